// Standalone Q3_G128 x Q8_1 mat-vec microbenchmark (issue 11): the current ggml kernel (patch 0005) against
// bandwidth-oriented candidates, an F16 mat-vec, a pure-read kernel and a D2D copy, at Qwen3-4B decoder
// shapes (--qwen15: Qwen2.5-Coder-1.5B's, K = 1536), batch 1/2/4/8. Each variant is checked against a host reference
// before timing.
//   GPU:  nvcc -O3 -std=c++17 -arch=native scripts/cuda_q3g_mmvq_bench.cu -o /tmp/q3gb && /tmp/q3gb [--quick]
//   host: g++ -O2 -std=c++17 -x c++ scripts/cuda_q3g_mmvq_bench.cu -o /tmp/q3gb_cpu && /tmp/q3gb_cpu --cpu-selftest DIR
//   no GPU: the nvcc binary's --q4-host-emu runs the batch-1 "q4*" kernels' logic on the CPU against the reference
// Batch-1-only candidates "q4_ldg", "q4_ldg_auto", "q4_cpa_auto", "q4il_auto_repack" (section (e); they need K/128 a
// multiple of 4; the harness needs K a multiple of 512, so --qwen15's down matrix, K = 8960, is skipped): one thread per
// 4 weight blocks (208 B = 13 x 16-B loads), one wave of small CTAs; the last one uses a repacked weight layout.
// Output: one JSON line per (variant, shape, batch), then one "model" line per (variant, batch).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define HD __host__ __device__ __forceinline__
#else
#define HD inline
#endif

// ---- block formats (ggml_patches/0001: block_q3_g128; ggml common: block_q8_1) ----
#define QK 128
#define QK8 32
struct blk_q3 { uint16_t d, m; uint8_t qs[QK / 4]; uint8_t qh[QK / 8]; };   // 52 B, 4-byte aligned
struct blk_q8 { uint16_t d, s; int8_t qs[QK8]; };                        // 36 B: s = fp16(sum of the floats)
static_assert(sizeof(blk_q3) == 52 && sizeof(blk_q8) == 36, "layout");

// ---- helpers shared by host and device ----
HD float bits2f(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f; memcpy(&f, &u, 4); return f;
#endif
}
HD float h2f(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(h));
#else
    uint32_t s = (h >> 15) & 1, e = (h >> 10) & 31, f = h & 1023; float v;
    if (e == 0) v = std::ldexp((float) f, -24); else if (e == 31) v = f ? NAN : INFINITY; else v = std::ldexp((float) (f | 1024), (int) e - 25);
    return s ? -v : v;
#endif
}
HD int dp4a(int a, int b, int c) {
#ifdef __CUDA_ARCH__
    return __dp4a(a, b, c);
#else
    for (int k = 0; k < 4; ++k) c += (int8_t) (a >> 8 * k) * (int8_t) (b >> 8 * k);
    return c;
#endif
}
// float(v / 2^k) exactly for |v| < 2^22 (v a multiple of 2^k): magic add, no I2F (patch 0005's trick)
HD float i2f_scaled(int v, int k) {
    const int magic = 0x4B400000 - (k << 23);
    return bits2f((uint32_t) (magic + v)) - bits2f((uint32_t) magic);
}
// w = the block as 13 ints: w[0] = d|m<<16, w[1..8] = qs ints, w[9..12] = qh ints.
// Bytes of quarter b (codes 32b..32b+31 = Q8_1 block b), word j (codes 32b+4j..+3), scaled by 2^(2b) (b<3) or 2^4 (b=3):
// low bits from qs int j (bit pair b), high bit from qh int j%4 (bit 2b + j/4). One LOP3 per 4 codes after the shifts.
HD uint32_t q3_vbyte(const uint32_t * w, int b, int j) {
    const uint32_t qs = w[1 + j], qh = w[9 + (j & 3)];
    if (b < 3) {
        const uint32_t hs = j < 4 ? qh << 2 : qh << 1;
        return (qs & (0x03030303u << (2 * b))) | (hs & (0x04040404u << (2 * b)));
    }
    return ((qs >> 2) & 0x30303030u) | ((j < 4 ? qh : qh >> 1) & 0x40404040u);
}
HD int q3_shift(int b) { return b == 0 ? 0 : b == 1 ? 2 : 4; }
// one block x one column: aq = 32 activation ints (quarter b word j at 8b+j), dy = 4 Q8_1 scales, ss = sum of the 4 s
// (same operation order as blocks_dot on the device: d folded into each quarter's scale)
HD float q3_block_dot1(const uint32_t * w, const int * aq, const float * dy, float ss) {
    const float d = h2f(w[0] & 0xFFFF);
    float acc = 0.0f;
    for (int b = 0; b < 4; ++b) {
        int si = 0;
        for (int j = 0; j < 8; ++j) si = dp4a((int) q3_vbyte(w, b, j), aq[8 * b + j], si);
        acc = fmaf(i2f_scaled(si, q3_shift(b)), d * dy[b], acc);
    }
    return fmaf(h2f(w[0] >> 16), ss, acc);
}

// ---- host reference: packing, dequant, Q8_1 quantization, dot ----
static uint16_t f2h(float v) {  // round to nearest even, finite, within half range
    uint16_t sign = std::signbit(v) ? 0x8000 : 0; double a = std::fabs((double) v);
    if (a < std::ldexp(1.0, -14)) return sign | (uint16_t) std::nearbyint(a * std::ldexp(1.0, 24));
    int e; double fr = std::frexp(a, &e); double mant = std::nearbyint(fr * 2048.0);
    if (mant == 2048.0) { mant = 1024.0; ++e; }
    return sign | (uint16_t) (((e + 14) << 10) | ((int) mant - 1024));
}
static void q3_pack(const uint8_t * codes, uint16_t d, uint16_t m, blk_q3 * b) {
    b->d = d; b->m = m; memset(b->qs, 0, sizeof b->qs); memset(b->qh, 0, sizeof b->qh);
    for (int i = 0; i < QK; ++i) {
        b->qs[i % (QK / 4)] |= (codes[i] & 3) << (2 * (i / (QK / 4)));
        b->qh[i % (QK / 8)] |= ((codes[i] >> 2) & 1) << (i / (QK / 8));
    }
}
static int q3_code(const blk_q3 * b, int i) {
    return ((b->qs[i % (QK / 4)] >> (2 * (i / (QK / 4)))) & 3) | (((b->qh[i % (QK / 8)] >> (i / (QK / 8))) & 1) << 2);
}
static void q3_dequant(const blk_q3 * b, float * y) {  // y = d*q + m in fp32 (d*q exact), as ggml and numpy
    const float d = h2f(b->d), m = h2f(b->m);
    for (int i = 0; i < QK; ++i) y[i] = d * (float) q3_code(b, i) + m;
}
static void q8_1_quantize(const float * x, blk_q8 * y, int k) {  // ggml-cuda quantize_q8_1
    for (int ib = 0; ib < k / QK8; ++ib) {
        float amax = 0, sum = 0;
        for (int j = 0; j < QK8; ++j) { amax = std::max(amax, std::fabs(x[ib * QK8 + j])); sum += x[ib * QK8 + j]; }
        const float d = amax / 127.0f;
        for (int j = 0; j < QK8; ++j) y[ib].qs[j] = amax == 0.0f ? 0 : (int8_t) std::round(x[ib * QK8 + j] / d);
        y[ib].d = f2h(d); y[ib].s = f2h(sum);
    }
}
// the value every Q3 kernel computes: sum over blocks of d*sum_i q_i*dy*qy_i + m*sum_b s_b (fp16 s, as ggml's
// vec_dot uses it); abs = the same with |terms|, the error scale
static void q3_ref_row(const blk_q3 * x, const blk_q8 * y, int k, double & ref, double & abs) {
    ref = 0; abs = 0;
    for (int kb = 0; kb < k / QK; ++kb) {
        const double d = h2f(x[kb].d), m = h2f(x[kb].m);
        for (int b = 0; b < 4; ++b) {
            const blk_q8 & yb = y[kb * 4 + b];
            const double dy = h2f(yb.d);
            for (int j = 0; j < QK8; ++j) {
                const double t = d * q3_code(&x[kb], 32 * b + j) * dy * yb.qs[j];
                ref += t; abs += std::fabs(t);
            }
            ref += m * h2f(yb.s); abs += std::fabs(m * h2f(yb.s));
        }
    }
}
static void q3_block_words(const blk_q3 * b, uint32_t * w) { memcpy(w, b, 52); }
static void q8_act_ints(const blk_q8 * y4, int * aq, float * dy, float & ss) {  // 4 Q8_1 blocks of one Q3 block
    ss = 0;
    for (int b = 0; b < 4; ++b) { memcpy(aq + 8 * b, y4[b].qs, 32); dy[b] = h2f(y4[b].d); ss += h2f(y4[b].s); }
}

