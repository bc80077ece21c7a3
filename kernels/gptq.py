"""GPTQ's column loop in one Triton launch per block (or per group segment) instead of ~10 torch
kernels per column.

GPTQ rounds columns left to right inside a block of B columns, each column's error spread onto the
columns after it through row i of the block's upper Cholesky factor of H^-1. Rows never interact,
so one program takes BLOCK_N rows of the block into registers and walks its columns in order:

    w   = W[:, i]                    (read from the tile: a masked row sum, exact)
    q   = clamp(round_half_even((w - m) / d), 0, qmax)     (d == 0: q = 0), as quantizer.codes_for
    err = (w - (d * q + m)) / Hinv[i, i]
    W  -= err * Hinv[i, :]           (Hinv upper triangular: columns before i get exactly 0)

codes[:, col], pre[:, col] (w as rounded) and Err[:, i] are written per column; the tile goes back
to W at the end. Why: on qwen15 one GPTQ pass took 590 s on a shared H200, almost all of it
18,000 columns × ~10 launches a decoder layer (eleventh run, docs/BENCHMARKS.md).

Exactness: under TRITON_INTERPRET=1 (numpy, no fused multiply-add) the result equals the torch loop
in methods/gptq.py bit for bit (tests/test_kernels_gptq.py); compiled for a GPU, the update
`W - err * h` may be contracted into one FMA, so codes can differ from the torch loop at exact
rounding ties of the error-updated weights. Either way, what is rounded is what is stored.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

if HAS_TRITON:
    from .fakequant import _round_half_even

    @triton.jit
    def _gptq_cols_kernel(w1_ptr, hinv_ptr, d_ptr, m_ptr, gidx_ptr, cidx_ptr, codes_ptr, pre_ptr, err_ptr,
                          n, k, ng, bw, c0, c1,
                          QMAX: tl.constexpr, B: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PRE: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, B)
        rmask = rows < n
        cmask = cols < bw
        tile = rows[:, None] * B + cols[None, :]
        W = tl.load(w1_ptr + tile, mask=rmask[:, None] & cmask[None, :], other=0.0)
        for i in range(c0, c1):
            g = tl.load(gidx_ptr + i)
            col = tl.load(cidx_ptr + i)
            d = tl.load(d_ptr + rows * ng + g, mask=rmask, other=1.0).to(tl.float32)  # fp16 (ours) or fp32 (a
            m = tl.load(m_ptr + rows * ng + g, mask=rmask, other=0.0).to(tl.float32)  # stock grid): exact in fp32
            w = tl.sum(tl.where(cols[None, :] == i, W, 0.0), axis=1)
            zero = d == 0.0
            s = tl.math.div_rn(w - m, tl.where(zero, 1.0, d))
            q = _round_half_even(tl.minimum(tl.maximum(s, -1.0), QMAX + 1.0))
            q = tl.where(zero, 0.0, tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0))
            hii = tl.load(hinv_ptr + i * B + i)
            err = tl.math.div_rn(w - (d * q + m), hii)
            h = tl.load(hinv_ptr + i * B + cols, mask=cmask, other=0.0)
            W = W - err[:, None] * h[None, :]
            tl.store(codes_ptr + rows * k + col, q.to(tl.uint8), mask=rmask)
            if HAS_PRE:
                tl.store(pre_ptr + rows * k + col, w, mask=rmask)
            tl.store(err_ptr + rows * B + i, err, mask=rmask)
        tl.store(w1_ptr + tile, W, mask=rmask[:, None] & cmask[None, :])


def gptq_cols(W1: torch.Tensor, Hinv1: torch.Tensor, d: torch.Tensor, m: torch.Tensor, gidx: torch.Tensor,
              cidx: torch.Tensor, codes: torch.Tensor, pre: torch.Tensor | None, err: torch.Tensor,
              c0: int, c1: int, bits: int) -> None:
    """Round columns c0..c1-1 of the block W1 (n, bw) in place, as methods/gptq.py's inner loop does.
    Hinv1 (bw, bw) the block of the upper factor; d, m (n, ng) group parameters as stored; gidx, cidx
    (bw,) int32: each block column's group and destination column in codes (n, k) uint8 and pre
    (n, k) fp32; err (n, bw) fp32 receives the scaled errors. All contiguous, on one device."""
    n, bw = W1.shape
    B = triton.next_power_of_2(max(bw, 16))
    if B != bw:  # the kernel's tile is a power of two wide: pad (Hinv with zeros: no update there)
        Wp = torch.zeros(n, B, dtype=torch.float32, device=W1.device)
        Wp[:, :bw] = W1
        Hp = torch.zeros(B, B, dtype=torch.float32, device=W1.device)
        Hp[:bw, :bw] = Hinv1
        Ep = torch.zeros(n, B, dtype=torch.float32, device=W1.device)
        pad = torch.zeros(B - bw, dtype=torch.int32, device=W1.device)
        gptq_cols(Wp, Hp, d, m, torch.cat([gidx, pad]), torch.cat([cidx, pad]), codes, pre, Ep, c0, c1, bits)
        W1.copy_(Wp[:, :bw])
        err.copy_(Ep[:, :bw])
        return
    block_n = 16
    _gptq_cols_kernel[(triton.cdiv(n, block_n),)](
        W1, Hinv1, d, m, gidx, cidx, codes, pre if pre is not None else W1, err,
        n, codes.shape[1], d.shape[1], bw, c0, c1,
        QMAX=2**bits - 1, B=B, BLOCK_N=block_n, HAS_PRE=pre is not None, num_warps=4)
