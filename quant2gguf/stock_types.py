"""Stock llama.cpp block formats as exact formulas over explicit integer parts (issue 10).

A method that learns codes and integer sub-scales for a stock type writes them with `pack`; the
value each weight takes in llama.cpp is `dequantize_parts(parts)`, bit-identical to ggml's
`dequantize_row_*` (tests/test_stock_types.py checks it against libggml's to_float and gguf-py);
`dequantize_parts_torch` is the same arithmetic in torch, differentiable (kd's StockFQLinear).
Ids and sizes come from gguf-py (GGMLQuantizationType, GGML_QUANT_SIZES); byte dequantization is
gguf-py's own numpy (`gguf.quants.dequantize`), which is bit-exact with libggml for these types.

Parts (arrays over n blocks; codes are unsigned, the format's offset is part of the formula).
Every product below is exact in fp32 (fp16 mantissa x 6-bit x 5-bit, or x 7-bit x 5-bit for Q6_K,
< 24 bits), so FMA contraction in C cannot change a bit; only Q4_K/Q5_K's final subtraction rounds.

    Q4_0 (32):  d fp16 (n,), q uint8 (n, 32) in 0..15
                y = f32(d) * (q - 8)
                bytes: d | qs[16]; qs[j] = q[j] | q[j + 16] << 4
    Q8_0 (32):  d fp16 (n,), q uint8 (n, 32) in 0..255; y = f32(d) * (q - 128); bytes: d | int8 q - 128
    Q5_0 (32):  as Q4_0 with q in 0..31, y = f32(d) * (q - 16); bytes: d | qh[4] | qs[16]:
                q & 15 in qs as Q4_0's, q >> 4 of weight j at bit j of qh (a little-endian uint32)
    Q5_1 (32):  d, m fp16 (n,), q in 0..31, y = q * f32(d) + f32(m); bytes: d | m | qh[4] | qs[16] as Q5_0
    Q4_K (256): d, dmin fp16 (n,), sc, m uint8 (n, 8) in 0..63, q uint8 (n, 256) in 0..15
                y[32s + l] = (f32(d) * sc[s]) * q - f32(dmin) * m[s]
                bytes: d | dmin | scales[12] | qs[128]; qs[32c + l] = q[64c + l] | q[64c + 32 + l] << 4
                scales (ggml get_scale_min_k4): b[j] = sc[j] | (sc[j+4] >> 4) << 6,
                b[j+4] = m[j] | (m[j+4] >> 4) << 6, b[j+8] = sc[j+4] & 15 | (m[j+4] & 15) << 4, j < 4
    Q3_K (256): d fp16 (n,), sc int8 (n, 16) in -32..31, q uint8 (n, 256) in 0..7
                y[16s + l] = (f32(d) * sc[s]) * (q - 4)
                bytes: hmask[32] | qs[64] | scales[12] | d; weight e = 128h + 32j + l (l < 32):
                q & 3 at bits 2j of qs[32h + l], q >> 2 at bit 4h + j of hmask[l];
                u = sc + 32 (6 bits): b[i] = u[i] & 15 | (u[i+8] & 15) << 4 (i < 8),
                b[8+i] = u[i] >> 4 | (u[i+4] >> 4) << 2 | (u[i+8] >> 4) << 4 | (u[i+12] >> 4) << 6 (i < 4)
    Q5_K (256): as Q4_K with q in 0..31; bytes: d | dmin | scales[12] | qh[32] | qs[128];
                q & 15 in qs as Q4_K's, q >> 4 of weight 32s + l at bit s of qh[l]
    Q6_K (256): d fp16 (n,), sc int8 (n, 16) in -128..127, q uint8 (n, 256) in 0..63
                y[16s + l] = (f32(d) * sc[s]) * (q - 32)
                bytes: ql[128] | qh[64] | scales[16] (int8) | d; weight e = 128h + 32j + l (l < 32):
                q & 15 at nibble j >> 1 of ql[64h + 32(j & 1) + l], q >> 4 at bits 2j of qh[32h + l]

`quantize_rtn(w)` is a plain vectorised round-to-nearest into the format (not llama.cpp's
quantizer, but for the block-32 types gguf-py's port of its *_ref one): valid blocks close to w,
for tests and as a starting point for methods.

`grid(**parts)` is the same formula as one affine map per sub-block of `sub` weights, y = a * q + b
with unsigned codes q in 0..2**bits - 1, the form a method rounds weights onto (stock_quant.py):
a*q is exact in fp32 like the products above, so a*q + b equals dequantize_parts exactly in value
(the types with a fixed code offset fold it into b, so an exact zero may come out as +0 where ggml gives -0).
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

REGISTRY: dict[str, type["StockType"]] = {}

_fp16_max = float(np.finfo(np.float16).max)


def _f16(x) -> np.ndarray:
    return np.asarray(x, np.float32).clip(-_fp16_max, _fp16_max).astype("<f2")


def _u8(x, lo: int, hi: int, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{what} must lie in {lo}..{hi}, got {a.min()}..{a.max()}")
    return a.astype(np.uint8)


def _half_bytes(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).astype("<f2")).reshape(-1, 1).view(np.uint8)


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view("<f2")[:, 0]


def _k4_scales_unpack(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes -> 6-bit sc, m (n, 8) (ggml get_scale_min_k4)."""
    hi = s[:, 8:]
    sc = np.concatenate([s[:, 0:4] & 63, (hi & 15) | (s[:, 0:4] >> 6) << 4], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (hi >> 4) | (s[:, 4:8] >> 6) << 4], axis=1)
    return sc, m


