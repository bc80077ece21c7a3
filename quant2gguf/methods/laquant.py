"""LAQuant: layer-wise weight-only QAT with a one-layer lookahead loss (2026; no public code).

Our specification (an interpretation of the paper), every term switchable:

    Y = F_l(X_l),  Y_hat = F_l^q(X_hat_l)                    FP target vs quantized layer l
    L = ||Y_hat - Y||^2 + lam * ||F_{l+1}(Y_hat) - F_{l+1}(Y)||^2 + mu * KV(l+1)
    KV(l+1) = ||K_{l+1}(Y_hat) - K_{l+1}(Y)||^2 + ||V_{l+1}(Y_hat) - V_{l+1}(Y)||^2

F_{l+1} is the frozen FP next layer (K, V: its k/v projections of its normed input, what the KV
cache holds). Trainable: layer l's latent weights plus per-group scales and offsets, through the
fused Triton fake-quant (straight-through round, LSQ-style d/m gradients; kernels/fakequant.py).
Initialised from RTN, GPTQ, AWQ or LoaQ; AdamW with a cosine schedule; latent weights, scales and
offsets in units of each group's initial step (kd.FQLinear: rates in grid cells per step, 1e-4 for
the weights, 1e-3 for the quantizer; the latents start inside the init's rounding cells, so step 0 is
the init exactly). Inputs come from the quantized stream, targets from the FP stream. The result is kept only
if it lowers the loss on the calibration set against the initialisation (reported in the stats).

In a stock llama.cpp type (cfg.target, init rtn or gptq on that grid) the codes stay the init's and
what the format stores besides them is trained, as distillation does (kd.StockFQLinear: fp16 super
scales, integer sub-scales/mins through straight-through rounding); lr_q is then relative (a step in
units of each value's initial magnitude, default 1e-3). lr_w given there trains a learned rounding
offset per weight too (AutoRound's V, in grid steps, |v| <= 1: each code moves at most one step);
not given, the codes stay frozen.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch.func import functional_call

from ..arch import get_module
from ..calib import COMPUTE, LayerContext, run_layer
from ..quantizer import EMPTY, QuantizedWeight, codes_for, expand


def _targets(ctx: LayerContext, lam: float, mu: float):
    """Per batch: (Y, F_{l+1}(Y) or None, (K, V) of Y or None), all from the FP stream."""
    nxt = ctx.next_layer
    if nxt is None:
        lam = mu = 0.0
    out = []
    with torch.no_grad():
        for y in ctx.fp_out:
            y = y.to(ctx.device)
            la = run_layer(nxt, [y], ctx.next_kwargs, ctx.device)[0] if lam else None
            kv = _kv(ctx, y) if mu else None
            out.append((y, la, kv))
    return out, lam, mu


@contextmanager
def _lookahead(ctx: LayerContext):
    """The frozen next layer on the device, computing in COMPUTE (fp32) like layer l while the method
    runs: a model held in bf16/fp16 (--dtype, --stream) keeps layer l + 1 so until it is reached, and
    its targets and lookahead/KV terms must see the fp32 streams at fp32, as an fp32-loaded run does.
    Each of its tensors goes back to the dtype it was held in afterwards (exact: bf16 and fp16 values
    are fp32 values), so quantize_layers finds it as it left it."""
    nxt = ctx.next_layer
    if nxt is None:
        yield
        return
    nxt.to(ctx.device)
    held = [(t, t.dtype) for t in (*nxt.parameters(), *nxt.buffers()) if t.is_floating_point()]
    for t, dt in held:
        if dt != COMPUTE:
            t.data = t.data.to(COMPUTE)
    try:
        yield
    finally:
        for t, dt in held:
            if t.dtype != dt:
                t.data = t.data.to(dt)


def _kv(ctx: LayerContext, h: torch.Tensor):
    nxt = ctx.next_layer
    x = get_module(nxt, ctx.arch.groups[0].prev)(h)
    return tuple(get_module(nxt, n)(x) for n in ctx.arch.kv)


def _loss(ctx, yq, target, lam, mu):
    y, la, kv = target
    loss = torch.mean((yq - y) ** 2)
    if lam:
        loss = loss + lam * torch.mean((run_layer_grad(ctx.next_layer, yq, ctx.next_kwargs) - la) ** 2)
    if mu:
        for a, b in zip(_kv(ctx, yq), kv):
            loss = loss + mu * torch.mean((a - b) ** 2)
    return loss


def run_layer_grad(layer, x, kwargs):
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


STOCK_LR_Q = 1e-3  # relative, in a stock grid (kd.StockFQLinear's units)


# Our types: rates in grid cells per step (kd.FQLinear's units), the same move on a 135M model whose steps are
# ~0.1 and a 1.5B one whose steps are ~0.01. They are SmolLM2's former absolute rates (1e-5, 1e-4) in those units;
# on qwen15 the absolute ones moved scales ~1 % a step and the guard kept QAT in 9 of 28 layers (tenth run).
LR_W_REL, LR_Q_REL = 1e-4, 1e-3


INIT_OPTIONS = ("damp", "act_order", "alpha")  # options LAQuant hands to its init when the init reads them (GPTQ, LoaQ)


def quantize_layer(ctx: LayerContext, init: str = "gptq", epochs: int = 2, lr_w: float | None = None,
                   lr_q: float | None = None, lam: float = 1.0, mu: float = 1.0, batch_size: int = 1,
                   damp: float | None = None, act_order: bool | None = None,
                   alpha: float | None = None) -> dict[str, QuantizedWeight]:
    import inspect

    from . import METHODS
    c = ctx.cfg
    names = list(ctx.arch.linears)
    fp = {n: ctx.linear(n).weight.data.clone() for n in names}
    # --damp / --act-order reach a GPTQ-family init (the recipe LAQuant starts from is the one run alone)
    given = {"damp": damp, "act_order": act_order, "alpha": alpha}
    init_opts = {k: given[k] for k in INIT_OPTIONS
                 if given[k] is not None and k in inspect.signature(METHODS[init]).parameters}
    start = METHODS[init](ctx, **init_opts)  # sets the layer's weights to the initial dequantized values
    if c.target:
        from .kd import StockFQLinear
        train_codes = lr_w is not None and lr_w > 0  # not given: codes frozen
        fq = {n: StockFQLinear(ctx.linear(n), start[n], train_codes, ctx.prequant.get(n, fp[n])).to(ctx.device)
              for n in names}
        groups = [{"params": [p for m in fq.values() for p in m.qparams()], "lr": STOCK_LR_Q if lr_q is None else lr_q}]
        if train_codes:
            groups.append({"params": [m.v for m in fq.values()], "lr": lr_w})
        project = [m.project_ for m in fq.values()]

        def weights():
            return {f"{n}.weight": fq[n].weight_q() for n in names}

        def export():
            return {n: fq[n].export() for n in names}
    else:  # our types: kd.FQLinear, latent weights, d and m in units of each group's initial step
        from .kd import FQLinear
        fq = {n: FQLinear(ctx.linear(n), start[n], ctx.prequant.get(n, fp[n]), triton=None).to(ctx.device)
              for n in names}
        groups = [{"params": [m.latent for m in fq.values()], "lr": LR_W_REL if lr_w is None else lr_w},
                  {"params": [p for m in fq.values() for p in m.qparams()], "lr": LR_Q_REL if lr_q is None else lr_q}]
        project = []

        def weights():
            return {f"{n}.weight": fq[n].weight_q() for n in names}

        def export():
            return {n: fq[n].export() for n in names}
    for p in ctx.layer.parameters():
        p.requires_grad_(False)
    if ctx.next_layer is not None:
        for p in ctx.next_layer.parameters():
            p.requires_grad_(False)
    with _lookahead(ctx):  # layer l + 1 in fp32 on the device while the targets and loss use it
        targets, lam, mu = _targets(ctx, lam, mu)
        inputs = [x.to(ctx.device) for x in ctx.q_in]

        def total_loss(w: dict) -> float:
            with torch.no_grad():
                return sum(_loss(ctx, _fwd(ctx, w, x), t, lam, mu).item() for x, t in zip(inputs, targets))

        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        steps = max(1, epochs * math.ceil(len(inputs) / batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        before = total_loss({f"{n}.weight": start[n].dequantize().to(ctx.device) for n in names})
        for _ in range(epochs):
            for i in torch.randperm(len(inputs)).split(batch_size):
                w = weights()
                loss = sum(_loss(ctx, _fwd(ctx, w, inputs[j]), targets[j], lam, mu) for j in i.tolist())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for f in project:
                    f()
                sched.step()
        with torch.no_grad():
            after = total_loss(weights())
    result = export() if after < before else start
    for n, q in result.items():
        ctx.set_quantized(n, q)
    ctx.stats.update(qat_loss_before=before, qat_loss_after=after, qat_kept=after < before)
    return result


def _fwd(ctx, w, x):
    out = functional_call(ctx.layer, w, (x,), dict(ctx.kwargs))
    return out[0] if isinstance(out, tuple) else out


def _export(w, d, m, pidx, c) -> QuantizedWeight:
    """The exact deployed form of what the fake-quant computed."""
    d16, m16 = d.to(torch.float16), m.to(torch.float16)
    n, k = w.shape
    codes = codes_for(w, expand(d16, c.group_size), expand(m16, c.group_size), c.bits).to(torch.uint8)
    pval = None
    if pidx is not None:
        base = torch.arange(k // c.group_size, device=w.device).view(1, -1, 1) * c.group_size
        col = (base + pidx.long().clamp(max=c.group_size - 1))
        pval = torch.gather(w.view(n, 1, k).expand(n, k // c.group_size, k), 2, col).to(torch.float16)
        pval = torch.where(pidx == EMPTY, torch.zeros_like(pval), pval)
    return QuantizedWeight(codes.cpu(), d16.cpu(), m16.cpu(), c.bits, c.group_size,
                           None if pidx is None else pidx.cpu(), None if pval is None else pval.cpu())
