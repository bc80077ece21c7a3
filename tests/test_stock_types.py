"""quant2gguf.stock_types against libggml (ctypes, like test_ggml_cpu.py) and gguf-py's numpy:
dequantize and dequantize_parts bit for bit, pack/unpack byte for byte, quantize_rtn valid and close."""
import ctypes

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from quant2gguf import llama
from quant2gguf import stock_types as st

NAMES = list(st.REGISTRY)
FP16_SPECIAL = np.array([0.0, -0.0, 65504.0, 2.0**-24, 2.0**-14, 6.1e-5, 1.0, 1e-3, 7.0, 1e4], np.float16)
FP16_FIELDS = {"Q4_0": ("d",), "Q4_K": ("d", "dmin"), "Q3_K": ("d",), "Q5_K": ("d", "dmin"), "Q6_K": ("d",),
               "Q8_0": ("d",), "Q5_0": ("d",), "Q5_1": ("d", "m")}

TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class TypeTraits(ctypes.Structure):  # ggml.h struct ggml_type_traits (leading fields)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", TO_FLOAT),
                ("from_float_ref", TO_FLOAT)]


def load_ggml_base():
    """libggml-base of the patched CPU build through ctypes (RuntimeError when it is not built)."""
    base = ctypes.CDLL(str(llama.lib_dir() / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    base.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
    base.ggml_get_type_traits.argtypes = [ctypes.c_int]
    base.ggml_validate_row_data.restype = ctypes.c_bool
    base.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return base


@pytest.fixture(scope="module")
def ggml():
    try:
        return load_ggml_base()
    except RuntimeError as e:
        pytest.skip(f"libggml-base.so of the patched llama.cpp CPU build is missing ({e})")


def ptr(a: np.ndarray) -> ctypes.c_void_p:
    assert a.flags.c_contiguous
    return ctypes.c_void_p(a.ctypes.data)


def traits(base, cls) -> TypeTraits:
    tr = base.ggml_get_type_traits(int(cls.qtype)).contents
    got = (tr.type_name.decode().upper(), tr.blck_size, tr.type_size)
    assert got == (cls.qtype.name, cls.block_size, cls.type_size)
    return tr


def c_to_float(base, cls, blocks: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(blocks, np.uint8)
    out = np.empty((blocks.shape[0], cls.block_size), np.float32)
    traits(base, cls).to_float(ptr(blocks), ptr(out), out.size)
    return out


def finite_f16(rng, n: int) -> np.ndarray:
    """fp16 values mixing normal ones, random finite bit patterns (subnormals, ±0, huge) and extremes."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits)  # Inf/NaN exponent -> subnormal
    special = rng.choice(FP16_SPECIAL, n) * rng.choice([1, -1], n)
    v = np.where(rng.random(n) < 0.3, bits.view(np.float16), rng.standard_normal(n) * 0.05)
    return np.where(rng.random(n) < 0.3, special, v).astype(np.float16)


def random_blocks(cls, rng, n: int = 200) -> np.ndarray:
    """Random bytes with finite fp16 scales, plus hand-made edge blocks: all-zero, max codes and
    sub-scales at fp16 max, min codes and sub-scales, zero sub-scales, negative super-mins."""
    parts = cls.unpack(rng.integers(0, 256, (n, cls.type_size), dtype=np.uint8))
    for f in FP16_FIELDS[cls.qtype.name]:
        parts[f] = finite_f16(rng, n)
    edges = [np.zeros((1, cls.type_size), np.uint8)]
    for sign in (1, -1):
        for code, scale in (("max", "max"), ("min", "min"), ("max", "zero"), ("min", "max")):
            p = {k: v[:1].copy() for k, v in parts.items()}
            for f in FP16_FIELDS[cls.qtype.name]:
                p[f][:] = sign * 65504.0
            p["q"][:] = {"max": 2**cls.bits - 1, "min": 0}[code]
            if "sc" in p:
                lo, hi = cls.ints["sc"]
                p["sc"][:] = {"max": hi, "min": lo, "zero": 0}[scale]
            if "m" in cls.ints:
                p["m"][:] = {"max": 63, "min": 0, "zero": 0}[scale]
            edges.append(cls.pack(**p))
    return np.concatenate([cls.pack(**parts), *edges])


def differing(a: np.ndarray, b: np.ndarray) -> list[int]:
    return sorted(set(np.nonzero(a.view(np.uint32) != b.view(np.uint32))[0].tolist()))


def test_registry_uses_gguf_ids_and_sizes():
    assert NAMES == ["Q4_0", "Q4_K", "Q3_K", "Q5_K", "Q6_K", "Q8_0", "Q5_0", "Q5_1"]
    for name, cls in st.REGISTRY.items():
        assert cls.qtype is GGMLQuantizationType[name]
        assert (cls.block_size, cls.type_size) == GGML_QUANT_SIZES[cls.qtype]
        assert st.stock_type(name.lower()) is st.stock_type(int(cls.qtype)) is st.stock_type(cls.qtype) is cls
    with pytest.raises(ValueError, match="no stock type"):
        st.stock_type("Q2_K")


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_bit_exact_with_libggml(ggml, name):
    cls = st.REGISTRY[name]
    blocks = random_blocks(cls, np.random.default_rng(int(cls.qtype)))
    ref = c_to_float(ggml, cls, blocks)
    assert not np.isnan(ref).any()
    for what, got in (("gguf-py dequantize", gq.dequantize(blocks, cls.qtype)),
                      ("stock_types.dequantize", cls.dequantize(blocks)),
                      ("dequantize_parts(unpack)", cls.dequantize_parts(**cls.unpack(blocks)))):
        bad = differing(got.reshape(ref.shape), ref)
        assert not bad, f"{name} {what}: {len(bad)} of {len(blocks)} blocks differ from libggml: {bad[:10]}"


@pytest.mark.parametrize("name", NAMES)
def test_pack_unpack_round_trip(name):
    cls = st.REGISTRY[name]
    rng = np.random.default_rng(1 + int(cls.qtype))
    b = rng.integers(0, 256, (300, cls.type_size), dtype=np.uint8)  # any bytes, NaN/Inf scales included
    parts = cls.unpack(b)
    assert tuple(parts) == cls.parts
    again = cls.pack(**parts)
    bad = np.nonzero((again != b).any(-1))[0]
    assert not bad.size, f"{name}: pack(unpack(b)) differs in blocks {bad[:10].tolist()}"
    back = cls.unpack(again)
    for k in cls.parts:
        assert np.array_equal(back[k].view(np.uint8), parts[k].view(np.uint8)), k


@pytest.mark.parametrize("name", NAMES)
def test_pack_rejects_out_of_range(name):
    cls = st.REGISTRY[name]
    parts = cls.unpack(np.zeros((2, cls.type_size), np.uint8))
    bad = dict(parts, q=parts["q"].astype(np.int16) + 2**cls.bits)
    with pytest.raises(ValueError, match="codes"):
        cls.pack(**bad)
    if "sc" in parts:
        with pytest.raises(ValueError, match="sub-scales"):
            cls.pack(**dict(parts, sc=parts["sc"].astype(np.int16) + np.ptp(cls.ints["sc"]) + 1))


@pytest.mark.parametrize("name", NAMES)
def test_quantize_rtn_valid_and_close(ggml, name):
    cls = st.REGISTRY[name]
    rng = np.random.default_rng(2 + int(cls.qtype))
    tol = {"Q4_0": 0.12, "Q4_K": 0.11, "Q3_K": 0.2, "Q5_K": 0.055, "Q6_K": 0.03, "Q8_0": 0.008, "Q5_0": 0.06,
           "Q5_1": 0.055}[name]  # relative RMSE on Gaussian weights
    for scale in (1e-2, 1.0, 1e3):
        w = (rng.standard_normal((8, 4 * cls.block_size)) * scale).astype(np.float32)
        w[0] = 0  # all-zero row: zero scales
        w[1, :cls.block_size] = np.abs(w[1, :cls.block_size])  # all-positive block: Q4_K min clamps at 0
        blocks = cls.quantize_rtn(w)
        assert blocks.shape == (w.size // cls.block_size, cls.type_size) and blocks.dtype == np.uint8
        assert ggml.ggml_validate_row_data(int(cls.qtype), ptr(blocks), blocks.size)
        y = cls.dequantize(blocks).reshape(w.shape)
        assert np.array_equal(y, c_to_float(ggml, cls, blocks).reshape(w.shape))
        assert not y[0].any()
        err = np.sqrt(((y - w)[1:] ** 2).mean() / (w[1:] ** 2).mean())
        assert err < tol, f"{name} scale {scale}: relative RMSE {err:.3f} >= {tol}"


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0", "Q5_0", "Q5_1"])
def test_block32_rtn_is_llama_reference_quantizer(ggml, name):
    """gguf-py's quantizer, which quantize_rtn uses for the block-32 types, writes quantize_row_*_ref's bytes."""
    cls = st.REGISTRY[name]
    w = np.ascontiguousarray(np.random.default_rng(5).standard_normal((4, 256)), np.float32)
    want = np.zeros((w.size // 32, cls.type_size), np.uint8)
    traits(ggml, cls).from_float_ref(ptr(w), ptr(want), w.size)
    bad = np.nonzero((cls.quantize_rtn(w) != want).any(-1))[0]
    assert not bad.size, f"blocks differ from quantize_row_q4_0_ref: {bad[:10].tolist()}"


@pytest.mark.parametrize("name", NAMES)
def test_grid_is_dequantize_parts(name):
    """grid's per-sub-block y = a * q + b (what methods round onto) is dequantize_parts exactly, up
    to the sign of an exact zero (-0 read as +0), edge blocks at fp16 max included."""
    cls = st.REGISTRY[name]
    blocks = random_blocks(cls, np.random.default_rng(3 + int(cls.qtype)))
    parts = cls.unpack(blocks)
    a, b = cls.grid(**parts)
    assert a.shape == b.shape == (len(blocks), cls.block_size // cls.sub) and a.dtype == b.dtype == np.float32
    q = parts["q"].reshape(len(blocks), -1, cls.sub).astype(np.float32)
    assert parts["q"].max() == 2**cls.bits - 1 and parts["q"].min() == 0
    y = (a[..., None] * q + b[..., None]).reshape(len(blocks), -1) + np.float32(0)
    want = cls.dequantize_parts(**parts) + np.float32(0)
    bad = differing(y, want)
    assert not bad, f"{name}: grid differs from dequantize_parts in blocks {bad[:10]}"