// ---- "q4" batch-1 candidates: one thread per quad = 4 consecutive Q3 blocks of a row (208 B = 13 x 16 B, 16-B
// aligned since K % 512 == 0). Q = nkb/4 quads per row; a CTA takes R = max(1, NT/Q) whole rows = R*Q contiguous quads.
HD int q4_rows_per_cta(int Q, int nt) { return nt / Q > 0 ? nt / Q : 1; }
// "il" repack (q4il variant only): inside a CTA's range of nq quads, warp w owns quads [32w, 32w+n), n = min(32, nq-32w);
// 16-B chunk i (0..12) of quad 32w+l is stored at chunk 13*32*w + n*i + l of the range -> LDG.128 i of the warp reads
// n*16 contiguous bytes (fully coalesced) and each lane still ends up with its own whole quad.
HD int q4_il_chunk(int t, int i, int nq) {
    const int w = t >> 5, l = t & 31, n = nq - 32 * w < 32 ? nq - 32 * w : 32;
    return 13 * 32 * w + n * i + l;
}
// 16-B chunk i of thread t's quad within its CTA's range (original layout: t*13 + i)
HD int q4_chunk(bool il, int t, int i, int nq) { return il ? q4_il_chunk(t, i, nq) : t * 13 + i; }
// host mimic of the q4 kernels' indexing: every quad (and, for the repack, every 16-B chunk) of the matrix is visited
// exactly once, and thread t's row / quad-in-row is the row the quad belongs to
static int q4_index_selftest(FILE * log) {
    static const int KN[6][2] = {{2560, 4096}, {2560, 1024}, {4096, 2560}, {2560, 9728}, {9728, 2560}, {2560, 49152}};
    int bad = 0;
    for (int nt : {32, 64, 128, 256})
        for (const auto & kn : KN) {
            const int K = kn[0], N = kn[1], nkb = K / QK, Q = nkb / 4, R = q4_rows_per_cta(Q, nt);
            const int grid = (N + R - 1) / R, nthr = (R * Q + 31) / 32 * 32;
            if (nthr > nt) ++bad;
            std::vector<uint8_t> quad_hits((size_t) N * Q, 0), chunk_hits((size_t) N * Q * 13, 0);
            for (int c = 0; c < grid; ++c) {
                const int row0 = c * R, rows = std::min(R, N - row0), nq = rows * Q;
                for (int t = 0; t < nthr; ++t) {
                    if (t >= nq) continue;
                    const size_t g = (size_t) row0 * Q + t;             // flat quad read by thread t
                    bad += (int) (g / Q) != row0 + t / Q || (int) (g % Q) != t % Q;
                    ++quad_hits[g];
                    for (int i = 0; i < 13; ++i) {
                        const int o = q4_il_chunk(t, i, nq);
                        if (o < 0 || o >= nq * 13) { ++bad; continue; }
                        ++chunk_hits[(size_t) row0 * Q * 13 + o];
                    }
                }
            }
            for (uint8_t h : quad_hits) bad += h != 1;
            for (uint8_t h : chunk_hits) bad += h != 1;
        }
    fprintf(log, "q4 index mimic (6 shapes x NT 32..256): %d errors\n", bad);
    return bad;
}

static FILE * g_log = stdout;  // the GPU run sends the selftest text to stderr, keeping stdout JSON-only
static int cpu_selftest(const char * dir) {
    std::mt19937 rng(7);
    std::uniform_int_distribution<int> code(0, 7);
    std::uniform_real_distribution<float> u(-1, 1);
    const int nb = 64;
    std::vector<uint8_t> codes(nb * QK);
    std::vector<blk_q3> blks(nb);
    std::vector<float> deq(nb * QK);
    std::vector<uint16_t> dm(2 * nb);
    int bad = 0;
    for (int kb = 0; kb < nb; ++kb) {
        for (int i = 0; i < QK; ++i) codes[kb * QK + i] = (uint8_t) code(rng);
        if (kb == 0) for (int i = 0; i < QK; ++i) codes[i] = 7;  // all-max block: the 2^4-scaled quarter at its limit
        dm[2 * kb] = f2h(0.002f + 0.05f * std::fabs(u(rng))); dm[2 * kb + 1] = f2h(0.3f * u(rng));
        q3_pack(&codes[kb * QK], dm[2 * kb], dm[2 * kb + 1], &blks[kb]);
        q3_dequant(&blks[kb], &deq[kb * QK]);
        for (int i = 0; i < QK; ++i) bad += q3_code(&blks[kb], i) != codes[kb * QK + i];
    }
    fprintf(g_log, "pack/unpack code mismatches: %d\n", bad);
    // q3_vbyte + scaling against plain integer dots, and the fused per-block dot against the fp64 reference
    std::vector<float> x(nb * QK);
    for (auto & v : x) v = u(rng) * (std::fabs(u(rng)) < 0.05f ? 20.0f : 1.0f);
    std::vector<blk_q8> y(nb * 4);
    q8_1_quantize(x.data(), y.data(), nb * QK);
    double q8err = 0;
    for (int i = 0; i < nb * QK; ++i) {
        const blk_q8 & yb = y[i / QK8];
        q8err = std::max(q8err, (double) std::fabs(x[i] - h2f(yb.d) * yb.qs[i % QK8]) / std::max(1e-30, (double) h2f(yb.d)));
    }
    fprintf(g_log, "q8_1 max |x - dy*qy| / dy = %.3f (<= 0.5 + 127*2^-11 = 0.562 with fp16 d)\n", q8err);
    int vbad = 0; double worst = 0; double rowref = 0, rowabs = 0, rowgot = 0;
    for (int kb = 0; kb < nb; ++kb) {
        uint32_t w[13]; int aq[32]; float dy[4], ss;
        q3_block_words(&blks[kb], w); q8_act_ints(&y[kb * 4], aq, dy, ss);
        for (int b = 0; b < 4; ++b) {
            int si = 0, want = 0;
            for (int j = 0; j < 8; ++j) si = dp4a((int) q3_vbyte(w, b, j), aq[8 * b + j], si);
            for (int i = 0; i < 32; ++i) want += codes[kb * QK + 32 * b + i] * y[kb * 4 + b].qs[i];
            vbad += i2f_scaled(si, q3_shift(b)) != (float) want;
        }
        double r, a; q3_ref_row(&blks[kb], &y[kb * 4], QK, r, a);
        const double got = q3_block_dot1(w, aq, dy, ss);
        worst = std::max(worst, std::fabs(got - r) / a);
        rowref += r; rowabs += a; rowgot += got;
    }
    fprintf(g_log, "quarter integer dots wrong: %d of %d; per-block dot worst rel err %.2e; %d-block row rel err %.2e\n",
           vbad, 4 * nb, worst, nb, std::fabs(rowgot - rowref) / rowabs);
    // the reference dot equals the plain float dot of the dequantized weights and activations, up to the s term
    double plain = 0, sfix = 0;
    for (int i = 0; i < nb * QK; ++i) plain += (double) deq[i] * h2f(y[i / QK8].d) * y[i / QK8].qs[i % QK8];
    for (int qb = 0; qb < nb * 4; ++qb) {
        int sq = 0; for (int j = 0; j < QK8; ++j) sq += y[qb].qs[j];
        sfix += (double) h2f(blks[qb / 4].m) * (h2f(y[qb].s) - (double) h2f(y[qb].d) * sq);
    }
    fprintf(g_log, "reference vs plain dequant dot (+fp16 s correction): rel %.2e\n", std::fabs(rowref - (plain + sfix)) / rowabs);
    const int q4bad = q4_index_selftest(g_log);
    const bool ok = q4bad == 0 && bad == 0 && vbad == 0 && worst < 1e-6 && std::fabs(rowgot - rowref) / rowabs < 1e-6 &&
                    std::fabs(rowref - (plain + sfix)) / rowabs < 1e-9 && q8err <= 0.5 + 127.0 / 2048 + 1e-6;
    if (dir) {  // for the numpy cross-check: packed bytes, codes, d/m, our dequant
        auto dump = [&](const char * name, const void * p, size_t n) {
            std::string path = std::string(dir) + "/" + name; FILE * f = fopen(path.c_str(), "wb");
            if (!f) { perror(path.c_str()); exit(1); } fwrite(p, 1, n, f); fclose(f);
        };
        dump("q3g128_blocks.bin", blks.data(), blks.size() * sizeof(blk_q3));
        dump("q3g128_codes.bin", codes.data(), codes.size());
        dump("q3g128_dm.bin", dm.data(), dm.size() * 2);
        dump("q3g128_deq.bin", deq.data(), deq.size() * 4);
        fprintf(g_log, "wrote %s/q3g128_{blocks,codes,dm,deq}.bin (%d blocks)\n", dir, nb);
    }
    fprintf(g_log, "cpu selftest %s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}

#ifndef __CUDACC__
int main(int argc, char ** argv) {
    if (argc >= 2 && !strcmp(argv[1], "--cpu-selftest")) return cpu_selftest(argc >= 3 ? argv[2] : nullptr);
    fprintf(stderr, "host build: only --cpu-selftest [DIR]\n");
    return 2;
}
#else
// ==================================== device ====================================
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); exit(1); } } while (0)

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// ---------- (a) current kernel: patch 0005 vec_dot_q3_g_q8_1<block_q3_g128,128,false> in mul_mat_vec_q ----------
static __device__ __forceinline__ float vd_cur(const void * __restrict__ vbq, const blk_q8 * __restrict__ bq8_1, const int kbx, const int iqs) {
    constexpr int NT = 4;
    const blk_q3 * x = (const blk_q3 *) vbq + kbx;
    const int t = iqs / 2;
    const uint32_t ql0 = ((const int *) x->qs)[t], ql1 = ((const int *) x->qs)[t + NT], h = ((const int *) x->qh)[t];
    const float2 dm = __half22float2(*((const half2 *) x));
    const uint32_t h2 = h << 2, h1 = h << 1;
    float sumf = 0.0f, sums = 0.0f;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        const blk_q8 * y = bq8_1 + b;
        uint32_t v0, v1;
        if (b < 3) {
            const uint32_t ml = 0x03030303u << (2 * b), mh = 0x04040404u << (2 * b);
            v0 = (ql0 & ml) | (h2 & mh); v1 = (ql1 & ml) | (h1 & mh);
        } else {
            v0 = ((ql0 >> 2) & 0x30303030u) | (h & 0x40404040u);
            v1 = ((ql1 >> 2) & 0x30303030u) | ((h >> 1) & 0x40404040u);
        }
        const int a0 = __ldg((const int *) y->qs + t), a1 = __ldg((const int *) y->qs + t + NT);
        int sumi = __dp4a((int) v0, a0, 0);
        sumi = __dp4a((int) v1, a1, sumi);
        const float fi = i2f_scaled(sumi, b == 0 ? 0 : b == 1 ? 2 : 4);
        const float2 ds = __half22float2(__ldg((const half2 *) &y->d));
        sums += ds.y;
        sumf = fmaf(fi, ds.x, sumf);
    }
    return dm.x * sumf + (dm.y * (1.0f / NT)) * sums;
}

