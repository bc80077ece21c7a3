#!/usr/bin/env bash
# One GPU-machine session for qwen15 (issue 8): our methods vs llama.cpp's stock types, in one run.
# Made for the device tool's limits (10 min a call, 30 s warm between calls, 64 MiB carried a call):
#   prep         carry .device/llama-src.tar.xz .device/whl .device/data .device/model/qwen15.sha256 .device/tools
#                installs wheels, unpacks + patches the pinned llama.cpp, starts its CUDA build in the
#                background (setsid: it outlives the call), and issue 11's CUDA mat-vec microbenchmark
#                (scripts/device_cuda_mmvq.sh, results in ~/results/cuda: they come back in logs.tgz)
#   stage NN     carry .device/model/qwen15.partNN: copies it to ~/stage
#   start        assemble + sha256-check the GGUF, copy the repo to ~/repo (the tree here is re-laid
#                every call) and start $JOB there in the background (default scripts/qwen15_job.sh: the GSM bench
#                job; scripts/qwen15_methods_job.sh: issue 8's method table and issue 10's Q3_K_M, KLD only; with
#                SPEED_ONLY=1 before the command, issue 11's speed stages alone, ~10 minutes shorter)
#   poll [S]     wait up to S seconds (default 540) for the job, print its progress; when it is done,
#                pack ~/logs and the results into $OUT
# Files are made by scripts/device_bundle.sh. With SNAP=DIR (a carried, git-ignored copy of the repo:
#   rm -rf .device/snap && mkdir -p .device/snap && git archive HEAD | tar -x -C .device/snap
# ), prep and start install and run that committed copy instead of a tree others are editing.
# Ask for kind nvidia-h200-x2 when it is lent (the prep call's `kind`): the methods job spreads its lanes over both
# GPUs (the twelfth run's lanes ended at minute 13 of the job against the eleventh's 25 on one GPU), and device time
# counts the held minutes, not the GPUs.
# Issue the 23 `stage` calls (00..22, 48 MiB chunks) together (one message, one call each): ~4 s a call on
# 2026-11-29, against 35-40 s a call when each waited for the previous answer. The carry limit counts the
# tracked tree too: 60 MiB chunks stopped fitting once docs/results grew past ~4 MiB (2026-11-29). Each call must come within 30 s
# of the last one's end or the machine is given back. Never `pkill -f PATTERN` where PATTERN appears
# in the command itself: it kills the call's own shell.
set -u
R=$(cd "${SNAP:-.}" && pwd); T=$PWD
OUT=${OUT:-$PWD/device_out}
mkdir -p ~/stage ~/logs "$OUT"
case ${1:-} in
prep)
  cp -rn .device/data ~/stage/ && cp .device/model/qwen15.sha256 ~/stage/
  cp -r .device/tools ~/stage/ 2>/dev/null || echo "no .device/tools carried: the synthetic-shape speeds will be skipped"
  # shellcheck source=scripts/device_common.sh
  . "$R"/scripts/device_common.sh
  device_install .device/whl "$R" || exit 1
  device_build "$R" "$T/.device/llama-src.tar.xz" $(( $(nproc) * 3 / 4 )) || exit 1
  # issue 11's mat-vec microbenchmark (< 2 min) while the GPU is idle: staging and the build use CPUs only
  # (run from a copy in ~/mmvq: the working tree is re-laid by the stage calls while it compiles)
  mkdir -p ~/results/cuda ~/mmvq/scripts && cp "$R"/scripts/device_cuda_mmvq.sh "$R"/scripts/cuda_q3g_mmvq_bench.cu ~/mmvq/scripts/
  (setsid nohup bash ~/mmvq/scripts/device_cuda_mmvq.sh ~/results/cuda/cuda_mmvq.jsonl >~/logs/cuda-mmvq.log 2>&1 </dev/null &)
  # then, once the build is done: test-backend-ops for our types; once the job's GPU work is done (gpu.idle), perf
  # mode for the batch 2..8 kernel on/off
  cp "$R"/scripts/device_cuda_tbo.sh ~/mmvq/scripts/
  (setsid nohup bash ~/mmvq/scripts/device_cuda_tbo.sh "$QUANT2GGUF_CACHE" ~/results/cuda ~/logs/gpu.idle >~/logs/cuda-tbo.log 2>&1 </dev/null &)
  ls ~/stage
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  ;;
stage)
  cp ".device/model/qwen15.part$2" ~/stage/ && echo "staged $2: $(ls ~/stage/qwen15.part* | wc -l) chunks"
  ;;
