#!/usr/bin/env bash
# The qwen15 job on the GPU machine (started by scripts/device_qwen15.sh start, from ~/repo):
#  GPU, two lanes in parallel (GPTQ-style loops are launch-bound, so two overlap on one GPU):
#    lane A: GPTQ W3G128 -> distillation QAT from it
#    lane B: LoaQ W3G64
#  (2026-11-28: staging took 15 of the 30 device minutes, so keep the lanes this short)
#  then PyTorch evaluation of every checkpoint (news and CHAMP eval splits, GSM held-out problems);
#  beside them, once the CUDA build is done: F16, stock types with an importance matrix, and our
#  files through llama.cpp (scripts/compare_gguf.py). Results: ~/results. Env: KD_MIN, KD_STEPS.
set -u
export PYTHONPATH=/tmp/site QUANT2GGUF_CACHE=$HOME/q2gcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
C=$QUANT2GGUF_CACHE
mkdir -p "$C/gguf" "$C/data" ~/bench ~/results ~/logs
cp -rn ~/stage/data/* "$C/data/" 2>/dev/null
[ -f "$C/data/champ_v0.json.xz" ] && [ ! -f "$C/data/champ_v0.json" ] && xz -dk "$C/data/champ_v0.json.xz"
ln -sf ~/stage/qwen15.gguf "$C/gguf/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
log() { echo "[job] $(date +%T) $*"; }
KD_MIN=${KD_MIN:-3.5} KD_STEPS=${KD_STEPS:-600}

log "fixture"
python3 -m quant2gguf fixtures fetch qwen15 >~/logs/fetch.log 2>&1 || { log "fetch failed"; tail ~/logs/fetch.log; touch ~/logs/job.done; exit 1; }
log "fixture ready"

q() {  # q NAME ARGS...: quantize into ~/bench/NAME
  local t0=$(date +%s)
  python3 -m quant2gguf quantize qwen15 -o ~/bench/$1 "${@:2}" --device cuda >~/logs/$1.log 2>&1
  log "$1 rc=$? $(( $(date +%s) - t0 )) s"
}
ev() {  # ev NAME ARGS...: PyTorch eval of ~/bench/NAME (or the FP model) into ~/results/eval-NAME-*.json
  local ck=~/bench/$1; [ "$1" = fp ] && ck=qwen15
  python3 -m quant2gguf eval $ck --ref qwen15 --ntokens 8192 --gsm 50 --json ~/results/eval-$1-news.json >~/logs/eval-$1.log 2>&1
  python3 -m quant2gguf eval $ck --ref qwen15 --text champ --ntokens 8192 --json ~/results/eval-$1-champ.json >>~/logs/eval-$1.log 2>&1
  log "eval $1 rc=$?"
}
# KD rates default to the method's (grid cells a step); KD_LRW / KD_LRQ override
KD="--method kd --steps $KD_STEPS --max-minutes $KD_MIN --batch 4 --eval-every 50 ${KD_LRW:+--lr-w $KD_LRW} ${KD_LRQ:+--lr-q $KD_LRQ}"
( q gptq-g128 --method gptq -g 128 && q kd-g128 $KD --init ~/bench/gptq-g128 -g 128 ) &
A=$!
( q loaq-g64 --method loaq -g 64 ) &
B=$!
# llama.cpp side: waits for the build, does the stock files first, then ours as they appear
( while pgrep -f "quant2gguf llama build" >/dev/null; do sleep 5; done
  log "llama build finished: $(tail -c 200 ~/logs/llama-build.log | tr '\n' ' ')"
  python3 scripts/compare_gguf.py --model qwen15 --cuda --workdir ~/gg --out ~/results/gguf.json \
    --types IQ3_S+imat Q3_K_M+imat Q3_G128 IQ3_XXS+imat Q3_K_S+imat IQ3_M+imat \
    --ckpts ~/bench/gptq-g128 ~/bench/kd-g128 ~/bench/loaq-g64 --wait 1200 >~/logs/compare.log 2>&1
  log "compare rc=$?" ) &
wait $A $B
( ev kd-g128; ev fp ) &
( ev gptq-g128; ev loaq-g64 ) &
wait
log "all done"
touch ~/logs/job.done