// upstream mul_mat_vec_q, GENERIC table (sm_80/90): qi = 8, vdr = 2 -> 4 threads per block; NW warps, RPB rows per CTA;
// UNR2 = the patch's "#pragma unroll 2" K loop (batch 1, not small-K)
template <int NC, int NW, int RPB, bool UNR2>
__launch_bounds__(NW * 32, 1) __global__ void k_cur(const void * __restrict__ vx, const blk_q8 * __restrict__ y, float * __restrict__ dst,
                                                    int ncols_x, int stride_row_x, int stride_col_y, int nrows) {
    constexpr int qi = 8, vdr = 2, blocks_per_iter = vdr * NW * 32 / qi;
    const int tid = 32 * threadIdx.y + threadIdx.x;
    const int row0 = RPB * blockIdx.x;
    const int blocks_per_row_x = ncols_x / QK;
    float tmp[NC][RPB] = {{0.0f}};
    const int kbx_offset = row0 * stride_row_x;
    if constexpr (UNR2) {
#pragma unroll 2
        for (int kbx = tid / (qi / vdr); kbx < blocks_per_row_x; kbx += blocks_per_iter) {
            const int kby = kbx * (QK / QK8), kqs = vdr * (tid % (qi / vdr));
#pragma unroll
            for (int i = 0; i < RPB; ++i) tmp[0][i] += vd_cur(vx, &y[kby], kbx_offset + i * stride_row_x + kbx, kqs);
        }
    } else {
        for (int kbx = tid / (qi / vdr); kbx < blocks_per_row_x; kbx += blocks_per_iter) {
            const int kby = kbx * (QK / QK8), kqs = vdr * (tid % (qi / vdr));
#pragma unroll
            for (int j = 0; j < NC; ++j)
#pragma unroll
                for (int i = 0; i < RPB; ++i) tmp[j][i] += vd_cur(vx, &y[j * stride_col_y + kby], kbx_offset + i * stride_row_x + kbx, kqs);
        }
    }
    __shared__ float tmp_shared[NW - 1 > 0 ? NW - 1 : 1][NC][RPB][32];
    if (threadIdx.y > 0) {
#pragma unroll
        for (int j = 0; j < NC; ++j)
#pragma unroll
            for (int i = 0; i < RPB; ++i) tmp_shared[threadIdx.y - 1][j][i][threadIdx.x] = tmp[j][i];
    }
    __syncthreads();
    if (threadIdx.y > 0) return;
#pragma unroll
    for (int j = 0; j < NC; ++j)
#pragma unroll
        for (int i = 0; i < RPB; ++i) {
#pragma unroll
            for (int l = 0; l < NW - 1; ++l) tmp[j][i] += tmp_shared[l][j][i][threadIdx.x];
            tmp[j][i] = warp_sum(tmp[j][i]);
            if (threadIdx.x == i && (RPB == 1 || row0 + i < nrows)) dst[j * nrows + row0 + i] = tmp[j][i];
        }
}

// ---------- shared activation staging for the candidates ----------
// Per column: aq[g][kb] int4 (g = 0..7: words 4g..4g+3 of Q3 block kb, quarter g/2) -> lane kb reads 16 B at a 16 B
// stride (conflict-free LDS.128); dy[b][kb] floats; ss[kb] = sum of the 4 s. Filled once per persistent CTA.
struct ActView { int4 * aq; float * dy; float * ss; int nkb; };
static __host__ __device__ size_t act_bytes(int nc, int nkb) { return (size_t) nc * nkb * (8 * 16 + 4 * 4 + 4); }
static __device__ __forceinline__ ActView act_view(char * sm, int c, int nkb) {
    char * p = sm + (size_t) c * nkb * 148;
    return ActView{(int4 *) p, (float *) (p + (size_t) nkb * 128), (float *) (p + (size_t) nkb * 144), nkb};
}
template <int NC>
static __device__ void act_fill(char * sm, const blk_q8 * __restrict__ y, int stride_col_y, int nkb) {
    // one (column, Q8_1 block) per thread step; 4-byte loads (Q8_1 blocks are 36 B)
    for (int i = threadIdx.x + blockDim.x * threadIdx.y; i < NC * nkb * 4; i += blockDim.x * blockDim.y) {
        const int c = i / (nkb * 4), qb = i % (nkb * 4), kb = qb >> 2, b = qb & 3;
        const blk_q8 * yb = y + (size_t) c * stride_col_y + qb;
        const int * q = (const int *) yb->qs;
        ActView a = act_view(sm, c, nkb);
        a.aq[(2 * b) * nkb + kb] = make_int4(__ldg(q + 0), __ldg(q + 1), __ldg(q + 2), __ldg(q + 3));
        a.aq[(2 * b + 1) * nkb + kb] = make_int4(__ldg(q + 4), __ldg(q + 5), __ldg(q + 6), __ldg(q + 7));
        const float2 ds = __half22float2(__ldg((const half2 *) &yb->d));
        a.dy[b * nkb + kb] = ds.x;
    }
    __syncthreads();
    for (int i = threadIdx.x + blockDim.x * threadIdx.y; i < NC * nkb; i += blockDim.x * blockDim.y) {
        const int c = i / nkb, kb = i % nkb;
        const blk_q8 * yb = y + (size_t) c * stride_col_y + 4 * kb;
        float s = 0.0f;
#pragma unroll
        for (int b = 0; b < 4; ++b) s += __half2float(__ushort_as_half(yb[b].s));
        act_view(sm, c, nkb).ss[kb] = s;
    }
    __syncthreads();
}

// R rows (weights w[r][13]) x NC columns for block kb: builds each code byte once, dp4a against every column
// (the batch>1 win: one weight decode serves NC columns; one activation LDS serves R rows).
template <int NC, int R>
static __device__ __forceinline__ void blocks_dot(const uint32_t (&w)[R][13], char * sm, int nkb, int kb, float (&acc)[NC][R]) {
    float d[R];
#pragma unroll
    for (int r = 0; r < R; ++r) d[r] = h2f(w[r][0] & 0xFFFF);
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        int si[NC][R];  // live for one quarter only: registers stay ~ NC*R*2 + 13*R + 4*NC
#pragma unroll
        for (int c = 0; c < NC; ++c)
#pragma unroll
            for (int r = 0; r < R; ++r) si[c][r] = 0;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int4 a[NC];
#pragma unroll
            for (int c = 0; c < NC; ++c) a[c] = act_view(sm, c, nkb).aq[(2 * b + h) * nkb + kb];
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int v = (int) q3_vbyte(w[r], b, 4 * h + e);
#pragma unroll
                    for (int c = 0; c < NC; ++c) {
                        const int av = e == 0 ? a[c].x : e == 1 ? a[c].y : e == 2 ? a[c].z : a[c].w;
                        si[c][r] = __dp4a(v, av, si[c][r]);
                    }
                }
            }
        }
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const float dyb = act_view(sm, c, nkb).dy[b * nkb + kb];
#pragma unroll
            for (int r = 0; r < R; ++r) acc[c][r] = fmaf(i2f_scaled(si[c][r], q3_shift(b)), d[r] * dyb, acc[c][r]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const float m = h2f(w[r][0] >> 16);
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[c][r] = fmaf(m, act_view(sm, c, nkb).ss[kb], acc[c][r]);
    }
}

