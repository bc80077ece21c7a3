#!/usr/bin/env bash
# The patched ggml on aarch64, under qemu: cross-build with Debian's aarch64-linux-gnu gcc, run
# our types' tests with qemu-aarch64 (qemu-user).
#
#   scripts/arm_qemu.sh build            build (cached) and print the build folder
#   scripts/arm_qemu.sh test             build, then for both CPU variants: test-quantize-fns -v and
#                                        test-backend-ops test -b CPU -p q3_g; logs in the build folder
#   scripts/arm_qemu.sh run V PROG ARGS  run bin/PROG of the build under qemu with variant V's ggml
#
# Two builds of ggml (only the `ggml` target: base, CPU backend, loader), one per NEON variant the
# patch selects at compile time: `neon` (-march=armv8-a: no __ARM_FEATURE_DOTPROD, smull/smlal dot
# products; run on an emulated Cortex-A57, which has no dotprod, so a stray sdot traps) and
# `dotprod` (-march=armv8.2-a+dotprod: sdot; emulated `max` CPU). test-quantize-fns,
# test-backend-ops and q3g-check (our to_float and vec_dot, file in / file out, for
# tests/test_ggml_arm.py) are compiled once against ggml's public headers and run on either
# variant's libraries (LD_LIBRARY_PATH). Cached like the x86 build: cache_dir("llama")/arm-<pin
# version>-<patch hash>/ (the source tree is quant2gguf.llama.source_dir(), the same key).
# Needs: aarch64-linux-gnu-gcc/g++ (apt: gcc-aarch64-linux-gnu g++-aarch64-linux-gnu), qemu-aarch64
# (apt: qemu-user), cmake, and the quant2gguf venv's python (PYTHON, default python).
set -euo pipefail

PYTHON=${PYTHON:-python}
CC=${ARM_CC:-aarch64-linux-gnu-gcc}
CXX=${ARM_CXX:-aarch64-linux-gnu-g++}
QEMU=${QEMU:-qemu-aarch64}
SYSROOT=${ARM_SYSROOT:-/usr/aarch64-linux-gnu}
VARIANTS="neon dotprod"

die() { echo "arm_qemu.sh: $*" >&2; exit 2; }
for t in "$CC" "$CXX" "$QEMU" cmake; do
    command -v "$t" >/dev/null || die "$t not found (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user cmake)"
done

march() { case "$1" in neon) echo armv8-a ;; dotprod) echo armv8.2-a+dotprod ;; *) die "unknown variant $1" ;; esac; }
qcpu()  { case "$1" in neon) echo cortex-a57 ;; dotprod) echo max ;; *) die "unknown variant $1" ;; esac; }

# source tree (pinned llama.cpp + our series) and cache folder, from the project's own build code
INFO_TXT=$("$PYTHON" -c '
import quant2gguf.llama as l
src = l.source_dir()
print(src); print(l.cache_dir("llama")); print(l.cache_key())' | tail -n 3) || die "$PYTHON cannot import quant2gguf (activate the venv or set PYTHON)"
mapfile -t INFO <<< "$INFO_TXT"
[ "${#INFO[@]}" -eq 3 ] || die "unexpected output from quant2gguf.llama: $INFO_TXT"
SRC=${INFO[0]}
ARM=${INFO[1]}/arm-${INFO[2]}
MARKER=$ARM/.quant2gguf-built

write_check_src() {
cat > "$1" <<'EOF'
// q3g-check: our types' to_float and vec_dot through ggml's public API, file in / file out
//   q3g-check to_float TYPE IN OUT       IN: packed blocks; OUT: float32 values
//   q3g-check vec_dot TYPE K W X OUT     W: rows of K weights (packed), X: K float32;
//                                        OUT: X as the vec_dot type (bytes), then one float32 per row
#include "ggml.h"
#include "ggml-cpu.h"
#include <stdio.h>
#include <stdlib.h>

static void * slurp(const char * path, size_t * n) {
    FILE * f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END); *n = (size_t) ftell(f); fseek(f, 0, SEEK_SET);
    void * p = malloc(*n ? *n : 1);
    if (fread(p, 1, *n, f) != *n) { perror(path); exit(2); }
    fclose(f);
    return p;
}

static void spit(const char * path, const void * p, size_t n, const char * mode) {
    FILE * f = fopen(path, mode);
    if (!f || fwrite(p, 1, n, f) != n) { perror(path); exit(2); }
    fclose(f);
}

int main(int argc, char ** argv) {
    if (argc < 5) { fprintf(stderr, "usage: q3g-check to_float TYPE IN OUT | vec_dot TYPE K W X OUT\n"); return 2; }
    ggml_cpu_init();
    const enum ggml_type t = (enum ggml_type) atoi(argv[2]);
    const struct ggml_type_traits * tr = ggml_get_type_traits(t);
    if (argv[1][0] == 't') {
        size_t n;
        void * in = slurp(argv[3], &n);
        const int64_t k = (int64_t) (n / tr->type_size) * tr->blck_size;
        float * out = malloc(k * sizeof(float) + 1);
        tr->to_float(in, out, k);
        spit(argv[4], out, k * sizeof(float), "wb");
        return 0;
    }
    if (argc < 7) { fprintf(stderr, "usage: q3g-check vec_dot TYPE K W X OUT\n"); return 2; }
    const struct ggml_type_traits_cpu * tc = ggml_get_type_traits_cpu(t);
    const int k = atoi(argv[3]);
    size_t nw, nx;
    char * w = slurp(argv[4], &nw);
    float * x = slurp(argv[5], &nx);
    const size_t rw = ggml_row_size(t, k), rx = ggml_row_size(tc->vec_dot_type, k);
    if (nx != k * sizeof(float) || nw % rw) { fprintf(stderr, "bad input sizes\n"); return 2; }
    void * xq = malloc(rx);
    ggml_get_type_traits_cpu(tc->vec_dot_type)->from_float(x, xq, k);
    const size_t nr = nw / rw;
    float * res = malloc(nr * sizeof(float) + 1);
    for (size_t r = 0; r < nr; ++r) {
        tc->vec_dot(k, &res[r], 0, w + r * rw, 0, xq, 0, 1);
    }
    spit(argv[6], xq, rx, "wb");
    spit(argv[6], res, nr * sizeof(float), "ab");
    return 0;
}
EOF
}

