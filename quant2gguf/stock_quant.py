"""Learned parameters in stock llama.cpp types (issue 10): fit a stock type's grid to a weight, then
let a method round onto it.

`fit(w, qtype, imp)` chooses every stored parameter but the codes (the block-32 types' fp16 d, and
Q5_1's m; the K types' fp16 super scales and 6- or 8-bit integer sub-scales / sub-mins) to minimise
the importance-weighted error sum_k imp_k (w_k - y_k)^2 of round-to-nearest codes, as llama.cpp's
imatrix quantizers do: per sub-block a few candidate scales around the max-abs (symmetric types) or
min-max (Q4_K, Q5_K, Q5_1) one, each
with its least-squares refit (make_qx_quants / make_qkx2_quants); then, for the K types, a few
candidate super scales with each sub-scale rounded down or up, every candidate scored on the values
exactly as stored. The grid is one affine map per sub-block, y = a*q + b (stock_types.grid), which
RTN rounds onto directly and GPTQ column by column (static groups). `finish(fit, codes)` packs the
blocks with stock_types.pack into a StockWeight, whose dequantize() is ggml's (bit-exact).

A recipe target (q3_k_s/m/l, q4_k_s/m) gives each decoder linear the type llama-quantize's
llama_tensor_get_type gives it in that mix (recipe_type). A K-type needs in-dims that are multiples
of 256; a tensor that cannot take it falls back as in llama-quantize (tensor_type_fallback): Q3_K to
Q4_0, Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0. The checkpoint records every tensor's type (`types`)
and the fallbacks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .quantizer import QuantizedWeight, codes_for
from .stock_types import REGISTRY, stock_type

# llama-quantize's mixed recipes (llama_tensor_get_type in src/llama-quant.cpp): each one's base type
RECIPES = {"Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K"}
TARGETS = {name.lower(): name for name in [*REGISTRY, *RECIPES]}  # --target value -> stock type or recipe name
FALLBACK = "Q4_0"  # the finest block any tensor gets (cfg.group_size)
# llama-quantize's fallback for an in-dim the type's 256-block cannot take (tensor_type_fallback)
LLAMA_FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
ROWS = 1024  # rows fitted at once: bounds the candidates' temporaries to a few copies of ROWS x K


def target_type(target: str) -> str:
    """The stock type or recipe name of a --target value (q3_k -> Q3_K, q3_k_m -> Q3_K_M)."""
    name = TARGETS.get(str(target).lower())
    if name is None:
        raise ValueError(f"--target {target}: unknown stock type; use --target {' | '.join(TARGETS)} "
                         f"(or leave it out for our own Q3_G types)")
    return name


def base_type(target: str) -> str:
    """The stock type most tensors of `target` get (a recipe's base type, else the type itself)."""
    t = target_type(target)
    return RECIPES.get(t, t)


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def recipe_type(name: str, target: str, layer: int = 0, n_layers: int = 1, is_70b: bool = False) -> str:
    """The type llama-quantize's recipe gives decoder linear `name` (an HF name: .v_proj, .qkv_proj,
    .o_proj, .down_proj ...) of layer `layer` of `n_layers`, before any fallback; a plain type
    target gives itself. Dense, non-Falcon models only (no n_expert rules); attn_v's index is the
    layer's, as llama-quantize's i_attention_wv counter is for one attn_v (or fused qkv) per layer.
    is_70b: llama.cpp's LLM_TYPE_70B (80 layers: llama with GQA, qwen2), whose attn_v gets Q5_K."""
    t = target_type(target)
    if t not in RECIPES:
        return t
    want, i, n = RECIPES[t], layer, n_layers
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("v_proj", "qkv_proj"):  # category_is_attn_v: fused qkv takes attn_v's rule first
        want = {"Q3_K_M": "Q5_K" if i < 2 else "Q4_K", "Q3_K_L": "Q5_K",
                "Q4_K_M": "Q6_K" if _use_more_bits(i, n) else want,
                "Q4_K_S": "Q5_K" if i < 4 else want}.get(t, want)
        if is_70b and want in ("Q3_K", "Q4_K"):
            want = "Q5_K"
    elif leaf == "down_proj":
        want = {"Q3_K_M": "Q5_K" if i < n // 16 else "Q4_K",  # non-Falcon: Q4_K past the first 1/16
                "Q3_K_L": "Q5_K", "Q4_K_M": "Q6_K" if _use_more_bits(i, n) else want,
                "Q4_K_S": "Q5_K" if i < n // 8 else want}.get(t, want)
    elif leaf == "o_proj":
        want = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(t, want)
    return want


def tensor_type(name: str, target: str, k: int, layer: int = 0, n_layers: int = 1, is_70b: bool = False) -> str:
    """The stock type a linear with in-dim k gets under `target`: the recipe's (or the plain
    target's) type, else the fallback."""
    t = recipe_type(name, target, layer, n_layers, is_70b)
    for cand in (t, LLAMA_FALLBACK.get(t, t)):
        if k % stock_type(cand).block_size == 0:
            return cand
    # llama-quantize would store it F16; our checkpoints hold no unquantized decoder linear
    raise ValueError(f"{name}: input dim {k} is not a multiple of {stock_type(FALLBACK).block_size}, the smallest "
                     f"stock block ({FALLBACK}); quantize this model without --target")


def linear_type(ctx, name: str) -> str:
    """The stock type of linear `name` in a LayerContext's layer, as quant_config chose it."""
    full = f"{ctx.arch.layers}.{ctx.index}.{name}"
    if ctx.cfg.types and full in ctx.cfg.types:
        return ctx.cfg.types[full]
    return tensor_type(full, ctx.cfg.target, ctx.linear(name).in_features)


def is_70b(model, arch) -> bool:
    """llama.cpp's LLM_TYPE_70B (src/models/llama.cpp, qwen2.cpp): 80 layers, llama with GQA or qwen2."""
    c = model.config
    if getattr(c, "num_hidden_layers", 0) != 80:
        return False
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return arch.name == "qwen2" or (arch.name in ("llama", "mistral") and kv != c.num_attention_heads)


def check_model(model, arch, target: str) -> dict[str, str]:
    """Every decoder linear's stock type under `target` (the first that can take none raises)."""
    from .arch import decoder_layers, get_module
    layers = decoder_layers(model, arch)
    big = is_70b(model, arch)
    return {f"{arch.layers}.{i}.{n}": tensor_type(f"{arch.layers}.{i}.{n}", target, get_module(layer, n).in_features,
                                                  i, len(layers), big)
            for i, layer in enumerate(layers) for n in arch.linears}


def fallbacks(model, arch, target: str) -> dict[str, str]:
    """The linears whose recipe type their in-dim cannot take: name -> "WANT -> GOT", GOT being
    llama-quantize's fallback (tensor_type raises where llama-quantize would keep F16)."""
    from .arch import decoder_layers, get_module
    layers = decoder_layers(model, arch)
    big, out = is_70b(model, arch), {}
    for i, layer in enumerate(layers):
        for n in arch.linears:
            full, k = f"{arch.layers}.{i}.{n}", get_module(layer, n).in_features
            want = recipe_type(full, target, i, len(layers), big)
            got = tensor_type(full, target, k, i, len(layers), big)
            if got != want:
                out[full] = f"{want} -> {got}"
    return out


def quant_config(target: str, model, arch):
    """(QuantConfig, the target's code bits, its block size) for a run into `target`, after checking
    every linear can take its type or the fallback; cfg.types holds each linear's type. Bits and
    block are the (recipe's) base type's; cfg.group_size is the fallback's block, the finest any
    tensor gets, so calib.check_model's divisibility check agrees."""
    from .calib import QuantConfig
    name = target_type(target)
    types = check_model(model, arch, name)
    cls = stock_type(base_type(name))
    cfg = QuantConfig(bits=cls.bits, group_size=stock_type(FALLBACK).block_size, target=name, types=types)
    return cfg, cls.bits, cls.block_size


@dataclass
class StockWeight(QuantizedWeight):
    """A QuantizedWeight on a stock type's grid: codes (N, K), scales / offsets the fp32 a, b of each
    sub-block (group_size = sub-block), and the packed blocks llama.cpp reads, whose values
    dequantize() returns (through gguf-py's numpy, bit-exact with ggml).

    packed() gives the lean form, which holds the blocks alone (codes, scales and offsets None as
    stored): reading `codes`, `scales` or `offsets` unpacks them from the blocks (from_blocks), the
    same values bit for bit, so a run holds ~3.4 bits a weight (Q3_K) instead of a byte of codes and
    two fp32 grids beside the blocks."""
    qtype: str = FALLBACK
    blocks: torch.Tensor | None = None  # uint8 (N, K // block_size * type_size)

    @property
    def is_lean(self) -> bool:
        """Whether only the blocks are held (codes, scales, offsets derived from them on access)."""
        return self.__dict__.get("codes") is None and self.blocks is not None

    @property
    def is_packed(self) -> bool:
        return self.is_lean

    @property
    def shape(self) -> tuple[int, int]:
        if not self.is_lean:
            return tuple(self.stored_codes.shape)
        cls = stock_type(self.qtype)
        n, row = self.blocks.shape
        return (n, row // cls.type_size * cls.block_size)

    def dequantize(self) -> torch.Tensor:
        cls = stock_type(self.qtype)
        y = cls.dequantize(self.blocks.cpu().numpy()).reshape(self.shape)
        return torch.from_numpy(y).to(self.blocks.device)

    def packed(self) -> "StockWeight":
        """The lean form: the blocks alone (what the checkpoint stores); codes and grid unpack from them."""
        return self if self.is_lean else self._lean(self.blocks)

    def _lean(self, blocks: torch.Tensor) -> "StockWeight":
        return StockWeight(None, None, None, self.bits, self.group_size, qtype=self.qtype, blocks=blocks)

    def rows(self, idx: torch.Tensor) -> "StockWeight":
        """Rows `idx`, lean (blocks rows are independent: nothing is unpacked)."""
        return self._lean(self.blocks[idx].contiguous())

    def to(self, device) -> "StockWeight":
        if self.is_lean:
            return self._lean(self.blocks.to(device))
        return StockWeight(self.codes.to(device), self.scales.to(device), self.offsets.to(device), self.bits,
                           self.group_size, qtype=self.qtype, blocks=self.blocks.to(device))


def _derived(field: str) -> property:
    """StockWeight.FIELD: as held, or (lean) unpacked from the blocks on each access."""
    def get(self):
        v = self.__dict__.get(field)
        if v is None and self.is_lean:
            return getattr(from_blocks(self.qtype, self.blocks), field)
        return v

    def set_(self, v) -> None:
        self.__dict__[field] = v
    return property(get, set_, doc=f"{field} as held, or unpacked from the blocks when lean")


# set after the dataclass is made (a class attribute named like a field would be taken for its default)
for _f in ("codes", "scales", "offsets"):
    setattr(StockWeight, _f, _derived(_f))
del _f


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
    """Parameters of `qtype` for w (N, K) minimising sum e_nk (w - y)^2 under RTN codes, e the weights
    llama.cpp's importance-matrix quantizer gives (element_weights: imp_k * sqrt(sigma2 + w_nk^2)); imp
    (K,) per input column (E[x^2]; GPTQ: the Hessian diagonal), default uniform. search=False: stock_types'
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
        shape = lambda t: t.reshape(t.shape[0], k // cls.block_size, -1, cls.sub)  # noqa: E731
        chunks = [fitter(shape(r), shape(element_weights(r, wt, cls.qtype.name) if imp is not None else wt[None]))
                  for r in x.split(ROWS)]
        parts = {p: np.concatenate([c[p] for c in chunks]) for p in chunks[0]}
    parts.pop("q", None)
    a, b = _grid(cls, parts, n, w.device)
    return Fit(cls.qtype.name, parts, a, b)


# llama.cpp's imatrix quantizers (ggml-quants.c quantize_row_*_impl) weight weight j's error by
# imp_j * sqrt(sigma2 + w_j^2): the importance alone under-protects the large weights a row leans on.
# sigma2 = SIGMA2[type][0] * mean w^2 over a 256-block ("block") or the whole row ("row"); Q6_K
# (its sigma2 term is commented out there) and Q8_0 (quantized without the imatrix) take imp alone.
SIGMA2 = {"Q3_K": (2.0, "block"), "Q4_K": (2.0, "block"), "Q5_K": (2.0, "block"),
          "Q4_0": (1.0, "row"), "Q5_0": (1.0, "row"), "Q5_1": (1.0, "row")}


def element_weights(w: torch.Tensor, imp: torch.Tensor, qtype: str) -> torch.Tensor:
    """(N, K) per-weight error weights of llama.cpp's importance-matrix quantizer for `qtype`: imp (K,)
    times sqrt(sigma2 + w^2) (SIGMA2), or imp broadcast where that type takes the importance alone."""
    n, k = w.shape
    if qtype not in SIGMA2:
        return imp.expand(n, k)
    c, over = SIGMA2[qtype]
    sq = w.square().reshape(n, -1, 256 if over == "block" else k)  # a row is one block of k
    return imp * (c * sq.mean(-1, keepdim=True) + sq).sqrt_().reshape(n, k)


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


def _fit_sym32(x, wt, bits: int) -> dict:
    """Q4_0/Q5_0/Q8_0: one fp16 scale per block of 32, searched as stored."""
    d = _half(_fit_symmetric(x, wt, bits, store=lambda s: _half(s).float()))
    return {"d": _np16(d)}


def _fit_q5_1(x, wt) -> dict:
    """Scale and offset as _fit_min (offset <= 0, as the K types' sub-mins; llama.cpp's min may be
    positive), stored as fp16 d and m."""
    s, mn = _fit_min(x, wt, 5)
    return {"d": _np16(_half(s)), "m": _np16(_half(-mn))}


def _fit_sym_k(x, wt, bits: int, lo: int, hi: int, cands) -> dict:
    """Q3_K/Q6_K: sub-scales as _fit_symmetric; super scale d among candidates mapping the largest
    sub-scale to each of `cands` (llama.cpp: lo), each sub-scale rounded down or up, scored as stored."""
    s = _fit_symmetric(x, wt, bits)  # (..., 16)
    smax = s.gather(-1, s.abs().argmax(-1, keepdim=True))
    z = 2 ** (bits - 1)
    best = None
    for c in cands:
        d = _half(smax / c)
        pick = None
        for sc in _ints(s, d, lo, hi):
            a = d.float() * sc
            pick = _keep(pick, [_err(x, wt, a, -z * a, bits), sc])
        best = _keep(best, [pick[0].sum(-1, keepdim=True), d, pick[1]])
    _, d, sc = best
    return {"d": _np16(d), "sc": sc.reshape(-1, 16).cpu().numpy().astype(np.int8)}


def _fit_q3_k(x, wt) -> dict:
    return _fit_sym_k(x, wt, 3, -32, 31, (-32, -31.5, -31, -30.5, -30, 31, 30.5, 30, 29.5, 29))


def _fit_q6_k(x, wt) -> dict:
    return _fit_sym_k(x, wt, 6, -128, 127, (-128, -127.5, -127, -126.5, -126, 127, 126.5, 126, 125.5, 125))


def _fit_min_k(x, wt, bits: int) -> dict:
    """Q4_K/Q5_K: sub-scales and sub-mins as _fit_min; super scale and super min among candidates
    mapping the largest of each to 61..63 (llama.cpp: 63), each sub-scale and sub-min rounded down or up."""
    s, mn = _fit_min(x, wt, bits)  # (..., 8) each
    smax, mmax = s.amax(-1, keepdim=True), mn.amax(-1, keepdim=True)
    best = None
    for cd in (63, 62, 61):
        for cm in (63, 62, 61):
            d, dmin = _half(smax / cd), _half(mmax / cm)
            pick = None
            for sc in _ints(s, d, 0, 63):
                for m in _ints(mn, dmin, 0, 63):
                    pick = _keep(pick, [_err(x, wt, d.float() * sc, -(dmin.float() * m), bits), sc, m])
            best = _keep(best, [pick[0].sum(-1, keepdim=True), d, dmin, pick[1], pick[2]])
    _, d, dmin, sc, m = best
    u8 = lambda t: t.reshape(-1, 8).cpu().numpy().astype(np.uint8)  # noqa: E731
    return {"d": _np16(d), "dmin": _np16(dmin), "sc": u8(sc), "m": u8(m)}


_FITTERS = {"Q4_0": lambda x, wt: _fit_sym32(x, wt, 4), "Q5_0": lambda x, wt: _fit_sym32(x, wt, 5),
            "Q8_0": lambda x, wt: _fit_sym32(x, wt, 8), "Q5_1": _fit_q5_1, "Q3_K": _fit_q3_k,
            "Q4_K": lambda x, wt: _fit_min_k(x, wt, 4), "Q5_K": lambda x, wt: _fit_min_k(x, wt, 5), "Q6_K": _fit_q6_k}