// the candidates' epilogue: a warp's R rows x NC columns reduced across lanes, lane 0 stores rows < nvalid
template <int NC, int R>
static __device__ __forceinline__ void store_rows(float (&acc)[NC][R], float * __restrict__ dst, int nrows, int row0,
                                                  int nvalid) {
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float s = warp_sum(acc[c][r]);
            if (threadIdx.x == 0 && r < nvalid) dst[(size_t) c * nrows + row0 + r] = s;
        }
}

// ---------- (b1) "wrow": persistent CTAs, activations in smem; a warp takes R rows, lane = Q3 block along K,
// each lane loads whole 52-B blocks (13 independent LDG.32 per row, R*13 in flight) ----------
template <int NC, int R, int NW>
__launch_bounds__(NW * 32) __global__ void k_wrow(const blk_q3 * __restrict__ x, const blk_q8 * __restrict__ y, float * __restrict__ dst,
                                                  int ncols_x, int stride_col_y, int nrows) {
    extern __shared__ __align__(16) char sm[];
    const int nkb = ncols_x / QK;
    act_fill<NC>(sm, y, stride_col_y, nkb);
    const int lane = threadIdx.x;
    for (int r0 = (blockIdx.x * NW + threadIdx.y) * R; r0 < nrows; r0 += gridDim.x * NW * R) {
        float acc[NC][R];
#pragma unroll
        for (int c = 0; c < NC; ++c)
#pragma unroll
            for (int r = 0; r < R; ++r) acc[c][r] = 0.0f;
#pragma unroll 1  // without it ptxas hoists several iterations' loads: 170-255 regs at R >= 2, occupancy 1 CTA/SM
        for (int kb = lane; kb < nkb; kb += 32) {
            uint32_t w[R][13];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int row = min(r0 + r, nrows - 1);
                const uint32_t * p = (const uint32_t *) (x + (size_t) row * nkb + kb);
#pragma unroll
                for (int i = 0; i < 13; ++i) w[r][i] = p[i];  // (__ldg here: 174 regs at R=2 vs 74, ptxas 13.0)
            }
            blocks_dot<NC, R>(w, sm, nkb, kb, acc);
        }
        store_rows<NC, R>(acc, dst, nrows, r0, nrows - r0);
    }
}

// ---------- (b2) "tile": persistent CTAs stream contiguous row tiles (TR rows = one contiguous byte range) into
// shared memory with 16-B cp.async (every lane busy, fully coalesced, double-buffered: copy-kernel access pattern),
// then compute from smem: warp per row, lane = block, 13 LDS.32 at a 13-word lane stride (conflict-free) ----------
static __device__ __forceinline__ void cp_async16(void * s, const void * g) {
    const unsigned sa = (unsigned) __cvta_generic_to_shared(s);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(g));
}
static __device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> static __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <int NC, int NW, int R>
__launch_bounds__(NW * 32) __global__ void k_tile(const blk_q3 * __restrict__ x, const blk_q8 * __restrict__ y, float * __restrict__ dst,
                                                  int ncols_x, int stride_col_y, int nrows, int TR) {
    extern __shared__ __align__(16) char sm[];
    const int nkb = ncols_x / QK;
    const size_t rowbytes = (size_t) nkb * 52;  // a multiple of 16 when K % 512 == 0 (checked on the host)
    const size_t abytes = (act_bytes(NC, nkb) + 15) & ~(size_t) 15;
    const int ntiles = (nrows + TR - 1) / TR;
    const int tid = threadIdx.x + 32 * threadIdx.y;
    auto issue = [&](int t, char * b) {
        if (t < ntiles) {
            const int rows = min(TR, nrows - t * TR);
            const char * g = (const char *) x + (size_t) t * TR * rowbytes;
            const int n16 = (int) (rows * rowbytes / 16);
            for (int i = tid; i < n16; i += NW * 32) cp_async16(b + 16 * (size_t) i, g + 16 * (size_t) i);
        }
        cp_commit();
    };
    int t = blockIdx.x;
    issue(t, sm + abytes);                       // first weight tile in flight while the activations are staged
    act_fill<NC>(sm, y, stride_col_y, nkb);
    for (int it = 0; t < ntiles; ++it, t += gridDim.x) {
        issue(t + gridDim.x, sm + abytes + ((it + 1) & 1) * TR * rowbytes);
        cp_wait<1>();
        __syncthreads();
        const char * b = sm + abytes + (it & 1) * TR * rowbytes;
        const int rows = min(TR, nrows - t * TR);
        // R rows per warp share each activation LDS (batch > 1 is otherwise LDS-bound: NC*128 B of
        // activations per 52 B of weights)
        for (int r0 = threadIdx.y * R; r0 < rows; r0 += NW * R) {
            float acc[NC][R];
#pragma unroll
            for (int c = 0; c < NC; ++c)
#pragma unroll
                for (int r = 0; r < R; ++r) acc[c][r] = 0.0f;
#pragma unroll 1
            for (int kb = threadIdx.x; kb < nkb; kb += 32) {
                uint32_t w[R][13];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const uint32_t * p = (const uint32_t *) (b + min(r0 + r, rows - 1) * rowbytes + (size_t) kb * 52);
#pragma unroll
                    for (int i = 0; i < 13; ++i) w[r][i] = p[i];
                }
                blocks_dot<NC, R>(w, sm, nkb, kb, acc);
            }
            store_rows<NC, R>(acc, dst, nrows, t * TR + r0, rows - r0);
        }
        __syncthreads();  // this buffer is refilled by the next iteration's issue
    }
    cp_wait<0>();
}

// ---------- (e) "q4" batch-1 candidates (this session): one thread per quad (4 Q3 blocks = 208 B = 13 x 16 B) ----------
// One wave of small CTAs (R whole rows each, R*Q <= NT threads) instead of a persistent grid: at these sizes (1-10 MB per
// matrix, ~1 DRAM latency x bandwidth of bytes) the kernel is latency bound, so every thread issues all 13 of its 16-B
// weight loads FIRST (208 B in flight per thread, the whole matrix in flight for all but the output shape), then stages
// the activations in shared memory while those loads fly, then does the math from registers. Same per-block math as
// blocks_dot (q3_vbyte -> dp4a per quarter, i2f_scaled, fmaf with d*dy, then fmaf(m, sum s)); partial sums per quad are
// reduced per row through shared memory. Batch 1 only.
// Activations, per Q3 block kb = 4q + j: aq[(8j + g)*Q + q] = int4 (Q8_1 words 4g..4g+3 of the block, quarter g/2),
// dy[j*Q + q] = float4 of the 4 Q8_1 scales d, sb[j*Q + q] = float4 of the 4 Q8_1 s (summed in q4_dot in the order of
// act_fill). Lanes of a warp read quads q = t % Q at consecutive 16-B slots (conflict-free LDS.128, broadcast across rows).
struct Q4Act { const int4 * aq; const float4 * dy; const float4 * sb; };
static __host__ __device__ size_t q4_act_bytes(int nkb) { return (size_t) nkb * (128 + 16 + 16); }
static HD Q4Act q4_act_view(const char * sm, int nkb) {
    return Q4Act{(const int4 *) sm, (const float4 *) (sm + (size_t) nkb * 128), (const float4 *) (sm + (size_t) nkb * 144)};
}
// one thread per Q8_1 block: its 9 words (36-B blocks are only 4-B aligned) loaded before any store, so the fill costs
// one L2 round trip (per-Q3-block threads with 36 loads each got compiled into ~5 dependent load->store rounds); no sync
static HD uint32_t q4_ldg32(const unsigned int * p) {
#ifdef __CUDA_ARCH__
    return __ldg(p);
#else
    return *p;
#endif
}
// (host and device: --q4-host-emu runs the q4 kernels' fill, addressing and math on the CPU)
static HD void q4_act_fill(char * sm, const blk_q8 * __restrict__ y, int nkb, int tid, int nthr) {
    const int Q = nkb >> 2;
    int4 * aq = (int4 *) sm;
    float * dy = (float *) (sm + (size_t) nkb * 128);
    float * sb = (float *) (sm + (size_t) nkb * 144);
    for (int i = tid; i < 4 * nkb; i += nthr) {
        const int kb = i >> 2, b = i & 3, q = kb >> 2, j = kb & 3;
        const unsigned int * p = (const unsigned int *) (y + i);
        uint32_t v[9];
#pragma unroll
        for (int e = 0; e < 9; ++e) v[e] = q4_ldg32(p + e);
        aq[(8 * j + 2 * b) * Q + q] = make_int4((int) v[1], (int) v[2], (int) v[3], (int) v[4]);
        aq[(8 * j + 2 * b + 1) * Q + q] = make_int4((int) v[5], (int) v[6], (int) v[7], (int) v[8]);
        dy[4 * (j * Q + q) + b] = h2f((uint16_t) (v[0] & 0xFFFF));
        sb[4 * (j * Q + q) + b] = h2f((uint16_t) (v[0] >> 16));
    }
}
// the quad (13 x uint4 in registers) against the staged activations of quad q
static HD float q4_dot(const uint4 (&c)[13], const Q4Act & a, int Q, int q) {
    uint32_t w[52];
#pragma unroll
    for (int i = 0; i < 13; ++i) { w[4 * i] = c[i].x; w[4 * i + 1] = c[i].y; w[4 * i + 2] = c[i].z; w[4 * i + 3] = c[i].w; }
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t * wb = w + 13 * j;  // block j of the quad starts at byte 52j = word 13j
        const float d = h2f(wb[0] & 0xFFFF);
        const float4 dy = a.dy[j * Q + q];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            int si = 0;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int4 av = a.aq[(8 * j + 2 * b + h) * Q + q];
                si = dp4a((int) q3_vbyte(wb, b, 4 * h + 0), av.x, si);
                si = dp4a((int) q3_vbyte(wb, b, 4 * h + 1), av.y, si);
                si = dp4a((int) q3_vbyte(wb, b, 4 * h + 2), av.z, si);
                si = dp4a((int) q3_vbyte(wb, b, 4 * h + 3), av.w, si);
            }
            const float dyb = b == 0 ? dy.x : b == 1 ? dy.y : b == 2 ? dy.z : dy.w;
            acc = fmaf(i2f_scaled(si, q3_shift(b)), d * dyb, acc);
        }
        const float4 sb = a.sb[j * Q + q];
        acc = fmaf(h2f(wb[0] >> 16), ((sb.x + sb.y) + sb.z) + sb.w, acc);
    }
    return acc;
}
// per-row sum of the Q quad partials: red[q*R + r] (R = the CTA's row capacity), thread r < rows sums its row
static __device__ __forceinline__ void q4_reduce_store(float v, float * red, float * __restrict__ dst, int tid, int nq, int Q,
                                                       int R, int row0, int rows) {
    if (tid < nq) red[(tid % Q) * R + tid / Q] = v;
    __syncthreads();
    if (tid < rows) {
        float s0 = 0.0f, s1 = 0.0f;
        int q = 0;
        for (; q + 1 < Q; q += 2) { s0 += red[q * R + tid]; s1 += red[(q + 1) * R + tid]; }
        if (q < Q) s0 += red[q * R + tid];
        dst[row0 + tid] = s0 + s1;
    }
}
// 16-B weight load: read-only path, L1-allocating (q4_ldg: the two halves of a 32-B sector come from two instructions)
static __device__ __forceinline__ uint4 q4_ld(const uint4 * p) { return __ldg(p); }

