"""Packed 3-bit matmul (kernels/qmatmul.py, kernels/qlinear.py) against float64 references.

CPU: Triton under TRITON_INTERPRET=1 (set before triton is imported); GPU: real kernels.
Random inputs are seeded per test (the `seed` fixture); outputs are poisoned with NaN before the kernels
write them."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from conftest import seed_from_test_id  # noqa: E402

from quant2gguf import quantizer as Q  # noqa: E402
from quant2gguf.kernels import qmatmul as QM  # noqa: E402
from quant2gguf.kernels.qlinear import QuantLinear, swap_linears  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def seed(request):
    return seed_from_test_id(request)


def rand_qw(n, k, g, bits=3, slots=2, p=0.03):
    w = torch.randn(n, k, device=DEV) * 0.05
    protect = None
    if slots:
        protect = torch.rand(n, k, device=DEV) < p
        cnt = protect.view(n, k // g, g).cumsum(-1)
        protect &= (cnt <= slots).view(n, k)  # at most `slots` per group
    return Q.quantize(w, bits, g, protect=protect, slots=slots)


@pytest.mark.parametrize("g", [32, 64, 128])
def test_pack_roundtrip(g):
    qw = rand_qw(9, 4 * g, g, slots=3, p=0.05)
    pw = QM.pack(qw)
    assert pw.qweight.dtype == torch.int32 and pw.qweight.shape == (3, 4 * g // 32, 9)
    back = QM.unpack(pw)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.pidx, qw.pidx) and torch.equal(back.pval, qw.pval)
    assert torch.equal(QM.dequantize_packed(pw), qw.dequantize())
    codes = torch.randint(0, 8, (3, 64), dtype=torch.uint8, device=DEV)
    assert torch.equal(QM.unpack_codes(QM.pack_codes(codes)), codes)
    assert pw.qweight.numel() * 4 == 9 * 4 * g * 3 // 8  # exactly 3 bits a code


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


# (n, k, g, M, dtype, path, config): shapes with row and K tails relative to the tiles
CASES = [
    (40, 384, 128, 1, torch.float16, "gemv", {"BN": 16, "BK": 256, "num_warps": 4}),
    (37, 320, 64, 1, torch.bfloat16, "gemv", {"BN": 8, "BK": 128, "SPLIT": 2, "num_warps": 4}),
    (24, 96, 32, 3, torch.float32, "gemv", {"BN": 8, "BK": 64, "SPLIT": 3, "num_warps": 2}),  # an empty slice
    # prefetching batch-1 loop: slices of 3 steps, the last prefetch past the slice end (masked)
    (37, 320, 64, 1, torch.float16, "gemv", {"BN": 8, "BW": 2, "SPLIT": 2, "PF": 1, "num_warps": 4}),
    (40, 384, 128, 1, torch.bfloat16, "gemv", {"BN": 16, "BW": 4, "PF": 1, "num_stages": 2, "num_warps": 4}),
    (33, 256, 128, 8, torch.float16, "gemv", {"BN": 8, "BK": 128, "SPLIT": 4, "num_warps": 4}),
    (48, 192, 64, 5, torch.bfloat16, "gemv", {"BN": 16, "BK": 64, "num_warps": 4}),
    (72, 320, 64, 2, torch.float16, "gemv", {"BN": 32, "BW": 1, "SPLIT": 4, "num_warps": 4}),  # the batch>1 shape
    (40, 384, 128, 37, torch.float16, "gemm", {"BM": 16, "BN": 32, "BK": 64, "num_warps": 4}),
    (70, 192, 64, 20, torch.bfloat16, "gemm", {"BM": 16, "BN": 64, "BK": 32, "num_warps": 4}),
    (24, 96, 32, 17, torch.float32, "gemm", {"BM": 32, "BN": 16, "BK": 32, "num_warps": 4}),
    (40, 384, 128, 300, torch.float16, "dense", None),
    (37, 192, 64, 260, torch.bfloat16, "dense", None),
]


@pytest.mark.parametrize("n,k,g,M,dtype,path,config", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_qmatmul_matches_float64(n, k, g, M, dtype, path, config, bias):
    qw = rand_qw(n, k, g, slots=0 if bias else 2)
    pw = QM.pack(qw)
    x = torch.randn(M, k, device=DEV).to(dtype)
    b = torch.randn(n, device=DEV).to(dtype) if bias else None
    ref = x.double() @ qw.dequantize().double().T + (b.double() if bias else 0)
    out = torch.full((M, n), float("nan"), dtype=dtype, device=DEV)
    y = QM.qmatmul(x, pw, b, config=config, force=path, out=out)
    assert y.shape == (M, n) and y.dtype == dtype
    if pw.prot_rows is None:  # with protected slots the corrected result is a new tensor
        assert torch.isfinite(out).all(), "kernel left poisoned outputs"
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)


@pytest.mark.parametrize("g", [32, 128])
def test_dequantize_dense_bit_exact(g):
    qw = rand_qw(23, 3 * g, g, slots=2)
    pw = QM.pack(qw)
    out = torch.full(qw.shape, float("nan"), dtype=torch.float16, device=DEV)
    QM.dequantize_dense(pw, torch.float16, out=out)
    assert torch.equal(out, qw.dequantize().half())
    assert torch.equal(QM.dequantize_dense(pw, torch.float32), qw.dequantize())


def test_qmatmul_poison_every_element_written():
    for path, cfg, M in (("gemv", {"BN": 8, "BK": 128, "num_warps": 4}, 3),
                         ("gemv", {"BN": 16, "BK": 64, "SPLIT": 2, "num_warps": 4}, 1),
                         ("gemm", {"BM": 16, "BN": 32, "BK": 64, "num_warps": 4}, 19)):
        qw = rand_qw(45, 256, 64, slots=0)
        x = torch.randn(M, 256, device=DEV).half()
        out = torch.full((M, 45), float("nan"), dtype=torch.float16, device=DEV)
        QM.qmatmul(x, QM.pack(qw), config=cfg, force=path, out=out)
        assert torch.isfinite(out).all()
        if path == "gemv":  # split-K counters are left at zero for the next launch
            assert int(QM._WS[str(x.device)][1].abs().sum()) == 0
        assert rel_err(out, x.double() @ qw.dequantize().double().T) < TOL[torch.float16]


@pytest.mark.parametrize("split", [1, 2])
def test_gemv_dense_protection(split):
    """More protected entries per row than one CSR chunk (32) in the fused GEMV correction."""
    qw = rand_qw(19, 384, 32, slots=3, p=0.5)
    pw = QM.pack(qw)
    assert int((pw.prot_rowptr[1:] - pw.prot_rowptr[:-1]).max()) > 32
    x = torch.randn(2, 384, device=DEV)
    out = torch.full((2, 19), float("nan"), device=DEV)
    QM.qmatmul(x, pw, config={"BN": 8, "BK": 128, "SPLIT": split, "num_warps": 4}, force="gemv", out=out)
    assert rel_err(out, x.double() @ qw.dequantize().double().T) < TOL[torch.float32]


def test_default_dispatch_and_batch_dims():
    """No config: the default (autotuned on GPU) path, a 3-D input, and M > 8 splits to GEMM."""
    qw = rand_qw(64, 256, 128, slots=1)
    pw = QM.pack(qw)
    wd = qw.dequantize().double()
    for shape in ((1, 1, 256), (2, 3, 256), (2, 9, 256), (2, 130, 256)):
        x = torch.randn(*shape, device=DEV).half()
        y = QM.qmatmul(x, pw)
        assert y.shape == (*shape[:-1], 64)
        assert rel_err(y, x.double() @ wd.T) < TOL[torch.float16]


def test_gemv_default_configs_repeat_calls():
    """Heuristic configs at batch 1, 2 and 7, with protected entries and bias. The second call of a
    signature takes the cached direct launch on GPU: fresh inputs must give fresh, right results."""
    qw = rand_qw(160, 512, 128, slots=1)
    pw = QM.pack(qw)
    wd = qw.dequantize().double()
    b = torch.randn(160, device=DEV).half()
    for m in (1, 2, 7):
        for _ in range(2):
            x = torch.randn(m, 512, device=DEV).half()
            y = QM.qmatmul(x, pw, b)
            assert rel_err(y, x.double() @ wd.T + b.double()) < TOL[torch.float16]
    assert int(QM._WS[str(x.device)][1].abs().sum()) == 0
    pw.prot_rowptr = None  # a PackedWeight built without the CSR offsets (the first H100 bench's copies)
    x = torch.randn(1, 512, device=DEV).half()
    assert rel_err(QM.qmatmul(x, pw), x.double() @ wd.T) < TOL[torch.float16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the direct launch exists only there")
def test_direct_launch_is_taken():
    """The second call of a signature goes through the cached launcher (kernels/launch.py), with
    results equal to the JIT launch's; triton 3.6's empty hook chains must not turn it off."""
    from quant2gguf.kernels import launch as KL
    KL.clear()
    pw = QM.pack(rand_qw(96, 256, 64))
    x = torch.randn(1, 256, device=DEV).half()
    y0 = QM.qmatmul(x, pw)
    assert KL.ENABLED and len(KL._CACHE) == 1
    y1 = QM.qmatmul(x, pw)
    assert KL.ENABLED and torch.equal(y0, y1)


def test_quantlinear_module():
    qw = rand_qw(32, 128, 64, slots=2)
    bias = torch.randn(32, device=DEV)
    ql = QuantLinear.from_quantized(qw, bias)
    ql = ql.half()  # must not round the packed scales / deltas
    assert torch.equal(ql.packed.scales.T, qw.scales) and ql.packed.prot_delta.dtype == torch.float32
    x = torch.randn(4, 128, device=DEV).half()
    ref = x.double() @ qw.dequantize().double().T + bias.half().double()
    assert rel_err(ql(x), ref) < TOL[torch.float16]
    assert torch.equal(ql.weight, qw.dequantize())


def test_swap_linears_tiny_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_model
    path = make_tiny_model("qwen2", tmp_path / "m", hidden=64, layers=2, seed=int(torch.randint(0, 2**31, (1,))))
    model = AutoModelForCausalLM.from_pretrained(path).float().to(DEV).eval()
    quantized = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            w = mod.weight.detach()
            protect = torch.rand_like(w) < 0.01
            protect &= (protect.view(w.shape[0], -1, 32).cumsum(-1) <= 1).view(w.shape)
            quantized[name] = Q.quantize(w, 3, 32, protect=protect, slots=1)
    with torch.no_grad():  # the dequantized model: same weights in dense linears
        for name, qw in quantized.items():
            model.get_submodule(name).weight.copy_(qw.dequantize())
        ids = torch.randint(0, 512, (1, 12), device=DEV)
        ref = model(ids).logits.double()  # 12 tokens: GEMM path
        ref1 = model(ids[:, :5]).logits.double()  # 5 tokens: GEMV path
        swap_linears(model, quantized)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(quantized)
        got = model(ids).logits.double()
        got1 = model(ids[:, :5]).logits.double()
    assert rel_err(got, ref) < 1e-4 and rel_err(got1, ref1) < 1e-4, (rel_err(got, ref), rel_err(got1, ref1))
