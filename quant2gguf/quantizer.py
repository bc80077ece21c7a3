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

import dataclasses
from dataclasses import dataclass

import torch

EMPTY = 255  # protected-slot index meaning "no weight in this slot"
FP16_MAX = 65504.0


PACK_CHUNK = 1 << 22  # codes per step of pack_codes / unpack_codes (bounds their int64 temporaries)


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes of one packed row of k codes: ceil(k / 8) chunks of 8 codes, `bits` bytes each."""
    return (k + 7) // 8 * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (N, K), each < 2**bits, as uint8 (N, packed_row_bytes(K, bits)): per row a
    little-endian bit stream (code j in stream bits [bits*j, bits*(j+1)), byte b holding stream bits
    8b..8b+7, lowest first), the row padded with zero codes to a multiple of 8 codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8 (N, K), got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    c = (k + 7) // 8
    out = torch.empty((n, c * bits), dtype=torch.uint8, device=codes.device)
    if n * k == 0:
        return out.zero_()
    if int(codes.max()) >> bits:
        raise ValueError(f"codes exceed {bits} bits (max {int(codes.max())})")
    shifts = torch.arange(8, device=codes.device) * bits  # code j of a chunk of 8
    to_bytes = torch.arange(bits, device=codes.device) * 8  # byte b of a chunk
    step = max(1, PACK_CHUNK // max(k, 1))
    for r in range(0, n, step):
        x = codes[r:r + step]
        if k % 8:
            x = torch.cat([x, x.new_zeros(x.shape[0], 8 * c - k)], 1)
        if bits == 8:
            out[r:r + step] = x
            continue
        v = (x.reshape(-1, c, 8).long() << shifts).sum(-1)  # disjoint bit ranges: sum == or, < 2**56
        out[r:r + step] = ((v.unsqueeze(-1) >> to_bytes) & 255).to(torch.uint8).reshape(-1, c * bits)
    return out


def unpack_codes(data: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """pack_codes' inverse: uint8 (N, packed_row_bytes(K, bits)) -> uint8 codes (N, K)."""
    n = data.shape[0]
    c = (k + 7) // 8
    if data.dim() != 2 or data.dtype != torch.uint8 or data.shape[1] != c * bits:
        raise ValueError(f"packed codes {data.dtype} {tuple(data.shape)} do not hold {k} codes of {bits} bits a row "
                         f"(expected uint8 (N, {c * bits}))")
    if bits == 8:
        return data[:, :k].contiguous()
    out = torch.empty((n, k), dtype=torch.uint8, device=data.device)
    shifts = torch.arange(8, device=data.device) * bits
    from_bytes = torch.arange(bits, device=data.device) * 8
    step = max(1, PACK_CHUNK // max(k, 1))
    for r in range(0, n, step):
        v = (data[r:r + step].reshape(-1, c, bits).long() << from_bytes).sum(-1)
        q = ((v.unsqueeze(-1) >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(-1, 8 * c)
        out[r:r + step] = q[:, :k]
    return out


@dataclass
class PackedCodes:
    """Codes held packed (pack_codes' layout): data uint8 (N, packed_row_bytes(k, bits))."""
    data: torch.Tensor
    bits: int
    k: int

    @classmethod
    def pack(cls, codes: torch.Tensor, bits: int) -> "PackedCodes":
        return cls(pack_codes(codes, bits), bits, codes.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.k)

    def unpack(self) -> torch.Tensor:
        return unpack_codes(self.data, self.bits, self.k)

    def to(self, device) -> "PackedCodes":
        return PackedCodes(self.data.to(device), self.bits, self.k)

    def rows(self, idx: torch.Tensor) -> "PackedCodes":
        """Rows `idx` (rows are packed independently: no unpacking)."""
        return PackedCodes(self.data[idx].contiguous(), self.bits, self.k)


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # uint8 (N, K); may be given as PackedCodes, still read back as uint8 (N, K)
    scales: torch.Tensor  # fp16 (N, K // G): d
    offsets: torch.Tensor  # fp16 (N, K // G): m
    bits: int
    group_size: int
    pidx: torch.Tensor | None = None  # uint8 (N, K // G, P): in-group index, EMPTY = unused
    pval: torch.Tensor | None = None  # fp16 (N, K // G, P): exact fp16 weight at that index

    # `codes` is a property (set below, after the dataclass is made): the field is stored as given,
    # a uint8 tensor or PackedCodes, and reading `codes` always gives the uint8 (N, K) tensor.
    @property
    def stored_codes(self) -> "torch.Tensor | PackedCodes":
        """The codes as held: a uint8 (N, K) tensor, or PackedCodes (not unpacked)."""
        return self.__dict__["codes"]

    @property
    def is_packed(self) -> bool:
        return isinstance(self.stored_codes, PackedCodes)

    def packed(self) -> "QuantizedWeight":
        """This weight with its codes held packed to `bits` bits (itself if they already are)."""
        if self.is_packed:
            return self
        return dataclasses.replace(self, codes=PackedCodes.pack(self.stored_codes, self.bits))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.stored_codes.shape)

    @property
    def slots(self) -> int:
        return 0 if self.pidx is None else self.pidx.shape[-1]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.offsets, self.group_size, self.pidx, self.pval)

    def to(self, device) -> "QuantizedWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(mv(self.stored_codes), mv(self.scales), mv(self.offsets), self.bits,
                               self.group_size, mv(self.pidx), mv(self.pval))


def _codes_get(self) -> torch.Tensor:
    c = self.__dict__["codes"]
    return c.unpack() if isinstance(c, PackedCodes) else c


def _codes_set(self, c) -> None:
    self.__dict__["codes"] = c


QuantizedWeight.codes = property(_codes_get, _codes_set, doc="uint8 (N, K) codes (unpacked on access if held packed)")


def check_group(name: str, k: int, group_size: int) -> None:
    """Raise ValueError naming the tensor if its input dim k cannot be cut into groups of group_size."""
    if k % group_size:
        from .gguf_types import TYPES  # the group sizes our GGUF types hold (imported late: it imports us)
        sizes = sorted({t.group_size for t in TYPES.values()})
        ok = [g for g in sizes if k % g == 0]
        hint = (f"use --group-size {' or '.join(map(str, ok))}" if ok
                else f"no group size our types hold ({'/'.join(map(str, sizes))}) divides it")
        raise ValueError(f"{name}: input dim {k} is not divisible by group size {group_size} ({hint})")


def check_weight(name: str, w: torch.Tensor, group_size: int) -> None:
    """Raise ValueError with the tensor's name if it cannot be group-quantized as asked."""
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    check_group(name, w.shape[1], group_size)
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