build() {
    [ -f "$MARKER" ] && return 0
    mkdir -p "$ARM"
    exec 9>"$ARM.lock"
    flock 9
    [ -f "$MARKER" ] && return 0
    local log=$ARM/build.log
    : > "$log"
    echo "arm_qemu.sh: cross-building ggml for aarch64 into $ARM (log: $log)" >&2
    for v in $VARIANTS; do
        # only ggml: llama, common and the tools are not needed to test the kernels
        cmake -S "$SRC" -B "$ARM/$v" -DCMAKE_BUILD_TYPE=Release \
            -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
            -DCMAKE_C_COMPILER="$CC" -DCMAKE_CXX_COMPILER="$CXX" \
            -DCMAKE_FIND_ROOT_PATH="$SYSROOT" -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER \
            -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY \
            -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$(march $v)" -DGGML_CCACHE=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_OPENSSL=OFF \
            $(command -v ninja >/dev/null && echo -G Ninja) >>"$log" 2>&1 \
            || die "cmake configure ($v) failed, see $log"
        cmake --build "$ARM/$v" -j "$(nproc)" --target ggml >>"$log" 2>&1 || die "build ($v) failed, see $log"
    done
    mkdir -p "$ARM/bin"
    write_check_src "$ARM/q3g-check.c"
    local inc="-I$SRC/ggml/include" lib="-L$ARM/dotprod/bin -lggml -lggml-base -lggml-cpu"
    # the test programs include only ggml headers; CMake would also build llama and common for them
    "$CC" -O2 $inc "$ARM/q3g-check.c" $lib -o "$ARM/bin/q3g-check" >>"$log" 2>&1 || die "q3g-check failed, see $log"
    "$CXX" -O2 -std=c++17 $inc "$SRC/tests/test-quantize-fns.cpp" $lib -o "$ARM/bin/test-quantize-fns" >>"$log" 2>&1 \
        || die "test-quantize-fns failed, see $log"
    "$CXX" -O1 -std=c++17 -pthread $inc "$SRC/tests/test-backend-ops.cpp" $lib -o "$ARM/bin/test-backend-ops" >>"$log" 2>&1 \
        || die "test-backend-ops failed, see $log"
    date -u +%FT%TZ > "$MARKER"
}

run() {  # run VARIANT PROG ARGS...
    local v=$1 prog=$2
    shift 2
    "$QEMU" -cpu "$(qcpu "$v")" -L "$SYSROOT" -E LD_LIBRARY_PATH="$ARM/$v/bin" "$ARM/bin/$prog" "$@"
}

run_tests() {
    local rc=0 pids=() v
    for v in $VARIANTS; do  # the variants in parallel: each run is one emulated thread, minutes
        (
            set +e
            run "$v" test-quantize-fns -v > "$ARM/test-quantize-fns-$v.log" 2>&1
            echo "rc=$?" >> "$ARM/test-quantize-fns-$v.log"
            run "$v" test-backend-ops test -b CPU -p q3_g > "$ARM/test-backend-ops-$v.log" 2>&1
            echo "rc=$?" >> "$ARM/test-backend-ops-$v.log"
        ) &
        pids+=($!)
    done
    wait "${pids[@]}"
    for v in $VARIANTS; do
        local q=$ARM/test-quantize-fns-$v.log b=$ARM/test-backend-ops-$v.log
        echo "== $v: test-quantize-fns ($q)"
        grep -E "^q3_g" "$q" || true
        tail -n 2 "$q"
        echo "== $v: test-backend-ops test -b CPU -p q3_g ($b)"
        grep -E "tests passed|backends passed" "$b" || true
        tail -n 1 "$b"
        grep -q '^rc=0$' "$q" && grep -q '^rc=0$' "$b" || rc=1
    done
    return $rc
}

case "${1:-test}" in
    build) build; echo "$ARM" ;;
    test)  build; run_tests ;;
    run)   [ $# -ge 3 ] || die "usage: arm_qemu.sh run neon|dotprod PROG ARGS..."; build; shift; run "$@" ;;
    dir)   echo "$ARM" ;;
    *)     die "usage: arm_qemu.sh [build|test|run VARIANT PROG ARGS...|dir]" ;;
esac
