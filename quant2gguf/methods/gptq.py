"""GPTQ baseline (Frantar et al. 2022, arXiv 2210.17323).

Per linear: H = 2 X^T X / n from the quantized-stream inputs, damped by `damp * mean(diag H)`;
columns are quantized left to right in blocks of 128 through the upper Cholesky factor of H^-1,
each column's error spread onto the columns not yet quantized. Group parameters are fitted when a
group starts (on the error-updated weights), or all up front with `static_groups`; act-order
(columns by decreasing diag H) forces static groups so every group stays G consecutive columns.
Linears are quantized group by group (arch.py), later groups seeing the earlier ones quantized.
With a stock target (cfg.target, issue 10) the grid is a stock llama.cpp type's, fitted up front by
stock_quant.fit weighted by diag H (llama.cpp's imatrix quantizers weight by the mean x^2 the same
way), and GPTQ rounds each column onto it: static groups of the type's sub-blocks.
"""
from __future__ import annotations

import torch

from .. import stock_quant
from ..kernels import gptq as gptq_kernel
from ..calib import LayerContext
from ..quantizer import QuantizedWeight, codes_for, fit_params, search_clip


class Hessian:
    """Accumulates 2 X^T X / n over calibration tokens (a forward-hook callback)."""

    def __init__(self, k: int, device):
        self.h = torch.zeros(k, k, device=device, dtype=torch.float32)
        self.n = 0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.float()
        self.h.addmm_(x.t(), x, alpha=2.0)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.h / max(self.n, 1)


