"""The one reference quantizer. Methods, Triton kernels, numpy/ggml packers and tests call or mirror it.

Asymmetric group quantization of a weight W (N out x K in); a group is G consecutive input
columns of one row:

    w = float(d) * q + float(m)        d, m fp16 (one pair per group), q in [0, 2**bits - 1]

Codes come from q = clamp(round_half_even((w - m) / d), 0, qmax) in fp32 with the fp16-rounded d, m.
d*q is exact in fp32 (11-bit mantissa times an integer < 256), so fused multiply-add and
multiply-then-add give identical fp32 bits: every backend agrees without caring about FMA.

Protected positions keep their exact fp16 weight: per group up to P slots, each an in-group index
(uint8, 255 = empty slot) and an fp16 value, exactly as the ggml "P" types store them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY = 255  # protected-slot index meaning "no weight in this slot"
FP16_MAX = 65504.0


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # uint8 (N, K)
    scales: torch.Tensor  # fp16 (N, K // G): d
    offsets: torch.Tensor  # fp16 (N, K // G): m
    bits: int
    group_size: int
    pidx: torch.Tensor | None = None  # uint8 (N, K // G, P): in-group index, EMPTY = unused
    pval: torch.Tensor | None = None  # fp16 (N, K // G, P): exact fp16 weight at that index

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def slots(self) -> int:
        return 0 if self.pidx is None else self.pidx.shape[-1]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.offsets, self.group_size, self.pidx, self.pval)

    def to(self, device) -> "QuantizedWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(mv(self.codes), mv(self.scales), mv(self.offsets), self.bits,
                               self.group_size, mv(self.pidx), mv(self.pval))


def check_weight(name: str, w: torch.Tensor, group_size: int) -> None:
    """Raise ValueError with the tensor's name if it cannot be group-quantized as asked."""
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    k = w.shape[1]
    if k % group_size:
        from .gguf_types import TYPES  # the group sizes our GGUF types hold (imported late: it imports us)
        sizes = sorted({t.group_size for t in TYPES.values()})
        ok = [g for g in sizes if k % g == 0]
        hint = (f"use --group-size {' or '.join(map(str, ok))}" if ok
                else f"no group size our types hold ({'/'.join(map(str, sizes))}) divides it")
        raise ValueError(f"{name}: input dim {k} is not divisible by group size {group_size} ({hint})")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"{name}: {bad} NaN/Inf weights; fix or re-export the model before quantizing")
    if w.abs().max().item() > FP16_MAX:
        raise ValueError(f"{name}: weights exceed the fp16 range (|w| > {FP16_MAX}); scales cannot be stored")


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    return w.float().reshape(n, k // group_size, group_size)


def fit_params(w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | float = 1.0,
               protect: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and offset per group, rounded to fp16. `clip` (scalar or (N, K//G)) shrinks
    the range [min*c, max*c]; `protect` (bool (N, K)) marks weights excluded from the range."""
    g = _groups(w, group_size)
    if protect is not None:
        p = protect.reshape(g.shape)
        lo = g.masked_fill(p, float("inf")).amin(-1)
        hi = g.masked_fill(p, float("-inf")).amax(-1)
        allp = p.all(-1)  # a fully protected group: any params work
        lo, hi = lo.masked_fill(allp, 0.0), hi.masked_fill(allp, 0.0)
    else:
        lo, hi = g.amin(-1), g.amax(-1)
    if not isinstance(clip, float) or clip != 1.0:
        lo, hi = lo * clip, hi * clip
    qmax = 2**bits - 1
    d = ((hi - lo) / qmax).to(torch.float16)
    m = lo.to(torch.float16)
    return d, m


def codes_for(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round((w - m) / d), 0, qmax) with matching shapes (broadcastable d, m); d == 0 gives 0."""
    df, mf = d.float(), m.float()
    safe = torch.where(df == 0, torch.ones_like(df), df)
    q = torch.round((w.float() - mf) / safe).clamp_(0, 2**bits - 1)
    return torch.where(df == 0, torch.zeros_like(q), q)


def fake_quant(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize with given fp16 params (broadcastable), in fp32."""
    return d.float() * codes_for(w, d, m, bits) + m.float()


def expand(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K//G) per-group values -> (N, K)."""
    return t.repeat_interleave(group_size, dim=-1)


def dequantize(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group_size: int,
               pidx: torch.Tensor | None = None, pval: torch.Tensor | None = None) -> torch.Tensor:
    """The deployed dequantization, fp32 (N, K)."""
    w = expand(d.float(), group_size) * codes.float() + expand(m.float(), group_size)
    if pidx is not None and pidx.numel():
        n, k = w.shape
        used = pidx != EMPTY
        base = torch.arange(k // group_size, device=w.device).view(1, -1, 1) * group_size
        col = (base + pidx.long()).masked_select(used)
        row = torch.arange(n, device=w.device).view(-1, 1, 1).expand_as(pidx).masked_select(used)
        w[row, col] = pval.float().masked_select(used)
    return w


def protect_slots(w: torch.Tensor, protect: torch.Tensor, group_size: int, slots: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a bool mask (N, K) with at most `slots` True per group into (pidx, pval)."""
    n, k = w.shape
    p = protect.reshape(n, k // group_size, group_size)
    if p.sum(-1).max().item() > slots:
        raise ValueError(f"more than {slots} protected weights in a group")
    # stable sort puts protected positions first, in index order
    order = torch.sort((~p).to(torch.uint8), dim=-1, stable=True).indices[..., :slots]
    used = torch.gather(p, -1, order)
    vals = torch.gather(w.reshape(n, k // group_size, group_size), -1, order).to(torch.float16)
    pidx = torch.where(used, order, torch.full_like(order, EMPTY)).to(torch.uint8)
    pval = torch.where(used, vals, torch.zeros_like(vals))
    return pidx, pval


def quantize(w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | float = 1.0,
             protect: torch.Tensor | None = None, slots: int = 0) -> QuantizedWeight:
    """RTN with optional clip ratio and protected positions (bool (N, K), <= slots per group)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    d, m = fit_params(w, bits, group_size, clip, protect)
    codes = codes_for(_groups(w, group_size), d.unsqueeze(-1), m.unsqueeze(-1), bits)
    codes = codes.reshape(w.shape).to(torch.uint8)
    pidx = pval = None
    if slots:
        if protect is None:
            protect = torch.zeros_like(w, dtype=torch.bool)
        pidx, pval = protect_slots(w, protect, group_size, slots)
    return QuantizedWeight(codes, d, m, bits, group_size, pidx, pval)


def search_clip(w: torch.Tensor, bits: int, group_size: int, grid: int = 20, min_ratio: float = 0.5,
                x: torch.Tensor | None = None, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group clip ratio in [min_ratio, 1] minimising the error of that group: weight MSE, or the
    output error sum_j x_j^2 (w_j - w'_j)^2 when a per-input-channel second moment x (K,) is given."""
    g = _groups(w, group_size)
    wt = torch.ones_like(g) if x is None else x.float().reshape(1, -1, group_size).expand_as(g)
    if protect is not None:  # protected weights are stored exactly: no error there
        wt = wt * (~protect.reshape(g.shape))
    best_err = torch.full(g.shape[:2], float("inf"), device=w.device)
    best = torch.ones(g.shape[:2], device=w.device)
    for i in range(grid):
        r = 1.0 - (1.0 - min_ratio) * i / max(grid - 1, 1)
        d, m = fit_params(w, bits, group_size, r, protect)
        err = ((fake_quant(g, d.unsqueeze(-1), m.unsqueeze(-1), bits) - g) ** 2 * wt).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best
