"""Packed 3-bit weights on GPU and dequant-matmul kernels (GEMV for decode, dense path for prefill).

Packing (not ggml's; made for the GEMV below). Weight W (N out, K in), codes q in [0, 7], K a
multiple of 32, group size G a power of two >= 32. Each run of 32 codes q[n, 32c + j] is stored in
three int32 words, one per plane of `qweight` int32 (3, K//32, N) -- word-column major, so that
consecutive output rows n are consecutive words (coalesced, 128-bit loads along N in the GEMV):

    plane i word (i = 0, 1, 2): bits 2+3t .. 4+3t = q[10i + t]   for t = 0..9 (bits 2..31)
    plane 0 bits 0..1 = q[30] & 3,  plane 1 bits 0..1 = q[31] & 3,
    plane 2 bit 0 = q[30] >> 2,     plane 2 bit 1 = q[31] >> 2
    scales, offsets : fp16 (K//G, N) (transposed: group-major)   d, m of the reference quantizer
    protected slots : COO lists rows int32 (nnz,), cols int32 (nnz,), delta fp32 (nnz,) with
                      delta = pval - (d*q + m) at that position, and the fp16 value pval (nnz,)

i.e. exactly 3 bits a code, 3.25 bpw at G=128 with d and m. Fields sit 3t+2 apart so that one shift
of a word by 9 (either way) lines three fields up with bits 14..22 (see the GEMV below).

    y[b, n] = sum_k x[b, k] * (d[k//G, n] * q[n, k] + m[k//G, n]) + sum_{(n,k) in COO} delta * x[b, k]

GEMV (batch M <= 8): a program owns BN output rows (lanes along N, 4 rows a thread: 128-bit word
loads) and BW word-columns per step of its K slice (split-K over SPLIT programs). A 3-bit field at
bits p..p+2 (p <= 20) of a word masked into the fp32 bits of 1.0, (word & 7<<p) | 0x3F800000, is
f = 1 + q * 2^(p-23) exactly (one LOP3, no int->float convert). With x' = x * 2^(23-p) (exact, once
per x element, shared by all rows): f * x' = x' + q x, so per 32-code word-column
sum_k w_k x_k = d * (S - sum x') + m * sum x,   S = sum f x'   (one FMA per weight and batch row).
fp16/bf16 activations: fields are read in place at p in {14, 17, 20} from the word and from the
word shifted by 9 either way (3 shifts per 10 fields instead of 10); relative error ~1e-6, far
below fp16 output rounding. fp32 activations (exact path): every field shifted to p = 20 (x' = 8x),
so each product f * x' is exact as before. x[b, 32c+j] is the same address for all lanes (broadcast).
Split-K partial sums go to an fp32 workspace; the last program of a row block (acq_rel counter)
adds them up, adds the bias, writes y and resets its counter (one launch). Protected entries are
scattered into the workspace with fp32 atomics (each program takes a share of its row block's CSR range).
Launch configs are chosen by a heuristic per shape fitted to an H100 sweep (scripts/tune_kernels.py;
no autotuning at run time); the compiled kernel is launched through its own launcher
(kernels/launch.py), skipping Triton's JIT dispatch.
Dense (> 8 rows): a Triton kernel dequantizes to (N, K) in the activation dtype, cuBLAS multiplies.
A fused tl.dot GEMM kernel exists (force="gemm", tests) but the default never picks it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from quant2gguf.quantizer import EMPTY, QuantizedWeight, dequantize

from .launch import launch

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
    qweight: torch.Tensor  # int32 (3, K//32, N)
    scales: torch.Tensor  # fp16 (K//G, N)  (transposed)
    offsets: torch.Tensor  # fp16 (K//G, N)
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
    """uint8 codes (N, K) in [0, 7] -> qweight int32 (3, K//32, N) (layout above)."""
    n, k = codes.shape
    if k % 32:
        raise ValueError(f"K={k} must be a multiple of 32 to pack")
    c = codes.to(torch.int64).reshape(n, k // 32, 32)
    if (c > 7).any():
        raise ValueError("codes above 7 cannot be packed as 3 bits")
    sh = 2 + 3 * torch.arange(10, device=codes.device, dtype=torch.int64)
    p0 = (c[..., 0:10] << sh).sum(-1) | (c[..., 30] & 3)
    p1 = (c[..., 10:20] << sh).sum(-1) | (c[..., 31] & 3)
    p2 = (c[..., 20:30] << sh).sum(-1) | ((c[..., 30] >> 2) & 1) | (((c[..., 31] >> 2) & 1) << 1)
    return torch.stack([_to_int32(p0).T, _to_int32(p1).T, _to_int32(p2).T]).contiguous()


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_codes: uint8 (N, K)."""
    _, kw, n = qweight.shape
    p = (qweight.to(torch.int64) & 0xFFFFFFFF).transpose(1, 2)  # (3, N, KW)
    sh = 2 + 3 * torch.arange(10, device=qweight.device, dtype=torch.int64)
    out = torch.empty((n, kw, 32), dtype=torch.int64, device=qweight.device)
    for i in range(3):
        out[..., 10 * i:10 * i + 10] = (p[i].unsqueeze(-1) >> sh) & 7
    out[..., 30] = (p[0] & 3) | ((p[2] & 1) << 2)
    out[..., 31] = (p[1] & 3) | (((p[2] >> 1) & 1) << 2)
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
        rowptr = _rowptr(rows, n)
    return PackedWeight(qweight, qw.scales.to(torch.float16).T.contiguous(),
                        qw.offsets.to(torch.float16).T.contiguous(),
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
        if pw.has_prot:
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
    return QuantizedWeight(codes, pw.scales.T.contiguous(), pw.offsets.T.contiguous(), pw.bits, g, pidx, pval)


def dequantize_packed(pw: PackedWeight) -> torch.Tensor:
    """fp32 (N, K), bit-exact with QuantizedWeight.dequantize."""
    w = dequantize(unpack_codes(pw.qweight), pw.scales.T, pw.offsets.T, pw.group_size)
    if pw.has_prot:
        w[pw.prot_rows.long(), pw.prot_cols.long()] = pw.prot_val.float()
    return w


# ------------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _fbits(word, O: tl.constexpr, P: tl.constexpr, ONE):
        # the 3-bit field at bit O of `word`, moved to bit P (<= 20), as the fp32 bits of
        # 1 + q * 2^(P-23): at most one shift, then one LOP3 ((t & mask) | const)
        if O < P:
            t = word << (P - O)
        elif O > P:
            t = word >> (O - P)  # arithmetic shift: the sign fill lands above bit 22, masked off
        else:
            t = word
        return (t & (7 << P)) | ONE

    @triton.jit
    def _field(a, b, c, j: tl.constexpr, EXACT: tl.constexpr, ONE):
        # f = 1 + q[j] * 2^(P-23) as fp32 for code j of a 32-code run in plane words a, b, c
        # (_xscale gives the matching x scale 2^(23-P)). EXACT: P = 20 for every j (one shift
        # each). Otherwise P in {14, 17, 20}: fields t = 1..3 / 4..6 / 7..9 of a word are read from
        # the word shifted left by 9 / the word / the word shifted right by 9, so the compiler shares
        # one shift between three fields (3 shift instructions per 10 fields)
        if j < 30:
            if j < 10:
                w = a
            elif j < 20:
                w = b
            else:
                w = c
            t: tl.constexpr = j % 10
            O: tl.constexpr = 2 + 3 * t
            if EXACT or t == 0:
                P: tl.constexpr = 20
            elif t < 4:
                P: tl.constexpr = O + 9
            elif t < 7:
                P: tl.constexpr = O
            else:
                P: tl.constexpr = O - 9
            bits = _fbits(w, O, P, ONE)
        else:
            if j == 30:
                bits = ((a << 20) & 0x300000) | ((c << 22) & 0x400000) | ONE
            else:
                bits = ((b << 20) & 0x300000) | ((c << 21) & 0x400000) | ONE
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _xscale(j: tl.constexpr, EXACT: tl.constexpr):
        # 2^(23-P) for the P that _field uses for code j
        t: tl.constexpr = j % 10
        if EXACT or j >= 30 or t == 0:
            return 8.0
        elif t % 3 == 1:
            return 512.0
        elif t % 3 == 2:
            return 64.0
        else:
            return 8.0

    @triton.jit
    def _prot_scatter(ws_ptr, x_ptr, stride_xm, rp_ptr, pr_ptr, pc_ptr, pd_ptr, bat, bmask, row0, N, pid_k,
                      SPLIT, BN: tl.constexpr, PE: tl.constexpr):
        # ws[b, r] += delta * x[b, c] over this row block's protected entries (CSR range [e_lo, e_hi)),
        # shared out between the block's SPLIT programs; fp32 atomics into this program's ws slice
        e_lo = tl.load(rp_ptr + row0)
        e_hi = tl.load(rp_ptr + tl.minimum(row0 + BN, N))
        share = (e_hi - e_lo + SPLIT - 1) // SPLIT
        s_lo = e_lo + pid_k * share
        s_hi = tl.minimum(s_lo + share, e_hi)
        for e0 in range(s_lo, s_hi, PE):
            e = e0 + tl.arange(0, PE)
            em = e < s_hi
            r_e = tl.load(pr_ptr + e, mask=em, other=0)
            c_e = tl.load(pc_ptr + e, mask=em, other=0)
            dl = tl.load(pd_ptr + e, mask=em, other=0.0)
            msk = bmask[:, None] & em[None, :]
            xv = tl.load(x_ptr + bat[:, None] * stride_xm + c_e[None, :], mask=msk, other=0.0).to(tl.float32)
            # relaxed: ordered before the release of the row-block counter by the barrier that follows
            tl.atomic_add(ws_ptr + bat[:, None] * N + r_e[None, :], xv * dl[None, :], mask=msk, sem="relaxed")

    @triton.jit
    def _b1_loads(q_ptr, d_ptr, m_ptr, rows, rmask, N, PS, w0, w_hi, WPG: tl.constexpr, BW: tl.constexpr):
        widx = w0 + tl.arange(0, BW)
        wmask = widx < w_hi
        wofs = widx[:, None] * N + rows[None, :]
        lmask = wmask[:, None] & rmask[None, :]
        a = tl.load(q_ptr + wofs, mask=lmask, other=0)
        b = tl.load(q_ptr + PS + wofs, mask=lmask, other=0)
        c = tl.load(q_ptr + 2 * PS + wofs, mask=lmask, other=0)
        gofs = (widx // WPG)[:, None] * N + rows[None, :]
        d = tl.load(d_ptr + gofs, mask=lmask, other=0.0)
        m = tl.load(m_ptr + gofs, mask=lmask, other=0.0)
        return a, b, c, d, m

    @triton.jit
    def _b1_step(x_ptr, a, b, c, d, m, w0, w_hi, ONE, BW: tl.constexpr, BN: tl.constexpr, EXACT: tl.constexpr):
        # (BW, BN) partial sums of one step: sum_j w * x over the 32 codes of each word-column
        widx = w0 + tl.arange(0, BW)
        wmask = widx < w_hi
        sfx = tl.zeros((BW, BN), dtype=tl.float32)
        sxs = tl.zeros((BW,), dtype=tl.float32)  # sum x'
        sx = tl.zeros((BW,), dtype=tl.float32)
        for j in tl.static_range(32):
            xj = tl.load(x_ptr + widx * 32 + j, mask=wmask, other=0.0).to(tl.float32)
            xs = xj * _xscale(j, EXACT)
            sfx += _field(a, b, c, j, EXACT, ONE) * xs[:, None]
            sxs += xs
            sx += xj
        df = d.to(tl.float32)
        return df * (sfx - sxs[:, None]) + m.to(tl.float32) * sx[:, None]

    @triton.jit
    def _gemv_b1(x_ptr, q_ptr, d_ptr, m_ptr, rows, rmask, N, PS, w_lo, w_hi, ONE,
                 G: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, PF: tl.constexpr, EXACT: tl.constexpr):
        # batch 1: sum over words [w_lo, w_hi) of this row block -> (BN,) fp32. PF: the next step's
        # words are loaded before this step's FMAs (register double buffer: memory under compute;
        # two steps ahead was no faster at any shape: results/tune_kernels-h100-pf2.json)
        WPG: tl.constexpr = G // 32
        acc2 = tl.zeros((BW, BN), dtype=tl.float32)
        if PF:
            a, b, c, d, m = _b1_loads(q_ptr, d_ptr, m_ptr, rows, rmask, N, PS, w_lo, w_hi, WPG, BW)
            for w0 in range(w_lo, w_hi, BW):
                an, bn, cn, dn, mn = _b1_loads(q_ptr, d_ptr, m_ptr, rows, rmask, N, PS, w0 + BW, w_hi, WPG, BW)
                acc2 += _b1_step(x_ptr, a, b, c, d, m, w0, w_hi, ONE, BW, BN, EXACT)
                a, b, c, d, m = an, bn, cn, dn, mn
        else:
            for w0 in range(w_lo, w_hi, BW):
                a, b, c, d, m = _b1_loads(q_ptr, d_ptr, m_ptr, rows, rmask, N, PS, w0, w_hi, WPG, BW)
                acc2 += _b1_step(x_ptr, a, b, c, d, m, w0, w_hi, ONE, BW, BN, EXACT)
        return tl.sum(acc2, axis=0)

    @triton.jit
    def _gemv_bn(x_ptr, q_ptr, d_ptr, m_ptr, rows, rmask, bat, bmask, stride_xm, N, PS, w_lo, w_hi, ONE,
                 G: tl.constexpr, MB: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, EXACT: tl.constexpr):
        # batch 2..8: (MB, BW, BN) tiles -> (MB, BN) fp32. Every load is 3-D so that the word
        # loads' layout (rows along lanes) carries through the FMAs without conversions. N here is
        # the unspecialized copy NS: scalar (still coalesced) word loads, so no thread holds several
        # rows and x[b, 32c+j] is loaded once a thread (a vectorized layout replicates those loads).
        WPG: tl.constexpr = G // 32
        acc3 = tl.zeros((MB, BW, BN), dtype=tl.float32)  # reduced over BW once, after the loop
        r3 = rows[None, None, :]
        rm3 = rmask[None, None, :]
        b3 = bat[:, None, None]
        bm3 = bmask[:, None, None]
        for w0 in range(w_lo, w_hi, BW):
            widx = w0 + tl.arange(0, BW)
            w3 = widx[None, :, None]
            wm3 = w3 < w_hi
            wofs = w3 * N + r3  # (1, BW, BN)
            lmask = wm3 & rm3
            a = tl.load(q_ptr + wofs, mask=lmask, other=0)
            b = tl.load(q_ptr + PS + wofs, mask=lmask, other=0)
            c = tl.load(q_ptr + 2 * PS + wofs, mask=lmask, other=0)
            gofs = (w3 // WPG) * N + r3
            d = tl.load(d_ptr + gofs, mask=lmask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + gofs, mask=lmask, other=0.0).to(tl.float32)
            sfx = tl.zeros((MB, BW, BN), dtype=tl.float32)
            sxs = tl.zeros((MB, BW, 1), dtype=tl.float32)
            sx = tl.zeros((MB, BW, 1), dtype=tl.float32)
            xofs = b3 * stride_xm + w3 * 32  # (MB, BW, 1)
            xmask = bm3 & wm3
            for j in tl.static_range(32):
                xj = tl.load(x_ptr + xofs + j, mask=xmask, other=0.0).to(tl.float32)
                xs = xj * _xscale(j, EXACT)
                sfx += _field(a, b, c, j, EXACT, ONE) * xs
                sxs += xs
                sx += xj
            acc3 += d * (sfx - sxs) + m * sx
        return tl.sum(acc3, axis=1)

    @triton.jit(do_not_specialize=["NS"])
    def _gemv_kernel(x_ptr, q_ptr, d_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, rp_ptr, pr_ptr, pc_ptr, pd_ptr,
                     M, N, NS, KW, stride_xm, stride_ym, WPS, SPLIT, ONE,
                     G: tl.constexpr, MB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROT: tl.constexpr,
                     USE_WS: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, PF: tl.constexpr,
                     EXACT: tl.constexpr):
        # grid (cdiv(N, BN), SPLIT): program (i, s) owns rows [i*BN, (i+1)*BN) and words
        # [s*WPS, (s+1)*WPS) of K (WPS a multiple of BW). USE_WS (SPLIT > 1 or protected entries):
        # partial sums go to ws (SPLIT, MB, N) fp32; the last program of a row block to bump cnt[i]
        # (acq_rel atomic) adds them up, writes y and resets cnt[i] to 0.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        bat = tl.arange(0, MB)
        bmask = bat < M
        PS = N * KW  # plane stride
        w_lo = pid_k * WPS
        w_hi = tl.minimum(w_lo + WPS, KW)
        if MB == 1:  # 2-D (BW, BN) tiles: the layout of the word loads is kept end to end
            acc = _gemv_b1(x_ptr, q_ptr, d_ptr, m_ptr, rows, rmask, N, PS, w_lo, w_hi, ONE, G, BW, BN, PF, EXACT)[None, :]
        else:
            acc = _gemv_bn(x_ptr, q_ptr, d_ptr, m_ptr, rows, rmask, bat, bmask, stride_xm, NS, PS, w_lo, w_hi, ONE,
                           G, MB, BW, BN, EXACT)
        omask = bmask[:, None] & rmask[None, :]
        yofs = bat[:, None] * stride_ym + rows[None, :]
        if USE_WS:
            wsofs = bat[:, None] * N + rows[None, :]
            tl.store(ws_ptr + pid_k * MB * N + wsofs, acc, mask=omask)
            if HAS_PROT:
                tl.debug_barrier()  # the partial sums are stored before the atomics add to them
                _prot_scatter(ws_ptr + pid_k * MB * N, x_ptr, stride_xm, rp_ptr, pr_ptr, pc_ptr, pd_ptr, bat,
                              bmask, pid_n * BN, N, pid_k, SPLIT, BN, 128 // MB)
            tl.debug_barrier()  # all partial stores of this program precede the release below
            cnt = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if cnt == SPLIT - 1:
                tot = tl.zeros((MB, BN), dtype=tl.float32)
                for s in range(SPLIT):  # a loop, not unrolled: bounded registers at large SPLIT
                    tot += tl.load(ws_ptr + s * MB * N + wsofs, mask=omask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    tot += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + yofs, tot.to(y_ptr.dtype.element_ty), mask=omask)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + yofs, acc.to(y_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _code_at(a, b, c, jj):
        # code at position jj (0..31) of a 32-code run stored in plane words a, b, c (broadcast shapes)
        pl = jj // 10
        w = tl.where(pl == 0, a, tl.where(pl == 1, b, c))
        reg = (w >> (2 + 3 * (jj - 10 * pl))) & 7
        q30 = (a & 3) | ((c & 1) << 2)
        q31 = (b & 3) | ((c & 2) << 1)
        return tl.where(jj < 30, reg, tl.where(jj == 30, q30, q31))

    @triton.jit
    def _gemm_kernel(x_ptr, q_ptr, d_ptr, m_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                     G: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        # fused dequant + tl.dot (test / force="gemm" only; the default dispatch uses the dense path)
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
        PS = N * KW
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + rk
            kmask = k < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :],
                        other=0.0)
            wmask = kmask[:, None] & nmask[None, :]
            wofs = (k // 32)[:, None] * N + rn[None, :]
            a = tl.load(q_ptr + wofs, mask=wmask, other=0)
            b = tl.load(q_ptr + PS + wofs, mask=wmask, other=0)
            c = tl.load(q_ptr + 2 * PS + wofs, mask=wmask, other=0)
            q = _code_at(a, b, c, (k % 32)[:, None])
            gofs = (k // G)[:, None] * N + rn[None, :]
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
    def _dequant_kernel(q_ptr, d_ptr, m_ptr, w_ptr, N, KW, G: tl.constexpr, BN: tl.constexpr,
                        BW: tl.constexpr):
        # program (i, s): rows [i*BN, ..) x words [s*BW, ..) -> w (N, K) row-major, K = 32*KW
        WPG: tl.constexpr = G // 32
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        widx = tl.program_id(1) * BW + tl.arange(0, BW)
        msk = (rows[:, None] < N) & (widx[None, :] < KW)  # (BN, BW)
        wofs = widx[None, :] * N + rows[:, None]
        PS = N * KW
        a = tl.load(q_ptr + wofs, mask=msk, other=0)
        b = tl.load(q_ptr + PS + wofs, mask=msk, other=0)
        c = tl.load(q_ptr + 2 * PS + wofs, mask=msk, other=0)
        gofs = (widx // WPG)[None, :] * N + rows[:, None]
        d = tl.load(d_ptr + gofs, mask=msk, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + gofs, mask=msk, other=0.0).to(tl.float32)
        jj = tl.arange(0, 32)
        q = _code_at(a[:, :, None], b[:, :, None], c[:, :, None], jj[None, None, :])  # (BN, BW, 32)
        w = d[:, :, None] * q.to(tl.float32) + m[:, :, None]
        oofs = rows[:, None, None] * (KW * 32) + (widx * 32)[None, :, None] + jj[None, None, :]
        tl.store(w_ptr + oofs, w.to(w_ptr.dtype.element_ty), mask=msk[:, :, None])


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


_WS: dict = {}
SPLIT_MAX = 32  # largest split-K of a GEMV launch (sizes the scratch)
NUM_SMS = 132  # H100 SXM; refined from the device on first use


def _workspace(device, ws_elems: int, n_counters: int, grow_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K scratch (fp32, >= ws_elems) and per-row-block counters (int32, kept at zero by the
    kernel); a new scratch is made grow_to elements large. Shared by all GEMV launches on a
    device: launches on concurrent streams must not overlap."""
    ws, cnt = _WS.get(device, (None, None))
    if ws is None or ws.numel() < ws_elems or cnt.numel() < n_counters:
        ws = torch.empty(max(grow_to, ws_elems, 1 << 20), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(n_counters, 4096), dtype=torch.int32, device=device)
        _WS[device] = (ws, cnt)
        _WS[str(device)] = (ws, cnt)
    return ws, cnt


def _refine_sms(device) -> None:
    global NUM_SMS, _SMS_SEEN
    if not _SMS_SEEN and device.type == "cuda":
        NUM_SMS = torch.cuda.get_device_properties(device).multi_processor_count
        _SMS_SEEN = True


_SMS_SEEN = False


def gemv_config(n: int, k: int, mb: int) -> dict:
    """Heuristic GEMV launch config. Batch 1: (BW, BN) = (16, 32) tiles, 4 warps, next step's words
    prefetched, split-K for ~3 programs an SM but at least 2 steps a program -- the fastest or within
    10 % of the fastest of 112 configs at every Qwen2.5-0.5B / Qwen3-4B / Qwen3-8B shape on the H100
    (scripts/tune_kernels.py, docs/BENCHMARKS.md). Batch 2..8: BN/128 rows a thread, one
    word-column a step, ~6 programs an SM (not re-tuned)."""
    kw = k // 32
    if mb == 1:
        bn, bw, pf = min(32, max(16, _next_pow2(n))), min(16, _next_pow2(kw)), 1
        nrb = triton.cdiv(n, bn)
        iters = triton.cdiv(kw, bw)
        most = iters // 2 if nrb >= NUM_SMS // 2 else iters  # few row blocks: split deeper
        split = max(1, min(most, SPLIT_MAX, round(3 * NUM_SMS / nrb)))
    else:
        bn, bw, pf = min(512 if mb <= 4 else 256, max(32, _next_pow2(n))), 1, 0
        nrb = triton.cdiv(n, bn)
        iters = triton.cdiv(kw, bw)
        split = max(1, min(iters, SPLIT_MAX, round(6 * NUM_SMS / nrb)))
    wps = triton.cdiv(iters, split) * bw
    split = triton.cdiv(kw, wps)
    return {"BN": bn, "BW": bw, "SPLIT": split, "PF": pf, "num_warps": 4, "num_stages": 1}


GEMV_ROWS = 8  # rows (batch) one GEMV launch takes; qmatmul uses the GEMV up to this many
DENSE_MIN_ROWS = GEMV_ROWS + 1  # from this many rows on, dequantize to a dense tile and use cuBLAS


def dequantize_dense(pw: PackedWeight, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """(N, K) dense weight in `dtype` = fp32 dequantization cast once (Triton kernel where it runs)."""
    n, k = pw.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=pw.qweight.device)
    if use_triton(pw.qweight):
        bn, bw = 32, 8
        launch(_dequant_kernel, "dequant", (triton.cdiv(n, bn), triton.cdiv(k // 32, bw)),
               (pw.qweight, pw.scales, pw.offsets, out, n, k // 32), ("G", "BN", "BW"), (pw.group_size, bn, bw),
               4, 3, out.device.index)
    else:
        out.copy_(dequantize_packed(pw))
        return out
    if pw.has_prot:
        out[pw.prot_rows.long(), pw.prot_cols.long()] = pw.prot_val.to(out.dtype)
    return out


# ---- GEMV launch: config per shape, compiled kernel launched directly (kernels/launch.py)
_CFG: dict = {}
_GEMV_CONST = ("G", "MB", "HAS_BIAS", "HAS_PROT", "USE_WS", "BN", "BW", "PF", "EXACT")


def _rowptr(rows: torch.Tensor, n: int) -> torch.Tensor:
    """CSR row offsets (n+1,) int32 of row-sorted COO rows."""
    rp = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    rp[1:] = torch.cumsum(torch.bincount(rows.long(), minlength=n), 0)
    return rp.to(torch.int32)


def _gemv(x2: torch.Tensor, pw: PackedWeight, bias, y: torch.Tensor, config: dict | None):
    n, k = pw.shape
    g = pw.group_size
    hp = pw.has_prot
    has_bias = bias is not None
    b = bias if has_bias else pw.scales
    for m0 in range(0, x2.shape[0], GEMV_ROWS):
        xs, ys = (x2, y) if x2.shape[0] <= GEMV_ROWS else (x2[m0:m0 + GEMV_ROWS], y[m0:m0 + GEMV_ROWS])
        mrows = xs.shape[0]
        mb = _next_pow2(mrows)
        if config is None:
            _refine_sms(xs.device)
            ck = (n, k, mb)
            cfg = _CFG.get(ck)
            if cfg is None:
                cfg = _CFG[ck] = gemv_config(n, k, mb)
        else:
            cfg = dict(config)
            if "BW" not in cfg:
                cfg["BW"] = cfg.pop("BK", 256) // 32
            cfg.pop("BK", None)
            cfg.setdefault("SPLIT", 1)
            cfg.setdefault("num_warps", 4)
            cfg.setdefault("PF", 0)
            cfg.setdefault("num_stages", 1)
            if cfg["SPLIT"] > SPLIT_MAX:
                raise ValueError(f"GEMV config needs SPLIT <= {SPLIT_MAX}, got {cfg}")
        bn, bw, split, nw = cfg["BN"], cfg["BW"], cfg["SPLIT"], cfg["num_warps"]
        pf, ns = int(cfg.get("PF", 0)) if mb == 1 else 0, cfg.get("num_stages", 1)
        kw = k // 32
        wps = triton.cdiv(triton.cdiv(kw, split), bw) * bw
        nrb = triton.cdiv(n, bn)
        use_ws = split > 1 or hp
        ws, cnt = _workspace(xs.device, split * mb * n, nrb, grow_to=SPLIT_MAX * GEMV_ROWS * n)
        if hp and pw.prot_rowptr is None:  # a hand-built PackedWeight without the CSR offsets
            pw.prot_rowptr = _rowptr(pw.prot_rows, n)
        prot = (pw.prot_rowptr, pw.prot_rows, pw.prot_cols, pw.prot_delta) if hp else (cnt, cnt, cnt, ws)
        args = (xs, pw.qweight, pw.scales, pw.offsets, b, ys, ws, cnt, *prot, mrows, n, n, kw, xs.stride(0),
                ys.stride(0), wps, split, 0x3F800000)  # ONE: fp32 1.0 bits, a runtime value (see _field)
        consts = (g, mb, has_bias, hp, use_ws, bn, bw, pf, xs.dtype == torch.float32)
        grid = (nrb, split)
        launch(_gemv_kernel, "gemv", grid, args, _GEMV_CONST, consts, nw, ns, xs.device.index)


def qmatmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
            config: dict | None = None, force: str | None = None, out: torch.Tensor | None = None
            ) -> torch.Tensor:
    """y = x @ dequant(pw).T (+ bias), x (..., K) fp16/bf16/fp32 -> (..., N) in x.dtype.

    GEMV kernel for <= 8 rows; from 9 rows on a dequantize kernel + cuBLAS ("dense"); `force` =
    "gemv" | "gemm" | "dense" overrides ("gemm": the fused tl.dot kernel, for tests). `config` pins
    the tile meta-parameters (GEMV: BN, BW, SPLIT, num_warps; GEMM: BM, BN, BK, GROUP_M, num_warps)
    instead of the heuristic; `out` (M, N) in x.dtype receives the result (tests poison it)."""
    n, k = pw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    mrows = x2.shape[0]
    y = torch.empty((mrows, n), dtype=x.dtype, device=x.device) if out is None else out
    if out is not None and (y.shape != (mrows, n) or y.dtype != x.dtype or y.stride(-1) != 1):
        raise ValueError(f"out must be ({mrows}, {n}) {x.dtype} with unit column stride")
    if mrows == 0:
        return y.reshape(*lead, n)
    path = force or ("gemv" if mrows < DENSE_MIN_ROWS else "dense")
    if path == "gemv":
        _gemv(x2, pw, bias, y, config)
        return y.reshape(*lead, n)
    if path == "dense":
        w = dequantize_dense(pw, x.dtype)
        if bias is not None:
            torch.addmm(bias, x2, w.T, out=y)
        else:
            torch.matmul(x2, w.T, out=y)
        return y.reshape(*lead, n)
    has_bias = bias is not None
    b = bias if has_bias else pw.scales
    ieee = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
    args = (x2, pw.qweight, pw.scales, pw.offsets, b, y, mrows, n, k, x2.stride(0), y.stride(0))
    cfg = dict(config or {"BM": 32, "BN": 64, "BK": 64, "GROUP_M": 8, "num_warps": 4})
    cfg.setdefault("GROUP_M", 8)
    grid = (triton.cdiv(mrows, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    _gemm_kernel[grid](*args, G=pw.group_size, HAS_BIAS=has_bias, IEEE=ieee, **cfg)
    if pw.has_prot:  # GEMM path: sparse correction in torch (the GEMV path fuses it)
        corr = x2[:, pw.prot_cols.long()].float() * pw.prot_delta
        y32 = y.float().index_add_(1, pw.prot_rows.long(), corr)
        y = y32.to(x.dtype)
    return y.reshape(*lead, n)


def qmatmul_torch(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """CPU fallback: dequantize (bit-exact) and matmul in the activation dtype."""
    w = dequantize_packed(pw).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)
