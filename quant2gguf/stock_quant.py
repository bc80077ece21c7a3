"""Learned parameters in stock llama.cpp types (issue 10): fit a stock type's grid to a weight, then
let a method round onto it.

`fit(w, qtype, imp)` chooses every stored parameter but the codes (Q4_0's fp16 d; the K types' fp16
super scales and 6-bit integer sub-scales / sub-mins) to minimise the importance-weighted error
sum_k imp_k (w_k - y_k)^2 of round-to-nearest codes, as llama.cpp's imatrix quantizers do: per
sub-block a few candidate scales around the max-abs (symmetric types) or min-max (Q4_K) one, each
with its least-squares refit (make_qx_quants / make_qkx2_quants); then, for the K types, a few
candidate super scales with each sub-scale rounded down or up, every candidate scored on the values
exactly as stored. The grid is one affine map per sub-block, y = a*q + b (stock_types.grid), which
RTN rounds onto directly and GPTQ column by column (static groups). `finish(fit, codes)` packs the
blocks with stock_types.pack into a StockWeight, whose dequantize() is ggml's (bit-exact).

A K-type target needs in-dims that are multiples of 256; like llama-quantize, a tensor that cannot
take it falls back, here to Q4_0 (the one block-32 type in stock_types; llama-quantize picks IQ4_NL
for Q3_K and Q5_0 for Q4_K). The checkpoint records every tensor's type.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .quantizer import QuantizedWeight, codes_for
from .stock_types import REGISTRY, stock_type

TARGETS = {name.lower(): name for name in REGISTRY}  # --target value -> stock type name
FALLBACK = "Q4_0"
ROWS = 1024  # rows fitted at once: bounds the candidates' temporaries to a few copies of ROWS x K


def target_type(target: str) -> str:
    """The stock type name of a --target value (q3_k -> Q3_K)."""
    name = TARGETS.get(str(target).lower())
    if name is None:
        raise ValueError(f"--target {target}: unknown stock type; use --target {' | '.join(TARGETS)} "
                         f"(or leave it out for our own Q3_G types)")
    return name


def tensor_type(name: str, target: str, k: int) -> str:
    """The stock type a linear with in-dim k gets under `target`: the target, else the fallback."""
    t = target_type(target)
    for cand in (t, FALLBACK):
        if k % stock_type(cand).block_size == 0:
            return cand
    raise ValueError(f"{name}: input dim {k} is not a multiple of {stock_type(FALLBACK).block_size}, the smallest "
                     f"stock block ({FALLBACK}); quantize this model without --target")


def linear_type(ctx, name: str) -> str:
    """The stock type of linear `name` in a LayerContext's layer under its cfg.target."""
    return tensor_type(f"{ctx.arch.layers}.{ctx.index}.{name}", ctx.cfg.target, ctx.linear(name).in_features)


def check_model(model, arch, target: str) -> dict[str, str]:
    """Every decoder linear's stock type under `target` (the first that can take none raises)."""
    from .arch import decoder_layers, get_module
    return {f"{arch.layers}.{i}.{n}": tensor_type(f"{arch.layers}.{i}.{n}", target, get_module(layer, n).in_features)
            for i, layer in enumerate(decoder_layers(model, arch)) for n in arch.linears}


def quant_config(target: str, model, arch):
    """(QuantConfig, the target's code bits, its block size) for a run into `target`, after checking
    every linear can take it or the fallback. cfg.group_size is the fallback's block, the finest any
    tensor gets, so calib.check_model's divisibility check agrees."""
    from .calib import QuantConfig
    name = target_type(target)
    check_model(model, arch, name)
    cls = stock_type(name)
    return QuantConfig(bits=cls.bits, group_size=stock_type(FALLBACK).block_size, target=name), cls.bits, cls.block_size