start)
  cd ~/stage && cat qwen15.part* > qwen15.gguf && sha256sum -c qwen15.sha256 || exit 1
  rm -f ~/stage/qwen15.part*
  cd - >/dev/null
  rm -rf ~/repo && mkdir ~/repo && (cd "$R" && cp -r quant2gguf kernels ggml_patches scripts pyproject.toml README.md ~/repo/)
  cd ~/repo && PYTHONPATH=/tmp/site python3 -m pip install -q --no-deps --no-build-isolation -e . >~/logs/install2.log 2>&1
  setsid nohup bash "${JOB:-scripts/qwen15_job.sh}" >~/logs/job.log 2>&1 </dev/null &
  sleep 20; tail -5 ~/logs/job.log
  ;;
poll)
  T0=$(date +%s); S=${2:-540}
  while [ ! -f ~/logs/job.done ] && [ $(( $(date +%s) - T0 )) -lt "$S" ]; do sleep 10; done
  grep -E "^\[job\]|Error|error:|Traceback" ~/logs/job.log | tail -40
  tail -c 1500 ~/logs/job.log | tr '\r' '\n' | tail -8
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  tail -c 300 ~/logs/llama-build.log | tr '\r' '\n' | tail -2
  # issue 8's table: compare_gguf's rows joined with the manifests (quantize s, peak GPU, held-out KL)
  [ -f ~/results/gguf.json ] && python3 scripts/method_table.py ~/results/gguf.json ~/results -o ~/results/method-table.md >/dev/null
  # compare_gguf's pace: rows so far, each text's wall seconds (the tool's own in brackets: the rest is ours)
  [ -f ~/results/gguf.json ] && python3 - <<'PACE'
import json, os
rows = json.load(open(os.path.expanduser("~/results/gguf.json")))["rows"]
print(f"compare: {len(rows)} rows;", "; ".join(
    r["file"].split(":")[0] + " " + " ".join(f"{v.get('seconds')}({v.get('tool_s')})" for v in r.values() if isinstance(v, dict))
    for r in rows[-6:]))
PACE
  # issue 11's speed tables (in logs.tgz): qwen15, then each synthetic shape; bandwidth against prep's copy roof
  RS=~/results; ROOF=$([ -f $RS/cuda/cuda_mmvq.jsonl ] && echo "--roof $RS/cuda/cuda_mmvq.jsonl")
  [ -f $RS/llama-bench-qwen15.json ] && python3 scripts/speed_table.py $RS/llama-bench-qwen15*.json $ROOF \
    --batched $RS/batched-bench-qwen15.jsonl -o $RS/speed-qwen15.md >/dev/null 2>&1
  for n in 05b 4b 8b; do [ -s $RS/shapes/llama-bench-$n.json ] && python3 scripts/speed_table.py $RS/shapes/llama-bench-$n.json \
    $(ls $RS/shapes/llama-bench-$n-f32y0.json $RS/shapes/llama-bench-$n-norm0.json $RS/shapes/llama-bench-$n-pf0.json $RS/shapes/llama-bench-$n-kall.json 2>/dev/null) $ROOF \
    -o $RS/speed-$n.md >/dev/null 2>&1; done
  # per-kernel time a token (ncu dumps of the shapes and of qwen15, where the machine has ncu)
  ls $RS/shapes/ncu-*.csv >/dev/null 2>&1 && python3 scripts/ncu_breakdown.py $RS/shapes/ncu-*.csv --layers 36 \
    --card "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" --md $RS/ncu-shapes.md --csv-out $RS/ncu-shapes.csv >/dev/null 2>&1
  ls $RS/ncu-qwen15-*.csv >/dev/null 2>&1 && python3 scripts/ncu_breakdown.py $RS/ncu-qwen15-*.csv --layers 28 \
    --card "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" --md $RS/ncu-qwen15.md --csv-out $RS/ncu-qwen15.csv >/dev/null 2>&1
  [ -s $RS/shapes/batched-bench-shapes.jsonl ] && python3 scripts/speed_table.py --batched $RS/shapes/batched-bench-shapes.jsonl \
    -o $RS/speed-shapes-batched.md >/dev/null 2>&1
  cp ~/results/gguf.json ~/results/gguf.md ~/results/gguf-*.png ~/results/bench-report.md ~/results/method-table.md "$OUT/" 2>/dev/null  # $OUT takes 8 files: the rest is in logs.tgz
  tar -czf "$OUT/logs.tgz" -C ~ logs results $(cd ~ && ls -d bench-gsm/cache/*.json bench-gsm/cache/*.jsonl bench-gsm/report.* bench-ours/cache/*.json bench-ours/cache/*.jsonl 2>/dev/null) 2>/dev/null  # both bench caches (A: stock, B: ours): a bench cut short still returns its answers (scripts/gsm_summary.py reads them)
  [ -f ~/logs/job.done ] && echo "JOB DONE" || echo "job still running"
  ;;
*) echo "usage: $0 prep|stage NN|start|poll [S]"; exit 2 ;;
esac
