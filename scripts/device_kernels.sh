#!/usr/bin/env bash
# Kernel check + benchmark on the GPU machine, in one call (< 10 min: pytest <= 150 s, bench <= 330 s).
#   1. the kernel tests on the real GPU (no TRITON_INTERPRET): tests/test_kernels_{fakequant,qmatmul}.py
#   2. scripts/bench_kernels.py: GEMV / GEMM / fake-quant / model-level timings vs torch fp16
# Results land in $OUT (env.txt, pytest.log, pytest.xml, bench.log, bench_kernels.{json,md}).
# MODE (default "test,bench") picks the steps; "tune": scripts/tune_kernels.py (launch-parameter
# sweeps, tune_kernels.json, tune.log).
# Needs torch + triton + transformers + pytest (present there); not datasets/gguf; no install.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/device_out}
mkdir -p "$OUT"
T0=$(date +%s)
PY=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version --format=csv
  "$PY" -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# quant2gguf.kernels lives in ./kernels (mapped by pyproject). Without an install, expose the repo
# through a shadow package of symlinks instead of pip-installing on the machine.
if ! (cd /tmp && "$PY" -c "import quant2gguf.kernels") >/dev/null 2>&1; then
  SHADOW=$(mktemp -d)/site
  mkdir -p "$SHADOW/quant2gguf"
  for f in "$REPO"/quant2gguf/*; do ln -s "$f" "$SHADOW/quant2gguf/"; done
  ln -s "$REPO/kernels" "$SHADOW/quant2gguf/kernels"
  export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
fi
(cd /tmp && "$PY" -c "import quant2gguf.kernels.qlinear as m; print('import ok:', m.__file__)") || exit 1

MODE=${MODE:-test,bench}
has() { case ",$MODE," in *",$1,"*) return 0;; esac; return 1; }

XDIST=""
"$PY" -c "import xdist" >/dev/null 2>&1 && XDIST="-n 4"
TMO=""
"$PY" -c "import pytest_timeout" >/dev/null 2>&1 && TMO="-p timeout --timeout 60"
if has test; then
echo "== pytest (GPU) $XDIST $TMO"
# no autotuning any more (heuristic configs): each test compiles a few kernels (~1-3 s each)
(cd /tmp && timeout 150 "$PY" -m pytest -q -p no:cacheprovider $XDIST $TMO -rfE --durations=8 \
   "$REPO/tests/test_kernels_fakequant.py" "$REPO/tests/test_kernels_qmatmul.py" \
   --junitxml="$OUT/pytest.xml") >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? ($(( $(date +%s) - T0 )) s so far)" | tee -a "$OUT/pytest.log"
tail -n 40 "$OUT/pytest.log"
fi

if has tune; then
  LEFT=$(( 570 - ($(date +%s) - T0) ))
  timeout "$LEFT" "$PY" "$REPO/scripts/tune_kernels.py" --out "$OUT" --budget $(( LEFT - 40 )) --only "${TUNE_ONLY:-floor,gemv,fqbench}" >"$OUT/tune.log" 2>&1
  echo "tune rc=$? ($(( $(date +%s) - T0 )) s)"
  grep -E "^gemv|^floor|^\[|Error" "$OUT/tune.log" | head -40
fi

has bench || exit 0

echo "== bench"
LEFT=$(( 575 - ($(date +%s) - T0) ))
[ "$LEFT" -gt 330 ] && LEFT=330
timeout "$LEFT" "$PY" "$REPO/scripts/bench_kernels.py" --out "$OUT" --budget $(( LEFT - 100 )) \
  >"$OUT/bench.log" 2>&1
echo "bench rc=$? ($(( $(date +%s) - T0 )) s total)" | tee -a "$OUT/bench.log"
grep -v '^|' "$OUT/bench.log" | grep -iE 'error|traceback|failed|skipped' | head -20
cat "$OUT/bench_kernels.md" 2>/dev/null || tail -n 60 "$OUT/bench.log"
