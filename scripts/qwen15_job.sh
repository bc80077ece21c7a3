#!/usr/bin/env bash
# The qwen15 job on the GPU machine (started by scripts/device_qwen15.sh start, from ~/repo).
# Staging the model takes ~11 of the session's 30 device minutes, so one run does:
#   lane A: GPTQ W3G128 (news calib, 128 x 512 tokens), then two distillation-QAT runs from it in
#           parallel: kd-scales (codes frozen, group scales/offsets trained: E2E-QP) and kd-full
#           (latent weights + scales/offsets), each cut to KD_MIN minutes
#   lane B: RTN and LoaQ W3G128 (same calib)
#   llama.cpp, once the CUDA build is done: F16, the stock types with an importance matrix from the
#           same 128 x 512 calibration tokens, then our checkpoints as they appear, KLD/PPL on the
#           news and CHAMP eval splits (scripts/compare_gguf.py). Results: ~/results.
set -u
export PYTHONPATH=/tmp/site QUANT2GGUF_CACHE=$HOME/q2gcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
C=$QUANT2GGUF_CACHE
mkdir -p "$C/gguf" "$C/data" ~/bench ~/results ~/logs
cp -rn ~/stage/data/* "$C/data/" 2>/dev/null
[ -f "$C/data/champ_v0.json.xz" ] && [ ! -f "$C/data/champ_v0.json" ] && xz -dk "$C/data/champ_v0.json.xz"
ln -sf ~/stage/qwen15.gguf "$C/gguf/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
log() { echo "[job] $(date +%T) $*"; }
KD_MIN=${KD_MIN:-5} NS=${NS:-128}

log "fixture"
python3 -m quant2gguf fixtures fetch qwen15 >~/logs/fetch.log 2>&1 || { log "fetch failed"; tail ~/logs/fetch.log; touch ~/logs/job.done; exit 1; }
log "fixture ready"

q() {  # q NAME ARGS...: quantize into ~/bench/NAME
  local t0=$(date +%s)
  python3 -m quant2gguf quantize qwen15 -o ~/bench/$1 "${@:2}" --nsamples $NS --device cuda >~/logs/$1.log 2>&1
  log "$1 rc=$? $(( $(date +%s) - t0 )) s"
}
KD="--method kd --init $HOME/bench/gptq-g128 -g 128 --steps 3000 --max-minutes $KD_MIN --batch 8 --eval-every 25 --heldout 16"
( q gptq-g128 --method gptq -g 128
  q kd-scales $KD --lr-w 0 --lr-q 2e-3 &
  q kd-full $KD --lr-w 1e-3 --lr-q 1e-3 &
  wait ) &
A=$!
( q rtn-g128 --method rtn -g 128; q loaq-g128 --method loaq -g 128 ) &
B=$!
( while pgrep -f "quant2gguf llama build" >/dev/null; do sleep 5; done
  log "llama build finished: $(tail -c 200 ~/logs/llama-build.log | tr '\n' ' ')"
  python3 scripts/compare_gguf.py --model qwen15 --cuda --workdir ~/gg --out ~/results/gguf.json --imat-nsamples $NS \
    --types IQ3_S+imat Q3_K_S+imat IQ3_XXS+imat IQ3_M+imat Q3_K_M+imat \
    --ckpts ~/bench/gptq-g128 ~/bench/rtn-g128 ~/bench/loaq-g128 ~/bench/kd-scales ~/bench/kd-full --wait 1500 \
    >~/logs/compare.log 2>&1
  log "compare rc=$?" ) &
wait $A $B
for n in gptq-g128 rtn-g128 loaq-g128 kd-scales kd-full; do cp ~/bench/$n/manifest.json ~/results/manifest-$n.json 2>/dev/null; done
log "quantize lanes done"
wait
log "all done"
touch ~/logs/job.done