// (e1) q4_ldg: original layout; lane t reads its quad directly: 13 LDG.128 at a 208-B lane stride (each sector is read
// by 2 of the 13 instructions, the L1 merges them); IL = true (q4il_ldg): the repacked layout of q4_il_chunk, the same
// 13 LDG.128 but each one fully coalesced (needs the one-time host/device repack below, and a layout conversion in ggml)
template <bool IL>
__launch_bounds__(256, 3) __global__ void k_q4_ldg(const uint4 * __restrict__ x, const blk_q8 * __restrict__ y, float * __restrict__ dst,
                                               int nkb, int nrows, int R) {
    extern __shared__ __align__(16) char sm[];
    const int Q = nkb >> 2, tid = threadIdx.x;
    const int row0 = blockIdx.x * R, rows = min(R, nrows - row0), nq = rows * Q;
    const uint4 * xc = x + (size_t) row0 * Q * 13;  // this CTA's contiguous quad range
    uint4 c[13];
    if (tid < nq) {
#pragma unroll
        for (int i = 0; i < 13; ++i) c[i] = q4_ld(xc + q4_chunk(IL, tid, i, nq));
    } else {
#pragma unroll
        for (int i = 0; i < 13; ++i) c[i] = make_uint4(0, 0, 0, 0);
    }
    q4_act_fill(sm, y, nkb, tid, blockDim.x);  // overlaps the weight loads
    __syncthreads();
    float v = 0.0f;
    if (tid < nq) v = q4_dot(c, q4_act_view(sm, nkb), Q, tid % Q);
    q4_reduce_store(v, (float *) (sm + q4_act_bytes(nkb)), dst, tid, nq, Q, R, row0, rows);
}

// (e2) q4_cpa: original layout; the CTA's contiguous R*Q*208 B are copied into shared memory by fully coalesced 16-B
// cp.async (every lane, consecutive chunks: the copy-kernel pattern), activations staged meanwhile, then each thread
// reads its quad with 13 LDS.128 at a 13-chunk lane stride (odd -> conflict-free). One tile per CTA, no double buffer.
__launch_bounds__(256) __global__ void k_q4_cpa(const uint4 * __restrict__ x, const blk_q8 * __restrict__ y, float * __restrict__ dst,
                                               int nkb, int nrows, int R) {
    extern __shared__ __align__(16) char sm[];
    const int Q = nkb >> 2, tid = threadIdx.x;
    const int row0 = blockIdx.x * R, rows = min(R, nrows - row0), nq = rows * Q;
    const uint4 * xc = x + (size_t) row0 * Q * 13;
    uint4 * ws = (uint4 *) sm;
    char * act = sm + (size_t) R * Q * 208;
#pragma unroll 4
    for (int i = tid; i < nq * 13; i += blockDim.x) cp_async16(ws + i, xc + i);
    cp_commit();
    q4_act_fill(act, y, nkb, tid, blockDim.x);
    cp_wait<0>();
    __syncthreads();
    float v = 0.0f;
    if (tid < nq) {
        uint4 c[13];
#pragma unroll
        for (int i = 0; i < 13; ++i) c[i] = ws[tid * 13 + i];
        v = q4_dot(c, q4_act_view(act, nkb), Q, tid % Q);
    }
    q4_reduce_store(v, (float *) (act + q4_act_bytes(nkb)), dst, tid, nq, Q, R, row0, rows);
}

// one-time repack for q4il_ldg (not timed): dst gets src (original layout) permuted per CTA range by q4_il_chunk
__global__ void k_q4_il_repack(const uint4 * __restrict__ src, uint4 * __restrict__ dst, int Q, int R, int nrows) {
    const int row0 = blockIdx.x * R, rows = min(R, nrows - row0), nq = rows * Q;
    const size_t base = (size_t) row0 * Q * 13;
    for (int idx = threadIdx.x; idx < nq * 13; idx += blockDim.x) dst[base + q4_il_chunk(idx / 13, idx % 13, nq)] = src[base + idx];
}

// ---------- (c) F16 mat-vec reference: warp per row, 16-B loads of 8 halves, fp32 activations ----------
template <int NC, int NW>
__launch_bounds__(NW * 32) __global__ void k_f16(const half * __restrict__ x, const float * __restrict__ y, float * __restrict__ dst, int K, int nrows) {
    const int row = blockIdx.x * NW + threadIdx.y;
    if (row >= nrows) return;
    const uint4 * xr = (const uint4 *) (x + (size_t) row * K);
    float acc[NC] = {0.0f};
#pragma unroll 4
    for (int i = threadIdx.x; i < K / 8; i += 32) {
        const uint4 u = __ldg(xr + i);
        const half2 * h = (const half2 *) &u;
        float2 f[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) f[e] = __half22float2(h[e]);
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const float4 a = __ldg((const float4 *) (y + (size_t) c * K) + 2 * i), bq = __ldg((const float4 *) (y + (size_t) c * K) + 2 * i + 1);
            acc[c] += f[0].x * a.x + f[0].y * a.y + f[1].x * a.z + f[1].y * a.w + f[2].x * bq.x + f[2].y * bq.y + f[3].x * bq.z + f[3].y * bq.w;
        }
    }
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const float s = warp_sum(acc[c]);
        if (threadIdx.x == 0) dst[(size_t) c * nrows + row] = s;
    }
}

// ---------- (d) roofs: pure 16-B read kernel; cudaMemcpyAsync D2D timed separately ----------
__global__ void k_read(const uint4 * __restrict__ p, size_t n, unsigned * sink) {
    uint32_t a = 0;
    for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x) {
        const uint4 v = __ldg(p + i);
        a ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (a == 0x9E3779B9u) *sink = a;  // keeps the loads alive
}

// ---------- data fill (hash-based, on the device) ----------
static __device__ __forceinline__ uint32_t hash32(uint64_t i, uint32_t seed) {
    uint64_t z = i * 0x9E3779B97F4A7C15ull + seed;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull; z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t) (z ^ (z >> 31));
}
__global__ void k_fill_q3(blk_q3 * x, size_t nblk, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < nblk; i += (size_t) gridDim.x * blockDim.x) {
        uint32_t * w = (uint32_t *) (x + i);
        const float d = 0.002f + 0.03f * (hash32(i, seed) & 0xFFFF) / 65535.0f;
        const float m = -0.1f + 0.2f * (hash32(i, seed + 1) & 0xFFFF) / 65535.0f;
        w[0] = (uint32_t) __half_as_ushort(__float2half_rn(d)) | ((uint32_t) __half_as_ushort(__float2half_rn(m)) << 16);
        for (int k = 1; k < 13; ++k) w[k] = hash32(13 * i + k, seed + 2);
    }
}
__global__ void k_fill_f16(half * x, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
        x[i] = __float2half_rn(((hash32(i, seed) & 0xFFFF) / 65535.0f - 0.5f) * 0.2f);
}

