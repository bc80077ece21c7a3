"""Learnable fake-quant for QAT: one fused Triton kernel per direction over a whole weight (N, K).

Shapes: W (N, K) any float dtype, contiguous; d, m (N, K//G) learnable scale/offset (fp32 master
params are fine); pidx optional uint8 (N, K//G, P), in-group index of protected weights, 255 = empty.
Viewed flat, W is (N*K/G, G): one group per row, so per-group reductions need no atomics.

Forward (bit-exact with quantizer.dequantize(codes_for(...)), fp32 out):
    d16 = fp32(fp16(d)), m16 = fp32(fp16(m))                 # round-to-nearest-even casts
    s   = (w - m16) / d16                                      # fp32, IEEE div (div_rn)
    r   = round_half_even(s);  q = clamp(r, 0, qmax)
    w^  = d16 * q + m16           (d16 == 0: q = 0, w^ = m16)
    w^  = fp32(fp16(w))           at protected positions

Backward (straight-through on round() and on the fp16 casts), g = dL/dw^:
    protected:                  dL/dw += g                           (d, m get nothing)
    d16 == 0:                   dL/dm += g                           (w, d get nothing)
    inside  (0 <= r <= qmax):   dL/dw += g,  dL/dd += g * (q - s),   dL/dm += 0
    clamped (r < 0 or r > qmax):             dL/dd += g * q,         dL/dm += g
This is exactly torch autograd of  w^ = d * clamp(s + (round(s) - s).detach(), 0, qmax) + m
(clamp passes gradient for 0 <= r <= qmax), the LSQ/EfficientQAT estimator without LSQ's
1/sqrt(N*qmax) gradient scale (leave that to the optimizer's learning rate).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU installs without triton use the torch path
    HAS_TRITON = False

from .launch import launch

EMPTY = 255


def use_triton(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or anywhere under TRITON_INTERPRET=1."""
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if HAS_TRITON:
    @triton.jit
    def _round_half_even(x):
        # x already clamped to a small range; floor-based so it runs in the interpreter and on GPU
        f = tl.floor(x)
        diff = x - f  # exact for |x| < 2**23
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        up = (diff > 0.5) | ((diff == 0.5) & odd)
        return tl.where(up, f + 1.0, f)

    @triton.jit
    def _fq_load(w_ptr, d_ptr, m_ptr, pidx_ptr, rows, cols, n_groups, G: tl.constexpr,
                 P: tl.constexpr, QMAX: tl.constexpr):
        rmask = rows < n_groups
        offs = rows[:, None] * G + cols[None, :]
        # d, m, pidx loaded as (BLOCK_R, 1) tiles: same layout family as the (BLOCK_R, G) tile, so no
        # layout conversion (shared-memory round trip) per broadcast
        r2 = rows[:, None]
        rm2 = rmask[:, None]
        w = tl.load(w_ptr + offs, mask=rm2, other=0.0).to(tl.float32)
        d2 = tl.load(d_ptr + r2, mask=rm2, other=1.0).to(tl.float16).to(tl.float32)
        m2 = tl.load(m_ptr + r2, mask=rm2, other=0.0).to(tl.float16).to(tl.float32)
        zero = d2 == 0.0
        s = tl.math.div_rn(w - m2, tl.where(zero, 1.0, d2))
        sc = tl.minimum(tl.maximum(s, -1.0), QMAX + 1.0)  # round then clamp == round of this, then clamp
        r = _round_half_even(sc)
        q = tl.minimum(tl.maximum(r, 0.0), QMAX * 1.0)
        q = tl.where(zero, 0.0, q)
        inside = (r >= 0.0) & (r <= QMAX) & (~zero)
        if P > 0:
            pis = tl.load(pidx_ptr + r2 * P, mask=rm2, other=255).to(tl.int32)
            prot = cols[None, :] == pis
            for p in tl.static_range(1, P):
                pi = tl.load(pidx_ptr + r2 * P + p, mask=rm2, other=255).to(tl.int32)
                prot = prot | (cols[None, :] == pi)
        else:
            prot = cols[None, :] < 0  # all False
        return w, d2, m2, s, q, zero, inside, prot, offs, rmask

    @triton.jit
    def _fq_fwd_kernel(w_ptr, d_ptr, m_ptr, pidx_ptr, out_ptr, n_groups,
                       G: tl.constexpr, P: tl.constexpr, QMAX: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, G)
        w, d2, m2, s, q, zero, inside, prot, offs, rmask = _fq_load(
            w_ptr, d_ptr, m_ptr, pidx_ptr, rows, cols, n_groups, G, P, QMAX)
        out = d2 * q + m2
        out = tl.where(prot, w.to(tl.float16).to(tl.float32), out)
        tl.store(out_ptr + offs, out, mask=rmask[:, None])

    @triton.jit
    def _fq_bwd_kernel(w_ptr, d_ptr, m_ptr, pidx_ptr, g_ptr, gw_ptr, gd_ptr, gm_ptr, n_groups,
                       G: tl.constexpr, P: tl.constexpr, QMAX: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, G)
        w, d2, m2, s, q, zero, inside, prot, offs, rmask = _fq_load(
            w_ptr, d_ptr, m_ptr, pidx_ptr, rows, cols, n_groups, G, P, QMAX)
        g = tl.load(g_ptr + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        gw = tl.where(inside | prot, g, 0.0)
        gd = tl.where(prot | zero, 0.0, tl.where(inside, g * (q - s), g * q))
        gm = tl.where(prot | inside, 0.0, g)
        tl.store(gw_ptr + offs, gw.to(gw_ptr.dtype.element_ty), mask=rmask[:, None])
        tl.store(gd_ptr + rows, tl.sum(gd, axis=1), mask=rmask)
        tl.store(gm_ptr + rows, tl.sum(gm, axis=1), mask=rmask)


def _block_r(group_size: int) -> int:
    # 1024 weights a program, 4 warps (8 a thread): the fastest for fwd and bwd, with and without
    # protected slots, at 4096x4096 and 9728x2560 on the H100 (scripts/tune_kernels.py, 2026-11-25;
    # 4096 a program ran the bwd 40 % slower)
    return max(1, 1024 // group_size)


_FQ_CONST = ("G", "P", "QMAX", "BLOCK_R")


def _launch_fwd(w, d, m, pidx, bits, group_size, out=None):
    n, k = w.shape
    ng = n * (k // group_size)
    if out is None:
        out = torch.empty((n, k), dtype=torch.float32, device=w.device)
    P = 0 if pidx is None else pidx.shape[-1]
    pi = pidx.contiguous() if P else d  # dummy pointer when no slots
    br = _block_r(group_size)
    launch(_fq_fwd_kernel, "fq_fwd", (triton.cdiv(ng, br),), (w, d, m, pi, out, ng), _FQ_CONST,
           (group_size, P, 2**bits - 1, br), 4, 1, w.device.index)
    return out


def _launch_bwd(w, d, m, pidx, g, bits, group_size, outs=None):
    n, k = w.shape
    ng = n * (k // group_size)
    if outs is None:
        outs = (torch.empty_like(w), torch.empty(d.shape, dtype=torch.float32, device=w.device),
                torch.empty(d.shape, dtype=torch.float32, device=w.device))
    gw, gd, gm = outs
    P = 0 if pidx is None else pidx.shape[-1]
    pi = pidx.contiguous() if P else d
    br = _block_r(group_size)
    launch(_fq_bwd_kernel, "fq_bwd", (triton.cdiv(ng, br),), (w, d, m, pi, g.contiguous(), gw, gd, gm, ng),
           _FQ_CONST, (group_size, P, 2**bits - 1, br), 4, 1, w.device.index)
    return gw, gd, gm


# ---- torch path (same math), for CPU without the interpreter ----

def _torch_parts(w, d, m, pidx, bits, group_size):
    n, k = w.shape
    qmax = 2**bits - 1
    wg = w.float().reshape(n, k // group_size, group_size)
    d2 = d.to(torch.float16).float().unsqueeze(-1)
    m2 = m.to(torch.float16).float().unsqueeze(-1)
    zero = d2 == 0
    s = (wg - m2) / torch.where(zero, torch.ones_like(d2), d2)
    r = torch.round(s.clamp(-1.0, qmax + 1.0))
    q = torch.where(zero, torch.zeros_like(r), r.clamp(0, qmax))
    inside = (r >= 0) & (r <= qmax) & ~zero
    prot = torch.zeros_like(wg, dtype=torch.bool)
    if pidx is not None and pidx.numel():
        ar = torch.arange(group_size, device=w.device).view(1, 1, 1, -1)
        prot = (pidx.long().unsqueeze(-1) == ar).any(-2)
    return wg, d2, m2, s, q, zero, inside, prot


def _torch_fwd(w, d, m, pidx, bits, group_size):
    wg, d2, m2, s, q, zero, inside, prot = _torch_parts(w, d, m, pidx, bits, group_size)
    out = torch.where(prot, wg.half().float(), d2 * q + m2)
    return out.reshape(w.shape)


def _torch_bwd(w, d, m, pidx, g, bits, group_size):
    wg, d2, m2, s, q, zero, inside, prot = _torch_parts(w, d, m, pidx, bits, group_size)
    g = g.float().reshape(wg.shape)
    z = torch.zeros_like(g)
    gw = torch.where(inside | prot, g, z)
    gd = torch.where(prot | zero, z, torch.where(inside, g * (q - s), g * q)).sum(-1)
    gm = torch.where(prot | inside, z, g).sum(-1)
    return gw.reshape(w.shape).to(w.dtype), gd, gm


class FakeQuantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, d, m, pidx, bits, group_size, triton=None):
        """triton: None = Triton where it runs (use_triton), False = the torch path (CPU training
        outside the slow interpreter), True = Triton."""
        w = w.contiguous()
        dc, mc = d.contiguous(), m.contiguous()
        ctx.save_for_backward(w, dc, mc, pidx)
        ctx.triton = use_triton(w) if triton is None else triton
        ctx.cfg = (bits, group_size, d.dtype, m.dtype)
        if ctx.triton:
            return _launch_fwd(w, dc, mc, pidx, bits, group_size)
        return _torch_fwd(w, dc, mc, pidx, bits, group_size)

    @staticmethod
    def backward(ctx, g):
        w, d, m, pidx = ctx.saved_tensors
        bits, group_size, ddt, mdt = ctx.cfg
        if ctx.triton:
            gw, gd, gm = _launch_bwd(w, d, m, pidx, g, bits, group_size)
        else:
            gw, gd, gm = _torch_bwd(w, d, m, pidx, g, bits, group_size)
        return gw, gd.to(ddt), gm.to(mdt), None, None, None, None


def fake_quant(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int, group_size: int,
               pidx: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable fake-quant of W (N, K) with per-group d, m (N, K//G); fp32 (N, K) out.

    Forward equals quantizer.dequantize of the codes the reference quantizer gives for fp16(d),
    fp16(m), with protected positions (pidx, 255 = empty) set to fp16(W). Gradients: see module doc."""
    n, k = w.shape
    if k % group_size or group_size & (group_size - 1):
        raise ValueError(f"K={k} must be a multiple of a power-of-two group size, got G={group_size}")
    if d.shape != (n, k // group_size) or m.shape != d.shape:
        raise ValueError(f"d, m must be {(n, k // group_size)}, got {tuple(d.shape)}, {tuple(m.shape)}")
    if pidx is not None and pidx.shape[-1] == 0:
        pidx = None
    return FakeQuantFn.apply(w, d, m, pidx, bits, group_size)


def reference_fake_quant(w, d, m, bits, group_size, pidx=None):
    """The math above in plain torch autograd (used by tests and as the torch.compile baseline)."""
    n, k = w.shape
    qmax = 2**bits - 1
    wg = w.reshape(n, k // group_size, group_size)
    d2 = d.unsqueeze(-1)
    m2 = m.unsqueeze(-1)
    s = (wg - m2) / d2
    r = s + (torch.round(s) - s).detach()
    out = d2 * torch.clamp(r, 0, qmax) + m2
    if pidx is not None and pidx.numel():
        ar = torch.arange(group_size, device=w.device).view(1, 1, 1, -1)
        prot = (pidx.long().unsqueeze(-1) == ar).any(-2)
        out = torch.where(prot, wg + (wg.half().float() - wg).detach(), out)  # value fp16(w), grad 1
    return out.reshape(n, k)
