"""LoaQ (arXiv 2509.06297): closed-form output approximation, then GPTQ unchanged.

GPTQ fits the quantized layer to its own input, min ||X_hat Q^T - X_hat W^T||. LoaQ aims at the
full-precision output instead: min_Q ||X_hat Q^T - X W^T||^2, X = the linear's input in the FP
model, X_hat = its input in the partly quantized one. With H = X_hat^T X_hat, C = X_hat^T (X - X_hat):

    ||X_hat Q^T - X W^T||^2 = ||X_hat (Q - W~)^T||^2 + const,   W~^T = (I + H^-1 C) W^T,

so quantizing W~ = W + W C^T H^-1 under GPTQ's Hessian H is exactly LoaQ. X comes from a frozen
copy of the layer's FP weights run on the FP stream; X_hat from the layer being quantized run on
the quantized stream (earlier groups of this layer already quantized). H is damped as GPTQ damps
it before the solve (damp * mean(diag H)), which keeps W~ finite when X_hat is rank-deficient.
"""
from __future__ import annotations

import copy

import torch

from .. import stock_quant
from ..calib import LayerContext, run_layer
from ..quantizer import QuantizedWeight
from .gptq import gptq_quantize, gptq_stock


class Moments:
    """Accumulates H = 2 X_hat^T X_hat / n and C = 2 X_hat^T (X - X_hat) / n, batch by batch."""

    def __init__(self, k: int, device):
        self.h = torch.zeros(k, k, device=device, dtype=torch.float32)
        self.c = torch.zeros_like(self.h)
        self.n = 0

    def add(self, x: torch.Tensor, xq: torch.Tensor) -> None:
        x, xq = x.float(), xq.float()
        self.h.addmm_(xq.t(), xq, alpha=2.0)
        self.c.addmm_(xq.t(), x - xq, alpha=2.0)
        self.n += x.shape[0]

    def value(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(self.n, 1)
        return self.h / n, self.c / n


def target_weight(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, damp: float = 0.01,
                  alpha: float = 1.0) -> torch.Tensor:
    """W~ = W (I + H^-1 C)^T = W + W C^T H^-1 (H symmetric), H damped as GPTQ damps it.
    `alpha` scales the correction (1 = the paper's closed form, 0 = plain GPTQ)."""
    hd = h.double().clone()
    dead = torch.diag(hd) == 0
    hd[dead, dead] = 1
    hd.diagonal().add_(damp * torch.mean(torch.diag(hd)))
    # W C^T H^-1 = (H^-1 C W^T)^T
    corr = torch.cholesky_solve(c.double() @ w.double().t(), torch.linalg.cholesky(hd)).t()
    return (w.double() + alpha * corr).to(torch.float32)


@torch.no_grad()
def quantize_layer(ctx: LayerContext, damp: float = 0.01, clip: bool = True, act_order: bool | None = None,
                   static_groups: bool = False, alpha: float = 1.0) -> dict[str, QuantizedWeight]:
    """GPTQ on W~ (above); in a stock grid (cfg.target) GPTQ's stock path, act-order on by default as there."""
    c = ctx.cfg
    if act_order is None:
        act_order = bool(c.target)
    fp_layer = copy.deepcopy(ctx.layer)  # the layer's FP weights, before any group is quantized
    shift = {}
    for group in ctx.arch.groups:
        mom = {n: Moments(ctx.linear(n).in_features, ctx.device) for n in group.linears}
        for x_fp, x_q in zip(ctx.fp_in, ctx.q_in):
            got: dict[str, list] = {n: [None, None] for n in group.linears}
            fp_hooks = {n: (lambda x, n=n: got[n].__setitem__(0, x)) for n in group.linears}
            q_hooks = {n: (lambda x, n=n: got[n].__setitem__(1, x)) for n in group.linears}
            run_layer(fp_layer, [x_fp], ctx.kwargs, ctx.device, fp_hooks, keep=False)
            run_layer(ctx.layer, [x_q], ctx.kwargs, ctx.device, q_hooks, keep=False)
            for n, (x, xq) in got.items():
                mom[n].add(x, xq)
        for n in group.linears:
            h, cc = mom[n].value()
            w0 = ctx.linear(n).weight.data.float()
            w = target_weight(w0, h, cc, damp, alpha)
            shift[n] = float((w - w0).norm() / w0.norm().clamp_min(1e-30))
            if c.target:  # the stock grid is fitted to W~, weighted by diag H like GPTQ's
                q, pre = gptq_stock(w, h, stock_quant.linear_type(ctx, n), damp=damp, act_order=act_order,
                                    search=clip, return_prequant=True)
            else:
                q, pre = gptq_quantize(w, h, c.bits, c.group_size, damp=damp, act_order=act_order,
                                       static_groups=static_groups, clip=clip, return_prequant=True)
            ctx.set_quantized(n, q, prequant=pre)
        del mom
    ctx.stats["loaq_max_rel_shift"] = round(max(shift.values()), 4)  # how far W~ moved from W
    del fp_layer
    return dict(ctx.quantized)