def _k4_scales_pack(name: str, sc, m) -> np.ndarray:
    sc = _u8(sc, 0, 63, f"{name} sub-scales").reshape(-1, 8)
    m = _u8(m, 0, 63, f"{name} sub-mins").reshape(-1, 8)
    return np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                           (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4], axis=1)


def _nibbles_unpack(qs: np.ndarray, block: int = 256, half: int = 32) -> np.ndarray:
    """Low-nibble bytes -> (n, block) codes: every 2 * half codes share half bytes, byte l holding code l in
    its low nibble and code half + l in its high one (Q4_K/Q5_K: 256 codes, half 32; block-32 types: 32, 16)."""
    qs = qs.reshape(-1, 1, half)
    return np.concatenate([qs & 15, qs >> 4], axis=1).reshape(-1, block)


def _nibbles_pack(q: np.ndarray, block: int = 256, half: int = 32) -> np.ndarray:
    q = np.asarray(q, np.uint8).reshape(-1, 2, half) & 15
    return (q[:, 0] | q[:, 1] << 4).reshape(-1, block // 2)


def _rtn_min_k(x: np.ndarray, qmax: int) -> dict:
    """Q4_K/Q5_K RTN parts of sub-blocks x (n, 8, 32): min-max per sub-block (min clamped to <= 0),
    6-bit sub-scales/mins on fp16 super-scales, codes 0..qmax against the stored (rounded) scales."""
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    s, mn = (hi - lo) / qmax, -lo  # per sub-block, both >= 0
    d, dmin = _f16(s.max(-1) / 63), _f16(mn.max(-1) / 63)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(s / d.astype(np.float32)[:, None]), 0).clip(0, 63)
        m = np.where(dmin[:, None] > 0, np.rint(mn / dmin.astype(np.float32)[:, None]), 0).clip(0, 63)
        ds = d.astype(np.float32)[:, None] * sc
        dm = dmin.astype(np.float32)[:, None] * m
        q = np.where(ds[..., None] > 0, np.rint((x + dm[..., None]) / ds[..., None]), 0).clip(0, qmax)
    return {"d": d, "dmin": dmin, "sc": sc.astype(np.uint8), "m": m.astype(np.uint8), "q": q.astype(np.uint8)}


