#!/usr/bin/env bash
# The qwen15 job on the GPU machine (started by scripts/device_qwen15.sh start, from ~/repo).
# Staging takes ~3 of the session's 30 device minutes when the 18 stage calls are issued together,
# leaving ~25 for this job. Fifth run (after the fourth showed GPTQ --act-order -> KD in the Q3_K grid beating
# IQ3_S + imatrix on news, CHAMP and code; docs/BENCHMARKS.md): the bench (issue 9) first, then Q3_K_M.
#   bench, phase 1 (as soon as the CUDA build is done, beside training): F16, the fixture's own Q4_K_M file (the
#           source grid of the FP reference: labelled by its file name) and stock IQ3_S, Q3_K_S, Q3_K_M with an
#           importance matrix from the same NS x 512 CALIB tokens: KLD on CHAMP, GSM pass@1 on BENCH_GSM held-out
#           problems, BENCH_LONG long CHAMP decodes (all cached per file and phase)
#   lane A: GPTQ --act-order in the Q3_K grid (--target q3_k, damp 0.1), then KD of its scales (default rate)
#   lane A2: from lane A's GPTQ, the same KD at a quarter of the rate (--lr-q 5e-4): the fourth run's KD peaked at
#           step 25 and drifted up
#   lane B: the same GPTQ -> KD with llama-quantize's Q3_K_M recipe (--target q3_k_m)
#   lane L: LoaQ in the Q3_K grid (its init beat GPTQ's on SmolLM2), judged against lane A's GPTQ (fourth run)
#   bench, phase 2 (when the training lanes are done): the speed cache of phase 1 (measured beside training) is
#           dropped, our files join, everything else resumes from the cache: report.md / report.json / PNGs
#   compare_gguf beside it: KLD/PPL on news, CHAMP and code for our files against Q3_K_M and IQ4_XS + imatrix
#   issue 12: peak RSS / VRAM of GPTQ and LAQuant with and without --stream on a synthetic 8B shape (4 of its
#           32 layers; scripts/stream_memory.py), before phase 2 so the speeds run alone
# Results: ~/results. Env: CALIB, KD_MIN, NS, BENCH_GSM, BENCH_LONG.
set -u
export PYTHONPATH=/tmp/site QUANT2GGUF_CACHE=$HOME/q2gcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
C=$QUANT2GGUF_CACHE
mkdir -p "$C/gguf" "$C/data" ~/bench ~/results ~/logs
cp -rn ~/stage/data/* "$C/data/" 2>/dev/null
[ -f "$C/data/champ_v0.json.xz" ] && [ ! -f "$C/data/champ_v0.json" ] && xz -dk "$C/data/champ_v0.json.xz"
ln -sf ~/stage/qwen15.gguf "$C/gguf/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
log() { echo "[job] $(date +%T) $*"; }
CALIB=${CALIB:-news+code} KD_MIN=${KD_MIN:-4} NS=${NS:-128} BENCH_GSM=${BENCH_GSM:-250} BENCH_LONG=${BENCH_LONG:-8}

log "fixture (calib $CALIB)"
python3 -m quant2gguf fixtures fetch qwen15 >~/logs/fetch.log 2>&1 || { log "fetch failed"; tail ~/logs/fetch.log; touch ~/logs/job.done; exit 1; }
log "fixture ready"

q() {  # q NAME ARGS...: quantize into ~/bench/NAME (N=... overrides --nsamples)
  local t0=$(date +%s)
  python3 -m quant2gguf quantize qwen15 -o ~/bench/$1 "${@:2}" --nsamples ${N:-$NS} --device cuda >~/logs/$1.log 2>&1
  log "$1 rc=$? $(( $(date +%s) - t0 )) s"
}
KD="--method kd --calib $CALIB --steps 3000 --max-minutes $KD_MIN --batch 8 --eval-every 25 --heldout 16"
GPTQ="--method gptq --calib $CALIB --damp 0.1 --act-order"
FIX=$C/gguf/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
conv() {  # conv NAME TYPE: our checkpoint -> ~/ours/NAME.gguf (compare_gguf converts its own copies in ~/gg), token_embd/output as llama-quantize gives them at TYPE
  python3 -m quant2gguf convert ~/bench/$1 -o ~/ours/$1.gguf --embd-type auto:$2 --force >~/logs/conv-$1.log 2>&1
  log "convert $1 rc=$?"
}
mkdir -p ~/ours
( q gptq-q3k $GPTQ --target q3_k; q kd-q3k $KD --init ~/bench/gptq-q3k; conv kd-q3k Q3_K_S ) &
A=$!
( while [ ! -f ~/bench/gptq-q3k/manifest.json ] && kill -0 $A 2>/dev/null; do sleep 5; done
  q kd-q3k-lr5 $KD --lr-q 5e-4 --init ~/bench/gptq-q3k; conv kd-q3k-lr5 Q3_K_S ) &
A2=$!
( q gptq-q3km $GPTQ --target q3_k_m; q kd-q3km $KD --init ~/bench/gptq-q3km; conv kd-q3km Q3_K_M ) &
B=$!
( q loaq-q3k --method loaq --calib $CALIB --damp 0.1 --target q3_k ) &  # LoaQ's init beat GPTQ's on SmolLM2
L=$!
BENCH="python3 -m quant2gguf bench --ref qwen15 --vs IQ3_S,Q3_K_S,Q3_K_M --calib $CALIB --nsamples $NS --text champ
  --gsm $BENCH_GSM --long $BENCH_LONG --parallel 16 --cuda -o $HOME/bench-gsm --force"
( while pgrep -f "quant2gguf llama build" >/dev/null; do sleep 5; done
  log "llama build finished: $(tail -c 200 ~/logs/llama-build.log | tr '\n' ' ')"
  $BENCH $FIX >~/logs/bench1.log 2>&1; log "bench phase 1 rc=$?" ) &
P1=$!
( while pgrep -f "quant2gguf llama build" >/dev/null; do sleep 5; done
  python3 scripts/compare_gguf.py --model qwen15 --cuda --workdir ~/gg --out ~/results/gguf.json --calib $CALIB \
    --imat-nsamples $NS --texts news champ code --types Q3_K_M+imat IQ4_XS+imat \
    --ckpts ~/bench/gptq-q3km ~/bench/loaq-q3k ~/bench/kd-q3k-lr5 ~/bench/kd-q3km --wait 1500 >~/logs/compare.log 2>&1
  log "compare rc=$?" ) &
( timeout 900 python3 scripts/stream_memory.py --shape 8b --layers 4 --method gptq laquant --device cuda --nsamples 32 \
    --seqlen 512 --workdir ~/smem --out ~/results/stream-memory-8b.json >~/logs/stream-memory.log 2>&1
  log "stream memory rc=$?"; rm -rf ~/smem ) &
S=$!
wait $A $A2 $B $L $S
for n in gptq-q3k kd-q3k kd-q3k-lr5 gptq-q3km kd-q3km loaq-q3k; do cp ~/bench/$n/manifest.json ~/results/manifest-$n.json 2>/dev/null; done
log "quantize lanes done"
wait $P1
rm -f ~/bench-gsm/cache/*.speed.*.json  # phase 1's speeds were measured beside training
OURS=$(ls ~/ours/kd-q3k.gguf ~/ours/kd-q3k-lr5.gguf ~/ours/kd-q3km.gguf 2>/dev/null)
$BENCH $OURS $FIX >~/logs/bench.log 2>&1
log "bench rc=$?"; cp ~/bench-gsm/report.md ~/results/bench-report.md; cp ~/bench-gsm/report.json ~/results/bench-report.json
cp ~/bench-gsm/*.png ~/results/ 2>/dev/null
wait
log "all done"
touch ~/logs/job.done