// ==================================== host driver ====================================
struct Shape { const char * name; int K, N, per_layer; };
static const Shape SHAPES_4B[6] = {
    {"q", 2560, 4096, 1}, {"k_v", 2560, 1024, 2}, {"o", 4096, 2560, 1},
    {"gate_up", 2560, 9728, 2}, {"down", 9728, 2560, 1}, {"output", 2560, 49152, 0},
};
// --qwen15: Qwen2.5-Coder-1.5B's linears (K = 1536: 12 blocks a row; its output matrix is Q6_K in the deployed files)
static const Shape SHAPES_QWEN15[6] = {
    {"q", 1536, 1536, 1}, {"k_v", 1536, 256, 2}, {"o", 1536, 1536, 1},
    {"gate_up", 1536, 8960, 2}, {"down", 8960, 1536, 1}, {"output", 1536, 151936, 0},
};
static const Shape * SHAPES = SHAPES_4B;
static int NLAYER = 36;
static const char * MODEL = "qwen3-4b-shape";
static int g_nsm = 0, g_iters = 200, g_reps = 5;
static size_t g_pool_bytes = (size_t) 1 << 30;

typedef void (*launch_fn)(cudaStream_t, const void * w, const void * y, float * dst, int K, int N);

template <int NC> static void L_cur(cudaStream_t s, const void * w, const void * y, float * dst, int K, int N) {
    // the patch's host dispatch: batch 1: 4 warps; small-K (K/128 < 32) -> 4 rows per CTA, else 1 row + unroll 2;
    // batch 2-4: 4 warps x 2 rows; batch 5-8: 2 warps x 2 rows
    const int nkb = K / QK;
    if constexpr (NC == 1) {
        if (nkb < 4 * 8) k_cur<1, 4, 4, false><<<(N + 3) / 4, dim3(32, 4), 0, s>>>(w, (const blk_q8 *) y, dst, K, nkb, K / QK8, N);
        else             k_cur<1, 4, 1, true ><<<N, dim3(32, 4), 0, s>>>(w, (const blk_q8 *) y, dst, K, nkb, K / QK8, N);
    } else {
        constexpr int NW = NC <= 4 ? 4 : 2;
        k_cur<NC, NW, 2, false><<<(N + 1) / 2, dim3(32, NW), 0, s>>>(w, (const blk_q8 *) y, dst, K, nkb, K / QK8, N);
    }
}
template <int NC, int R, int NW> static void L_wrow(cudaStream_t s, const void * w, const void * y, float * dst, int K, int N) {
    const int nkb = K / QK;
    const size_t smem = act_bytes(NC, nkb);
    static int occ = -1; static size_t occ_smem = 0;
    if (occ < 0 || occ_smem != smem) {  // cached per smem size (K); never during capture of a new size
        CK(cudaFuncSetAttribute(k_wrow<NC, R, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem));
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, k_wrow<NC, R, NW>, NW * 32, smem));
        occ_smem = smem;
    }
    const int groups = (N + NW * R - 1) / (NW * R);
    const int grid = std::max(1, std::min(groups, occ * g_nsm));
    k_wrow<NC, R, NW><<<grid, dim3(32, NW), smem, s>>>((const blk_q3 *) w, (const blk_q8 *) y, dst, K, K / QK8, N);
}
template <int NC, int NW, int STAGE, int R = 1> static void L_tile(cudaStream_t s, const void * w, const void * y, float * dst, int K, int N) {
    const int nkb = K / QK;
    const size_t rowbytes = (size_t) nkb * 52;
    const int TR = std::max(1, (int) (STAGE / rowbytes));
    const size_t smem = ((act_bytes(NC, nkb) + 15) & ~(size_t) 15) + 2 * TR * rowbytes;
    static int occ = -1; static size_t occ_smem = 0;
    if (occ < 0 || occ_smem != smem) {
        CK(cudaFuncSetAttribute(k_tile<NC, NW, R>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem));
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, k_tile<NC, NW, R>, NW * 32, smem));
        occ_smem = smem;
    }
    const int ntiles = (N + TR - 1) / TR;
    const int grid = std::max(1, std::min(ntiles, std::max(occ, 1) * g_nsm));
    k_tile<NC, NW, R><<<grid, dim3(32, NW), smem, s>>>((const blk_q3 *) w, (const blk_q8 *) y, dst, K, K / QK8, N, TR);
}
template <int NC> static void L_f16(cudaStream_t s, const void * w, const void * y, float * dst, int K, int N) {
    constexpr int NW = 4;
    k_f16<NC, NW><<<(N + NW - 1) / NW, dim3(32, NW), 0, s>>>((const half *) w, (const float *) y, dst, K, N);
}

// batch-1 launchers of the q4 kernels: one CTA per R rows (R*Q <= NT threads), one thread per quad, grid = ceil(N/R).
// NT = 256 (q4_ldg), or "auto": NT halved (256 -> 32) while the grid has fewer than 2 CTAs per SM, so the small
// matrices (k/v: 1 MB) are spread over all SMs instead of 21 CTAs
static int q4_pick_R(int Q, int N, bool autont) {
    int nt = 256;
    if (autont) while (nt > 32 && (N + q4_rows_per_cta(Q, nt) - 1) / q4_rows_per_cta(Q, nt) < 2 * g_nsm) nt /= 2;
    return q4_rows_per_cta(Q, nt);
}
template <bool AUTO, bool IL> static void L_q4_ldg(cudaStream_t s, const void * w, const void * y, float * d, int K, int N) {
    const int nkb = K / QK, Q = nkb / 4, R = q4_pick_R(Q, N, AUTO);
    const size_t smem = q4_act_bytes(nkb) + (size_t) R * Q * 4;
    k_q4_ldg<IL><<<(N + R - 1) / R, (R * Q + 31) / 32 * 32, smem, s>>>((const uint4 *) w, (const blk_q8 *) y, d, nkb, N, R);
}
static void L_q4_cpa(cudaStream_t s, const void * w, const void * y, float * d, int K, int N) {
    const int nkb = K / QK, Q = nkb / 4, R = q4_pick_R(Q, N, true);
    const size_t smem = (size_t) R * Q * 208 + q4_act_bytes(nkb) + (size_t) R * Q * 4;
    static size_t smem_set = 0;
    if (smem > smem_set) {  // first call per larger size is the (uncaptured) check launch
        CK(cudaFuncSetAttribute(k_q4_cpa, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem));
        smem_set = smem;
    }
    k_q4_cpa<<<(N + R - 1) / R, (R * Q + 31) / 32 * 32, smem, s>>>((const uint4 *) w, (const blk_q8 *) y, d, nkb, N, R);
}
// q4il_auto_repack: copy 0 of the pool (what the host check reads) is repacked in place before the variant runs
// (original saved in the scratch buffer) and restored after; the timing loop's other copies keep the original bytes,
// which only changes the values, not the access pattern being timed. R must match the launcher's (auto) choice.
static void P_q4il(cudaStream_t s, char * pool, char * scratch, size_t mbytes, int K, int N, bool undo) {
    if (undo) { CK(cudaMemcpyAsync(pool, scratch, mbytes, cudaMemcpyDeviceToDevice, s)); CK(cudaStreamSynchronize(s)); return; }
    const int Q = K / QK / 4, R = q4_pick_R(Q, N, true);
    CK(cudaMemcpyAsync(scratch, pool, mbytes, cudaMemcpyDeviceToDevice, s));
    k_q4_il_repack<<<(N + R - 1) / R, 256, 0, s>>>((const uint4 *) scratch, (uint4 *) pool, Q, R, N);
    CK(cudaGetLastError());
    CK(cudaStreamSynchronize(s));
}
// --q4-host-emu (no GPU needed: runs before any CUDA call): the q4 kernels' per-CTA work on the CPU with the same
// host/device functions (q4_act_fill, q4_chunk, q4_dot) and the same R choice (132 SMs), the il repack done as
// k_q4_il_repack does, the row sums as q4_reduce_store; every row of every shape checked against q3_ref_row
static int q4_host_emu() {
    if (!g_nsm) g_nsm = 132;
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    int nfail = 0;
    for (int si = 0; si < 6; ++si) {
        const Shape & sh = SHAPES[si];
        const int K = sh.K, N = sh.N, nkb = K / QK, Q = nkb / 4;
        std::vector<uint32_t> wmat((size_t) N * nkb * 13);
        for (size_t b = 0; b < (size_t) N * nkb; ++b) {
            const float d = 0.002f + 0.03f * (rng() & 0xFFFF) / 65535.0f, m = -0.1f + 0.2f * (rng() & 0xFFFF) / 65535.0f;
            wmat[13 * b] = (uint32_t) f2h(d) | ((uint32_t) f2h(m) << 16);
            for (int k = 1; k < 13; ++k) wmat[13 * b + k] = (uint32_t) rng();
        }
        std::vector<float> x(K);
        for (auto & v : x) v = nd(rng);
        std::vector<blk_q8> yq(K / QK8);
        q8_1_quantize(x.data(), yq.data(), K);
        std::vector<double> ref(N), rabs(N);
        for (int r = 0; r < N; ++r) q3_ref_row((const blk_q3 *) wmat.data() + (size_t) r * nkb, yq.data(), K, ref[r], rabs[r]);
        const uint4 * orig = (const uint4 *) wmat.data();
        for (int mode = 0; mode < 3; ++mode) {  // q4_ldg (NT 256), q4_ldg_auto / q4_cpa_auto, q4il_auto_repack
            const bool autont = mode > 0, il = mode == 2;
            const int R = q4_pick_R(Q, N, autont), grid = (N + R - 1) / R, nthr = (R * Q + 31) / 32 * 32;
            std::vector<uint4> img(orig, orig + (size_t) N * Q * 13);
            if (il)
                for (int c = 0; c < grid; ++c) {
                    const int row0 = c * R, nq = std::min(R, N - row0) * Q;
                    const size_t base = (size_t) row0 * Q * 13;
                    for (int idx = 0; idx < nq * 13; ++idx) img[base + q4_il_chunk(idx / 13, idx % 13, nq)] = orig[base + idx];
                }
            std::vector<float> out(N, NAN);
            std::vector<uint4> smem((q4_act_bytes(nkb) + (size_t) R * Q * 4 + 15) / 16);
            char * sm = (char *) smem.data();
            float * red = (float *) (sm + q4_act_bytes(nkb));
            for (int c = 0; c < grid; ++c) {
                const int row0 = c * R, rows = std::min(R, N - row0), nq = rows * Q;
                const uint4 * xc = img.data() + (size_t) row0 * Q * 13;
                memset(sm, 0xFF, smem.size() * 16);  // NaN: a slot the fill misses poisons the result
                for (int tid = 0; tid < nthr; ++tid) q4_act_fill(sm, yq.data(), nkb, tid, nthr);
                for (int tid = 0; tid < nq; ++tid) {
                    uint4 cc[13];
                    for (int i = 0; i < 13; ++i) cc[i] = xc[q4_chunk(il, tid, i, nq)];
                    red[(tid % Q) * R + tid / Q] = q4_dot(cc, q4_act_view(sm, nkb), Q, tid % Q);
                }
                for (int tid = 0; tid < rows; ++tid) {
                    float s0 = 0.0f, s1 = 0.0f;
                    int q = 0;
                    for (; q + 1 < Q; q += 2) { s0 += red[q * R + tid]; s1 += red[(q + 1) * R + tid]; }
                    if (q < Q) s0 += red[q * R + tid];
                    out[row0 + tid] = s0 + s1;
                }
            }
            double maxerr = 0;
            for (int r = 0; r < N; ++r) {
                const double e = std::fabs(out[r] - ref[r]) / std::max(rabs[r], 1e-30);
                maxerr = std::isnan(e) ? 1e30 : std::max(maxerr, e);
            }
            const bool ok = maxerr < 1e-4;
            nfail += !ok;
            printf("q4 host emu %-7s K=%d N=%d mode=%s R=%d grid=%d threads=%d: max_rel_err %.2e %s\n", sh.name, K, N,
                   mode == 0 ? "nt256" : mode == 1 ? "auto" : "auto_il", R, grid, nthr, maxerr, ok ? "ok" : "FAIL");
        }
    }
    printf("q4 host emu %s\n", nfail ? "FAIL" : "PASS");
    return nfail ? 1 : 0;
}
typedef void (*prep_fn)(cudaStream_t, char * pool, char * scratch, size_t mbytes, int K, int N, bool undo);

