"""The patched ggml (built by quant2gguf.llama.build, cached) against the Python reference:
to_float bit for bit, the C reference quantizer byte for byte, vec_dot with protected slots,
row validation, and llama.cpp's own test-quantize-fns."""
import ctypes
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from quant2gguf import gguf_types as gt
from quant2gguf import llama
from quant2gguf import quantizer as qz

GGML_TYPE_Q8_1 = 9
FP16_SPECIAL = np.array([0.0, -0.0, 65504.0, 2.0**-24, 2.0**-14, 6.1e-5, 1.0, 1e-3, 7.0, 1e4], np.float16)

TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                           ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", TO_FLOAT),
                ("from_float_ref", FROM_FLOAT)]


class TypeTraitsCpu(ctypes.Structure):
    _fields_ = [("from_float", FROM_FLOAT), ("vec_dot", VEC_DOT), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


X86_AVX2 = platform.machine().lower() in ("x86_64", "amd64") and " avx2" in (
    Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")


@pytest.fixture(scope="module")
def ggml():
    llama.build()
    d = llama.lib_dir()
    base = ctypes.CDLL(str(d / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(d / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    base.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
    base.ggml_get_type_traits.argtypes = [ctypes.c_int]
    base.ggml_validate_row_data.restype = ctypes.c_bool
    base.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCpu)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    cpu.ggml_cpu_init()
    return base, cpu


def ptr(a: np.ndarray) -> ctypes.c_void_p:
    assert a.flags.c_contiguous
    return ctypes.c_void_p(a.ctypes.data)


def c_to_float(base, t: gt.QType, packed: np.ndarray) -> np.ndarray:
    tr = base.ggml_get_type_traits(t.id).contents
    assert tr.type_name.decode() == t.name.lower() and tr.blck_size == t.group_size and tr.type_size == t.block_bytes
    assert tr.is_quantized
    packed = np.ascontiguousarray(packed)
    out = np.empty(packed.size // t.block_bytes * t.group_size, np.float32)
    tr.to_float(ptr(packed), ptr(out), out.size)
    return out


def random_weight(t: gt.QType, n: int, nb: int, rng) -> qz.QuantizedWeight:
    """Arbitrary codes; scales/offsets/protected values mixing normal and fp16 extremes; random slots."""
    k = nb * t.group_size
    sign = lambda *s: rng.choice([1, 1, -1], size=s)  # noqa: E731
    extreme = lambda *s: rng.choice(FP16_SPECIAL, size=s) * sign(*s)  # noqa: E731
    d = np.where(rng.random((n, nb)) < 0.3, extreme(n, nb), rng.standard_normal((n, nb)) * 0.05).astype(np.float16)
    m = np.where(rng.random((n, nb)) < 0.3, extreme(n, nb), rng.standard_normal((n, nb)) * 0.2).astype(np.float16)
    codes = rng.integers(0, 8, (n, k), dtype=np.uint8)
    pidx = pval = None
    if t.slots:
        pidx = rng.integers(0, t.group_size, (n, nb, t.slots)).astype(np.uint8)
        pidx[..., 1] = np.where(pidx[..., 1] == pidx[..., 0], gt.EMPTY, pidx[..., 1])
        pidx[rng.random(pidx.shape) < 0.3] = gt.EMPTY
        pval = np.where(rng.random(pidx.shape) < 0.3, extreme(*pidx.shape), rng.standard_normal(pidx.shape))
        pval = np.where(pidx == gt.EMPTY, 0, pval).astype(np.float16)
        pidx, pval = torch.from_numpy(pidx), torch.from_numpy(pval)
    return qz.QuantizedWeight(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m), 3, t.group_size,
                              pidx, pval)


@pytest.mark.parametrize("name", list(gt.TYPES))
def test_to_float_bit_exact(ggml, name):
    base, _ = ggml
    t = gt.TYPES[name]
    rng = np.random.default_rng(t.id)
    for n, nb in [(1, 1), (3, 5), (16, 8)]:
        qw = random_weight(t, n, nb, rng)
        with np.errstate(over="ignore"):
            ref = qw.dequantize().numpy()
        got = c_to_float(base, t, gt.pack(qw, t)).reshape(ref.shape)
        diff = np.nonzero(got.view(np.uint32) != ref.view(np.uint32))
        blocks = sorted({(int(r), int(c) // t.group_size) for r, c in zip(*diff)})
        assert not blocks, f"{name}: {len(blocks)} blocks differ (row, block): {blocks[:10]}"


@pytest.mark.parametrize("name", list(gt.TYPES))
def test_c_reference_quantizer_matches_python(ggml, name):
    """quantize_row_*_ref (RTN min-max) writes the bytes of pack(quantizer.quantize(w))."""
    base, _ = ggml
    t = gt.TYPES[name]
    tr = base.ggml_get_type_traits(t.id).contents
    gen = torch.Generator().manual_seed(t.id)
    for scale in (1.0, 1e-5, 3e4):
        w = (torch.randn(4, 4 * t.group_size, generator=gen) * scale).clamp(-65000, 65000)
        w[0, :t.group_size] = 0.5  # constant group: d == 0
        x = np.ascontiguousarray(w.numpy(), np.float32)
        out = np.zeros((4, t.row_bytes(x.shape[1])), np.uint8)
        tr.from_float_ref(ptr(x), ptr(out), x.size)
        want = gt.pack(qz.quantize(w, 3, t.group_size), t)
        bad = np.nonzero((out != want).reshape(4, -1, t.block_bytes).any(-1))
        assert bad[0].size == 0, f"{name} scale {scale}: blocks differ (row, block): {list(zip(*bad))[:10]}"


@pytest.mark.parametrize("name", list(gt.TYPES))
def test_vec_dot_q8_1_with_protected_slots(ggml, name):
    base, cpu = ggml
    t = gt.TYPES[name]
    tc = cpu.ggml_get_type_traits_cpu(t.id).contents
    assert tc.vec_dot_type == GGML_TYPE_Q8_1 and tc.nrows == 1
    q8 = cpu.ggml_get_type_traits_cpu(GGML_TYPE_Q8_1).contents
    rng = np.random.default_rng(100 + t.id)
    gen = torch.Generator().manual_seed(t.id)
    for trial in range(8):
        k = t.group_size * int(rng.integers(1, 9))
        w = torch.randn(1, k, generator=gen)
        prot = torch.zeros(1, k, dtype=torch.bool)
        if t.slots:
            for b in range(k // t.group_size):  # 0..2 protected weights per group
                cnt = int(rng.integers(0, t.slots + 1))
                prot[0, b * t.group_size + torch.randperm(t.group_size, generator=gen)[:cnt]] = True
            w[prot] *= 20  # outliers: the protected correction matters
        qw = qz.quantize(w, 3, t.group_size, protect=prot if t.slots else None, slots=t.slots)
        wq = qw.dequantize().numpy().astype(np.float64)[0]
        packed = np.ascontiguousarray(gt.pack(qw, t)[0])
        x = np.ascontiguousarray(rng.standard_normal(k).astype(np.float32) * (1 + trial))
        xq = np.zeros(k // 32 * 36, np.uint8)
        q8.from_float(ptr(x), ptr(xq), k)
        blk = xq.reshape(-1, 36)  # block_q8_1: d fp16, s fp16, qs int8[32]; ggml has no to_float for it
        a = (blk[:, 0:2].copy().view("<f2").astype(np.float32) * blk[:, 4:].view(np.int8)).reshape(-1)
        res = np.zeros(1, np.float32)
        tc.vec_dot(k, ptr(res), 0, ptr(packed), 0, ptr(xq), 0, 1)
        ref = float(wq @ a.astype(np.float64))
        # only the fp16 rounding of Q8_1's s = d*sum(q) and fp32 sums separate the two
        tol = 1e-3 * float(qw.offsets.float().abs().max()) * float(np.abs(a).sum()) + 1e-4 * float(np.abs(wq * a).sum()) + 1e-5
        assert abs(res[0] - ref) <= tol, f"{name} k={k}: vec_dot {res[0]} vs reference {ref} (tol {tol})"


def finite_weight(t: gt.QType, n: int, nb: int, rng) -> qz.QuantizedWeight:
    """random_weight with scales, offsets and protected values clamped: finite dot products."""
    qw = random_weight(t, n, nb, rng)
    qw.scales = qw.scales.float().clamp(-1, 1).half()
    qw.offsets = qw.offsets.float().clamp(-1, 1).half()
    if qw.pval is not None:
        qw.pval = qw.pval.float().clamp(-100, 100).half()
    return qw


def check_x8(lib, vec_dot, t: gt.QType, q8, rng) -> bool:
    """The CPU_REPACK path (8 rows interleaved): ggml_q3g_repack_x8 then ggml_q3g_gemv_x8 against
    vec_dot row by row and an fp64 reference; False where the build has no such path."""
    lib.ggml_q3g_x8_supported.restype, lib.ggml_q3g_x8_supported.argtypes = ctypes.c_bool, [ctypes.c_int]
    lib.ggml_q3g_repack_x8.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.ggml_q3g_gemv_x8.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_int]
    lib.ggml_q3g_gemm_x8.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    if not lib.ggml_q3g_x8_supported(t.id):
        return False
    for nr, nb in [(8, 1), (16, 5), (24, 9), (8, 14)]:
        qw = finite_weight(t, nr, nb, rng)
        k = nb * t.group_size
        rows = np.ascontiguousarray(gt.pack(qw, t))
        x8 = np.zeros_like(rows)
        lib.ggml_q3g_repack_x8(t.id, ptr(x8), ptr(rows), nr, k)
        assert sorted(x8.tobytes()) == sorted(rows.tobytes()), f"{t.name}: repack is not a permutation of the bytes"
        x = np.ascontiguousarray(rng.standard_normal(k).astype(np.float32))
        xq = np.zeros(k // 32 * 36, np.uint8)
        q8.from_float(ptr(x), ptr(xq), k)
        blk = xq.reshape(-1, 36)
        a = (blk[:, 0:2].copy().view("<f2").astype(np.float64) * blk[:, 4:].view(np.int8)).reshape(-1)
        got = np.full(nr + 8, np.nan, np.float32)
        lib.ggml_q3g_gemv_x8(t.id, k, ptr(got), ptr(x8), ptr(xq), nr)
        assert np.isnan(got[nr:]).all(), f"{t.name}: wrote past row {nr}"
        wq = qw.dequantize().numpy().astype(np.float64)
        ref = wq @ a
        for r in range(nr):
            one = np.zeros(1, np.float32)
            vec_dot(k, ptr(one), 0, ptr(np.ascontiguousarray(rows[r])), 0, ptr(xq), 0, 1)
            # the same sums in another fp32 order
            assert got[r] == pytest.approx(one[0], rel=1e-5, abs=1e-4), f"{t.name} {nr}x{k} row {r}: {got[r]} vs vec_dot {one[0]}"
            tol = (1e-3 * float(np.abs(qw.offsets[r].float().numpy()).max()) * float(np.abs(a).sum())
                   + 1e-4 * float(np.abs(wq[r] * a).sum()) + 1e-4)
            assert abs(got[r] - ref[r]) <= tol, f"{t.name} {nr}x{k} row {r}: {got[r]} vs reference {ref[r]}"
        # gemm (prompt batches): 6 activation rows = one group of 4 + 2 single, output rows bs apart
        na, bs = 6, nr + 3
        xs = np.ascontiguousarray((rng.standard_normal((na, k)) * np.arange(1, na + 1)[:, None]).astype(np.float32))
        xsq = np.zeros((na, k // 32 * 36), np.uint8)
        for i in range(na):
            q8.from_float(ptr(xs[i]), ptr(xsq[i]), k)
        out = np.full((na, bs), np.nan, np.float32)
        lib.ggml_q3g_gemm_x8(t.id, k, ptr(out), bs, ptr(x8), ptr(xsq), na, nr)
        assert np.isnan(out[:, nr:]).all(), f"{t.name}: gemm wrote past row {nr}"
        for i in range(na):
            one = np.zeros(nr, np.float32)
            lib.ggml_q3g_gemv_x8(t.id, k, ptr(one), ptr(x8), ptr(np.ascontiguousarray(xsq[i])), nr)
            assert (out[i, :nr] == one).all(), f"{t.name} {nr}x{k}: gemm activation row {i} differs from gemv"
            for r in (0, nr - 1):
                ref1 = np.zeros(1, np.float32)
                vec_dot(k, ptr(ref1), 0, ptr(np.ascontiguousarray(rows[r])), 0, ptr(np.ascontiguousarray(xsq[i])), 0, 1)
                assert out[i, r] == pytest.approx(ref1[0], rel=1e-5, abs=1e-4 * (i + 1)), f"{t.name}: gemm ({i}, {r})"
    return True


@pytest.mark.parametrize("name", list(gt.TYPES))
def test_repacked_gemv_x8(ggml, name):
    """x86 AVX2 builds repack Q3_G128/Q3_G64 weights into 8-row groups (CPU_REPACK buffer) and
    run mul_mat through ggml_q3g_gemv_x8; P types and other builds keep vec_dot."""
    _, cpu = ggml
    t = gt.TYPES[name]
    tc = cpu.ggml_get_type_traits_cpu(t.id).contents
    q8 = cpu.ggml_get_type_traits_cpu(GGML_TYPE_Q8_1).contents
    if not X86_AVX2 and not t.slots:
        pytest.skip("needs an x86 AVX2 build: the repacked path exists only there")
    repacked = check_x8(cpu, tc.vec_dot, t, q8, np.random.default_rng(300 + t.id))
    # P types (protected slots) stay on vec_dot by design; the others must take the repacked path
    assert repacked == (not t.slots), f"{name}: repacked path {'taken' if repacked else 'missing'}"


@pytest.mark.parametrize("name", list(gt.TYPES))
def test_validate_row_data(ggml, name):
    base, _ = ggml
    t = gt.TYPES[name]
    qw = qz.quantize(torch.randn(1, 2 * t.group_size), 3, t.group_size)
    good = np.ascontiguousarray(gt.pack(qw, t)[0])
    assert base.ggml_validate_row_data(t.id, ptr(good), good.size)
    bb = t.block_bytes
    half = lambda v: np.array([v], "<u2").view(np.uint8)  # noqa: E731
    cases = {"d NaN": [(0, half(0x7E00))], "m +Inf": [(bb + 2, half(0x7C00))]}  # block 0 d, block 1 m
    if t.slots:  # block 1: slot 0 used (index 3) with value -Inf; block 0: slot 1 index out of the block
        cases["pv -Inf"] = [(bb + bb - 2, np.array([3], np.uint8)), (bb + 4, half(0xFC00))]
        cases["pi >= G"] = [(bb - 1, np.array([t.group_size], np.uint8))]
    for what, edits in cases.items():
        bad = good.copy()
        for off, val in edits:
            bad[off:off + len(val)] = val
        assert not base.ggml_validate_row_data(t.id, ptr(bad), bad.size), f"{name}: {what} accepted"


def test_quantize_fns_passes_for_our_types(ggml):
    exe = llama.tool("test-quantize-fns")
    r = subprocess.run([str(exe), "-v"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for t in gt.TYPES.values():
        lines = [ln for ln in r.stdout.splitlines() if ln.strip().startswith(t.name.lower() + " ")]
        assert len(lines) == 3 and all(" ok " in ln for ln in lines), f"{t.name}: {lines}"


def test_scalar_and_avx2_paths_agree(ggml, tmp_path):
    """The build runs one vec_dot path (AVX2 here, with AVX512-VNNI where -march=native has it);
    compile q3g.c scalar, AVX2 (maddubs) and AVX512-VNNI (dpbusd, ternlog) and compare them."""
    import shutil
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler")
    from pathlib import Path
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if not all(f" {f}" in cpuinfo for f in ("avx2", "fma", "f16c")):
        pytest.skip("this CPU cannot run the AVX2 path")
    src = llama.source_dir()
    inc = [f"-I{src / p}" for p in ("ggml/include", "ggml/src", "ggml/src/ggml-cpu")]
    variants = {"scalar": [], "avx2": ["-mavx2", "-mfma", "-mf16c"]}
    if all(f" {f}" in cpuinfo for f in ("avx512f", "avx512vl", "avx512bw", "avx512_vnni")):
        variants["avx512vnni"] = [*variants["avx2"], "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni"]
    libs = {}
    for name, flags in variants.items():
        so = tmp_path / f"q3g_{name}.so"
        subprocess.run([gcc, "-O2", "-shared", "-fPIC", *flags, *inc, str(src / "ggml/src/ggml-cpu/q3g.c"),
                        f"-L{llama.lib_dir()}", "-lggml-base", "-o", str(so)], check=True)
        libs[name] = ctypes.CDLL(str(so))
    _, cpu = ggml
    q8 = cpu.ggml_get_type_traits_cpu(GGML_TYPE_Q8_1).contents
    rng = np.random.default_rng(7)
    for t in gt.TYPES.values():
        qw = random_weight(t, 1, 6, rng)
        qw.scales = qw.scales.float().clamp(-1, 1).half()  # finite sums: compare arithmetic, not overflow
        qw.offsets = qw.offsets.float().clamp(-1, 1).half()
        if qw.pval is not None:
            qw.pval = qw.pval.float().clamp(-100, 100).half()
        packed = np.ascontiguousarray(gt.pack(qw, t)[0])
        k = 6 * t.group_size
        x = np.ascontiguousarray(rng.standard_normal(k).astype(np.float32))
        xq = np.zeros(k // 32 * 36, np.uint8)
        q8.from_float(ptr(x), ptr(xq), k)
        out = {}
        for name, lib in libs.items():
            r = np.zeros(1, np.float32)
            fn = ctypes.cast(getattr(lib, f"ggml_vec_dot_{t.name.lower()}_q8_1"), VEC_DOT)
            fn(k, ptr(r), 0, ptr(packed), 0, ptr(xq), 0, 1)
            out[name] = float(r[0])
        for name in out:
            assert out["scalar"] == pytest.approx(out[name], rel=1e-5, abs=1e-4), f"{t.name}: {out}"
        for name, lib in libs.items():  # the repacked path (none in the scalar build, nor for P types)
            fn = ctypes.cast(getattr(lib, f"ggml_vec_dot_{t.name.lower()}_q8_1"), VEC_DOT)
            assert check_x8(lib, fn, t, q8, rng) == (name != "scalar" and not t.slots), name
