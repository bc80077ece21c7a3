"""GPTQ's Triton column loop (kernels/gptq.py) against the torch loop in methods/gptq.py.

CPU: the kernel runs under TRITON_INTERPRET=1 (numpy, no fused multiply-add): the same codes, group
parameters and error-updated weights bit for bit, for static (act-order, a stock grid) and dynamic
groups, and a width that is no multiple of the block. On a GPU the update may be contracted into
an FMA: there the result must still be GPTQ's (same output error within a hair), checked apart.
"""
import os

if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from quant2gguf.methods.gptq import gptq_quantize
from quant2gguf.quantizer import QuantizedWeight

triton = pytest.importorskip("triton", reason="triton is not installed")


def _problem(n, k, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g) * torch.linspace(0.2, 3.0, k)  # uneven channels: act-order matters
    w = torch.randn(n, k, generator=g) * 0.05
    h = 2 * x.t() @ x / x.shape[0]
    h[:, 3] = h[3, :] = 0  # a dead input channel
    return w.to(device), h.to(device)


CASES = [  # (n, k, group size, act_order, static_groups)
    (40, 256, 128, True, False),
    (40, 256, 64, False, False),   # dynamic: fitted at each group start, mid-block for G64
    (24, 256, 32, False, False),
    (24, 192, 64, False, True),    # last block 64 wide: the kernel pads to a power of two
    (33, 320, 64, True, False),
]


@pytest.mark.parametrize("n,k,gs,act,static", CASES)
def test_kernel_equals_torch_loop(n, k, gs, act, static):
    w, h = _problem(n, k)
    ref, ref_pre = gptq_quantize(w, h, 3, gs, damp=0.01, act_order=act, static_groups=static, clip=True,
                                 return_prequant=True, kernel=False)
    got, got_pre = gptq_quantize(w, h, 3, gs, damp=0.01, act_order=act, static_groups=static, clip=True,
                                 return_prequant=True, kernel=True)
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scales, ref.scales) and torch.equal(got.offsets, ref.offsets)
    assert torch.equal(got_pre, ref_pre)


def test_kernel_with_a_given_grid():
    """A stock type's fp32 grid (static groups of its sub-blocks), as gptq_stock passes it."""
    w, h = _problem(32, 256, seed=1)
    d = (w.abs().reshape(32, 16, 16).amax(-1) / 3).float()
    m = -4 * d
    ref = gptq_quantize(w, h, 3, 16, damp=0.1, act_order=True, grid=(d, m), kernel=False)
    got = gptq_quantize(w, h, 3, 16, damp=0.1, act_order=True, grid=(d, m), kernel=True)
    assert torch.equal(got.codes, ref.codes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the compiled kernel is GPU-only")
def test_compiled_kernel_is_gptq():
    w, h = _problem(512, 1024, device="cuda")
    ref = gptq_quantize(w, h, 3, 128, act_order=True, kernel=False)
    got = gptq_quantize(w, h, 3, 128, act_order=True, kernel=True)

    def out_err(q: QuantizedWeight):
        e = q.dequantize().float() - w
        return (e @ h * e).sum().item()

    assert (got.codes != ref.codes).float().mean().item() < 1e-3  # FMA ties only
    assert out_err(got) == pytest.approx(out_err(ref), rel=1e-3)


def test_self_check_turns_a_broken_kernel_off(monkeypatch):
    """GPTQ checks the kernel once per device before using it by default: one that fails to launch (or
    rounds differently) is replaced by the torch loop with a warning, not a lane dead at layer 0."""
    from quant2gguf.kernels import gptq as gk
    from quant2gguf.methods import gptq

    monkeypatch.setattr(gptq, "_KERNEL_OK", {})
    assert gptq._kernel_ok(torch.device("cpu"))  # the interpreted kernel passes

    def broken(*a, **k):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(gptq, "_KERNEL_OK", {})
    monkeypatch.setattr(gk, "gptq_cols", broken)
    with pytest.warns(UserWarning, match="torch loop runs instead"):
        assert not gptq._kernel_ok(torch.device("cpu"))
