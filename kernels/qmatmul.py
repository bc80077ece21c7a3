"""Packed 3-bit weights on GPU and dequant-matmul kernels (GEMV for decode, GEMM for prefill).

Packing (not ggml's; made for the kernels below). Weight W (N out, K in), codes q in [0, 7],
K a multiple of 16 and of the group size G (a power of two, 16..128):

    lo : int32 (N, K//16)   bits 2j..2j+1 of lo[n, w] = q[n, 16w + j] & 3        (j = 0..15)
    hi : int16 (N, K//16)   bit  j        of hi[n, w] = (q[n, 16w + j] >> 2) & 1
    scales, offsets : fp16 (N, K//G)   d, m of the reference quantizer
    protected slots : COO lists rows int32 (nnz,), cols int32 (nnz,), delta fp32 (nnz,)
                      with delta = pval - (d*q + m) at that position (the correction term)

so 16 codes take 6 bytes (3 bits each) plus 4 bytes of d, m per group: 3.25 bpw at G=128.

    y[b, n] = sum_k x[b, k] * (d[n, k//G] * q[n, k] + m[n, k//G]) + sum_{(n,k) in COO} delta * x[b, k]

GEMV (batch M <= 8): a program owns BN rows and all M batch rows and walks K in BK chunks. It
loads the (BN, BK/16) lo/hi words once and, for each in-word position j (static unroll), builds
f = 1 + q/8 straight into fp32 bits ((q << 20) | 0x3F800000: shifts and masks, no int->float
convert), so per word of 16 codes (one group's d, m)  sum_k w_k x_k = 8d * sum f_k x_k + (m - 8d) * sum x_k.
GEMM (M > 8): tiles (BM, BN, BK), the weight tile is dequantized exactly in fp32 (d*q + m), cast
to the activation dtype and fed to tl.dot with fp32 accumulation.
Both add the bias in-kernel; the protected correction is a sparse index_add after the kernel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from quant2gguf.quantizer import EMPTY, QuantizedWeight, dequantize

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class PackedWeight:
    lo: torch.Tensor  # int32 (N, K//16)
    hi: torch.Tensor  # int16 (N, K//16)
    scales: torch.Tensor  # fp16 (N, K//G)
    offsets: torch.Tensor  # fp16 (N, K//G)
    bits: int
    group_size: int
    shape: tuple[int, int]
    slots: int = 0
    prot_rows: torch.Tensor | None = None  # int32 (nnz,)
    prot_cols: torch.Tensor | None = None  # int32 (nnz,)
    prot_delta: torch.Tensor | None = None  # fp32 (nnz,)
    prot_val: torch.Tensor | None = None  # fp16 (nnz,): the protected weight itself (dense path)

    def to(self, device) -> "PackedWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(mv(self.lo), mv(self.hi), mv(self.scales), mv(self.offsets), self.bits,
                            self.group_size, self.shape, self.slots, mv(self.prot_rows),
                            mv(self.prot_cols), mv(self.prot_delta), mv(self.prot_val))

    @property
    def nbytes(self) -> int:
        ts = [self.lo, self.hi, self.scales, self.offsets, self.prot_rows, self.prot_cols, self.prot_delta,
              self.prot_val]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def pack_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes (N, K) in [0, 7] -> (lo int32 (N, K//16), hi int16 (N, K//16))."""
    n, k = codes.shape
    if k % 16:
        raise ValueError(f"K={k} must be a multiple of 16 to pack")
    c = codes.to(torch.int64).reshape(n, k // 16, 16)
    if (c > 7).any():
        raise ValueError("codes above 7 cannot be packed as 3 bits")
    j = torch.arange(16, device=codes.device, dtype=torch.int64)
    lo = ((c & 3) << (2 * j)).sum(-1)
    hi = (((c >> 2) & 1) << j).sum(-1)
    lo = torch.where(lo >= 2**31, lo - 2**32, lo).to(torch.int32)
    hi = torch.where(hi >= 2**15, hi - 2**16, hi).to(torch.int16)
    return lo.contiguous(), hi.contiguous()


def unpack_codes(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_codes: uint8 (N, K)."""
    n, kw = lo.shape
    j = torch.arange(16, device=lo.device, dtype=torch.int64)
    l = (lo.to(torch.int64).unsqueeze(-1) >> (2 * j)) & 3  # noqa: E741
    h = (hi.to(torch.int64).unsqueeze(-1) >> j) & 1
    return (l | (h << 2)).reshape(n, kw * 16).to(torch.uint8)


def pack(qw: QuantizedWeight) -> PackedWeight:
    """QuantizedWeight (any device) -> PackedWeight on the same device."""
    if qw.bits > 3:
        raise ValueError(f"the packed kernels hold up to 3-bit codes, got {qw.bits} bits")
    g = qw.group_size
    if g < 16 or g & (g - 1) or g > 1024:
        raise ValueError(f"group size must be a power of two >= 16, got {g}")
    n, k = qw.shape
    lo, hi = pack_codes(qw.codes)
    rows = cols = delta = val = None
    if qw.pidx is not None and qw.pidx.numel():
        used = qw.pidx != EMPTY
        base = torch.arange(k // g, device=qw.codes.device).view(1, -1, 1) * g
        c = (base + qw.pidx.long()).masked_select(used)
        r = torch.arange(n, device=qw.codes.device).view(-1, 1, 1).expand_as(qw.pidx).masked_select(used)
        deq = dequantize(qw.codes, qw.scales, qw.offsets, g)  # without protection
        val = qw.pval.masked_select(used)
        delta = val.float() - deq[r, c]
        order = torch.argsort(r * k + c)  # row-major order: deterministic, cache friendly
        rows, cols = r[order].to(torch.int32), c[order].to(torch.int32)
        delta, val = delta[order].contiguous(), val[order].to(torch.float16).contiguous()
    return PackedWeight(lo, hi, qw.scales.to(torch.float16).contiguous(), qw.offsets.to(torch.float16).contiguous(),
                        qw.bits, g, (n, k), qw.slots, rows, cols, delta, val)


def unpack(pw: PackedWeight) -> QuantizedWeight:
    """PackedWeight -> QuantizedWeight with the same codes, d, m and protected values (slot order:
    ascending in-group index, as quantizer.protect_slots writes them)."""
    n, k = pw.shape
    g = pw.group_size
    codes = unpack_codes(pw.lo, pw.hi)
    pidx = pval = None
    if pw.slots:
        pidx = torch.full((n, k // g, pw.slots), EMPTY, dtype=torch.uint8, device=codes.device)
        pval = torch.zeros((n, k // g, pw.slots), dtype=torch.float16, device=codes.device)
        if pw.prot_rows is not None and pw.prot_rows.numel():
            r, c = pw.prot_rows.long(), pw.prot_cols.long()
            deq = dequantize(codes, pw.scales, pw.offsets, g)
            val = pw.prot_val
            grp = r * (k // g) + c // g
            # slot number = rank of this entry within its group (entries are sorted row-major)
            first = torch.ones_like(grp, dtype=torch.bool)
            first[1:] = grp[1:] != grp[:-1]
            idx = torch.arange(grp.numel(), device=grp.device)
            start = torch.cummax(torch.where(first, idx, torch.zeros_like(idx)), 0).values
            slot = idx - start
            pidx.view(-1, pw.slots)[grp, slot] = (c % g).to(torch.uint8)
            pval.view(-1, pw.slots)[grp, slot] = val
    return QuantizedWeight(codes, pw.scales, pw.offsets, pw.bits, g, pidx, pval)


def dequantize_packed(pw: PackedWeight) -> torch.Tensor:
    """fp32 (N, K), bit-exact with QuantizedWeight.dequantize."""
    w = dequantize(unpack_codes(pw.lo, pw.hi), pw.scales, pw.offsets, pw.group_size)
    if pw.prot_rows is not None and pw.prot_rows.numel():
        r, c = pw.prot_rows.long(), pw.prot_cols.long()
        w[r, c] = pw.prot_val.float()
    return w


# ------------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _gemv_kernel(x_ptr, lo_ptr, hi_ptr, d_ptr, m_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                     G: tl.constexpr, MB: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr):
        WPG: tl.constexpr = G // 16  # words per group
        BW: tl.constexpr = BK // 16  # words per chunk
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        rmask = rows < N
        bat = tl.arange(0, MB)
        bmask = bat < M
        KW = K // 16
        NG = K // G
        acc = tl.zeros((MB, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            widx = k0 // 16 + tl.arange(0, BW)
            wmask = widx < KW
            wofs = rows[:, None] * KW + widx[None, :]
            lmask = rmask[:, None] & wmask[None, :]
            lo = tl.load(lo_ptr + wofs, mask=lmask, other=0)
            hi = tl.load(hi_ptr + wofs, mask=lmask, other=0).to(tl.int32)
            sfx = tl.zeros((MB, BN, BW), dtype=tl.float32)
            sx = tl.zeros((MB, BW), dtype=tl.float32)
            xofs = bat[:, None] * stride_xm + widx[None, :] * 16
            xmask = bmask[:, None] & wmask[None, :]
            for j in tl.static_range(16):
                xj = tl.load(x_ptr + xofs + j, mask=xmask, other=0.0).to(tl.float32)
                # low 2 bits of code j -> mantissa bits 20..21, high bit -> 22: f = 1 + q/8
                if 2 * j <= 20:
                    a = (lo << (20 - 2 * j)) & 0x300000
                else:
                    a = (lo >> (2 * j - 20)) & 0x300000
                bits = a | ((hi << (22 - j)) & 0x400000) | 0x3F800000
                f = bits.to(tl.float32, bitcast=True)
                sfx += f[None, :, :] * xj[:, None, :]
                sx += xj
            # group params per word (WPG consecutive words share them: cached loads, no reshape)
            gofs = rows[:, None] * NG + (widx // WPG)[None, :]
            d = tl.load(d_ptr + gofs, mask=lmask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + gofs, mask=lmask, other=0.0).to(tl.float32)
            d8 = 8.0 * d
            acc += tl.sum(d8[None, :, :] * sfx + (m - d8)[None, :, :] * sx[:, None, :], axis=2)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
        yofs = bat[:, None] * stride_ym + rows[None, :]
        tl.store(y_ptr + yofs, acc.to(y_ptr.dtype.element_ty), mask=bmask[:, None] & rmask[None, :])

    @triton.jit
    def _gemm_kernel(x_ptr, lo_ptr, hi_ptr, d_ptr, m_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                     MBUCKET, G: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        npm = tl.cdiv(M, BM)
        npn = tl.cdiv(N, BN)
        width = GROUP_M * npn  # grouped ordering for L2 reuse of weight tiles
        gid = pid // width
        first_m = gid * GROUP_M
        gsz = tl.minimum(npm - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsz
        pid_n = (pid % width) // gsz
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mmask = rm < M
        nmask = rn < N
        KW = K // 16
        NG = K // G
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + rk
            kmask = k < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :],
                        other=0.0)
            wmask = kmask[:, None] & nmask[None, :]
            wofs = rn[None, :] * KW + (k // 16)[:, None]
            lo = tl.load(lo_ptr + wofs, mask=wmask, other=0)
            hi = tl.load(hi_ptr + wofs, mask=wmask, other=0).to(tl.int32)
            sh = (k % 16)[:, None]
            q = ((lo >> (2 * sh)) & 3) | (((hi >> sh) & 1) << 2)
            gofs = rn[None, :] * NG + (k // G)[:, None]
            d = tl.load(d_ptr + gofs, mask=wmask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + gofs, mask=wmask, other=0.0).to(tl.float32)
            w = d * q.to(tl.float32) + m
            if IEEE:  # fp32 activations, or bf16 under the interpreter (its bf16 dot is broken)
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        yofs = rm[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptr + yofs, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _dequant_kernel(lo_ptr, hi_ptr, d_ptr, m_ptr, w_ptr, n_words, G: tl.constexpr, BLOCK: tl.constexpr):
        WPG: tl.constexpr = G // 16
        wi = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        msk = wi < n_words
        lo = tl.load(lo_ptr + wi, mask=msk, other=0)
        hi = tl.load(hi_ptr + wi, mask=msk, other=0).to(tl.int32)
        j = tl.arange(0, 16)
        q = ((lo[:, None] >> (2 * j)[None, :]) & 3) | (((hi[:, None] >> j[None, :]) & 1) << 2)
        d = tl.load(d_ptr + wi // WPG, mask=msk, other=0.0).to(tl.float32)  # row-major groups: word // WPG
        m = tl.load(m_ptr + wi // WPG, mask=msk, other=0.0).to(tl.float32)
        w = d[:, None] * q.to(tl.float32) + m[:, None]
        tl.store(w_ptr + wi[:, None] * 16 + j[None, :], w.to(w_ptr.dtype.element_ty), mask=msk[:, None])

    _GEMV_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
                     for bn, bk, w, s in [(4, 1024, 4, 1), (8, 512, 4, 1), (8, 1024, 4, 1), (16, 512, 4, 1),
                                          (16, 1024, 8, 1), (2, 2048, 4, 1), (8, 512, 4, 3), (4, 512, 2, 1)]]
    _GEMM_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
                     for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                                              (64, 64, 64, 4, 4), (128, 256, 64, 8, 3)]]
    _tuned = {}

    def _tuned_kernel(name):
        if name not in _tuned:
            if name == "gemv":
                _tuned[name] = triton.autotune(_GEMV_CONFIGS, key=["N", "K", "MB", "G"])(_gemv_kernel)
            else:
                _tuned[name] = triton.autotune(_GEMM_CONFIGS, key=["N", "K", "MBUCKET", "G"])(_gemm_kernel)
        return _tuned[name]


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def gemv_max_batch() -> int:
    return 8


DENSE_MIN_ROWS = 256  # from this many rows on, dequantize to a dense tile and use cuBLAS


def dequantize_dense(pw: PackedWeight, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """(N, K) dense weight in `dtype` = fp32 dequantization cast once (Triton kernel where it runs)."""
    n, k = pw.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=pw.lo.device)
    if use_triton(pw.lo):
        nw = n * k // 16
        blk = 128
        _dequant_kernel[(triton.cdiv(nw, blk),)](pw.lo, pw.hi, pw.scales, pw.offsets, out, nw,
                                                 G=pw.group_size, BLOCK=blk, num_warps=4)
    else:
        out.copy_(dequantize(unpack_codes(pw.lo, pw.hi), pw.scales, pw.offsets, pw.group_size))
    if pw.prot_rows is not None and pw.prot_rows.numel():
        out[pw.prot_rows.long(), pw.prot_cols.long()] = pw.prot_val.to(out.dtype)
    return out


def qmatmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
            config: dict | None = None, force: str | None = None, out: torch.Tensor | None = None
            ) -> torch.Tensor:
    """y = x @ dequant(pw).T (+ bias), x (..., K) fp16/bf16/fp32 -> (..., N) in x.dtype.

    GEMV kernel for <= 8 rows, fused GEMM kernel below DENSE_MIN_ROWS, and from there a dequantize
    kernel + cuBLAS ("dense"); `force` = "gemv" | "gemm" | "dense" overrides. `config`
    pins the tile meta-parameters (BN, BK[, BM, GROUP_M], num_warps) instead of autotuning;
    `out` (M, N) in x.dtype receives the kernel's result (tests poison it)."""
    n, k = pw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    mrows = x2.shape[0]
    y = torch.empty((mrows, n), dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (mrows, n) or y.dtype != x.dtype or y.stride(-1) != 1:
        raise ValueError(f"out must be ({mrows}, {n}) {x.dtype} with unit column stride")
    if mrows == 0:
        return y.reshape(*lead, n)
    has_bias = bias is not None
    b = bias if has_bias else pw.scales
    g = pw.group_size
    path = force or ("gemv" if mrows <= gemv_max_batch() else "gemm" if mrows < DENSE_MIN_ROWS else "dense")
    if path == "dense":
        w = dequantize_dense(pw, x.dtype)
        torch.matmul(x2, w.T, out=y)
        if bias is not None:
            y += bias
        return y.reshape(*lead, n)
    tune = config is None and not interpreting()
    if path == "gemv":
        for m0 in range(0, mrows, 8):
            xs, ys = x2[m0:m0 + 8], y[m0:m0 + 8]
            mb = _next_pow2(xs.shape[0])
            args = (xs, pw.lo, pw.hi, pw.scales, pw.offsets, b, ys, xs.shape[0], n, k, xs.stride(0), ys.stride(0))
            if tune:
                _tuned_kernel("gemv")[lambda meta: (triton.cdiv(n, meta["BN"]),)](
                    *args, G=g, MB=mb, HAS_BIAS=has_bias)
            else:
                cfg = dict(config or {"BN": 8, "BK": max(g, 128), "num_warps": 4})
                _gemv_kernel[(triton.cdiv(n, cfg["BN"]),)](*args, G=g, MB=mb, HAS_BIAS=has_bias, **cfg)
    else:
        ieee = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
        args = (x2, pw.lo, pw.hi, pw.scales, pw.offsets, b, y, mrows, n, k, x2.stride(0), y.stride(0),
                min(_next_pow2(mrows), 4096))
        if tune:
            grid = lambda meta: (triton.cdiv(mrows, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
            _tuned_kernel("gemm")[grid](*args, G=g, HAS_BIAS=has_bias, IEEE=ieee)
        else:
            cfg = dict(config or {"BM": 16, "BN": 32, "BK": max(32, min(g, 64)), "GROUP_M": 4, "num_warps": 4})
            cfg.setdefault("GROUP_M", 8)
            grid = (triton.cdiv(mrows, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
            _gemm_kernel[grid](*args, G=g, HAS_BIAS=has_bias, IEEE=ieee, **cfg)
    if pw.prot_rows is not None and pw.prot_rows.numel():
        corr = x2[:, pw.prot_cols.long()].float() * pw.prot_delta
        y32 = y.float().index_add_(1, pw.prot_rows.long(), corr)
        y = y32.to(x.dtype)
    return y.reshape(*lead, n)


def qmatmul_torch(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """CPU fallback: dequantize (bit-exact) and matmul in the activation dtype."""
    w = dequantize_packed(pw).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)