@dataclass
class StockWeight(QuantizedWeight):
    """A QuantizedWeight on a stock type's grid: codes (N, K), scales / offsets the fp32 a, b of each
    sub-block (group_size = sub-block), and the packed blocks llama.cpp reads, whose values
    dequantize() returns (through gguf-py's numpy, bit-exact with ggml)."""
    qtype: str = FALLBACK
    blocks: torch.Tensor | None = None  # uint8 (N, K // block_size * type_size)

    def dequantize(self) -> torch.Tensor:
        cls = stock_type(self.qtype)
        y = cls.dequantize(self.blocks.cpu().numpy()).reshape(self.shape)
        return torch.from_numpy(y).to(self.blocks.device)

    def to(self, device) -> "StockWeight":
        return StockWeight(self.codes.to(device), self.scales.to(device), self.offsets.to(device), self.bits,
                           self.group_size, qtype=self.qtype, blocks=self.blocks.to(device))


def _grid(cls, parts: dict, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = cls.grid(**parts)
    return (torch.from_numpy(np.ascontiguousarray(a)).reshape(n, -1).to(device),
            torch.from_numpy(np.ascontiguousarray(b)).reshape(n, -1).to(device))


def from_blocks(qtype: str, blocks: torch.Tensor) -> StockWeight:
    """The StockWeight stored as `blocks` (uint8 (N, row_bytes)): codes and grid unpacked from them."""
    cls = stock_type(qtype)
    n = blocks.shape[0]
    parts = cls.unpack(blocks.cpu().numpy())
    a, b = _grid(cls, parts, n, blocks.device)
    codes = torch.from_numpy(parts["q"]).reshape(n, -1).to(blocks.device)
    return StockWeight(codes, a, b, cls.bits, cls.sub, qtype=cls.qtype.name, blocks=blocks)


@dataclass
class Fit:
    """A stock type's parameters for one weight: `parts` (numpy, all but q) and their grid a, b
    (fp32 (N, K // sub)) on the weight's device."""
    qtype: str
    parts: dict
    a: torch.Tensor
    b: torch.Tensor

    @property
    def cls(self):
        return stock_type(self.qtype)


def finish(f: Fit, codes: torch.Tensor) -> StockWeight:
    """Pack codes (N, K) on the fitted grid into the stock blocks."""
    cls, n = f.cls, codes.shape[0]
    q = codes.to(torch.uint8).cpu().numpy().reshape(-1, cls.block_size)
    blocks = torch.from_numpy(cls.pack(**f.parts, q=q)).reshape(n, -1).to(codes.device)
    return StockWeight(codes.to(torch.uint8), f.a, f.b, cls.bits, cls.sub, qtype=f.qtype, blocks=blocks)


def round_codes(w: torch.Tensor, f: Fit) -> torch.Tensor:
    """Round-to-nearest codes (N, K) on the grid."""
    n, k = w.shape
    g = w.float().reshape(n, -1, f.cls.sub)
    return codes_for(g, f.a.unsqueeze(-1), f.b.unsqueeze(-1), f.cls.bits).reshape(n, k).to(torch.uint8)


@torch.no_grad()
def quantize_rtn(w: torch.Tensor, qtype: str, imp: torch.Tensor | None = None, search: bool = True) -> StockWeight:
    f = fit(w, qtype, imp, search)
    return finish(f, round_codes(w, f))


# ------------------------------------------------------------------------------ fitting ----

@torch.no_grad()
def fit(w: torch.Tensor, qtype: str, imp: torch.Tensor | None = None, search: bool = True) -> Fit:
    """Parameters of `qtype` for w (N, K) minimising sum imp_k (w - y)^2 under RTN codes; imp (K,)
    per input column (GPTQ: the Hessian diagonal), default uniform. search=False: stock_types'
    plain quantize_rtn parameters (max-abs / min-max, no search)."""
    cls = stock_type(qtype)
    n, k = w.shape
    if w.dim() != 2 or k % cls.block_size:
        raise ValueError(f"{qtype}: need a 2-D weight with rows a multiple of {cls.block_size}, got {tuple(w.shape)}")
    if not search:
        parts = cls.unpack(cls.quantize_rtn(w.detach().float().cpu().numpy()))
    else:
        x = w.detach().float()
        wt = torch.ones(k, device=x.device) if imp is None else imp.detach().float().to(x.device).clamp(min=0)
        wt = wt + 1e-6 * wt.mean() + 1e-30  # an all-dead sub-block still gets (uniformly weighted) parameters
        fitter = _FITTERS[cls.qtype.name]
        chunks = [fitter(r.reshape(r.shape[0], k // cls.block_size, -1, cls.sub),
                         wt.reshape(1, k // cls.block_size, -1, cls.sub)) for r in x.split(ROWS)]
        parts = {p: np.concatenate([c[p] for c in chunks]) for p in chunks[0]}
    parts.pop("q", None)
    a, b = _grid(cls, parts, n, w.device)
    return Fit(cls.qtype.name, parts, a, b)


def _err(x, wt, a, b, bits) -> torch.Tensor:
    """Weighted squared error of round-to-nearest codes per sub-block: x, wt (..., sub); a, b (...).
    In place on one temporary (this runs for every candidate); codes as codes_for's, but through
    1/a, which can round differently only within an ulp of a tie."""
    a, b = a.unsqueeze(-1), b.unsqueeze(-1)
    inv = torch.where(a != 0, 1 / torch.where(a != 0, a, 1), 0)  # a == 0: code 0, like codes_for
    r = (x - b).mul_(inv).round_().clamp_(0, 2**bits - 1)
    return r.mul_(a).add_(b).sub_(x).square_().mul_(wt).sum(-1)


def _ls(x, wt, L) -> tuple[torch.Tensor, torch.Tensor]:
    """sum w x L and sum w L^2 over the last dim."""
    wl = wt * L
    return (wl * x).sum(-1), wl.mul_(L).sum(-1)


def _keep(best: list | None, cand: list) -> list:
    """Element-wise, the one of two candidates (lists whose first entry is the error) erring less."""
    if best is None:
        return cand
    lt = cand[0] < best[0]
    return [torch.where(lt, c, b) for c, b in zip(cand, best)]


def _fit_symmetric(x, wt, bits, store=lambda s: s, steps: int = 9) -> torch.Tensor:
    """Per sub-block the scale s of y = s * (q - z), z = 2**(bits-1), with the least weighted error
    among the max-abs one (the extreme weight at q = 0) and make_qx_quants' candidates: L rounded at
    iscale = -(z + 0.1 t) / max, t in -steps..steps, each refitted by least squares. `store` rounds a
    scale as it will be kept (fp16 for Q4_0), so candidates are scored as stored."""
    z = 2 ** (bits - 1)
    amax = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    safe = torch.where(amax == 0, torch.ones_like(amax), amax)
    s0 = store(-amax / z)
    best = [_err(x, wt, s0, -z * s0, bits), s0]
    for t in range(-steps, steps + 1):
        L = torch.round(x * (-(z + 0.1 * t) / safe).unsqueeze(-1)).clamp_(-z, z - 1)
        num, den = _ls(x, wt, L)
        s = store(torch.where(den > 0, num / den.clamp(min=1e-30), s0))
        best = _keep(best, [_err(x, wt, s, -z * s, bits), s])
    return best[1]


def _fit_min(x, wt, bits, rmin: float = -1.0, rdelta: float = 0.1, nstep: int = 20):
    """Per sub-block (s >= 0, mn >= 0) of y = s * q - mn, least weighted error among min-max (min
    clamped <= 0) and make_qkx2_quants' candidates: L rounded at iscale = (qmax + rmin + rdelta t) /
    (max - min), each refitted by weighted least squares with the offset kept <= 0."""
    qmax = 2**bits - 1
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)
    rng = hi - lo
    best = [_err(x, wt, rng / qmax, lo, bits), rng / qmax, -lo]
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    sw, swx = wt.sum(-1), (wt * x).sum(-1)
    for t in range(nstep + 1):
        L = torch.round((x - lo.unsqueeze(-1)) * ((qmax + rmin + rdelta * t) / safe).unsqueeze(-1)).clamp_(0, qmax)
        swlx, swl2 = _ls(x, wt, L)
        swl = (wt * L).sum(-1)
        det = swl2 * sw - swl * swl
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s, b = (sw * swlx - swl * swx) / det, (swl2 * swx - swl * swlx) / det
        pos = b > 0  # the offset must stay <= 0 (stored as a non-negative sub-min): refit s alone
        s = torch.where(pos, swlx / swl2.clamp(min=1e-30), s).clamp(min=0)
        b = torch.where(pos, torch.zeros_like(b), b)
        e = torch.where(ok, _err(x, wt, s, b, bits), torch.inf)
        best = _keep(best, [e, s, -b])
    return best[1], best[2]


def _half(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(-65504, 65504).half()


def _ints(v, d, lo: int, hi: int):
    """floor and ceil of v / d (fp16 d, broadcast), clamped to lo..hi; 0 where d == 0."""
    df = d.float()
    r = torch.where(df != 0, v / torch.where(df != 0, df, torch.ones_like(df)), torch.zeros_like(v))
    return [r.floor().clamp(lo, hi), r.ceil().clamp(lo, hi)]


def _np16(t):
    return t.reshape(-1).cpu().numpy().astype("<f2")


def _fit_q4_0(x, wt) -> dict:
    d = _half(_fit_symmetric(x, wt, 4, store=lambda s: _half(s).float()))
    return {"d": _np16(d)}


def _fit_q3_k(x, wt) -> dict:
    """Sub-scales as _fit_symmetric; super scale d among candidates mapping the largest sub-scale to
    -32..-30 or 29..31 (llama.cpp: -32), each sub-scale rounded down or up, scored as stored."""
    s = _fit_symmetric(x, wt, 3)  # (..., 16)
    smax = s.gather(-1, s.abs().argmax(-1, keepdim=True))
    best = None
    for c in (-32, -31.5, -31, -30.5, -30, 31, 30.5, 30, 29.5, 29):
        d = _half(smax / c)
        pick = None
        for sc in _ints(s, d, -32, 31):
            a = d.float() * sc
            pick = _keep(pick, [_err(x, wt, a, -4 * a, 3), sc])
        best = _keep(best, [pick[0].sum(-1, keepdim=True), d, pick[1]])
    _, d, sc = best
    return {"d": _np16(d), "sc": sc.reshape(-1, 16).cpu().numpy().astype(np.int8)}


def _fit_q4_k(x, wt) -> dict:
    """Sub-scales and sub-mins as _fit_min; super scale and super min among candidates mapping the
    largest of each to 61..63 (llama.cpp: 63), each sub-scale and sub-min rounded down or up."""
    s, mn = _fit_min(x, wt, 4)  # (..., 8) each
    smax, mmax = s.amax(-1, keepdim=True), mn.amax(-1, keepdim=True)
    best = None
    for cd in (63, 62, 61):
        for cm in (63, 62, 61):
            d, dmin = _half(smax / cd), _half(mmax / cm)
            pick = None
            for sc in _ints(s, d, 0, 63):
                for m in _ints(mn, dmin, 0, 63):
                    pick = _keep(pick, [_err(x, wt, d.float() * sc, -(dmin.float() * m), 4), sc, m])
            best = _keep(best, [pick[0].sum(-1, keepdim=True), d, dmin, pick[1], pick[2]])
    _, d, dmin, sc, m = best
    u8 = lambda t: t.reshape(-1, 8).cpu().numpy().astype(np.uint8)  # noqa: E731
    return {"d": _np16(d), "dmin": _np16(dmin), "sc": u8(sc), "m": u8(m)}


_FITTERS = {"Q4_0": _fit_q4_0, "Q3_K": _fit_q3_k, "Q4_K": _fit_q4_k}
