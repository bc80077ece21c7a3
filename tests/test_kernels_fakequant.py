"""Fake-quant kernel (kernels/fakequant.py) against the reference quantizer and float64 autograd.

CPU: Triton runs under TRITON_INTERPRET=1 (set here before triton is imported); GPU: real kernels.
Random inputs are seeded per test (the `seed` fixture)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from conftest import seed_from_test_id  # noqa: E402

from quant2gguf import quantizer as Q  # noqa: E402
from quant2gguf.kernels import fakequant as FQ  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def seed(request):
    return seed_from_test_id(request)


def make_case(n, k, g, bits=3, slots=2, dtype=torch.float32):
    """Random W with fp32 master d, m near an RTN fit, some d == 0 groups, protected slots, and
    weights placed at clamp edges and rounding ties of the fp16-rounded grid."""
    w = torch.randn(n, k, device=DEV) * torch.rand(n, 1, device=DEV) * 0.2
    qmax = 2**bits - 1
    wg = w.reshape(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    d = (hi - lo) / qmax * (0.8 + 0.4 * torch.rand_like(lo))  # not fp16 values: kernel must round
    m = lo + (torch.rand_like(lo) - 0.5) * d
    zero = torch.rand_like(d) < 0.1
    d = torch.where(zero, torch.zeros_like(d), d)
    d16, m16 = d.half().float(), m.half().float()
    # edges: w = m16 + t*d16 for t at clamp bounds / ties / outside
    t = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 2.5, qmax - 0.5, qmax, qmax + 0.5, qmax + 2.0], device=DEV)
    sel = torch.rand(n, k // g, device=DEV) < 0.5
    col = torch.randint(0, g, (n, k // g), device=DEV)
    val = m16 + t[torch.randint(0, len(t), (n, k // g), device=DEV)] * d16
    wg.scatter_(-1, col.unsqueeze(-1), torch.where(sel, val, wg.gather(-1, col.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1))
    w = wg.reshape(n, k).to(dtype)
    pidx = None
    if slots:
        protect = torch.zeros(n, k, dtype=torch.bool, device=DEV)
        pr = torch.rand(n, k // g, device=DEV) < 0.5
        pc = torch.randint(0, g, (n, k // g), device=DEV)
        protect.view(n, k // g, g).scatter_(-1, pc.unsqueeze(-1), pr.unsqueeze(-1))
        pidx, _ = Q.protect_slots(w.float(), protect, g, slots)
    return w, d, m, pidx


def reference_forward(w, d, m, bits, g, pidx):
    n, k = w.shape
    d16, m16 = d.half(), m.half()
    codes = Q.codes_for(w.float().reshape(n, k // g, g), d16.unsqueeze(-1), m16.unsqueeze(-1), bits)
    pval = None
    if pidx is not None:
        wg = w.float().reshape(n, k // g, g)
        pval = wg.gather(-1, pidx.long().clamp(max=g - 1)).half()
    return Q.dequantize(codes.reshape(n, k).to(torch.uint8), d16, m16, g, pidx, pval)


@pytest.mark.parametrize("g,slots,dtype", [(32, 0, torch.float32), (64, 2, torch.float32),
                                           (128, 3, torch.float32), (64, 1, torch.bfloat16)])
def test_forward_bit_exact(g, slots, dtype):
    n, k = 7, 2 * g + g  # 21 groups: not a multiple of the kernel's row block
    w, d, m, pidx = make_case(n, k, g, slots=slots, dtype=dtype)
    ref = reference_forward(w, d, m, 3, g, pidx)
    out = FQ.fake_quant(w, d, m, 3, g, pidx)
    assert out.dtype == torch.float32
    diff = (out != ref).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} mismatches, first at {diff[:5].tolist()}"
    # the torch fallback path computes the same bits
    assert torch.equal(FQ._torch_fwd(w, d, m, pidx, 3, g), ref)


def test_forward_poisoned_output_fully_written():
    if not FQ.use_triton(torch.empty(0, device=DEV)):
        pytest.skip("no triton")
    g = 64
    w, d, m, pidx = make_case(5, 3 * g, g, slots=2)
    out = torch.full(w.shape, float("nan"), device=DEV)
    FQ._launch_fwd(w, d, m, pidx, 3, g, out=out)
    assert torch.equal(out, reference_forward(w, d, m, 3, g, pidx))
    gout = torch.randn_like(w)
    outs = (torch.full_like(w, float("nan")), torch.full_like(d, float("nan")), torch.full_like(d, float("nan")))
    FQ._launch_bwd(w, d, m, pidx, gout, 3, g, outs=outs)
    assert all(torch.isfinite(t).all() for t in outs)


def float64_reference_grads(w, d, m, bits, g, pidx, gout):
    """torch autograd of w^ = d*clamp(s + (r - s).detach(), 0, qmax) + m in float64, where r is
    the fp32 reference's rounding decision (so both sides take the same branches)."""
    n, k = w.shape
    qmax = 2**bits - 1
    d16, m16 = d.half().float(), m.half().float()
    wg32 = w.float().reshape(n, k // g, g)
    zero = (d16 == 0).unsqueeze(-1)
    s32 = (wg32 - m16.unsqueeze(-1)) / torch.where(zero, torch.ones_like(d16.unsqueeze(-1)), d16.unsqueeze(-1))
    r32 = torch.round(s32.clamp(-1, qmax + 1)).double()
    w64 = w.double().detach().requires_grad_()
    d64 = d16.double().detach().requires_grad_()
    m64 = m16.double().detach().requires_grad_()
    wg = w64.reshape(n, k // g, g)
    dd, mm = d64.unsqueeze(-1), m64.unsqueeze(-1)
    s = (wg - mm) / torch.where(zero, torch.ones_like(dd), dd)
    r = s + (r32 - s).detach()
    q = torch.clamp(r, 0, qmax)
    out = torch.where(zero, mm + 0 * wg, dd * q + mm)
    if pidx is not None:
        ar = torch.arange(g, device=w.device).view(1, 1, 1, -1)
        prot = (pidx.long().unsqueeze(-1) == ar).any(-2)
        out = torch.where(prot, wg, out)
    out.reshape(n, k).backward(gout.double())
    return w64.grad, d64.grad, m64.grad


@pytest.mark.parametrize("g,slots", [(32, 0), (64, 2), (128, 1)])
def test_gradients_match_float64_autograd(g, slots):
    n, k = 6, 3 * g
    w, d, m, pidx = make_case(n, k, g, slots=slots)
    w.requires_grad_()
    dp, mp = d.clone().requires_grad_(), m.clone().requires_grad_()
    out = FQ.fake_quant(w, dp, mp, 3, g, pidx)
    gout = torch.randn_like(out)
    out.backward(gout)
    gw, gd, gm = float64_reference_grads(w.detach(), d, m, 3, g, pidx, gout)
    assert torch.equal(w.grad, gw.float())  # a mask times g: exact
    for got, ref in ((dp.grad, gd), (mp.grad, gm)):
        err = (got.double() - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 1e-5, err
        assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    # torch fallback gives the same gradients
    tw, td, tm = FQ._torch_bwd(w.detach(), d, m, pidx, gout, 3, g)
    assert torch.equal(tw, w.grad)
    assert torch.allclose(td, dp.grad, rtol=1e-5, atol=1e-6) and torch.allclose(tm, mp.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_like_learning_step():
    """A few optimizer steps on d, m reduce the reconstruction error (the estimator is usable)."""
    g = 32
    w, d, m, _ = make_case(4, 4 * g, g, slots=0)
    d = d.abs().clamp_min(1e-3).requires_grad_()
    m = m.clone().requires_grad_()
    opt = torch.optim.Adam([d, m], lr=1e-3)
    errs = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((FQ.fake_quant(w, d, m, 3, g) - w) ** 2).sum()
        loss.backward()
        opt.step()
        errs.append(loss.item())
    assert errs[-1] < errs[0]