struct Variant { const char * name; bool f16; launch_fn fn[4]; prep_fn prep; };  // fn per batch 1,2,4,8 (null: not run)
#define V4(T) {T<1>, T<2>, T<4>, T<8>}
template <int NC> static void L_wrow_r1(cudaStream_t s, const void * w, const void * y, float * d, int K, int N) { L_wrow<NC, 1, 8>(s, w, y, d, K, N); }
template <int NC> static void L_wrow_r2(cudaStream_t s, const void * w, const void * y, float * d, int K, int N) { L_wrow<NC, 2, 8>(s, w, y, d, K, N); }
template <int NC> static void L_wrow_r4(cudaStream_t s, const void * w, const void * y, float * d, int K, int N) { L_wrow<NC, 4, 4>(s, w, y, d, K, N); }
template <int NC> static void L_tile16(cudaStream_t s, const void * w, const void * y, float * d, int K, int N) { L_tile<NC, 8, 16384>(s, w, y, d, K, N); }
template <int NC> static void L_tile32(cudaStream_t s, const void * w, const void * y, float * d, int K, int N) { L_tile<NC, 8, 32768>(s, w, y, d, K, N); }
template <int NC> static void L_tile16r2(cudaStream_t s, const void * w, const void * y, float * d, int K, int N) { L_tile<NC, 8, 16384, 2>(s, w, y, d, K, N); }
template <int NC> static void L_tile8w4(cudaStream_t s, const void * w, const void * y, float * d, int K, int N) { L_tile<NC, 4, 8192>(s, w, y, d, K, N); }

static const Variant VARIANTS[] = {
    {"cur", false, V4(L_cur)},
    {"wrow_r1", false, V4(L_wrow_r1)},
    {"wrow_r2", false, V4(L_wrow_r2)},
    {"wrow_r4", false, V4(L_wrow_r4)},
    {"tile16k", false, V4(L_tile16)},
    {"tile32k", false, V4(L_tile32)},
    {"tile16k_r2", false, V4(L_tile16r2)},
    {"tile8k_w4", false, V4(L_tile8w4)},
    {"q4_ldg", false, {L_q4_ldg<false, false>, nullptr, nullptr, nullptr}},
    {"q4_ldg_auto", false, {L_q4_ldg<true, false>, nullptr, nullptr, nullptr}},
    {"q4_cpa_auto", false, {L_q4_cpa, nullptr, nullptr, nullptr}},
    {"q4il_auto_repack", false, {L_q4_ldg<true, true>, nullptr, nullptr, nullptr}, P_q4il},
    {"f16", true, V4(L_f16)},
};
static const int BATCHES[4] = {1, 2, 4, 8};

// time `iters` launches cycling through weight copies (pool >> L2, so weights stream from HBM), in a CUDA graph
static double time_us(cudaStream_t s, launch_fn fn, const char * pool, size_t mat_stride, int ncopies, const void * y, float * dst, int K, int N) {
    fn(s, pool, y, dst, K, N);  // warm-up, outside capture (sets attributes, occupancy cache)
    CK(cudaStreamSynchronize(s));
    cudaGraph_t g; cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < g_iters; ++i) fn(s, pool + (size_t) (i % ncopies) * mat_stride, y, dst, K, N);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    CK(cudaGraphLaunch(ge, s));
    double best = 1e30;
    for (int r = 0; r < g_reps; ++r) {
        CK(cudaEventRecord(e0, s)); CK(cudaGraphLaunch(ge, s)); CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
        best = std::min(best, 1000.0 * ms / g_iters);
    }
    CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
    CK(cudaGraphExecDestroy(ge)); CK(cudaGraphDestroy(g));
    return best;
}

static std::vector<int> check_rows(int N) {
    std::vector<int> r;
    for (int i = 0; i < N; ++i) if (i < 40 || i >= N - 40 || ((uint32_t) i * 2654435761u) >> 27 == 0) r.push_back(i);
    return r;
}

