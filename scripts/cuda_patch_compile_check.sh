#!/usr/bin/env bash
# Compile check (no GPU needed) of the CUDA files that ggml_patches/0005-ggml-cuda-q3g.patch touches, for sm_80 and
# sm_90, with the flags ggml's CMake uses for ggml-cuda (-use_fast_math -extended-lambda, GGML_CUDA_USE_GRAPHS,
# GGML_SCHED_MAX_COPIES=4, -O3). Also builds and runs the host check of q3g.cuh and a CPU emulation of the batch 1..8
# kernel (mul_mat_vec_q3g_wrow, with Q8_1 and with float activations) cut out of the patched mmvq.cu. SKIP_NVCC=1 runs only those two (seconds).
#   usage: scripts/cuda_patch_compile_check.sh PATCHED_LLAMA_SRC [FILES...]
#   (FILES default: the .cu files 0005 touches + one MMQ instance (includes q3g.cuh via vecdotq.cuh), relative to ggml/src/ggml-cuda)
# toolkit: $CUDA_HOME, else the PyPI toolkit in $CUDA_VENV (default /tmp/cudavenv3), else /usr/local/cuda; the PyPI one:
#   python3 -m venv /tmp/cudavenv3 && /tmp/cudavenv3/bin/pip install nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cublas
# (the cu12 wheels nvidia-cuda-nvcc-cu12 12.4/12.9 ship only ptxas, no nvcc driver; the CUDA 13 wheels have it).
set -euo pipefail
SRC=${1:?usage: $0 PATCHED_LLAMA_SRC [FILES...]}
shift || true
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(mmvq.cu convert.cu getrows.cu ggml-cuda.cu template-instances/mmq-instance-q4_0.cu)
CUDA_VENV=${CUDA_VENV:-/tmp/cudavenv3}
VENV_CU=$(ls -d "$CUDA_VENV"/lib/python3*/site-packages/nvidia/cu1[0-9] 2>/dev/null | tail -1 || true)
OUT=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$OUT"
G=$SRC/ggml
rc=0
if [ "${SKIP_NVCC:-0}" = 1 ]; then FILES=()  # the two host checks below need g++ alone
else
  if [ -n "${CUDA_HOME:-}" ]; then CUDA_ROOT=$CUDA_HOME
  elif [ -n "$VENV_CU" ] && [ -x "$VENV_CU/bin/nvcc" ]; then CUDA_ROOT=$VENV_CU
  elif [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_ROOT=/usr/local/cuda
  else echo "no nvcc: set CUDA_HOME or install the PyPI toolkit (see header)"; exit 2
  fi
  # ggml-cuda includes cublas_v2.h: a toolkit without it is not enough
  [ -f "$CUDA_ROOT/include/cublas_v2.h" ] || { echo "no cublas_v2.h under $CUDA_ROOT/include (pip install nvidia-cublas into the venv)"; exit 2; }
  NVCC=$CUDA_ROOT/bin/nvcc
  export PATH="$CUDA_ROOT/bin:$PATH"
  DEFS=(-DGGML_CUDA_USE_GRAPHS -DGGML_SCHED_MAX_COPIES=4 -DGGML_USE_CUDA -D_GNU_SOURCE -D_XOPEN_SOURCE=600 -DNDEBUG)
  INCS=(-I"$G/include" -I"$G/src" -I"$G/src/ggml-cuda" -I"$CUDA_ROOT/include")
  echo "nvcc: $NVCC ($("$NVCC" --version | tail -1))"
fi
for f in "${FILES[@]}"; do
    b=$(basename "${f%.cu}")
    for arch in 80 90; do
        cmd=("$NVCC" -std=c++17 -O3 -use_fast_math -extended-lambda --generate-code=arch=compute_$arch,code=[compute_$arch,sm_$arch]
             "${DEFS[@]}" "${INCS[@]}" -Xptxas -v,-warn-spills -c "$G/src/ggml-cuda/$f" -o "$OUT/$b.sm$arch.o")
        echo "+ ${cmd[*]}"
        if "${cmd[@]}" > "$OUT/$b.sm$arch.log" 2>&1; then echo "OK   $f sm_$arch"; else echo "FAIL $f sm_$arch"; rc=1; fi
        # everything but ptxas' per-kernel info lines (so: warnings, errors, spills)
        grep -v -e '^$' -e '^ptxas info' -e '^ *[0-9]* bytes stack frame, 0 bytes spill stores, 0 bytes spill loads$' \
            "$OUT/$b.sm$arch.log" | head -40 || true
        # per kernel of ours at batch 1..8 (mul_mat_vec_q3g_wrow<type, ncols_dst, R, F32Y, FZ, LPR>): registers and stack frame
        awk '/Compiling entry function/ { want = ($0 ~ /q3g_wrow/); if (want) { match($0, /ggml_type[0-9]+ELi[0-9]+ELi[0-9]+ELb[01]ELi[0-9]+ELi[0-9]+/); k = substr($0, RSTART, RLENGTH) } }
             want && /bytes stack frame/ { st = $1 }
             want && /Used [0-9]+ registers/ { match($0, /Used [0-9]+/); print k, "regs", substr($0, RSTART + 5, RLENGTH - 5), "stack", st }' \
            "$OUT/$b.sm$arch.log" > "$OUT/$b.sm$arch.q3g_wrow.txt"
        if [ -s "$OUT/$b.sm$arch.q3g_wrow.txt" ]; then
            echo "     q3g_wrow kernels: $(wc -l < "$OUT/$b.sm$arch.q3g_wrow.txt"), max regs $(awk '{print $3}' "$OUT/$b.sm$arch.q3g_wrow.txt" | sort -n | tail -1), max stack frame $(awk '{print $5}' "$OUT/$b.sm$arch.q3g_wrow.txt" | sort -n | tail -1) B (ggml_type96..99 = Q3_G128, G64, G128P, G64P; ELi<ncols_dst>ELi<R>ELb<F32Y>ELi<FZ>ELi<LPR>): $OUT/$b.sm$arch.q3g_wrow.txt"
        fi
    done
done
# host check of q3g.cuh (vec_dot and the wrow block dot against an fp64 reference)
if g++ -std=c++17 -O1 -Wno-unknown-pragmas "$G/src/ggml-cuda/q3g-host-check.cpp" -o "$OUT/q3g-host-check" && "$OUT/q3g-host-check"; then
    echo "OK   q3g-host-check"; else echo "FAIL q3g-host-check"; rc=1; fi
# CPU emulation of the batch 1..8 kernel itself (indexing, staging, strides, broadcast, row tails, P slots): the kernel
# text between "#define Q3G_WROW_NWARPS" and its launcher is cut out of mmvq.cu and run with std::thread per CUDA thread
awk '/^#define Q3G_WROW_NWARPS 8/{on=1} /^\/\/ Returns false \(nothing launched\)/{on=0} on' "$G/src/ggml-cuda/mmvq.cu" > "$OUT/kernel.inc"
cat > "$OUT/q3g-wrow-emu.cpp" <<'EMU_EOF'
// CPU emulation of the real mul_mat_vec_q3g_wrow kernel text (kernel.inc: extracted from the patched mmvq.cu),
// one std::thread per CUDA thread, std::barrier for __syncthreads and the warp reduction; checks every dst element
// (and that nothing else is written) against an fp64 dot, with padded strides, broadcast, row tails, used P slots.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>
#include <memory>
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __shared__
#define __launch_bounds__(x)
#define GGML_CUDA_RESTRICT
#define WARP_SIZE 32
struct half { uint16_t b; };
struct half2 { half x, y; };
struct float2 { float x, y; };
struct int4 { int x, y, z, w; };
struct float4 { float x, y, z, w; };
struct uint3 { unsigned x, y, z; };
static int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
static float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static float h2f(uint16_t h) {
    uint32_t s = (h >> 15) & 1, e = (h >> 10) & 31, f = h & 1023; float v;
    if (e == 0) v = std::ldexp((float) f, -24); else if (e == 31) v = f ? NAN : INFINITY; else v = std::ldexp((float)(f | 1024), (int) e - 25);
    return s ? -v : v;
}
static uint16_t f2h(float v) {
    uint16_t sign = std::signbit(v) ? 0x8000 : 0; double a = std::fabs((double) v);
    if (a < std::ldexp(1.0, -14)) return sign | (uint16_t) std::nearbyint(a * std::ldexp(1.0, 24));
    int e; double fr = std::frexp(a, &e); double mant = std::nearbyint(fr * 2048.0);
    if (mant == 2048.0) { mant = 1024.0; ++e; }
    return sign | (uint16_t) (((e + 14) << 10) | ((int) mant - 1024));
}
static float __half2float(half h) { return h2f(h.b); }
static half __float2half(float v) { return {f2h(v)}; }
static float2 __half22float2(half2 h) { return {h2f(h.x.b), h2f(h.y.b)}; }
static float __low2float(half2 h) { return h2f(h.x.b); }
static float __high2float(half2 h) { return h2f(h.y.b); }
static float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
typedef half ggml_half; typedef half2 ggml_half2;
static int get_int_b2(const void * x, const int & i) { uint16_t a, b; memcpy(&a, (const char*)x + 4*i, 2); memcpy(&b, (const char*)x + 4*i + 2, 2); return a | (b << 16); }
static int get_int_b4(const void * x, const int & i) { if (((uintptr_t) x) % 4) { fprintf(stderr, "misaligned b4\n"); std::abort(); } int v; memcpy(&v, (const char*)x + 4*i, 4); return v; }
static int __ldg(const int * p) { return *p; }
static half2 __ldg(const half2 * p) { return *p; }
static float4 __ldg(const float4 * p) { if (((uintptr_t) p) % 16) { fprintf(stderr, "misaligned float4\n"); std::abort(); } return *p; }
static int ggml_cuda_dp4a(int a, int b, int c) { for (int k = 0; k < 4; ++k) c += (int8_t)(a >> 8*k) * (int8_t)(b >> 8*k); return c; }
#define QK8_1 32
typedef struct { union { struct { ggml_half d; ggml_half s; }; ggml_half2 ds; }; int8_t qs[QK8_1]; } block_q8_1;
#define QK3_G128 128
#define QK3_G64 64
#define Q3G_SLOTS 2
typedef struct { ggml_half d, m; uint8_t qs[32]; uint8_t qh[16]; } block_q3_g128;
typedef struct { ggml_half d, m; uint8_t qs[16]; uint8_t qh[8]; } block_q3_g64;
typedef struct { ggml_half d, m; ggml_half pv[2]; uint8_t qs[32]; uint8_t qh[16]; uint8_t pi[2]; } block_q3_g128p;
typedef struct { ggml_half d, m; ggml_half pv[2]; uint8_t qs[16]; uint8_t qh[8]; uint8_t pi[2]; } block_q3_g64p;
#include "q3g.cuh"
enum ggml_type { GGML_TYPE_Q3_G128 = 96, GGML_TYPE_Q3_G64 = 97, GGML_TYPE_Q3_G128P = 98, GGML_TYPE_Q3_G64P = 99 };
template <ggml_type t> struct ggml_cuda_type_traits;
template <> struct ggml_cuda_type_traits<GGML_TYPE_Q3_G128>  { static constexpr int qk = 128; };
template <> struct ggml_cuda_type_traits<GGML_TYPE_Q3_G64>   { static constexpr int qk = 64; };
template <> struct ggml_cuda_type_traits<GGML_TYPE_Q3_G128P> { static constexpr int qk = 128; };
template <> struct ggml_cuda_type_traits<GGML_TYPE_Q3_G64P>  { static constexpr int qk = 64; };
// thread state
thread_local uint3 threadIdx, blockIdx;
uint3 gridDim;
static uint32_t fastdiv(uint32_t n, uint3 v) { return n / v.x; }
static void ggml_cuda_pdl_sync() {}
static void ggml_cuda_pdl_lc() {}
std::unique_ptr<std::barrier<>> cta_bar;
std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
float warp_slots[8][32];
static void __syncthreads() { cta_bar->arrive_and_wait(); }
// width-W groups of lanes (W = 32: the whole warp), summed in lane order (q8_ref below mirrors it for W = 8)
template <int W> static float warp_reduce_sum(float v) {
    const int w = threadIdx.y, l = threadIdx.x;
    warp_slots[w][l] = v;
    warp_bar[w]->arrive_and_wait();
    float s = 0; for (int i = l/W*W; i < l/W*W + W; ++i) s += warp_slots[w][i];
    warp_bar[w]->arrive_and_wait();
    return s;
}
template <int W> static float warp_reduce_max(float v) {
    const int w = threadIdx.y, l = threadIdx.x;
    warp_slots[w][l] = v;
    warp_bar[w]->arrive_and_wait();
    float m = warp_slots[w][l/W*W]; for (int i = l/W*W; i < l/W*W + W; ++i) m = std::fmax(m, warp_slots[w][i]);
    warp_bar[w]->arrive_and_wait();
    return m;
}
// fabsf, fmaxf, roundf: the C library's (<cmath>), which round and compare as CUDA's do; rsqrtf exact (CUDA's: 2 ulp)
static float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
alignas(16) int4 q3g_wrow_act[1 << 16];
// the fusion epilogue's GLU ops (ggml.h's names; unary.cuh's formulas)
enum ggml_glu_op { GGML_GLU_OP_REGLU, GGML_GLU_OP_GEGLU, GGML_GLU_OP_SWIGLU, GGML_GLU_OP_SWIGLU_OAI, GGML_GLU_OP_GEGLU_ERF,
                   GGML_GLU_OP_GEGLU_QUICK, GGML_GLU_OP_SWIGLU_CLAMP };
static float ggml_cuda_op_silu_single(float x) { return x / (1.0f + expf(-x)); }
static float ggml_cuda_op_gelu_single(float x) { return 0.5f * x * (1.0f + tanhf(0.79788456080286535587989211986876f * x * (1.0f + 0.044715f * x * x))); }
static float ggml_cuda_op_swiglu_oai_single(float x, float g, float alpha = 1.702f, float limit = 7.0f) {
    x = fminf(x, limit); g = fmaxf(fminf(g, limit), -limit); return x / (1.0f + expf(-x * alpha)) * (1.0f + g); }
static float ggml_cuda_op_swiglu_clamp_single(float gate, float up, float limit) {
    gate = fminf(gate, limit); up = fmaxf(fminf(up, limit), -limit); return ggml_cuda_op_silu_single(gate) * up; }
using std::min;
#include "kernel.inc"

// runs f() as every thread of a gx x gy x gz grid of 8-warp CTAs, one CTA after another (shared memory refilled first)
template <typename F> static void emulate(int gx, int gy, int gz, int nbytes, int fill, F f) {
    gridDim = {(unsigned) gx, (unsigned) gy, (unsigned) gz};
    for (int bz = 0; bz < gz; ++bz) for (int by = 0; by < gy; ++by) for (int bx = 0; bx < gx; ++bx) {
        memset(q3g_wrow_act, fill, nbytes);
        cta_bar = std::make_unique<std::barrier<>>(256);
        warp_bar.clear(); for (int i = 0; i < 8; ++i) warp_bar.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> th;
        for (int ty = 0; ty < 8; ++ty) for (int tx = 0; tx < 32; ++tx)
            th.emplace_back([&, tx, ty, bx, by, bz] {
                threadIdx = {(unsigned) tx, (unsigned) ty, 0}; blockIdx = {(unsigned) bx, (unsigned) by, (unsigned) bz};
                f();
            });
        for (auto & t : th) t.join();
    }
}
// quantize_q8_1's formula with the F32Y staging's sum order (per lane (x0+x1)+(x2+x3), lanes 0..7 in order)
static void q8_ref(const float * x, block_q8_1 & b) {
    float amax = 0, sum = 0;
    for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    for (int t = 0; t < 8; ++t) sum += (x[4*t] + x[4*t + 1]) + (x[4*t + 2] + x[4*t + 3]);
    const float d = amax / 127.0f;
    for (int j = 0; j < 32; ++j) b.qs[j] = amax == 0.0f ? 0 : (int8_t) std::round(x[j] / d);
    b.ds.x.b = f2h(d); b.ds.y.b = f2h(sum);
}
template <ggml_type type, typename block_t, int NC, int R, bool F32Y = false, int L = 32>
static double run(std::mt19937 & rng, int K, int nrows, int gridx, int nch_x, int nch_dst, int ns_x, int ns_dst, bool slots) {
    constexpr int G = ggml_cuda_type_traits<type>::qk, NQ = G/32;
    constexpr bool P = q3g_wrow_type<type>::P;
    const int nkb = K/G;
    const int stride_row_x = nkb + 1, stride_channel_x = stride_row_x*nrows + 2, stride_sample_x = stride_channel_x*nch_x + 3;
    const int stride_col_y = nkb*NQ + 3, stride_channel_y = stride_col_y*NC + 1, stride_sample_y = stride_channel_y*nch_dst + 2;
    const int stride_col_dst = nrows + 5, stride_channel_dst = stride_col_dst*NC + 7, stride_sample_dst = stride_channel_dst*nch_dst + 1;
    std::uniform_int_distribution<int> code(0, 7), q8(-127, 127), idx(0, G-1), coin(0, 2);
    std::uniform_real_distribution<float> u(-1, 1);
    std::vector<block_t> x((size_t) stride_sample_x*ns_x + 4);
    std::vector<float> w(x.size()*G, NAN);
    for (size_t b = 0; b < x.size(); ++b) {
        block_t & bl = x[b];
        bl.d.b = f2h(0.01f + 0.05f*std::fabs(u(rng))); bl.m.b = f2h(0.2f*u(rng));
        memset(bl.qs, 0, sizeof bl.qs); memset(bl.qh, 0, sizeof bl.qh);
        for (int i = 0; i < G; ++i) {
            int q = code(rng);
            bl.qs[i % (G/4)] |= (q & 3) << (2*(i / (G/4)));
            bl.qh[i % (G/8)] |= ((q >> 2) & 1) << (i / (G/8));
            w[b*G + i] = h2f(bl.d.b)*q + h2f(bl.m.b);
        }
        if constexpr (P) {
            int i0 = idx(rng), i1; do { i1 = idx(rng); } while (i1 == i0);
            int pis[2] = {i0, i1};
            for (int s = 0; s < 2; ++s) {
                if (!slots || coin(rng) == 0) pis[s] = 255;
                bl.pi[s] = (uint8_t) pis[s]; bl.pv[s].b = f2h(2.0f*u(rng));
                if (pis[s] < G) w[b*G + pis[s]] = h2f(bl.pv[s].b);
            }
        }
    }
    std::vector<block_q8_1> y((size_t) stride_sample_y*ns_dst + 4);
    for (auto & yb : y) {
        yb.ds.x.b = f2h(0.001f + 0.02f*std::fabs(u(rng)));
        int sq = 0; for (int j = 0; j < 32; ++j) { yb.qs[j] = (int8_t) q8(rng); sq += yb.qs[j]; }
        yb.ds.y.b = f2h(h2f(yb.ds.x.b)*sq*(1.0f + 0.001f*u(rng)));
    }
    // F32Y: float columns (strides in floats, multiples of 4, one all-zero block a column); y becomes their Q8_1
    // reference, so the Q8_1 kernel's dst is what the F32Y kernel must reproduce bit for bit
    const int fstride_col = K + 4, fstride_channel = fstride_col*NC + 8, fstride_sample = fstride_channel*nch_dst + 4;
    std::vector<float4> yf4(F32Y ? ((size_t) fstride_sample*ns_dst + 8)/4 : 0);
    float * yf = (float *) yf4.data();
    if constexpr (F32Y) {
        std::normal_distribution<float> nd(0.0f, 1.0f);
        for (size_t i = 0; i < yf4.size()*4; ++i) yf[i] = NAN;
        for (int sd = 0; sd < ns_dst; ++sd) for (int cd = 0; cd < nch_dst; ++cd) for (int c = 0; c < NC; ++c) {
            float * col = yf + (size_t) sd*fstride_sample + (size_t) cd*fstride_channel + (size_t) c*fstride_col;
            const int zero_block = (sd + cd + c) % (K/32);
            for (int k = 0; k < K; ++k) col[k] = k/32 == zero_block ? 0.0f : nd(rng)*(k % 7 == 0 ? 8.0f : 1.0f);
            for (int qb = 0; qb < K/32; ++qb)
                q8_ref(col + 32*qb, y[(size_t) sd*stride_sample_y + (size_t) cd*stride_channel_y + (size_t) c*stride_col_y + qb]);
        }
    }
    std::vector<float> dst((size_t) stride_sample_dst*ns_dst + 8, -12345.0f);
    const int nbytes = NC*q3g_wrow_col_bytes<G>(nkb);
    if (nbytes > (int) sizeof q3g_wrow_act) { fprintf(stderr, "smem too small\n"); std::abort(); }
    const uint3 cr = {(unsigned) (nch_dst/nch_x), 0, 0}, sr = {(unsigned) (ns_dst/ns_x), 0, 0};
    emulate(gridx, nch_dst, ns_dst, nbytes, 0xAB, [&] {
        mul_mat_vec_q3g_wrow<type, NC, R, false, 0, L>(x.data(), y.data(), dst.data(), K, nrows, stride_row_x, stride_col_y, stride_col_dst,
            cr, stride_channel_x, stride_channel_y, stride_channel_dst, sr, stride_sample_x, stride_sample_y, stride_sample_dst, {});
    });
    if constexpr (F32Y) {
        std::vector<float> dst2(dst.size(), -12345.0f);
        emulate(gridx, nch_dst, ns_dst, nbytes, 0xCD, [&] {
            mul_mat_vec_q3g_wrow<type, NC, R, true>(x.data(), yf, dst2.data(), K, nrows, stride_row_x, fstride_col, stride_col_dst,
                cr, stride_channel_x, fstride_channel, stride_channel_dst, sr, stride_sample_x, fstride_sample, stride_sample_dst, {});
        });
        if (memcmp(dst.data(), dst2.data(), dst.size()*sizeof(float)) != 0) {
            for (size_t i = 0; i < dst.size(); ++i) if (dst[i] != dst2[i]) { fprintf(stderr, "F32Y differs from the Q8_1 path at %zu: %.9g vs %.9g\n", i, dst2[i], dst[i]); break; }
            return 1.0;
        }
    }
    double worst = 0; size_t nwritten = 0, expected = 0;
    std::vector<char> touched(dst.size(), 0);
    for (int sd = 0; sd < ns_dst; ++sd) for (int cd = 0; cd < nch_dst; ++cd) for (int c = 0; c < NC; ++c) for (int row = 0; row < nrows; ++row) {
        const int sx = sd / (ns_dst/ns_x), cx = cd / (nch_dst/nch_x);
        const size_t xo = (size_t) sx*stride_sample_x + (size_t) cx*stride_channel_x + (size_t) row*stride_row_x;
        const size_t yo = (size_t) sd*stride_sample_y + (size_t) cd*stride_channel_y + (size_t) c*stride_col_y;
        double want = 0, wabs = 0;
        for (int kb = 0; kb < nkb; ++kb) for (int k = 0; k < NQ; ++k) {
            const block_q8_1 & yb = y[yo + kb*NQ + k];
            const double dy = h2f(yb.ds.x.b); int sq = 0;
            for (int j = 0; j < 32; ++j) { const double t = (double) w[(xo + kb)*G + 32*k + j]*dy*yb.qs[j]; want += t; wabs += std::fabs(t); sq += yb.qs[j]; }
            want += (double) h2f(x[xo + kb].m.b) * ((double) h2f(yb.ds.y.b) - dy*sq);
        }
        const size_t di = (size_t) sd*stride_sample_dst + (size_t) cd*stride_channel_dst + (size_t) c*stride_col_dst + row;
        touched[di] = 1; ++expected;
        worst = std::max(worst, std::fabs(dst[di] - want)/wabs);
    }
    for (size_t i = 0; i < dst.size(); ++i) { if (!touched[i] && dst[i] != -12345.0f) { fprintf(stderr, "stray write at %zu\n", i); return 1.0; } }
    (void) nwritten;
    return worst;
}
// one launch of the kernel over a grid (batch 1, one channel and sample), the emulation's way
template <ggml_type type, int R, bool F32Y, int FZ, int L = 32>
static void launch1(const void * x, const float * yf, float * dst, int K, int nrows, int stride_row_x, int gridx,
                    const q3g_fusion_args & fz) {
    constexpr int G = ggml_cuda_type_traits<type>::qk;
    emulate(gridx, 1, 1, q3g_wrow_smem_bytes<G, F32Y>(1, K/G), 0xEF, [&] {
        mul_mat_vec_q3g_wrow<type, 1, R, F32Y, FZ, L>(x, yf, dst, K, nrows, stride_row_x, 0, 0, {1, 0, 0}, 0, 0, 0, {1, 0, 0}, 0, 0, 0, fz);
    });
}
// n weight blocks of random bytes with sane d and m; P types get two distinct slots (or 255: unused)
template <ggml_type type, typename block_t>
static std::vector<block_t> random_blocks(std::mt19937 & rng, size_t n) {
    constexpr int G = ggml_cuda_type_traits<type>::qk;
    std::uniform_int_distribution<int> byte(0, 255), slot(0, 300);
    std::uniform_real_distribution<float> u(-1, 1);
    std::vector<block_t> v(n);
    for (auto & b : v) {
        uint8_t * p = (uint8_t *) &b; for (size_t i = 0; i < sizeof b; ++i) p[i] = (uint8_t) byte(rng);
        b.d.b = f2h(0.01f + 0.05f*std::fabs(u(rng))); b.m.b = f2h(0.2f*u(rng));
        if constexpr (q3g_wrow_type<type>::P) {
            for (int s = 0; s < 2; ++s) { const int i = slot(rng); b.pi[s] = (uint8_t) (i < G ? i : 255); b.pv[s].b = f2h(2.0f*u(rng)); }
            if (b.pi[0] == b.pi[1]) b.pi[1] = 255;
        }
    }
    return v;
}
// the fused batch-1 calls (FZ 1: + x_bias; FZ 2: gate matrix, gate bias, GLU) against the epilogue applied to two
// plain F32Y mat-vecs (up rows, gate rows) of the same kernel: bit for bit
// norm: src1 is a deferred rms_norm(x)*w (every launch stages it from x)
template <ggml_type type, typename block_t>
static double run_fused(std::mt19937 & rng, int K, int nrows, int gridx, int fz_kind, ggml_glu_op op, bool norm = false) {
    constexpr int G = ggml_cuda_type_traits<type>::qk;
    const int nkb = K/G, stride_row_x = nkb + 2;
    std::uniform_real_distribution<float> u(-1, 1);
    std::vector<block_t> xu = random_blocks<type, block_t>(rng, (size_t) stride_row_x*nrows);
    std::vector<block_t> xg = random_blocks<type, block_t>(rng, (size_t) stride_row_x*nrows);
    std::vector<float4> y4(K/4 + 1);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (int k = 0; k < K; ++k) ((float *) y4.data())[k] = nd(rng);
    std::vector<float> xb(nrows), gb(nrows);
    for (int i = 0; i < nrows; ++i) { xb[i] = u(rng); gb[i] = u(rng); }
    std::vector<float4> nw4(K/4 + 1);
    for (int k = 0; k < K; ++k) ((float *) nw4.data())[k] = 0.5f + std::fabs(u(rng));
    q3g_fusion_args plain;
    if (norm) { plain.norm_w = (const float *) nw4.data(); plain.norm_eps = 0.25f; }
    std::vector<float> up(nrows + 4, -1.0f), gate(nrows + 4, -1.0f), fused(nrows + 4, -12345.0f);
    launch1<type, 1, true, 0>(xu.data(), (const float *) y4.data(), up.data(), K, nrows, stride_row_x, gridx, plain);
    launch1<type, 1, true, 0>(xg.data(), (const float *) y4.data(), gate.data(), K, nrows, stride_row_x, gridx, plain);
    q3g_fusion_args fz = plain; fz.x_bias = xb.data(); fz.glu_op = op; fz.glu_limit = 0.5f;
    if (fz_kind == 2) { fz.gate = xg.data(); fz.gate_bias = gb.data(); }
    if (fz_kind == 2) launch1<type, 2, true, 2>(xu.data(), (const float *) y4.data(), fused.data(), K, nrows, stride_row_x, gridx, fz);
    else              launch1<type, 1, true, 1>(xu.data(), (const float *) y4.data(), fused.data(), K, nrows, stride_row_x, gridx, fz);
    for (int i = 0; i < nrows; ++i) {
        float want = up[i] + xb[i];
        if (fz_kind == 2) {
            const float g = gate[i] + gb[i];
            switch (op) {
                case GGML_GLU_OP_SWIGLU:       want *= ggml_cuda_op_silu_single(g); break;
                case GGML_GLU_OP_GEGLU:        want *= ggml_cuda_op_gelu_single(g); break;
                case GGML_GLU_OP_SWIGLU_CLAMP: want = ggml_cuda_op_swiglu_clamp_single(g, want, 0.5f); break;
                default:                       want = ggml_cuda_op_swiglu_oai_single(g, want); break;
            }
        }
        if (fused[i] != want) { fprintf(stderr, "fused row %d: %.9g vs %.9g\n", i, fused[i], want); return 1.0; }
    }
    for (int i = nrows; i < nrows + 4; ++i) if (fused[i] != -12345.0f) { fprintf(stderr, "stray fused write\n"); return 1.0; }
    return 0.0;
}
// the deferred RMS norm (norm_w): the kernel on x against the plain F32Y kernel on y = rms_norm(x)*w computed as
// rms_norm_f32 does; they differ only by the plain path's fp16 Q8_1 scales and sums (2^-11 relative a block) and rare
// q rounding ties, so |diff| / sum_j max|w_i.| |y_j| (max over the weight block) must stay under 1e-3. eps = 2
// against mean(x^2) ~ 5 (x1) .. 130 (x5): a dropped eps or scale, or an unscaled sum, is far outside it. Returns 0
// (pass) or 1.
template <ggml_type type, typename block_t>
static double run_norm(std::mt19937 & rng, int K, int nrows, int gridx, float xscale) {
    constexpr int G = ggml_cuda_type_traits<type>::qk;
    const int nkb = K/G, stride_row_x = nkb + 1;
    std::uniform_real_distribution<float> u(-1, 1);
    std::vector<block_t> xw = random_blocks<type, block_t>(rng, (size_t) stride_row_x*nrows);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float4> x4(K/4 + 1), w4(K/4 + 1), y4(K/4 + 1);
    float * x = (float *) x4.data(), * w = (float *) w4.data(), * y = (float *) y4.data();
    for (int k = 0; k < K; ++k) { x[k] = xscale*nd(rng)*(k % 97 == 0 ? 20.0f : 1.0f); w[k] = 0.2f + 2.0f*std::fabs(u(rng)); }
    for (int k = 0; k < 32; ++k) x[64 + k] = 0.0f;  // an all-zero block
    const float eps = 2.0f;
    float ss = 0.0f; for (int k = 0; k < K; ++k) ss += x[k]*x[k];
    const float scale = 1.0f/std::sqrt(ss/K + eps);
    for (int k = 0; k < K; ++k) y[k] = scale*x[k]*w[k];
    std::vector<float> ref(nrows + 4, -12345.0f), got(nrows + 4, -12345.0f);
    launch1<type, 1, true, 0>(xw.data(), y, ref.data(), K, nrows, stride_row_x, gridx, {});
    q3g_fusion_args fz; fz.norm_w = w; fz.norm_eps = eps;
    launch1<type, 1, true, 0>(xw.data(), x, got.data(), K, nrows, stride_row_x, gridx, fz);
    // per row: |y| against a bound on the weight block's |w_ij| (7d + |m|, or a slot's |pv|)
    double worst = 0;
    for (int r = 0; r < nrows; ++r) {
        double bound = 0;
        for (int kb = 0; kb < nkb; ++kb) {
            const block_t & b = xw[(size_t) r*stride_row_x + kb];
            double wmax = 7.0*std::fabs(h2f(b.d.b)) + std::fabs(h2f(b.m.b));
            if constexpr (q3g_wrow_type<type>::P) for (int s = 0; s < 2; ++s) wmax = std::max(wmax, (double) std::fabs(h2f(b.pv[s].b)));
            for (int j = 0; j < G; ++j) bound += wmax*std::fabs(y[kb*G + j]);
        }
        worst = std::max(worst, std::fabs((double) got[r] - ref[r])/bound);
    }
    for (int i = nrows; i < nrows + 4; ++i) if (got[i] != -12345.0f) { fprintf(stderr, "stray norm write\n"); return 1.0; }
    printf("  norm K=%d: max |diff| / sum|w y| = %.2e (bound 1e-3)\n", K, worst);
    return worst < 1e-3 ? 0.0 : 1.0;
}
// 16 lanes a row (two rows a warp, rows of < 16 weight blocks) against 32: the same sums in the same lane order, so
// bit for bit, plain, + bias, gate + GLU and with the deferred norm; odd row counts (a lane group past the last
// row) and grids smaller than the row groups. Returns 0 (pass) or 1.
template <ggml_type type, typename block_t>
static double run_lpr(std::mt19937 & rng, int K, int nrows, int gridx, bool norm) {
    constexpr int G = ggml_cuda_type_traits<type>::qk;
    const int nkb = K/G, stride_row_x = nkb + 3;
    std::uniform_real_distribution<float> u(-1, 1);
    std::vector<block_t> xu = random_blocks<type, block_t>(rng, (size_t) stride_row_x*nrows);
    std::vector<block_t> xg = random_blocks<type, block_t>(rng, (size_t) stride_row_x*nrows);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float4> y4(K/4 + 1), w4(K/4 + 1);
    for (int k = 0; k < K; ++k) { ((float *) y4.data())[k] = 3.0f*nd(rng); ((float *) w4.data())[k] = 0.5f + std::fabs(u(rng)); }
    std::vector<float> xb(nrows), gb(nrows);
    for (int i = 0; i < nrows; ++i) { xb[i] = u(rng); gb[i] = u(rng); }
    const float * y = (const float *) y4.data();
    for (int fz_kind = 0; fz_kind < 3; ++fz_kind) {
        q3g_fusion_args fz;
        if (norm) { fz.norm_w = (const float *) w4.data(); fz.norm_eps = 1e-5f; }
        if (fz_kind >= 1) { fz.x_bias = xb.data(); }
        if (fz_kind == 2) { fz.gate = xg.data(); fz.gate_bias = gb.data(); fz.glu_op = GGML_GLU_OP_SWIGLU; }
        std::vector<float> a(nrows + 4, -12345.0f), b(nrows + 4, -12345.0f);
        if (fz_kind == 0) { launch1<type, 1, true, 0>(xu.data(), y, a.data(), K, nrows, stride_row_x, gridx, fz);
                            launch1<type, 1, true, 0, 16>(xu.data(), y, b.data(), K, nrows, stride_row_x, gridx, fz); }
        if (fz_kind == 1) { launch1<type, 1, true, 1>(xu.data(), y, a.data(), K, nrows, stride_row_x, gridx, fz);
                            launch1<type, 1, true, 1, 16>(xu.data(), y, b.data(), K, nrows, stride_row_x, gridx, fz); }
        if (fz_kind == 2) { launch1<type, 2, true, 2>(xu.data(), y, a.data(), K, nrows, stride_row_x, gridx, fz);
                            launch1<type, 2, true, 2, 16>(xu.data(), y, b.data(), K, nrows, stride_row_x, gridx, fz); }
        for (int i = 0; i < nrows; ++i) if (a[i] == -12345.0f) { fprintf(stderr, "lpr32 row %d unwritten\n", i); return 1.0; }
        if (memcmp(a.data(), b.data(), a.size()*sizeof(float)) != 0) {
            for (int i = 0; i < nrows + 4; ++i) if (a[i] != b[i]) { fprintf(stderr, "16 lanes a row, fz %d, row %d: %.9g vs %.9g\n", fz_kind, i, b[i], a[i]); break; }
            return 1.0;
        }
    }
    return 0.0;
}
int main() {
    std::mt19937 rng(5);
    double worst = 0;
    auto rep = [&](const char * name, double e) { printf("%-44s rel err %.2e\n", name, e); worst = std::max(worst, e); };
    // K with nkb > 32 (the lane loop wraps) and < 32; odd row counts (tail); grid.x smaller than the row groups (persistent loop);
    // channel and sample broadcast; padded strides everywhere
    rep("G128  nc2 R1 K=5120 rows 37 grid 1 bc",  run<GGML_TYPE_Q3_G128,  block_q3_g128,  2, 1>(rng, 5120, 37, 1, 2, 4, 1, 2, false));
    rep("G128  nc3 R2 K=4352 rows 37 grid 2 bc",  run<GGML_TYPE_Q3_G128,  block_q3_g128,  3, 2>(rng, 4352, 37, 2, 2, 4, 1, 2, false));
    rep("G128  nc8 R2 K=256  rows 16 grid 1",     run<GGML_TYPE_Q3_G128,  block_q3_g128,  8, 2>(rng, 256, 16, 1, 1, 1, 1, 1, false));
    rep("G64   nc2 R1 K=2112 rows 33 grid 1 bc",  run<GGML_TYPE_Q3_G64,   block_q3_g64,   2, 1>(rng, 2112, 33, 1, 1, 3, 2, 2, false));
    rep("G64   nc7 R2 K=4160 rows 19 grid 1",     run<GGML_TYPE_Q3_G64,   block_q3_g64,   7, 2>(rng, 4160, 19, 1, 1, 1, 1, 1, false));
    rep("G128P nc5 R2 K=4224 rows 21 grid 1 slots", run<GGML_TYPE_Q3_G128P, block_q3_g128p, 5, 2>(rng, 4224, 21, 1, 2, 2, 1, 1, true));
    rep("G128P nc2 R1 K=384  rows 9 grid 1 slots",  run<GGML_TYPE_Q3_G128P, block_q3_g128p, 2, 1>(rng, 384, 9, 1, 1, 1, 1, 1, true));
    rep("G64P  nc4 R2 K=2176 rows 17 grid 2 slots bc", run<GGML_TYPE_Q3_G64P, block_q3_g64p, 4, 2>(rng, 2176, 17, 2, 1, 2, 1, 3, true));
    rep("G64P  nc8 R2 K=64   rows 3 grid 1 slots",  run<GGML_TYPE_Q3_G64P,  block_q3_g64p,  8, 2>(rng, 64, 3, 1, 1, 1, 1, 1, true));
    // 16 lanes a row at batch 2..8 (rows of < 16 weight blocks; GGML_Q3G_WROW_LPR16=0 turns it off): odd rows (a lane group past the
    // last row), grid smaller than the row groups, broadcast, slots
    rep("LPR16 G128  nc2 R1 K=1536 rows 37 grid 1 bc", run<GGML_TYPE_Q3_G128,  block_q3_g128,  2, 1, false, 16>(rng, 1536, 37, 1, 2, 4, 1, 2, false));
    rep("LPR16 G128  nc8 R1 K=1536 rows 21 grid 2",    run<GGML_TYPE_Q3_G128,  block_q3_g128,  8, 1, false, 16>(rng, 1536, 21, 2, 1, 1, 1, 1, false));
    rep("LPR16 G64   nc5 R1 K=896  rows 19 grid 1",    run<GGML_TYPE_Q3_G64,   block_q3_g64,   5, 1, false, 16>(rng, 896, 19, 1, 1, 1, 1, 1, false));
    rep("LPR16 G128P nc3 R1 K=1024 rows 9 grid 1 slots", run<GGML_TYPE_Q3_G128P, block_q3_g128p, 3, 1, false, 16>(rng, 1024, 9, 1, 2, 2, 1, 1, true));
    rep("LPR16 G64P  nc4 R1 K=640  rows 17 grid 3 slots bc", run<GGML_TYPE_Q3_G64P, block_q3_g64p, 4, 1, false, 16>(rng, 640, 17, 3, 1, 2, 1, 3, true));
    // F32Y (float src1 quantized in the kernel): bit-identical to the Q8_1 path on q8_ref's blocks, batch 1 and more
    rep("F32Y G128  nc1 R1 K=5120 rows 37 grid 1 bc",  run<GGML_TYPE_Q3_G128,  block_q3_g128,  1, 1, true>(rng, 5120, 37, 1, 2, 4, 1, 2, false));
    rep("F32Y G128  nc1 R1 K=256  rows 11 grid 2",     run<GGML_TYPE_Q3_G128,  block_q3_g128,  1, 1, true>(rng, 256, 11, 2, 1, 1, 1, 1, false));
    rep("F32Y G128  nc3 R2 K=4352 rows 37 grid 2 bc",  run<GGML_TYPE_Q3_G128,  block_q3_g128,  3, 2, true>(rng, 4352, 37, 2, 2, 4, 1, 2, false));
    rep("F32Y G64   nc1 R1 K=2112 rows 33 grid 1 bc",  run<GGML_TYPE_Q3_G64,   block_q3_g64,   1, 1, true>(rng, 2112, 33, 1, 1, 3, 2, 2, false));
    rep("F32Y G128P nc1 R1 K=4224 rows 21 grid 1 slots", run<GGML_TYPE_Q3_G128P, block_q3_g128p, 1, 1, true>(rng, 4224, 21, 1, 2, 2, 1, 1, true));
    rep("F32Y G64P  nc8 R2 K=2176 rows 17 grid 2 slots bc", run<GGML_TYPE_Q3_G64P, block_q3_g64p, 8, 2, true>(rng, 2176, 17, 2, 1, 2, 1, 3, true));
    // the fused batch-1 calls through F32Y: + bias (q/k/v of qwen2), gate + GLU (ffn gate/up), bit for bit
    rep("F32Y fused bias   G128  K=2560 rows 37 grid 2",  run_fused<GGML_TYPE_Q3_G128,  block_q3_g128>(rng, 2560, 37, 2, 1, GGML_GLU_OP_SWIGLU));
    rep("F32Y fused swiglu G128  K=2560 rows 37 grid 2",  run_fused<GGML_TYPE_Q3_G128,  block_q3_g128>(rng, 2560, 37, 2, 2, GGML_GLU_OP_SWIGLU));
    rep("F32Y fused geglu  G64   K=1152 rows 19 grid 1",  run_fused<GGML_TYPE_Q3_G64,   block_q3_g64>(rng, 1152, 19, 1, 2, GGML_GLU_OP_GEGLU));
    rep("F32Y fused clamp  G128P K=1024 rows 9 grid 3",   run_fused<GGML_TYPE_Q3_G128P, block_q3_g128p>(rng, 1024, 9, 3, 2, GGML_GLU_OP_SWIGLU_CLAMP));
    rep("F32Y fused oai    G64P  K=640  rows 5 grid 1",   run_fused<GGML_TYPE_Q3_G64P,  block_q3_g64p>(rng, 640, 5, 1, 2, GGML_GLU_OP_SWIGLU_OAI));
    // the deferred RMS norm: staged from x (0 = pass, 1 = fail), and the fused calls with it, bit for bit
    rep("F32Y norm  G128  K=5120 rows 37 grid 2",   run_norm<GGML_TYPE_Q3_G128,  block_q3_g128>(rng, 5120, 37, 2, 1.0f));
    rep("F32Y norm  G64   K=2112 rows 19 grid 1 x5", run_norm<GGML_TYPE_Q3_G64,   block_q3_g64>(rng, 2112, 19, 1, 5.0f));
    rep("F32Y norm  G128P K=2560 rows 9 grid 3",    run_norm<GGML_TYPE_Q3_G128P, block_q3_g128p>(rng, 2560, 9, 3, 1.0f));
    rep("F32Y norm fused swiglu G128 K=2560 rows 37", run_fused<GGML_TYPE_Q3_G128, block_q3_g128>(rng, 2560, 37, 2, 2, GGML_GLU_OP_SWIGLU, true));
    rep("F32Y norm fused bias   G64P K=1152 rows 19", run_fused<GGML_TYPE_Q3_G64P, block_q3_g64p>(rng, 1152, 19, 1, 1, GGML_GLU_OP_SWIGLU, true));
    // 16 lanes a row (< 16 weight blocks: qwen2.5-1.5B's K = 1536) against 32, bit for bit (0 = pass, 1 = fail)
    rep("F32Y 16 lanes/row G128  K=1536 rows 37 grid 1", run_lpr<GGML_TYPE_Q3_G128,  block_q3_g128>(rng, 1536, 37, 1, false));
    rep("F32Y 16 lanes/row G128  K=1536 rows 21 grid 2 norm", run_lpr<GGML_TYPE_Q3_G128, block_q3_g128>(rng, 1536, 21, 2, true));
    rep("F32Y 16 lanes/row G64   K=640  rows 17 grid 3", run_lpr<GGML_TYPE_Q3_G64,   block_q3_g64>(rng, 640, 17, 3, false));
    rep("F32Y 16 lanes/row G128P K=1024 rows 9 grid 1",  run_lpr<GGML_TYPE_Q3_G128P, block_q3_g128p>(rng, 1024, 9, 1, false));
    rep("F32Y 16 lanes/row G64P  K=896  rows 33 grid 2 norm", run_lpr<GGML_TYPE_Q3_G64P, block_q3_g64p>(rng, 896, 33, 2, true));
    printf("worst %.3e -> %s\n", worst, worst < 1e-5 ? "PASS" : "FAIL");
    return worst < 1e-5 ? 0 : 1;
}
EMU_EOF
if [ -s "$OUT/kernel.inc" ] && g++ -std=c++20 -O1 -pthread -Wno-unknown-pragmas -I"$G/src/ggml-cuda" "$OUT/q3g-wrow-emu.cpp" -o "$OUT/q3g-wrow-emu" \
        && "$OUT/q3g-wrow-emu"; then
    echo "OK   q3g-wrow-emu"; else echo "FAIL q3g-wrow-emu"; rc=1; fi
echo "objects and logs in $OUT"
exit $rc
