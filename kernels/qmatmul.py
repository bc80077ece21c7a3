"""Packed 3-bit weights on GPU and dequant-matmul kernels (GEMV for decode, GEMM for prefill).

Packing (not ggml's; made for the GEMV below). Weight W (N out, K in), codes q in [0, 7], K a
multiple of 32, group size G a multiple of 32 (32, 64, 128). Each run of 32 codes q[n, 32c + j]
is stored in three int32 words, one per plane of `qweight` int32 (3, N, K//32):

    plane 0 word: bits 3j..3j+2 = q[j]        for j = 0..9,   bits 30..31 = q[30] & 3
    plane 1 word: bits 3(j-10).. = q[j]       for j = 10..19, bits 30..31 = q[31] & 3
    plane 2 word: bits 3(j-20).. = q[j]       for j = 20..29, bit 30 = q[30] >> 2, bit 31 = q[31] >> 2
    scales, offsets : fp16 (N, K//G)   d, m of the reference quantizer
    protected slots : COO lists rows int32 (nnz,), cols int32 (nnz,), delta fp32 (nnz,) with
                      delta = pval - (d*q + m) at that position, and the fp16 value pval (nnz,)

i.e. exactly 3 bits a code, 3.25 bpw at G=128 with d and m.

    y[b, n] = sum_k x[b, k] * (d[n, k//G] * q[n, k] + m[n, k//G]) + sum_{(n,k) in COO} delta * x[b, k]

GEMV (batch M <= 8): a program owns BN rows and all M batch rows and walks K in BK chunks. It
loads the (BN, BK/32) words of the three planes once and, for each position j (static unroll),
builds f = 1 + q/8 straight in fp32 bits: bits = ((word & (7 << o)) shifted to bit 20) + 0x3F800000,
two integer instructions (mask, shift-add) and one FMA per weight, no int->float convert. Per
32-code word (one group's d, m):  sum_k w_k x_k = 8d * sum f_k x_k + (m - 8d) * sum x_k.
GEMM (9..255 rows): tiles (BM, BN, BK); the weight tile is dequantized exactly in fp32 (d*q + m),
cast to the activation dtype and fed to tl.dot with fp32 accumulation.
Dense (>= 256 rows): a Triton kernel dequantizes to (N, K) in the activation dtype, cuBLAS multiplies.
GEMV/GEMM add the bias in-kernel. The protected correction is fused in the GEMV (each program takes a
share of its row block's entries, found through prot_rowptr, and scatters them with a one-hot); the GEMM path adds it with a sparse index_add after the kernel.
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
    qweight: torch.Tensor  # int32 (3, N, K//32)
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
    prot_rowptr: torch.Tensor | None = None  # int32 (N+1,): CSR row offsets into the lists (GEMV)

    def to(self, device) -> "PackedWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(mv(self.qweight), mv(self.scales), mv(self.offsets), self.bits,
                            self.group_size, self.shape, self.slots, mv(self.prot_rows),
                            mv(self.prot_cols), mv(self.prot_delta), mv(self.prot_val), mv(self.prot_rowptr))

    @property
    def has_prot(self) -> bool:
        return self.prot_rows is not None and self.prot_rows.numel() > 0

    @property
    def nbytes(self) -> int:
        ts = [self.qweight, self.scales, self.offsets, self.prot_rows, self.prot_cols, self.prot_delta,
              self.prot_val, self.prot_rowptr]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, K) in [0, 7] -> qweight int32 (3, N, K//32) (layout above)."""
    n, k = codes.shape
    if k % 32:
        raise ValueError(f"K={k} must be a multiple of 32 to pack")
    c = codes.to(torch.int64).reshape(n, k // 32, 32)
    if (c > 7).any():
        raise ValueError("codes above 7 cannot be packed as 3 bits")
    sh = 3 * torch.arange(10, device=codes.device, dtype=torch.int64)
    p0 = (c[..., 0:10] << sh).sum(-1) | ((c[..., 30] & 3) << 30)
    p1 = (c[..., 10:20] << sh).sum(-1) | ((c[..., 31] & 3) << 30)
    p2 = (c[..., 20:30] << sh).sum(-1) | (((c[..., 30] >> 2) & 1) << 30) | (((c[..., 31] >> 2) & 1) << 31)
    return torch.stack([_to_int32(p0), _to_int32(p1), _to_int32(p2)]).contiguous()


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_codes: uint8 (N, K)."""
    _, n, kw = qweight.shape
    p = qweight.to(torch.int64) & 0xFFFFFFFF
    sh = 3 * torch.arange(10, device=qweight.device, dtype=torch.int64)
    out = torch.empty((n, kw, 32), dtype=torch.int64, device=qweight.device)
    for i in range(3):
        out[..., 10 * i:10 * i + 10] = (p[i].unsqueeze(-1) >> sh) & 7
    out[..., 30] = ((p[0] >> 30) & 3) | (((p[2] >> 30) & 1) << 2)
    out[..., 31] = ((p[1] >> 30) & 3) | (((p[2] >> 31) & 1) << 2)
    return out.reshape(n, kw * 32).to(torch.uint8)


def pack(qw: QuantizedWeight) -> PackedWeight:
    """QuantizedWeight (any device) -> PackedWeight on the same device."""
    if qw.bits > 3:
        raise ValueError(f"the packed kernels hold up to 3-bit codes, got {qw.bits} bits")
    g = qw.group_size
    if g < 32 or g & (g - 1) or g > 1024:
        raise ValueError(f"group size must be a power of two >= 32, got {g}")
    n, k = qw.shape
    qweight = pack_codes(qw.codes)
    rows = cols = delta = val = rowptr = None
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
        rowptr = torch.zeros(n + 1, dtype=torch.int64, device=qw.codes.device)
        rowptr[1:] = torch.cumsum(torch.bincount(rows.long(), minlength=n), 0)
        rowptr = rowptr.to(torch.int32)
    return PackedWeight(qweight, qw.scales.to(torch.float16).contiguous(), qw.offsets.to(torch.float16).contiguous(),
                        qw.bits, g, (n, k), qw.slots, rows, cols, delta, val, rowptr)


def unpack(pw: PackedWeight) -> QuantizedWeight:
    """PackedWeight -> QuantizedWeight with the same codes, d, m and protected values (slot order:
    ascending in-group index, as quantizer.protect_slots writes them)."""
    n, k = pw.shape
    g = pw.group_size
    codes = unpack_codes(pw.qweight)
    pidx = pval = None
    if pw.slots:
        pidx = torch.full((n, k // g, pw.slots), EMPTY, dtype=torch.uint8, device=codes.device)
        pval = torch.zeros((n, k // g, pw.slots), dtype=torch.float16, device=codes.device)
        if pw.prot_rows is not None and pw.prot_rows.numel():
            r, c = pw.prot_rows.long(), pw.prot_cols.long()
            grp = r * (k // g) + c // g
            # slot number = rank of this entry within its group (entries are sorted row-major)
            first = torch.ones_like(grp, dtype=torch.bool)
            first[1:] = grp[1:] != grp[:-1]
            idx = torch.arange(grp.numel(), device=grp.device)
            start = torch.cummax(torch.where(first, idx, torch.zeros_like(idx)), 0).values
            slot = idx - start
            pidx.view(-1, pw.slots)[grp, slot] = (c % g).to(torch.uint8)
            pval.view(-1, pw.slots)[grp, slot] = pw.prot_val
    return QuantizedWeight(codes, pw.scales, pw.offsets, pw.bits, g, pidx, pval)


def dequantize_packed(pw: PackedWeight) -> torch.Tensor:
    """fp32 (N, K), bit-exact with QuantizedWeight.dequantize."""
    w = dequantize(unpack_codes(pw.qweight), pw.scales, pw.offsets, pw.group_size)
    if pw.prot_rows is not None and pw.prot_rows.numel():
        w[pw.prot_rows.long(), pw.prot_cols.long()] = pw.prot_val.float()
    return w


# ------------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _fbits(word, O: tl.constexpr):
        # the 3-bit field at bit O of `word` as fp32 bits of 1 + q/8 (field moved to bits 20..22)
        t = word & (7 << O)
        if O <= 20:
            r = (t << (20 - O)) + 0x3F800000
        else:
            r = (t >> (O - 20)) + 0x3F800000
        return r

    @triton.jit
    def _prot_correction(acc, rows, bat, bmask, x_ptr, stride_xm, rp_ptr, pr_ptr, pc_ptr, pd_ptr, row0, N,
                         pid_k, SPLIT: tl.constexpr, MB: tl.constexpr, PE: tl.constexpr):
        # acc (MB, BN) += delta * x[:, col] over this row block's protected entries (CSR range),
        # the block's entries shared out between its SPLIT programs; scatter by a one-hot on rows
        e_lo = tl.load(rp_ptr + row0)
        e_hi = tl.load(rp_ptr + tl.minimum(row0 + rows.shape[0], N))
        share = tl.cdiv(e_hi - e_lo, SPLIT)
        s_lo = e_lo + pid_k * share
        s_hi = tl.minimum(s_lo + share, e_hi)
        for e0 in range(s_lo, s_hi, PE):
            e = e0 + tl.arange(0, PE)
            em = e < s_hi
            r_e = tl.load(pr_ptr + e, mask=em, other=-1)
            c_e = tl.load(pc_ptr + e, mask=em, other=0)
            dl = tl.load(pd_ptr + e, mask=em, other=0.0)
            xv = tl.load(x_ptr + bat[:, None] * stride_xm + c_e[None, :], mask=bmask[:, None] & em[None, :],
                         other=0.0).to(tl.float32)
            hit = (r_e[:, None] == rows[None, :]).to(tl.float32)  # (PE, BN)
            acc += tl.sum((xv * dl[None, :])[:, :, None] * hit[None, :, :], axis=1)
        return acc

    @triton.jit
    def _gemv_kernel(x_ptr, q_ptr, d_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, rp_ptr, pr_ptr, pc_ptr, pd_ptr,
                     M, N, K, stride_xm, stride_ym,
                     G: tl.constexpr, MB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROT: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
        # grid (cdiv(N, BN), SPLIT): program (i, s) owns rows [i*BN, (i+1)*BN) and the s-th K slice.
        # SPLIT > 1: partial sums go to ws (SPLIT, MB, N) fp32; the last program of a row block to
        # bump cnt[i] (acq_rel atomic) adds them up, writes y and resets cnt[i] to 0 (one launch).
        WPG: tl.constexpr = G // 32  # words (of 32 codes) per group
        BW: tl.constexpr = BK // 32  # words per chunk
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        bat = tl.arange(0, MB)
        bmask = bat < M
        KW = K // 32
        NG = K // G
        PS = N * KW  # plane stride
        chunk = tl.cdiv(KW, SPLIT * BW) * BW  # words per K slice, a multiple of BW
        w_lo = pid_k * chunk
        w_hi = tl.minimum(w_lo + chunk, KW)
        acc3 = tl.zeros((MB, BN, BW), dtype=tl.float32)  # reduced over BW once, after the loop
        for w0 in range(w_lo, w_hi, BW):
            widx = w0 + tl.arange(0, BW)
            wmask = widx < KW
            wofs = rows[:, None] * KW + widx[None, :]
            lmask = rmask[:, None] & wmask[None, :]
            a = tl.load(q_ptr + wofs, mask=lmask, other=0)
            b = tl.load(q_ptr + PS + wofs, mask=lmask, other=0)
            c = tl.load(q_ptr + 2 * PS + wofs, mask=lmask, other=0)
            gofs = rows[:, None] * NG + (widx // WPG)[None, :]
            d = tl.load(d_ptr + gofs, mask=lmask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + gofs, mask=lmask, other=0.0).to(tl.float32)
            sfx = tl.zeros((MB, BN, BW), dtype=tl.float32)
            sx = tl.zeros((MB, BW), dtype=tl.float32)
            xofs = bat[:, None] * stride_xm + widx[None, :] * 32
            xmask = bmask[:, None] & wmask[None, :]
            for j in tl.static_range(32):
                xj = tl.load(x_ptr + xofs + j, mask=xmask, other=0.0).to(tl.float32)
                if j < 10:
                    bits = _fbits(a, 3 * j)
                elif j < 20:
                    bits = _fbits(b, 3 * (j - 10))
                elif j < 30:
                    bits = _fbits(c, 3 * (j - 20))
                elif j == 30:
                    bits = ((a >> 10) & 0x300000) + ((c >> 8) & 0x400000) + 0x3F800000
                else:
                    bits = ((b >> 10) & 0x300000) + ((c >> 9) & 0x400000) + 0x3F800000
                f = bits.to(tl.float32, bitcast=True)
                sfx += f[None, :, :] * xj[:, None, :]
                sx += xj
            d8 = 8.0 * d
            acc3 += d8[None, :, :] * sfx + (m - d8)[None, :, :] * sx[:, None, :]
        acc = tl.sum(acc3, axis=2)
        if HAS_PROT:
            acc = _prot_correction(acc, rows, bat, bmask, x_ptr, stride_xm, rp_ptr, pr_ptr, pc_ptr, pd_ptr,
                                   pid_n * BN, N, pid_k, SPLIT, MB, 128 // MB)
        omask = bmask[:, None] & rmask[None, :]
        yofs = bat[:, None] * stride_ym + rows[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + yofs, acc.to(y_ptr.dtype.element_ty), mask=omask)
        else:
            wsofs = bat[:, None] * N + rows[None, :]
            tl.store(ws_ptr + pid_k * MB * N + wsofs, acc, mask=omask)
            tl.debug_barrier()  # all partial stores of this program precede the release below
            cnt = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if cnt == SPLIT - 1:
                tot = tl.zeros((MB, BN), dtype=tl.float32)
                for s in tl.static_range(SPLIT):
                    tot += tl.load(ws_ptr + s * MB * N + wsofs, mask=omask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    tot += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + yofs, tot.to(y_ptr.dtype.element_ty), mask=omask)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)

    @triton.jit
    def _code_at(a, b, c, jj):
        # code at position jj (0..31) of a 32-code run stored in plane words a, b, c (broadcast shapes)
        pl = jj // 10
        w = tl.where(pl == 0, a, tl.where(pl == 1, b, c))
        reg = (w >> (3 * (jj - 10 * pl))) & 7
        q30 = ((a >> 30) & 3) | (((c >> 30) & 1) << 2)
        q31 = ((b >> 30) & 3) | (((c >> 31) & 1) << 2)
        return tl.where(jj < 30, reg, tl.where(jj == 30, q30, q31))

    @triton.jit
    def _gemm_kernel(x_ptr, q_ptr, d_ptr, m_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
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
        KW = K // 32
        NG = K // G
        PS = N * KW
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + rk
            kmask = k < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :],
                        other=0.0)
            wmask = kmask[:, None] & nmask[None, :]
            wofs = rn[None, :] * KW + (k // 32)[:, None]
            a = tl.load(q_ptr + wofs, mask=wmask, other=0)
            b = tl.load(q_ptr + PS + wofs, mask=wmask, other=0)
            c = tl.load(q_ptr + 2 * PS + wofs, mask=wmask, other=0)
            q = _code_at(a, b, c, (k % 32)[:, None])
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
    def _dequant_kernel(q_ptr, d_ptr, m_ptr, w_ptr, n_words, G: tl.constexpr, BLOCK: tl.constexpr):
        WPG: tl.constexpr = G // 32
        wi = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat word index n*KW + c
        msk = wi < n_words
        a = tl.load(q_ptr + wi, mask=msk, other=0)
        b = tl.load(q_ptr + n_words + wi, mask=msk, other=0)
        c = tl.load(q_ptr + 2 * n_words + wi, mask=msk, other=0)
        jj = tl.arange(0, 32)
        q = _code_at(a[:, None], b[:, None], c[:, None], jj[None, :])
        d = tl.load(d_ptr + wi // WPG, mask=msk, other=0.0).to(tl.float32)  # row-major groups: word // WPG
        m = tl.load(m_ptr + wi // WPG, mask=msk, other=0.0).to(tl.float32)
        w = d[:, None] * q.to(tl.float32) + m[:, None]
        tl.store(w_ptr + wi[:, None] * 32 + jj[None, :], w.to(w_ptr.dtype.element_ty), mask=msk[:, None])

    # (BN, BK, num_warps, SPLIT). Batch 1 wants ~8 rows a thread (x loads amortised) and split-K to
    # keep enough warps in flight; batch 2..8 wants more rows a thread still (x is per batch row).
    _GEMV1_CONFIGS = [triton.Config({"BN": bn, "BK": bk, "SPLIT": sp}, num_warps=w, num_stages=1)
                      for bn, bk, w, sp in [(16, 1024, 4, 1), (32, 1024, 4, 1), (32, 1024, 4, 4), (32, 512, 4, 4),
                                            (16, 512, 2, 4), (32, 256, 2, 8), (64, 512, 4, 2), (8, 1024, 4, 2)]]
    _GEMVB_CONFIGS = [triton.Config({"BN": bn, "BK": bk, "SPLIT": sp}, num_warps=w, num_stages=1)
                      for bn, bk, w, sp in [(16, 512, 2, 8), (16, 512, 2, 4), (32, 512, 2, 4), (64, 256, 2, 4),
                                            (32, 256, 4, 4), (16, 256, 1, 8)]]
    _GEMM_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
                     for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                                              (64, 64, 64, 4, 4), (128, 256, 64, 8, 3)]]
    _tuned = {}

    def _tuned_kernel(name):
        if name not in _tuned:
            if name in ("gemv1", "gemvB"):
                cfgs = _GEMV1_CONFIGS if name == "gemv1" else _GEMVB_CONFIGS
                _tuned[name] = triton.autotune(cfgs, key=["N", "K", "MB", "G"])(_gemv_kernel)
            else:
                _tuned[name] = triton.autotune(_GEMM_CONFIGS, key=["N", "K", "MBUCKET", "G"])(_gemm_kernel)
        return _tuned[name]


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


_WS: dict = {}
SPLIT_MAX = 8  # largest split-K of a GEMV config (sizes the scratch)


def _workspace(device, ws_elems: int, n_counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K scratch (fp32) and per-row-block counters (int32, kept at zero by the kernel).
    Shared by all GEMV launches on a device: launches on concurrent streams must not overlap."""
    key = str(device)
    ws, cnt = _WS.get(key, (None, None))
    if ws is None or ws.numel() < ws_elems:
        ws = torch.empty(max(ws_elems, 1 << 16), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < n_counters:
        cnt = torch.zeros(max(n_counters, 4096), dtype=torch.int32, device=device)
    _WS[key] = (ws, cnt)
    return ws, cnt


def gemv_max_batch() -> int:
    return 8


DENSE_MIN_ROWS = 256  # from this many rows on, dequantize to a dense tile and use cuBLAS


def dequantize_dense(pw: PackedWeight, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """(N, K) dense weight in `dtype` = fp32 dequantization cast once (Triton kernel where it runs)."""
    n, k = pw.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=pw.qweight.device)
    if use_triton(pw.qweight):
        nw = n * k // 32
        blk = 64
        _dequant_kernel[(triton.cdiv(nw, blk),)](pw.qweight, pw.scales, pw.offsets, out, nw,
                                                 G=pw.group_size, BLOCK=blk, num_warps=4)
    else:
        out.copy_(dequantize(unpack_codes(pw.qweight), pw.scales, pw.offsets, pw.group_size))
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
            ws, cnt = _workspace(x.device, SPLIT_MAX * mb * n, triton.cdiv(n, 8))
            hp = pw.has_prot
            prot = (pw.prot_rowptr, pw.prot_rows, pw.prot_cols, pw.prot_delta) if hp else (cnt, cnt, cnt, ws)
            args = (xs, pw.qweight, pw.scales, pw.offsets, b, ys, ws, cnt, *prot, xs.shape[0], n, k, xs.stride(0),
                    ys.stride(0))
            if tune:
                _tuned_kernel("gemv1" if mb == 1 else "gemvB")[
                    lambda meta: (triton.cdiv(n, meta["BN"]), meta["SPLIT"])](*args, G=g, MB=mb, HAS_BIAS=has_bias,
                                                                              HAS_PROT=hp)
            else:
                cfg = dict(config or {"BN": 8, "BK": 128, "num_warps": 4})
                cfg.setdefault("SPLIT", 1)
                if cfg["SPLIT"] > SPLIT_MAX or cfg["BN"] < 8:
                    raise ValueError(f"GEMV config needs SPLIT <= {SPLIT_MAX} and BN >= 8, got {cfg}")
                _gemv_kernel[(triton.cdiv(n, cfg["BN"]), cfg["SPLIT"])](*args, G=g, MB=mb, HAS_BIAS=has_bias,
                                                                         HAS_PROT=hp, **cfg)
        return y.reshape(*lead, n)
    else:
        ieee = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
        args = (x2, pw.qweight, pw.scales, pw.offsets, b, y, mrows, n, k, x2.stride(0), y.stride(0),
                min(_next_pow2(mrows), 4096))
        if tune:
            grid = lambda meta: (triton.cdiv(mrows, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
            _tuned_kernel("gemm")[grid](*args, G=g, HAS_BIAS=has_bias, IEEE=ieee)
        else:
            cfg = dict(config or {"BM": 16, "BN": 32, "BK": max(32, min(g, 64)), "GROUP_M": 4, "num_warps": 4})
            cfg.setdefault("GROUP_M", 8)
            grid = (triton.cdiv(mrows, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
            _gemm_kernel[grid](*args, G=g, HAS_BIAS=has_bias, IEEE=ieee, **cfg)
    if pw.has_prot:  # GEMM path: sparse correction in torch (the GEMV path fuses it)
        corr = x2[:, pw.prot_cols.long()].float() * pw.prot_delta
        y32 = y.float().index_add_(1, pw.prot_rows.long(), corr)
        y = y32.to(x.dtype)
    return y.reshape(*lead, n)


def qmatmul_torch(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """CPU fallback: dequantize (bit-exact) and matmul in the activation dtype."""
    w = dequantize_packed(pw).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)
