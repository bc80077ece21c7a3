"""AWQ baseline (Lin et al. 2023, arXiv 2306.00978), and the scale search QuantLRM plugs into.

Per group of linears sharing an input (arch.py): s = stat^alpha over input channels, alpha on a
20-point grid 0, 0.05, ..., 0.95, normalised by sqrt(max*min); weights are scaled by s, quantized,
divided back, and the alpha with the lowest MSE of the group's outputs (the concatenated outputs
of its linears, an architecture-free stand-in for AWQ's sub-block output) wins. 1/s is folded into
the preceding norm or linear, so inference pays nothing. Then a per-group clip search weighted by
the input's second moment. `stat` is mean|x| (AWQ) or any per-channel importance (QuantLRM).
Groups whose producer cannot absorb the scale exactly keep s = 1 (no fold, no scaling): v_proj ->
o_proj under GQA, and phi3's fused qkv_proj -> o_proj under GQA (arch.Group.prev_part).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..arch import get_module
from ..calib import LayerContext
from ..quantizer import QuantizedWeight, fake_quant, fit_params, quantize, search_clip

ALPHAS = [i / 20 for i in range(20)]
MAX_TOKENS = 8192  # tokens kept for the alpha search (the statistics use all of them)


class InputStats:
    """Forward-hook callback: mean |x|, mean x^2 per channel, and a token sample."""

    def __init__(self, k: int, device, keep: int = MAX_TOKENS):
        self.abs = torch.zeros(k, device=device)
        self.sq = torch.zeros(k, device=device)
        self.n, self.keep, self.sample = 0, keep, []

    def __call__(self, x: torch.Tensor) -> None:
        x = x.float()
        self.abs += x.abs().sum(0)
        self.sq += (x * x).sum(0)
        self.n += x.shape[0]
        have = sum(s.shape[0] for s in self.sample)
        if have < self.keep:
            idx = torch.randperm(x.shape[0], device=x.device)[: self.keep - have]
            self.sample.append(x[idx])

    def mean_abs(self) -> torch.Tensor:
        return self.abs / max(self.n, 1)

    def mean_sq(self) -> torch.Tensor:
        return self.sq / max(self.n, 1)

    def tokens(self) -> torch.Tensor:
        return torch.cat(self.sample)


def _part(ctx: LayerContext, prev: str) -> tuple[int, int]:
    """arch.Group.prev_part of the group fed by `prev`: which row chunk of its output is the input."""
    arch = getattr(ctx, "arch", None)
    return next((g.prev_part for g in arch.groups if g.prev == prev), (0, 1)) if arch else (0, 1)


def _rows(ctx: LayerContext, prev: str, k: int) -> slice | None:
    """The rows of linear `prev` whose outputs are the group's input, or None when they are not k
    whole output channels in order: v_proj under GQA (fewer rows than o_proj's input, each shared
    by several query heads), or phi3's fused qkv_proj under GQA (its last third is not v). Folding
    there would not be exact, so those groups are skipped (s = 1) rather than folded wrongly."""
    mod = get_module(ctx.layer, prev)
    i, n = _part(ctx, prev)
    if mod.out_features != n * k:
        return None
    return slice(i * k, (i + 1) * k)


def can_fold(ctx: LayerContext, prev: str, k: int) -> bool:
    mod = get_module(ctx.layer, prev)
    if isinstance(mod, torch.nn.Linear):
        return _rows(ctx, prev, k) is not None
    return _part(ctx, prev) == (0, 1) and getattr(mod, "weight", None) is not None and mod.weight.shape[-1] == k


@torch.no_grad()
def fold(ctx: LayerContext, prev: str, s: torch.Tensor) -> None:
    """Divide the producer's output channels by s: a linear's rows and bias (for a fused producer
    only the rows that are the group's input: the v third of phi3's qkv_proj under MHA, the up
    half of gate_up_proj, which only multiplies act(gate), so the function is unchanged), or a
    norm's gain norm_offset + weight (gemma's (1 + w) RMSNorm: w' = (1 + w) / s - 1)."""
    mod = get_module(ctx.layer, prev)
    if isinstance(mod, torch.nn.Linear):
        rows = _rows(ctx, prev, s.numel())
        if rows is None:  # no exact fold (can_fold is False): only s = 1 is a no-op
            if bool((s == 1).all()):
                return
            raise ValueError(f"{prev}: its outputs are not the scaled input channels; AWQ cannot fold here")
        mod.weight[rows].div_(s.view(-1, 1).to(mod.weight.dtype))
        if mod.bias is not None:
            mod.bias[rows].div_(s.to(mod.bias.dtype))
    else:
        arch = getattr(ctx, "arch", None)
        off = arch.norm_offset if arch else 0.0
        w = mod.weight.data
        if off:
            w.copy_(((w.float() + off) / s.float() - off).to(w.dtype))
        else:
            w.div_(s.to(w.dtype))


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], x: torch.Tensor, stat: torch.Tensor, bits: int, group_size: int,
                 alphas=ALPHAS) -> tuple[torch.Tensor, float, list[float]]:
    """The alpha minimising || x W^T - x (Q(W s)/s)^T ||^2 over the group's linears; returns (s, alpha, losses)."""
    ref = [x @ w.float().t() for w in weights]
    stat = stat.float().clamp(min=1e-4)
    best = (None, 0.0, float("inf"))
    losses = []
    for a in alphas:
        s = stat.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, y in zip(weights, ref):
            ws = w.float() * s
            d, m = fit_params(ws, bits, group_size)
            g = ws.reshape(ws.shape[0], -1, group_size)
            wq = fake_quant(g, d.unsqueeze(-1), m.unsqueeze(-1), bits).reshape(ws.shape) / s
            loss += ((x @ wq.t() - y) ** 2).mean().item()
        losses.append(loss)
        if loss < best[2]:
            best = (s, a, loss)
    return best[0], best[1], losses