class StockType:
    """One stock ggml block format; subclasses register as `class X(StockType, qtype="Q4_0")`."""
    qtype: GGMLQuantizationType
    block_size: int
    type_size: int
    parts: tuple[str, ...]
    sub: int  # weights sharing one (a, b) of `grid`
    bits: int  # code bits: q in 0..2**bits - 1
    ints: dict[str, tuple[int, int]] = {}  # integer parts (but q) -> the (lo, hi) range pack accepts

    @classmethod
    def reach(cls) -> int:
        """How many grid steps |a| of its sub-block (y = a * q + b) a weight can sit from the point a
        scale change leaves in place, so a relative change e of a scale part (d, sc) moves a weight
        by up to e * reach() steps (kd.StockFQLinear's learning-rate units). Codes against a free
        offset (Q4_K, Q5_K, Q5_1: y = a * q - mn): 2**bits - 1, a relative change of the offset
        parts (dmin, m) moving weights by at most as many steps."""
        return 2 ** cls.bits - 1

    def __init_subclass__(cls, qtype: str | None, **kw):
        super().__init_subclass__(**kw)
        if qtype is None:  # a shared base of several types, not a type
            return
        cls.qtype = GGMLQuantizationType[qtype]
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.qtype]
        REGISTRY[qtype] = cls

    @classmethod
    def blocks(cls, data: np.ndarray) -> np.ndarray:
        """Any uint8 array holding whole blocks as (n_blocks, type_size)."""
        b = np.ascontiguousarray(data, dtype=np.uint8)
        if b.size % cls.type_size:
            raise ValueError(f"{cls.qtype.name}: {b.size} bytes is not a whole number of {cls.type_size}-byte blocks")
        return b.reshape(-1, cls.type_size)

    @classmethod
    def dequantize(cls, blocks: np.ndarray) -> np.ndarray:
        """float32 (n_blocks, block_size), bit-identical to ggml's to_float (gguf-py's numpy)."""
        return gq.dequantize(cls.blocks(blocks), cls.qtype).reshape(-1, cls.block_size)

    @classmethod
    def unpack(cls, blocks: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def pack(cls, **parts) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def dequantize_parts(cls, **parts) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def quantize_rtn(cls, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def dequantize_parts_torch(cls, **parts):
        """dequantize_parts in torch, differentiable: parts as float32 tensors (fp16 values for the
        super scales, integer values for sub-scales/mins and codes q (n, block_size)), the same fp32
        operations in the same order, so the values are dequantize_parts' bit for bit."""
        raise NotImplementedError

    @classmethod
    def grid(cls, **parts) -> tuple[np.ndarray, np.ndarray]:
        """float32 (a, b), each (n_blocks, block_size // sub): y = a * q + b per sub-block."""
        raise NotImplementedError

    @classmethod
    def _sub_blocks(cls, w: np.ndarray, sub: int) -> np.ndarray:
        w = np.asarray(w, np.float32)
        if w.ndim != 2 or w.shape[1] % cls.block_size:
            raise ValueError(f"{cls.qtype.name}: need a 2-D weight with rows a multiple of {cls.block_size}, "
                             f"got {w.shape}")
        return w.reshape(-1, cls.block_size // sub, sub)


class _Sym32(StockType, qtype=None):
    """Block-32 types y = d * (q - zero): Q4_0 (8), Q5_0 (16), Q8_0 (128)."""
    parts = ("d", "q")
    sub = 32
    zero: int

    @classmethod
    def reach(cls):
        return cls.zero  # |q - zero| <= zero

    @classmethod
    def dequantize_parts(cls, d, q):
        return np.asarray(d).astype(np.float32)[:, None] * (np.asarray(q, np.float32) - cls.zero)

    @classmethod
    def dequantize_parts_torch(cls, d, q):
        return d[:, None] * (q - cls.zero)

    @classmethod
    def grid(cls, d, **_):
        a = np.asarray(d).astype(np.float32)[:, None]
        return a, -cls.zero * a

    @classmethod
    def quantize_rtn(cls, w):
        """gguf-py's quantizer (mirrors llama.cpp's quantize_row_*_ref)."""
        cls._sub_blocks(w, 32)
        return cls.blocks(gq.quantize(np.ascontiguousarray(w, np.float32), cls.qtype))


class Q4_0(_Sym32, qtype="Q4_0"):
    bits, zero = 4, 8

    @classmethod
    def unpack(cls, blocks):
        b = cls.blocks(blocks)
        return {"d": _half(b, 0), "q": _nibbles_unpack(b[:, 2:], 32, 16)}

    @classmethod
    def pack(cls, d, q):
        q = _u8(q, 0, 15, "Q4_0 codes").reshape(-1, 32)
        return np.concatenate([_half_bytes(d), _nibbles_pack(q, 32, 16)], axis=1)


class Q4_K(StockType, qtype="Q4_K"):
    ints = {"sc": (0, 63), "m": (0, 63)}
    parts = ("d", "dmin", "sc", "m", "q")
    sub, bits = 32, 4

    @classmethod
    def unpack(cls, blocks):
        b = cls.blocks(blocks)
        sc, m = _k4_scales_unpack(b[:, 4:16])
        return {"d": _half(b, 0), "dmin": _half(b, 2), "sc": sc, "m": m, "q": _nibbles_unpack(b[:, 16:])}

    @classmethod
    def pack(cls, d, dmin, sc, m, q):
        q = _u8(q, 0, 15, "Q4_K codes")
        return np.concatenate([_half_bytes(d), _half_bytes(dmin), _k4_scales_pack("Q4_K", sc, m),
                               _nibbles_pack(q)], axis=1)

    @classmethod
    def dequantize_parts(cls, d, dmin, sc, m, q):
        d1 = np.asarray(d).astype(np.float32)[:, None] * np.asarray(sc, np.float32)  # (n, 8), C: d * sc
        m1 = np.asarray(dmin).astype(np.float32)[:, None] * np.asarray(m, np.float32)
        y = d1[:, :, None] * np.asarray(q, np.float32).reshape(-1, 8, 32) - m1[:, :, None]
        return y.reshape(-1, 256)

    @classmethod
    def dequantize_parts_torch(cls, d, dmin, sc, m, q):
        d1, m1 = d[:, None] * sc, dmin[:, None] * m
        return (d1[:, :, None] * q.reshape(-1, 8, 32) - m1[:, :, None]).reshape(-1, 256)

    @classmethod
    def grid(cls, d, dmin, sc, m, **_):
        a = np.asarray(d).astype(np.float32)[:, None] * np.asarray(sc, np.float32)
        return a, -(np.asarray(dmin).astype(np.float32)[:, None] * np.asarray(m, np.float32))

    @classmethod
    def quantize_rtn(cls, w):
        """Min-max per 32-weight sub-block (min clamped to <= 0), 6-bit sub-scales/mins on fp16
        super-scales, codes against the stored (rounded) scales."""
        return cls.pack(**_rtn_min_k(cls._sub_blocks(w, 32), 2 ** cls.bits - 1))


class _SymK(StockType, qtype=None):
    """Q3_K/Q6_K: 16 sub-blocks of 16, y = d * sc * (q - zero), zero = 2**(bits-1), signed integer
    sub-scales sc (ints["sc"]) on one fp16 super-scale d."""
    parts = ("d", "sc", "q")
    sub = 16

    @classmethod
    def _zero(cls) -> int:
        return 2 ** (cls.bits - 1)

    @classmethod
    def reach(cls):
        return cls._zero()  # |q - zero| <= zero: Q3_K 4, Q6_K 32

    @classmethod
    def dequantize_parts(cls, d, sc, q):
        dl = np.asarray(d).astype(np.float32)[:, None] * np.asarray(sc, np.float32)  # C: d * sc * (q - zero)
        return (dl[:, :, None] * (np.asarray(q, np.float32).reshape(-1, 16, 16) - cls._zero())).reshape(-1, 256)

    @classmethod
    def dequantize_parts_torch(cls, d, sc, q):
        return ((d[:, None] * sc)[:, :, None] * (q.reshape(-1, 16, 16) - cls._zero())).reshape(-1, 256)

    @classmethod
    def grid(cls, d, sc, **_):
        a = np.asarray(d).astype(np.float32)[:, None] * np.asarray(sc, np.float32)
        return a, -cls._zero() * a

    @classmethod
    def quantize_rtn(cls, w):
        """Symmetric per 16-weight sub-block: the largest-magnitude weight maps to code 0 (-zero), so
        it is exact up to scale rounding; signed sub-scales on an fp16 super-scale."""
        z, (lo, hi) = cls._zero(), cls.ints["sc"]
        x = cls._sub_blocks(w, 16)
        amax = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
        s = -amax / z  # signed: x = s * (q - z) with q - z = -z at the extreme
        d = _f16(np.abs(s).max(-1) / hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.where(d[:, None] > 0, np.rint(s / d.astype(np.float32)[:, None]), 0).clip(lo, hi)
            dl = d.astype(np.float32)[:, None] * sc
            q = np.where(dl[..., None] != 0, np.rint(x / dl[..., None]), 0).clip(-z, z - 1) + z
        return cls.pack(d=d, sc=sc.astype(np.int8), q=q.astype(np.uint8))


class Q3_K(_SymK, qtype="Q3_K"):
    ints = {"sc": (-32, 31)}
    bits = 3

    @classmethod
    def unpack(cls, blocks):
        b = cls.blocks(blocks)
        hmask, qs, s = b[:, :32], b[:, 32:96].reshape(-1, 2, 1, 32), b[:, 96:108]
        low = (qs >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # (n, h, j, l)
        high = (hmask[:, None, None, :] >> np.arange(8, dtype=np.uint8).reshape(2, 4, 1)) & 1
        q = (low | high << 2).reshape(-1, 256)
        lo4 = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], axis=1)  # u[0..7], u[8..15]
        hi2 = (s[:, 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3  # (n, i, k): u[i + 4k]
        u = lo4 | hi2.transpose(0, 2, 1).reshape(-1, 16) << 4
        return {"d": _half(b, 108), "sc": u.astype(np.int8) - 32, "q": q}

    @classmethod
    def pack(cls, d, sc, q):
        u = (np.asarray(sc).astype(np.int16) + 32)
        u = _u8(u, 0, 63, "Q3_K sub-scales + 32").reshape(-1, 16)
        q = _u8(q, 0, 7, "Q3_K codes").reshape(-1, 2, 4, 32)  # (n, h, j, l)
        qs = ((q & 3) << np.array([0, 2, 4, 6], np.uint8)[:, None]).sum(2, dtype=np.uint8).reshape(-1, 64)
        hmask = ((q >> 2) << np.arange(8, dtype=np.uint8).reshape(2, 4, 1)).sum((1, 2), dtype=np.uint8)
        hi2 = (u >> 4).reshape(-1, 4, 4)  # (n, k, i): u[4k + i]
        s = np.concatenate([(u[:, :8] & 15) | (u[:, 8:] & 15) << 4,
                            (hi2 << np.array([0, 2, 4, 6], np.uint8)[:, None]).sum(1, dtype=np.uint8)], axis=1)
        return np.concatenate([hmask, qs, s, _half_bytes(d)], axis=1)


class Q5_K(StockType, qtype="Q5_K"):
    ints = {"sc": (0, 63), "m": (0, 63)}
    parts = ("d", "dmin", "sc", "m", "q")
    sub, bits = 32, 5

    @classmethod
    def unpack(cls, blocks):
        b = cls.blocks(blocks)
        sc, m = _k4_scales_unpack(b[:, 4:16])
        high = (b[:, 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # (n, l, s): bit s of qh[l]
        q = _nibbles_unpack(b[:, 48:]) | high.transpose(0, 2, 1).reshape(-1, 256) << 4
        return {"d": _half(b, 0), "dmin": _half(b, 2), "sc": sc, "m": m, "q": q}

    @classmethod
    def pack(cls, d, dmin, sc, m, q):
        q = _u8(q, 0, 31, "Q5_K codes").reshape(-1, 8, 32)
        qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)
        return np.concatenate([_half_bytes(d), _half_bytes(dmin), _k4_scales_pack("Q5_K", sc, m), qh,
                               _nibbles_pack(q)], axis=1)

    dequantize_parts = Q4_K.__dict__["dequantize_parts"]  # the same formula, 5-bit q
    dequantize_parts_torch = Q4_K.__dict__["dequantize_parts_torch"]
    grid = Q4_K.__dict__["grid"]

    @classmethod
    def quantize_rtn(cls, w):
        """As Q4_K's, codes 0..31."""
        return cls.pack(**_rtn_min_k(cls._sub_blocks(w, 32), 2 ** cls.bits - 1))


class Q6_K(_SymK, qtype="Q6_K"):
    ints = {"sc": (-128, 127)}
    bits = 6

    @classmethod
    def unpack(cls, blocks):
        b = cls.blocks(blocks)
        ql = b[:, :128].reshape(-1, 2, 1, 2, 32)  # (n, half, nibble, j & 1, l)
        low = (ql >> np.array([0, 4], np.uint8)[:, None, None]) & 15  # (n, half, j >> 1, j & 1, l)
        qh = b[:, 128:192].reshape(-1, 2, 1, 32)
        high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # (n, half, j, l)
        q = low.reshape(-1, 2, 4, 32) | high << 4
        return {"d": _half(b, 208), "sc": b[:, 192:208].view(np.int8).copy(), "q": q.reshape(-1, 256)}

    @classmethod
    def pack(cls, d, sc, q):
        sc = np.asarray(sc)
        if sc.size and (sc.min() < -128 or sc.max() > 127):
            raise ValueError(f"Q6_K sub-scales must lie in -128..127, got {sc.min()}..{sc.max()}")
        q = _u8(q, 0, 63, "Q6_K codes").reshape(-1, 2, 2, 2, 32)  # (n, half, j >> 1, j & 1, l)
        ql = ((q & 15) << np.array([0, 4], np.uint8)[:, None, None]).sum(2, dtype=np.uint8).reshape(-1, 128)
        qh = ((q.reshape(-1, 2, 4, 32) >> 4) << np.array([0, 2, 4, 6], np.uint8)[:, None]).sum(2, dtype=np.uint8)
        return np.concatenate([ql, qh.reshape(-1, 64), sc.astype(np.int8).reshape(-1, 16).view(np.uint8),
                               _half_bytes(d)], axis=1)


def _qh_unpack(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 high-bit bytes (a little-endian uint32) -> bit j of weight j, (n, 32)."""
    return (qh[:, :, None] >> np.arange(8, dtype=np.uint8)).reshape(-1, 32) & 1


def _qh_pack(q: np.ndarray) -> np.ndarray:
    return ((q.reshape(-1, 4, 8) >> 4) << np.arange(8, dtype=np.uint8)).sum(2, dtype=np.uint8)


class Q8_0(_Sym32, qtype="Q8_0"):
    bits, zero = 8, 128

    @classmethod
    def unpack(cls, blocks):
        b = cls.blocks(blocks)
        return {"d": _half(b, 0), "q": (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)}

    @classmethod
    def pack(cls, d, q):
        q = _u8(q, 0, 255, "Q8_0 codes").reshape(-1, 32)
        return np.concatenate([_half_bytes(d), (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], axis=1)


class Q5_0(_Sym32, qtype="Q5_0"):
    bits, zero = 5, 16

    @classmethod
    def unpack(cls, blocks):
        b = cls.blocks(blocks)
        return {"d": _half(b, 0), "q": _nibbles_unpack(b[:, 6:], 32, 16) | _qh_unpack(b[:, 2:6]) << 4}

    @classmethod
    def pack(cls, d, q):
        q = _u8(q, 0, 31, "Q5_0 codes").reshape(-1, 32)
        return np.concatenate([_half_bytes(d), _qh_pack(q), _nibbles_pack(q, 32, 16)], axis=1)


class Q5_1(StockType, qtype="Q5_1"):
    quantize_rtn = _Sym32.__dict__["quantize_rtn"]  # gguf-py's, llama.cpp's *_ref quantizer
    parts = ("d", "m", "q")
    sub, bits = 32, 5

    @classmethod
    def unpack(cls, blocks):
        b = cls.blocks(blocks)
        q = _nibbles_unpack(b[:, 8:], 32, 16) | _qh_unpack(b[:, 4:8]) << 4
        return {"d": _half(b, 0), "m": _half(b, 2), "q": q}

    @classmethod
    def pack(cls, d, m, q):
        q = _u8(q, 0, 31, "Q5_1 codes").reshape(-1, 32)
        return np.concatenate([_half_bytes(d), _half_bytes(m), _qh_pack(q), _nibbles_pack(q, 32, 16)], axis=1)

    @classmethod
    def dequantize_parts(cls, d, m, q):
        return np.asarray(q, np.float32) * np.asarray(d).astype(np.float32)[:, None] + \
            np.asarray(m).astype(np.float32)[:, None]

    @classmethod
    def dequantize_parts_torch(cls, d, m, q):
        return q * d[:, None] + m[:, None]

    @classmethod
    def grid(cls, d, m, **_):
        return np.asarray(d).astype(np.float32)[:, None], np.asarray(m).astype(np.float32)[:, None]


def stock_type(t: str | int | GGMLQuantizationType) -> type[StockType]:
    """Look a stock type up by name ("Q4_K"), ggml id (12) or GGMLQuantizationType."""
    name = GGMLQuantizationType(t).name if not isinstance(t, str) else t.upper()
    if name not in REGISTRY:
        raise ValueError(f"no stock type {t!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]