def _group_params(w, h_diag, bits, group_size, clip):
    ratio = search_clip(w, bits, group_size, x=h_diag) if clip else 1.0
    return fit_params(w, bits, group_size, ratio)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, blocksize: int = 128,
                  damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  clip: bool = False, return_prequant: bool = False, grid: tuple | None = None,
                  kernel: bool | None = None):
    """QuantizedWeight, and with return_prequant also the error-updated weights as they were
    rounded (their fake-quant is exactly the result: the natural start for QAT). `grid`: fixed
    per-group (d, m) (N, K // group_size) fitted by the caller, e.g. a stock type's fp32 (a, b):
    static groups, kept as given. `kernel`: the column loop as kernels/gptq.py's Triton launch per
    block or group (None: on CUDA; the interpreter would take minutes where the torch loop takes
    seconds)."""
    n, k = w.shape
    W = w.float().clone()
    H = h.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = static_groups or act_order or grid is not None
    ng = k // group_size
    d = torch.zeros(n, ng, dtype=torch.float16, device=w.device)
    m = torch.zeros_like(d)
    if grid is not None:
        d, m = grid
    elif static:
        d, m = _group_params(W, torch.diag(H), bits, group_size, clip)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k, device=w.device)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    cols = perm.tolist()  # one host copy: indexing the GPU tensor per column syncs every column
    hdiag = torch.diag(H)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    pre = torch.zeros(n, k, dtype=torch.float32, device=w.device) if return_prequant else None
    if kernel is None:
        kernel = w.is_cuda and _kernel_ok(w.device)
    if kernel:  # the kernel reads d, m in place (dynamic groups write into them as they start)
        d, m = d.contiguous(), m.contiguous()
        gidx, cidx = (perm // group_size).to(torch.int32), perm.to(torch.int32)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1, Hinv1 = W[:, i1:i2].clone(memory_format=torch.contiguous_format), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        if kernel:
            # segments between group starts (dynamic groups are fitted on the updated block first)
            starts = [0] if static else sorted({0, *(i for i in range(i2 - i1) if cols[i1 + i] % group_size == 0)})
            for a, b in zip(starts, starts[1:] + [i2 - i1]):
                if not static:
                    g, sl = cols[i1 + a] // group_size, slice(a, a + group_size)
                    dg, mg = _group_params(W1[:, sl], hdiag[i1 + a:i1 + a + group_size], bits, group_size, clip)
                    d[:, g], m[:, g] = dg[:, 0], mg[:, 0]
                gptq_kernel.gptq_cols(W1, Hinv1.contiguous(), d, m, gidx[i1:i2].contiguous(),
                                      cidx[i1:i2].contiguous(), codes, pre, Err1, a, b, bits)
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
            continue
        for i in range(i2 - i1):
            col = cols[i1 + i]
            g = col // group_size
            if not static and col % group_size == 0:  # group starts: fit on the updated weights
                sl = slice(i, i + group_size)
                dg, mg = _group_params(W1[:, sl], hdiag[i1 + i:i1 + i + group_size], bits, group_size, clip)
                d[:, g], m[:, g] = dg[:, 0], mg[:, 0]
            wc = W1[:, i]
            q = codes_for(wc, d[:, g], m[:, g], bits)
            deq = d[:, g].float() * q + m[:, g].float()
            codes[:, col] = q.to(torch.uint8)
            if pre is not None:
                pre[:, col] = wc
            err = (wc - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    qw = QuantizedWeight(codes, d, m, bits, group_size)
    return (qw, pre) if return_prequant else qw


_KERNEL_OK: dict = {}


def _kernel_ok(device: torch.device) -> bool:
    """Once per device: the Triton loop compiles and rounds a small problem as the torch loop does (all
    but FMA ties); else a warning and the torch loop, rather than a lane that dies at its first layer."""
    key = str(device)
    if key not in _KERNEL_OK:
        ok, why = gptq_kernel.HAS_TRITON, "triton is not installed"
        if ok:
            try:
                g = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(512, 256, generator=g, device=device)
                w, h = torch.randn(64, 256, generator=g, device=device), 2 * x.t() @ x / 512
                a = gptq_quantize(w, h, 3, 128, act_order=True, return_prequant=True, kernel=True)[0]
                b = gptq_quantize(w, h, 3, 128, act_order=True, return_prequant=True, kernel=False)[0]
                agree = (a.codes == b.codes).float().mean().item()
                ok, why = agree > 0.99, f"its codes agree with the torch loop's on {100 * agree:.1f} % only"
            except Exception as e:  # noqa: BLE001 - any failure to compile or launch: use the torch loop
                ok, why = False, f"{type(e).__name__}: {str(e)[:200]}"
        if not ok:
            import warnings
            warnings.warn(f"GPTQ's Triton column loop is off on {key} ({why}): the torch loop runs instead")
        _KERNEL_OK[key] = ok
    return _KERNEL_OK[key]


def gptq_stock(w: torch.Tensor, h: torch.Tensor, qtype: str, damp: float = 0.01, act_order: bool = False,
               search: bool = True, return_prequant: bool = False):
    """GPTQ in a stock type's grid: parameters fitted on w weighted by diag H (stock_quant.fit;
    search=False: stock_types' plain RTN parameters), then every column rounded onto them."""
    f = stock_quant.fit(w, qtype, imp=torch.diag(h), search=search)
    q, pre = gptq_quantize(w, h, f.cls.bits, f.cls.sub, damp=damp, act_order=act_order, grid=(f.a, f.b),
                           return_prequant=True)
    sw = stock_quant.finish(f, q.codes)
    return (sw, pre) if return_prequant else sw


def quantize_layer(ctx: LayerContext, act_order: bool | None = None, damp: float = 0.01, clip: bool = True,
                   static_groups: bool = False) -> dict[str, QuantizedWeight]:
    """`clip`: the per-group clip search (our types) or, with a stock target, the parameter search.
    `act_order` None: on in a stock grid (its groups are static anyway; SmolLM2 Q4_0 news KLD 0.190 ->
    0.116, docs/BENCHMARKS.md), off in ours (qwen15 Q3_G128: news 0.148 -> 0.142 but code 0.155 -> 0.160)."""
    c = ctx.cfg
    if act_order is None:
        act_order = bool(c.target)
    if c.group_size > 128 and not (act_order or static_groups):
        raise ValueError("GPTQ fits groups within a 128-column block: use group size <= 128 or --act-order")
    for group in ctx.arch.groups:
        hs = {name: Hessian(ctx.linear(name).in_features, ctx.device) for name in group.linears}
        ctx.forward(ctx.q_in, hooks=hs, keep=False)
        for name in group.linears:
            w = ctx.linear(name).weight.data
            if c.target:
                q, pre = gptq_stock(w, hs[name].value(), stock_quant.linear_type(ctx, name), damp=damp,
                                    act_order=act_order, search=clip, return_prequant=True)
            else:
                q, pre = gptq_quantize(w, hs[name].value(), c.bits, c.group_size, damp=damp, act_order=act_order,
                                       static_groups=static_groups, clip=clip, return_prequant=True)
            ctx.set_quantized(name, q, prequant=pre)
        del hs
    return dict(ctx.quantized)
