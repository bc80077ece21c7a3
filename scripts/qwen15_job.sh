#!/usr/bin/env bash
# The qwen15 job on the GPU machine (started by scripts/device_qwen15.sh start, from ~/repo).
# Staging takes ~3 of the session's 30 device minutes when the 18 stage calls are issued together,
# leaving ~24 for this job:
#   lane A: GPTQ W3G128 on CALIB (default news+code: CHAMP math stays out, the held-out domain), then
#           distillation QAT from it on the same source (codes frozen, scales/offsets trained), KD_MIN min
#   lane B: RTN W3G128 (reference), then, from lane A's GPTQ init, the same distillation on SELF_N sequences
#           sampled from the teacher itself (--calib self, LLM-QAT's data-free data: every domain the model
#           knows, where 60K news tokens fitted news and lost CHAMP on 2026-11-28)
#   lane C: GPTQ W3G128 on news alone (2026-11-28's calibration, for the comparison), then GPTQ on CALIB
#           with 10x the Hessian damping (--damp 0.1: less error compensation fitted to the calibration text)
#   llama.cpp, once the CUDA build is done: F16, the stock types with an importance matrix from the same
#           NS x 512 CALIB tokens, then our checkpoints (the PTQ ones while KD trains); KLD/PPL on the news, CHAMP and
#           code eval splits (scripts/compare_gguf.py)
#   then `quant2gguf bench` of both KD files against F16 and stock IQ3_S, Q3_K_M, Q4_K_M: GSM pass@1 on
#           BENCH_GSM held-out problems and BENCH_LONG CHAMP long decodes through llama-server (16 slots)
# Results: ~/results. Env: CALIB, KD_MIN, NS, SELF_N, BENCH_GSM, BENCH_LONG.
set -u
export PYTHONPATH=/tmp/site QUANT2GGUF_CACHE=$HOME/q2gcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
C=$QUANT2GGUF_CACHE
mkdir -p "$C/gguf" "$C/data" ~/bench ~/results ~/logs
cp -rn ~/stage/data/* "$C/data/" 2>/dev/null
[ -f "$C/data/champ_v0.json.xz" ] && [ ! -f "$C/data/champ_v0.json" ] && xz -dk "$C/data/champ_v0.json.xz"
ln -sf ~/stage/qwen15.gguf "$C/gguf/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
log() { echo "[job] $(date +%T) $*"; }
CALIB=${CALIB:-news+code} KD_MIN=${KD_MIN:-5} SELF_N=${SELF_N:-1024} NS=${NS:-128} BENCH_GSM=${BENCH_GSM:-250} BENCH_LONG=${BENCH_LONG:-16}

log "fixture (calib $CALIB)"
python3 -m quant2gguf fixtures fetch qwen15 >~/logs/fetch.log 2>&1 || { log "fetch failed"; tail ~/logs/fetch.log; touch ~/logs/job.done; exit 1; }
log "fixture ready"

q() {  # q NAME ARGS...: quantize into ~/bench/NAME (N=... overrides --nsamples)
  local t0=$(date +%s)
  python3 -m quant2gguf quantize qwen15 -o ~/bench/$1 "${@:2}" --nsamples ${N:-$NS} --device cuda >~/logs/$1.log 2>&1
  log "$1 rc=$? $(( $(date +%s) - t0 )) s"
}
KD="--method kd -g 128 --calib $CALIB --steps 3000 --max-minutes $KD_MIN --batch 8 --eval-every 25 --heldout 16"
( q gptq-g128 --method gptq -g 128 --calib $CALIB; q kd-g128 $KD --init ~/bench/gptq-g128 ) &
A=$!
( q rtn-g128 --method rtn -g 128 --calib $CALIB
  while [ ! -f ~/bench/gptq-g128/manifest.json ] && kill -0 $A 2>/dev/null; do sleep 5; done
  N=$SELF_N q kd-self-g128 ${KD/--calib $CALIB/--calib self} --init ~/bench/gptq-g128 ) &
B=$!
( q gptq-g128-news --method gptq -g 128 --calib news; q gptq-g128-d10 --method gptq -g 128 --calib $CALIB --damp 0.1 ) &
B2=$!
( while pgrep -f "quant2gguf llama build" >/dev/null; do sleep 5; done
  log "llama build finished: $(tail -c 200 ~/logs/llama-build.log | tr '\n' ' ')"
  python3 scripts/compare_gguf.py --model qwen15 --cuda --workdir ~/gg --out ~/results/gguf.json --calib $CALIB \
    --imat-nsamples $NS --texts news champ code --types IQ3_S+imat Q3_K_S+imat IQ3_XXS+imat IQ3_M+imat Q3_K_M+imat \
    --ckpts ~/bench/rtn-g128 ~/bench/gptq-g128 ~/bench/gptq-g128-news ~/bench/gptq-g128-d10 ~/bench/kd-g128 ~/bench/kd-self-g128 \
    --wait 1500 \
    >~/logs/compare.log 2>&1
  log "compare rc=$?" ) &
D=$!
wait $A $B $B2
for n in gptq-g128 kd-g128 rtn-g128 kd-self-g128 gptq-g128-news gptq-g128-d10; do cp ~/bench/$n/manifest.json ~/results/manifest-$n.json 2>/dev/null; done
log "quantize lanes done"
# one bench run (issue 9): F16, our KD files and stock IQ3_S, Q3_K_M, Q4_K_M (the source grid) with an
# imatrix from the same CALIB tokens; GSM pass@1 on BENCH_GSM held-out problems, CHAMP long decodes
( t0=$(date +%s); while { [ ! -f ~/gg/kd-g128.gguf ] || [ ! -f ~/gg/kd-self-g128.gguf ]; } && [ $(( $(date +%s) - t0 )) -lt 900 ]; do sleep 10; done
  python3 -m quant2gguf bench $(ls ~/gg/kd-g128.gguf ~/gg/kd-self-g128.gguf 2>/dev/null) --ref qwen15 --vs IQ3_S,Q3_K_M,Q4_K_M --calib $CALIB --nsamples $NS \
    --text champ --gsm $BENCH_GSM --long $BENCH_LONG --parallel 16 --cuda -o ~/bench-gsm --force >~/logs/bench.log 2>&1
  log "bench rc=$?"; cp ~/bench-gsm/report.md ~/results/bench-report.md; cp ~/bench-gsm/report.json ~/results/bench-report.json ) &
wait
log "all done"
touch ~/logs/job.done