int main(int argc, char ** argv) {
    bool quick = false;
    const char * only = nullptr;
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "--cpu-selftest")) return cpu_selftest(i + 1 < argc ? argv[i + 1] : nullptr);
        else if (!strcmp(argv[i], "--q4-host-emu")) return q4_host_emu();
        else if (!strcmp(argv[i], "--quick")) { quick = true; g_iters = 50; g_reps = 3; }
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc) g_iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--qwen15")) { SHAPES = SHAPES_QWEN15; NLAYER = 28; MODEL = "qwen2.5-1.5b-shape"; }
        else { fprintf(stderr, "usage: %s [--quick] [--qwen15] [--iters N] [--only variant] | --cpu-selftest [DIR] | --q4-host-emu\n", argv[0]); return 2; }
    }
    g_log = stderr;
    if (cpu_selftest(nullptr) != 0) return 1;
    cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
    g_nsm = prop.multiProcessorCount;
    printf("{\"device\":\"%s\",\"sm\":%d,\"cc\":\"%d.%d\",\"l2_mb\":%.1f,\"iters\":%d}\n", prop.name, g_nsm, prop.major, prop.minor,
           prop.l2CacheSize / 1048576.0, g_iters);
    fflush(stdout);
    cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    char * pool; CK(cudaMalloc(&pool, g_pool_bytes));
    char * pool2; CK(cudaMalloc(&pool2, g_pool_bytes / 2));
    unsigned * sink; CK(cudaMalloc(&sink, 4));

    // roofs: D2D copy (read+write bytes) and a pure read kernel, 512 MiB each
    double copy_gbps, read_gbps;
    {
        const size_t n = g_pool_bytes / 2;
        cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
        float best = 1e30f, ms;
        for (int r = 0; r < 6; ++r) {
            CK(cudaEventRecord(e0, s)); CK(cudaMemcpyAsync(pool2, pool, n, cudaMemcpyDeviceToDevice, s)); CK(cudaEventRecord(e1, s));
            CK(cudaEventSynchronize(e1)); CK(cudaEventElapsedTime(&ms, e0, e1)); if (r) best = std::min(best, ms);
        }
        copy_gbps = 2.0 * n / (best * 1e-3) / 1e9;
        best = 1e30f;
        for (int r = 0; r < 6; ++r) {
            CK(cudaEventRecord(e0, s)); k_read<<<g_nsm * 8, 512, 0, s>>>((const uint4 *) pool, g_pool_bytes / 16, sink); CK(cudaEventRecord(e1, s));
            CK(cudaEventSynchronize(e1)); CK(cudaEventElapsedTime(&ms, e0, e1)); if (r) best = std::min(best, ms);
        }
        read_gbps = g_pool_bytes / (best * 1e-3) / 1e9;
        printf("{\"roof\":\"d2d_copy\",\"gbps\":%.1f}\n{\"roof\":\"read_kernel\",\"gbps\":%.1f}\n", copy_gbps, read_gbps);
        fflush(stdout);
    }

    const int nv = sizeof(VARIANTS) / sizeof(VARIANTS[0]);
    std::vector<double> us_tab(nv * 4 * 6, -1.0);
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    int nfail = 0;
    for (int si = 0; si < 6; ++si) {
        const Shape & sh = SHAPES[si];
        if (quick && si == 5) continue;
        const int K = sh.K, N = sh.N, nkb = K / QK;
        // rows of 16-B aligned blocks only (qwen15's down, K = 8960, is skipped: no shape line, no per-step total)
        if (K % 512) { fprintf(stderr, "%s: K %% 512 != 0 unsupported, skipped\n", sh.name); continue; }
        // activations for 8 columns: fp32 (F16 path) and Q8_1 (quantized on the host, as quantize_q8_1 does)
        std::vector<float> xf(8 * (size_t) K);
        for (auto & v : xf) v = nd(rng);
        std::vector<blk_q8> yq(8 * (size_t) K / QK8);
        for (int c = 0; c < 8; ++c) q8_1_quantize(&xf[(size_t) c * K], &yq[(size_t) c * K / QK8], K);
        float * d_xf; blk_q8 * d_yq; float * d_dst;
        CK(cudaMalloc(&d_xf, xf.size() * 4)); CK(cudaMalloc(&d_yq, yq.size() * sizeof(blk_q8))); CK(cudaMalloc(&d_dst, 8 * (size_t) N * 4));
        CK(cudaMemcpy(d_xf, xf.data(), xf.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_yq, yq.data(), yq.size() * sizeof(blk_q8), cudaMemcpyHostToDevice));
        const std::vector<int> rows = check_rows(N);
        for (int pass = 0; pass < 2; ++pass) {  // 0: Q3 variants, 1: F16
            const bool f16 = pass == 1;
            const size_t mbytes = f16 ? (size_t) N * K * 2 : (size_t) N * nkb * 52;
            const size_t al = f16 ? 4096 : 53248;  // Q3: a multiple of 52 and 16, so every copy is on the fill's block grid
            const size_t stride = (mbytes + al - 1) / al * al;
            const int ncopies = (int) std::max<size_t>(1, std::min<size_t>(g_pool_bytes / stride, g_iters));
            if (f16) k_fill_f16<<<g_nsm * 8, 256, 0, s>>>((half *) pool, g_pool_bytes / 2, 11 + si);
            else     k_fill_q3<<<g_nsm * 8, 256, 0, s>>>((blk_q3 *) pool, g_pool_bytes / 52, 17 + si);
            CK(cudaStreamSynchronize(s));
            // host reference for copy 0, 8 columns, sampled rows
            std::vector<uint8_t> hw(mbytes);
            CK(cudaMemcpy(hw.data(), pool, mbytes, cudaMemcpyDeviceToHost));
            std::vector<double> ref(8 * rows.size()), rabs(8 * rows.size());
            for (size_t ri = 0; ri < rows.size(); ++ri)
                for (int c = 0; c < 8; ++c) {
                    double r = 0, a = 0;
                    if (f16) {
                        const uint16_t * wr = (const uint16_t *) hw.data() + (size_t) rows[ri] * K;
                        for (int k = 0; k < K; ++k) { const double t = (double) h2f(wr[k]) * xf[(size_t) c * K + k]; r += t; a += std::fabs(t); }
                    } else {
                        q3_ref_row((const blk_q3 *) hw.data() + (size_t) rows[ri] * nkb, &yq[(size_t) c * K / QK8], K, r, a);
                    }
                    ref[8 * ri + c] = r; rabs[8 * ri + c] = a;
                }
            for (int vi = 0; vi < nv; ++vi) {
                const Variant & v = VARIANTS[vi];
                if (v.f16 != f16) continue;
                if (only && strcmp(only, v.name) && !v.f16) continue;
                if (v.prep) v.prep(s, pool, pool2, mbytes, K, N, false);
                for (int bi = 0; bi < 4; ++bi) {
                    if (!v.fn[bi]) continue;
                    const int nc = BATCHES[bi];
                    const void * yarg = f16 ? (const void *) d_xf : (const void *) d_yq;
                    CK(cudaMemsetAsync(d_dst, 0xFF, 8 * (size_t) N * 4, s));  // NaN: unwritten rows fail the check
                    v.fn[bi](s, pool, yarg, d_dst, K, N);
                    CK(cudaGetLastError());
                    CK(cudaStreamSynchronize(s));
                    std::vector<float> got((size_t) nc * N);
                    CK(cudaMemcpy(got.data(), d_dst, got.size() * 4, cudaMemcpyDeviceToHost));
                    double maxerr = 0;
                    for (size_t ri = 0; ri < rows.size(); ++ri)
                        for (int c = 0; c < nc; ++c) {
                            const double e = std::fabs(got[(size_t) c * N + rows[ri]] - ref[8 * ri + c]) / std::max(rabs[8 * ri + c], 1e-30);
                            maxerr = std::isnan(e) ? 1e30 : std::max(maxerr, e);
                        }
                    const bool ok = maxerr < 1e-4;  // fp32 accumulation vs fp64; a layout bug gives O(1)
                    nfail += !ok;
                    const double us = time_us(s, v.fn[bi], pool, stride, ncopies, yarg, d_dst, K, N);
                    us_tab[(vi * 4 + bi) * 6 + si] = us;
                    const double gbps = mbytes / (us * 1e-6) / 1e9;
                    printf("{\"variant\":\"%s\",\"shape\":\"%s\",\"K\":%d,\"N\":%d,\"batch\":%d,\"us\":%.3f,\"weight_gbps\":%.1f,"
                           "\"copy_share\":%.3f,\"read_share\":%.3f,\"max_rel_err\":%.2e,\"ok\":%s}\n",
                           v.name, sh.name, K, N, nc, us, gbps, gbps / copy_gbps, gbps / read_gbps, maxerr, ok ? "true" : "false");
                    fflush(stdout);
                }
                if (v.prep) v.prep(s, pool, pool2, mbytes, K, N, true);
            }
        }
        CK(cudaFree(d_xf)); CK(cudaFree(d_yq)); CK(cudaFree(d_dst));
    }
    // per token: 36 layers of (q, k, v, o, gate, up, down) + the output matrix; mat-vec time only
    int f16i = -1;
    for (int vi = 0; vi < nv; ++vi) if (VARIANTS[vi].f16) f16i = vi;
    for (int bi = 0; bi < 4; ++bi) {
        double f16_us = 0;
        std::vector<double> tot(nv, 0.0);
        for (int vi = 0; vi < nv; ++vi) {
            for (int si = 0; si < 6; ++si) {
                const double u = us_tab[(vi * 4 + bi) * 6 + si];
                if (u < 0) { tot[vi] = -1; break; }
                tot[vi] += si == 5 ? u : NLAYER * SHAPES[si].per_layer * u;
            }
        }
        f16_us = tot[f16i];
        for (int vi = 0; vi < nv; ++vi) {
            if (tot[vi] < 0) continue;
            printf("{\"model\":\"%s\",\"variant\":\"%s\",\"batch\":%d,\"matvec_us_per_step\":%.1f,\"x_f16\":%.3f}\n",
                   MODEL, VARIANTS[vi].name, BATCHES[bi], tot[vi], f16_us > 0 ? f16_us / tot[vi] : 0.0);
        }
    }
    printf("{\"checks_failed\":%d}\n", nfail);
    CK(cudaFree(pool)); CK(cudaFree(pool2)); CK(cudaFree(sink));
    return nfail ? 3 : 0;
}
#endif