def quantize_layer(ctx: LayerContext, clip: bool = True,
                   importance: Callable[[LayerContext, str, InputStats], torch.Tensor] | None = None,
                   protect: Callable[[LayerContext, str, torch.Tensor], torch.Tensor | None] | None = None,
                   ) -> dict[str, QuantizedWeight]:
    """AWQ over the layer's groups. `importance(ctx, group_first_linear, stats)` replaces mean|x|
    (QuantLRM); `protect(ctx, linear, scaled_w)` returns a bool mask of weights kept in fp16."""
    c = ctx.cfg
    second_moment = {}
    # Phase 1 (as llm-awq): search and apply every group's scale on unquantized weights, in order,
    # so a fold into an earlier linear (v_proj, up_proj) never touches quantized weights.
    for group in ctx.arch.groups:
        lins = [ctx.linear(n) for n in group.linears]
        k = lins[0].in_features
        st = InputStats(k, ctx.device)
        ctx.forward(ctx.q_in, hooks={group.linears[0]: st}, keep=False)
        s = torch.ones(k, device=ctx.device)
        if can_fold(ctx, group.prev, k):
            stat = importance(ctx, group.linears[0], st) if importance else st.mean_abs()
            s, _, _ = search_scale([l.weight.data for l in lins], st.tokens(), stat, c.bits, c.group_size)
            fold(ctx, group.prev, s)
            for l in lins:
                l.weight.data.mul_(s.view(1, -1).to(l.weight.dtype))
        for name in group.linears:
            second_moment[name] = st.mean_sq() / (s * s)  # of the scaled input x / s
    # Phase 2: clip search weighted by the input's second moment, then quantize.
    for name in ctx.arch.linears:
        w = ctx.linear(name).weight.data
        mask = protect(ctx, name, w) if protect else None
        ratio = search_clip(w, c.bits, c.group_size, x=second_moment[name], protect=mask) if clip else 1.0
        ctx.set_quantized(name, quantize(w, c.bits, c.group_size, clip=ratio, protect=mask, slots=c.slots))
    return dict(ctx.quantized)
