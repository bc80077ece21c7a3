"""Our ggml tensor types in numpy: pack a QuantizedWeight into GGUF blocks, dequantize them, and
teach gguf-py the types so GGUFWriter/GGUFReader round-trip them.

Layout (ggml_patches/README.md, little-endian, one block = G weights of one row):

    Q3_G{G}  : d fp16 | m fp16 |                     qs[G/4] | qh[G/8]
    Q3_G{G}P : d fp16 | m fp16 | pv[2] fp16 |        qs[G/4] | qh[G/8] | pi[2] uint8 (255 = empty)

code i: low 2 bits in qs[i % (G/4)] at bit 2*(i // (G/4)); high bit in qh[i % (G/8)] at bit i // (G/8).
y = float32(d) * q + float32(m), then y[pi[s]] = float32(pv[s]) for pi[s] < G. Bit-exact with
quantizer.dequantize (d*q is exact in fp32).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum

import numpy as np

from .quantizer import EMPTY, QuantizedWeight

SLOTS = 2  # protected slots per block in the P types


@dataclass(frozen=True)
class QType:
    name: str
    id: int
    group_size: int
    slots: int

    @property
    def block_bytes(self) -> int:
        g = self.group_size
        return 4 + 2 * self.slots + g // 4 + g // 8 + self.slots

    @property
    def bpw(self) -> float:
        return 8 * self.block_bytes / self.group_size

    def row_bytes(self, k: int) -> int:
        if k % self.group_size:
            raise ValueError(f"{self.name}: row length {k} is not a multiple of {self.group_size}")
        return k // self.group_size * self.block_bytes


TYPES: dict[str, QType] = {t.name: t for t in (
    QType("Q3_G128", 96, 128, 0),
    QType("Q3_G64", 97, 64, 0),
    QType("Q3_G128P", 98, 128, SLOTS),
    QType("Q3_G64P", 99, 64, SLOTS),
)}
BY_ID: dict[int, QType] = {t.id: t for t in TYPES.values()}


def qtype(t: str | int | QType) -> QType:
    """Look a type up by name ("Q3_G64"), id (97) or enum member."""
    if isinstance(t, QType):
        return t
    key = getattr(t, "value", t)
    found = BY_ID.get(key) if isinstance(key, int) else TYPES.get(str(key).upper())
    if found is None:
        raise ValueError(f"unknown quant2gguf type {t!r}; known: {', '.join(TYPES)}")
    return found


def type_for(qw: QuantizedWeight) -> QType:
    """The type that stores qw exactly: G from its group size, P when it has protected slots."""
    if qw.bits != 3:
        raise ValueError(f"the GGUF types hold 3-bit codes; this weight has {qw.bits} bits")
    name = f"Q3_G{qw.group_size}" + ("P" if qw.pidx is not None else "")
    if name not in TYPES:
        raise ValueError(f"no GGUF type for group size {qw.group_size} (use 64 or 128)")
    return TYPES[name]


def _np(t, dtype) -> np.ndarray:
    a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    return np.ascontiguousarray(a.astype(dtype, copy=False))


def pack(qw: QuantizedWeight, type: str | int | QType | None = None) -> np.ndarray:
    """Blocks of qw as uint8 (N, row_bytes), ready for GGUFWriter.add_tensor(raw_dtype=...)."""
    t = type_for(qw) if type is None else qtype(type)
    g = t.group_size
    if qw.group_size != g:
        raise ValueError(f"{t.name} needs group size {g}, the weight has {qw.group_size}")
    codes = _np(qw.codes, np.uint8)
    n, k = codes.shape
    t.row_bytes(k)
    if codes.max(initial=0) > 7:
        raise ValueError("codes exceed 3 bits (max 7)")
    nb = k // g
    q = codes.reshape(n, nb, g)
    lo = (q & 3).reshape(n, nb, 4, g // 4)
    qs = (lo[:, :, 0] | lo[:, :, 1] << 2 | lo[:, :, 2] << 4 | lo[:, :, 3] << 6).astype(np.uint8)
    hi = (q >> 2).reshape(n, nb, 8, g // 8)
    qh = np.zeros((n, nb, g // 8), np.uint8)
    for b in range(8):
        qh |= (hi[:, :, b] << b).astype(np.uint8)
    d = _np(qw.scales, "<f2").reshape(n, nb, 1).view(np.uint8)
    m = _np(qw.offsets, "<f2").reshape(n, nb, 1).view(np.uint8)
    parts = [d, m]
    if t.slots:
        pidx = np.full((n, nb, t.slots), EMPTY, np.uint8)
        pval = np.zeros((n, nb, t.slots), "<f2")
        if qw.pidx is not None:
            src_i, src_v = _np(qw.pidx, np.uint8), _np(qw.pval, "<f2")
            p = src_i.shape[-1]
            if p > t.slots and (src_i[..., t.slots:] != EMPTY).any():
                raise ValueError(f"{t.name} holds {t.slots} protected weights per group; this weight uses up to {p}")
            p = min(p, t.slots)
            pidx[..., :p], pval[..., :p] = src_i[..., :p], src_v[..., :p]
        pval = np.where(pidx == EMPTY, np.float16(0), pval).astype("<f2")
        parts += [pval.view(np.uint8), qs, qh, pidx]
    else:
        if qw.pidx is not None and (_np(qw.pidx, np.uint8) != EMPTY).any():
            raise ValueError(f"{t.name} has no protected slots but the weight has protected weights; "
                             f"use {t.name}P")
        parts += [qs, qh]
    blocks = np.concatenate(parts, axis=-1)
    assert blocks.shape[-1] == t.block_bytes
    return blocks.reshape(n, nb * t.block_bytes)


def dequantize(data: np.ndarray, type: str | int | QType, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """float32 weights of packed blocks; shape (…, K) defaults to data's rows times its row length."""
    t = qtype(type)
    g, bb = t.group_size, t.block_bytes
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    if raw.size % bb:
        raise ValueError(f"{t.name}: {raw.size} bytes is not a whole number of {bb}-byte blocks")
    if shape is None:
        rows = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
        shape = (*raw.shape[:-1], rows.shape[-1] // bb * g)
    blk = raw.reshape(-1, bb)
    nblk = blk.shape[0]
    if nblk * g != int(np.prod(shape)):
        raise ValueError(f"{t.name}: {nblk} blocks of {g} do not make shape {tuple(shape)}")
    d = blk[:, 0:2].copy().view("<f2").astype(np.float32)
    m = blk[:, 2:4].copy().view("<f2").astype(np.float32)
    o = 4 + 2 * t.slots
    qs = blk[:, o:o + g // 4]
    qh = blk[:, o + g // 4:o + g // 4 + g // 8]
    low = np.concatenate([(qs >> (2 * j)) & 3 for j in range(4)], axis=1)
    high = np.concatenate([(qh >> j) & 1 for j in range(8)], axis=1)
    q = (low | high << 2).astype(np.float32)
    y = d * q + m  # d*q is exact in fp32, so this matches any fused or unfused backend
    if t.slots:
        pv = blk[:, 4:4 + 2 * t.slots].copy().view("<f2").astype(np.float32)
        pi = blk[:, bb - t.slots:]
        for s in range(t.slots):
            used = np.nonzero(pi[:, s] < g)[0]  # 255 = empty; like ggml, never write outside the block
            y[used, pi[used, s]] = pv[used, s]
    return y.reshape(shape)


# --- gguf-py registration -------------------------------------------------------------------

def _add_member(enum_cls: type[Enum], name: str, value: int) -> None:
    """Add a pseudo-member to an IntEnum (Python has no public API for it); idempotent."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        if existing.name != name:
            raise RuntimeError(f"{enum_cls.__name__} already uses value {value} for {existing.name}, not {name}: "
                               "this gguf version collides with quant2gguf's private type ids")
        return
    member = int.__new__(enum_cls, value)
    member._name_, member._value_ = name, value
    member.__objclass__ = enum_cls
    member.__init__(value)
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)


class _GGUFDequant:
    """Duck-typed entry for gguf.quants' dequantize(data, qtype) dispatch."""

    def __init__(self, t: QType):
        self.t = t

    def dequantize(self, data: np.ndarray) -> np.ndarray:
        rows = np.asarray(data, np.uint8)
        return dequantize(rows, self.t, (*rows.shape[:-1], rows.shape[-1] // self.t.block_bytes * self.t.group_size))

    def quantize(self, data: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{self.t.name}: quantize with quant2gguf.quantizer and pack with "
                                  "quant2gguf.gguf_types.pack")


def _gguf_modules() -> list:
    mods = []
    for name, mod in list(sys.modules.items()):
        if name.endswith("constants") and hasattr(mod, "GGMLQuantizationType") and hasattr(mod, "GGML_QUANT_SIZES"):
            mods.append(mod)
    return mods


def register(*constants_modules) -> None:
    """Make gguf-py know our 4 types: GGMLQuantizationType, LlamaFileType, GGML_QUANT_SIZES and
    gguf.quants.dequantize. Without arguments: the installed `gguf` plus every gguf-py already
    imported (e.g. the pinned tree's vendored copy, which the patch series also updates)."""
    if not constants_modules:
        import gguf  # noqa: F401  (ensures the installed one is loaded)
        constants_modules = tuple(_gguf_modules())
    for c in constants_modules:
        for t in TYPES.values():
            _add_member(c.GGMLQuantizationType, t.name, t.id)
            member = c.GGMLQuantizationType(t.id)
            c.GGML_QUANT_SIZES.setdefault(member, (t.group_size, t.block_bytes))
            if hasattr(c, "LlamaFileType"):
                _add_member(c.LlamaFileType, f"MOSTLY_{t.name}", t.id)
        quants = sys.modules.get(c.__name__.rsplit(".", 1)[0] + ".quants")
        traits = getattr(quants, "_type_traits", None)
        if isinstance(traits, dict):
            for t in TYPES.values():
                traits.setdefault(c.GGMLQuantizationType(t.id), _GGUFDequant(t))
