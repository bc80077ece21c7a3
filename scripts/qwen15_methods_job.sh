#!/usr/bin/env bash
# Issue 8's method table on qwen15 in one run, plus issue 10's Q3_K_S goal (started by
# `JOB=scripts/qwen15_methods_job.sh scripts/device_qwen15.sh start`, from ~/repo). GSM only for issue 10's files
# (the ninth run's bench answered it for the others). One table, one run, on one or two GPUs (lanes spread over them and share each through
# CUDA MPS; quantize times are wall times beside each other, peak GPU memory per process). compare_gguf converts checkpoints
# and makes stock files four at once and measures CMP_JOBS (4) files at once, a complete checkpoint before any stock
# file (the tenth run's serial queue left five checkpoints unmeasured, the eleventh's stock-first queue all ten, the
# twelfth's conversions inside its measuring slots all but two, the fourteenth's six: a text took ~30 s with two
# measuring, ~120 s with four, nearly all of it gguf-py's GGUFReader in each worker thread's file check, now a header
# scan):
#   our type, calibration news+code (NS x 512), GPTQ damp 0.1 + act-order throughout: Q3_G128 RTN | GPTQ | LoaQ |
#     LAQuant (its own GPTQ init) | LAQuant -> KD (news+code, KD_MIN minutes), and Q3_G64 LAQuant | LAQuant -> KD
#     (G64's RTN / GPTQ / LoaQ left out for the budget)
#   issue 10: GPTQ (damp 0.1, act-order) in the Q3_K grid -> KD news+code at lr-q 5e-4 for KD_Q3K_MIN minutes (4:
#     the twelfth run's held-out KL was flat from step 200 of 350, ~3 minutes in: the data, not the steps, limit it),
#     converted with Q3_K_S's token_embd/output (same bytes as llama-quantize's Q3_K_S): the fourth run's recipe (news KLD 0.061 = 0.51x
#     Q3_K_S + imatrix) against the goal of half.
#   issue 10's Q3_K_M: GPTQ in llama-quantize's Q3_K_M mix -> KD (KD_Q3K_MIN minutes), against Q3_K_M + imatrix
#   (the two GPTQ inits in stock grids are not measured: the fourteenth run did; EXTRA_CKPTS adds checkpoints)
#   stock, importance matrix from the same NS x 512 news+code tokens: Q3_K_M, IQ4_XS, IQ3_XXS, Q3_K_S, IQ3_S, IQ3_M
#   all through compare_gguf: whole-file MiB and bpw, KLD / p99 / same top-1 / PPL vs the F16 GGUF on the news, CHAMP
#   (held out: in no calibration) and code eval splits, and the size-KLD plots with the stock frontier.
# After the lanes, on GPU 0 and CPUs 0-3: issue 11's qwen15 decode / prefill / batch 1..8 speeds (ours beside F16 and
# stock files), then the synthetic Qwen3-4B / 8B shapes of scripts/device_shapes.sh (made on CPUs 0-3 while the lanes
# train), then with BENCH_GSM=N (default 0: the fourteenth run's bench answered it) issue 10's GSM bench on N problems
# (our distilled Q3_K / Q3_K_M files, llama-quantize's, F16).
# Then ~/logs/gpu.idle lets scripts/device_cuda_tbo.sh (started by prep) time MUL_MAT with the batch 2..8 kernel.
# Results: ~/results (gguf.json/.md/-*.png, manifests, speeds, bench-report.*, shapes/). Env: CALIB, KD_MIN,
# KD_Q3K_MIN, NS, BENCH_GSM, SPEED_BY / GSM_BY / SHAPES_BY (seconds into the job a stage may still start), SPEED_ONLY=1
# (issue 11 alone: only the RTN lane, compare_gguf with the three stock files speed() times, then the speed stages); for a dry run on a CPU machine
# MODEL=qwen05 DEV=cpu HOME=/tmp/dry (a fixture whose dims take group 128; its llama.cpp build must exist: the CUDA one
# when DEV=cuda).
set -u
mkdir -p ~/results ~/logs
# GPTQ's Triton column loop vs the torch loop at qwen15's shapes, compiled (< 1 min, while the fixture is made on the CPU)
[ "${DEV:-cuda}" = cuda ] && (PYTHONPATH=/tmp/site python3 scripts/bench_gptq_kernel.py --out ~/results/gptq-kernel.json \
  >~/logs/gptq-kernel.log 2>&1 &)
source "$(dirname "$0")/device_job_env.sh"  # env, caches, staged data, log(), the fixture
KD_MIN=${KD_MIN:-4} KD_Q3K_MIN=${KD_Q3K_MIN:-4} NS=${NS:-128} DEV=${DEV:-cuda} T_START=$(date +%s)
GPU=$([ "$DEV" = cuda ] && echo --cuda)
[ "$DEV" = cuda ] && mps_on

# Lanes spread over the machine's GPUs (lane k on GPU k mod NGPU; compare_gguf's llama.cpp runs on the last GPU):
# on a 2-GPU machine the two LAQuant lanes get a GPU each. CPU threads: six lanes, the llama.cpp build and
# compare_gguf share the cores.
NGPU=$([ "$DEV" = cuda ] && nvidia-smi -L | grep -c '^GPU' || echo 1) THR=$(( $(nproc) / 6 > 2 ? $(nproc) / 6 : 2 ))
log "$NGPU GPU(s), $THR CPU threads a lane"
# The twelfth run's rows took ~6 min each, conversions ~4.5 min, writes ~50 MB/s: every row re-reads the F16 log-prob
# files (~5 GB for the three texts), so they go to the RAM disk where it has room; the disk's speed is logged.
LOGITS=~/gg
[ "$(df -B1G --output=avail /dev/shm 2>/dev/null | tail -1)" -ge 16 ] 2>/dev/null && LOGITS=/dev/shm/logits
log "storage: $(df -h --output=target,size,avail ~ /dev/shm 2>/dev/null | tail -n +2 | tr -s ' ' | paste -sd';'), log-probs in $LOGITS"
[ "${DISK_PROBE:-1}" = 1 ] && ( dd if=/dev/zero of=$HOME/dd.test bs=1M count=1024 oflag=direct 2>&1 | tail -1 | sed 's/^/[disk] write: /'
  dd if=$HOME/dd.test of=/dev/null bs=1M iflag=direct 2>&1 | tail -1 | sed 's/^/[disk] read: /'; rm -f $HOME/dd.test ) >>~/logs/disk.log 2>&1 &
# CPUs: the speed stage keeps 0-3 to itself, compare_gguf (which splits its share among its workers) the rest: the
# thirteenth run's llama-bench and batched-bench ran beside compare's conversions on every core.
llama_bin() { ls -d $C/llama/build-*-cuda-*/bin | head -1; }  # the CUDA build's tools (prep builds it)
SPEED_CPUS= CMP_CPUS=
[ $(nproc) -ge 8 ] && command -v taskset >/dev/null && SPEED_CPUS="taskset -c 0-3" CMP_CPUS="taskset -c 4-$(( $(nproc) - 1 ))"
log "CPUs: speed stage '${SPEED_CPUS:-all}', compare_gguf '${CMP_CPUS:-all}'"
# Issue 11's synthetic Qwen3-4B / 8B shapes (scripts/device_shapes.sh): made on the speed stage's CPUs while the lanes
# train, measured by shapes_bench below on compare_gguf's GPU once it is done
[ "$DEV" = cuda ] && ( while pgrep -f "quant2gguf llama build" >/dev/null; do sleep 5; done
  # (SPEED_ONLY: on every CPU: no lane trains, and the fifteenth run's shapes took 18 minutes on four)
  $([ "${SPEED_ONLY:-0}" = 1 ] || echo $SPEED_CPUS) bash scripts/device_shapes.sh make ~/stage/$MODEL.gguf ~/shapes "$(llama_bin)" \
    >~/logs/shapes.log 2>&1; log "shapes made rc=$?"; touch ~/logs/shapes.made ) &
q() {  # q NAME ARGS...: quantize into ~/bench/NAME, on GPU $LANE mod NGPU
  local t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=$(( ${LANE:-0} % NGPU )) OMP_NUM_THREADS=$THR python3 -m quant2gguf quantize $MODEL -o ~/bench/$1 "${@:2}" --calib ${QCALIB:-$CALIB} --nsamples $NS --device $DEV \
    >~/logs/$1.log 2>&1
  local rc=$?
  log "$1 rc=$rc $(( $(date +%s) - t0 )) s"
  cp ~/bench/$1/manifest.json ~/results/manifest-$1.json 2>/dev/null
  return $rc
}
KD="--method kd --steps 3000 --batch 8 --eval-every 25 --heldout 16 --lr-q 5e-4"
GPTQ="--method gptq --damp 0.1 --act-order"
rtn_lane() {  # RTN W3G128, then (background) the same file with q/k/v as one attn_qkv (convert --fuse-qkv) for the speed stage
  q rtn-g128 --method rtn -g 128
  (python3 -m quant2gguf convert ~/bench/rtn-g128 -o ~/gg/rtn-g128-fqkv.gguf --fuse-qkv --embd-type auto --threads 4 \
    >~/logs/conv-fqkv.log 2>&1; log "convert --fuse-qkv rc=$?") &
}
L3= L4= L5= L6= L7=
if [ "${SPEED_ONLY:-0}" = 1 ]; then
  # issue 11 alone (SPEED_ONLY=1): the RTN file and its fused twin, and the stock files speed() times, from compare_gguf
  ( LANE=0; rtn_lane; wait ) &
  L1=$!
  CMP_TYPES="IQ3_S+imat Q3_K_S+imat Q3_K_M+imat" CMP_CKPTS="$HOME/bench/rtn-g128 ${EXTRA_CKPTS:-}"
else
( LANE=1; rtn_lane
  q gptq-g128 $GPTQ -g 128 ) &  # (the thirteenth run's KD with teacher samples mixed in, 0.0569 vs 0.0563: dropped)
L1=$!
( LANE=2; sleep 10; q loaq-g128 --method loaq --damp 0.1 --act-order -g 128 ) &
L3=$!
( LANE=0; sleep 20; q laq-g128 --method laquant --init gptq --damp 0.1 --act-order -g 128 && q kd-laq-g128 $KD --max-minutes $KD_MIN -g 128 --init ~/bench/laq-g128 ) &
L4=$!
( LANE=1; sleep 30; q laq-g64 --method laquant --init gptq --damp 0.1 --act-order -g 64 && q kd-laq-g64 $KD --max-minutes $KD_MIN -g 64 --init ~/bench/laq-g64 ) &
L5=$!
( LANE=2; sleep 40; q gptq-q3k $GPTQ --target q3_k && q kd-gptq-q3k $KD --max-minutes $KD_Q3K_MIN --init ~/bench/gptq-q3k ) &
L6=$!
# issue 10's Q3_K_M: GPTQ in llama-quantize's Q3_K_M mix (the fifth run: news KLD 0.043 vs Q3_K_M + imatrix 0.065) -> KD
( LANE=1; sleep 50; q gptq-q3km $GPTQ --target q3_k_m && q kd-gptq-q3km $KD --max-minutes $KD_Q3K_MIN --init ~/bench/gptq-q3km ) &
L7=$!
CMP_TYPES="IQ3_S+imat Q3_K_S+imat IQ3_M+imat Q3_K_M+imat IQ3_XXS+imat IQ4_XS+imat"
CMP_CKPTS=$(for c in rtn-g128 gptq-g128 loaq-g128 laq-g128 kd-laq-g128 laq-g64 kd-laq-g64 kd-gptq-q3k kd-gptq-q3km; do
  echo -n "$HOME/bench/$c "; done)${EXTRA_CKPTS:-}
fi
( while pgrep -f "quant2gguf llama build" >/dev/null; do sleep 5; done
  log "llama build finished: $(tail -c 200 ~/logs/llama-build.log | tr '\n' ' ')"
  CUDA_VISIBLE_DEVICES=$(( NGPU - 1 )) $CMP_CPUS python3 scripts/compare_gguf.py --model $MODEL $GPU --workdir ~/gg --out ~/results/gguf.json --calib $CALIB \
    --imat-nsamples $NS --texts news champ code --embd-type auto \
    --types $CMP_TYPES --ckpts $CMP_CKPTS \
    --wait 1500 --jobs ${CMP_JOBS:-4} --convert-jobs 4 --logits-dir $LOGITS >~/logs/compare.log 2>&1
  log "compare rc=$?" ) &
P=$!
# Issue 11 on the real model, only if the device budget allows (SPEED_BY: seconds since the job started): decode
# tg128 / prefill pp512 (llama-bench) and batch 1/2/4/8 decode (llama-batched-bench, ours with the batch 2..8 kernel
# on and off, and with q/k/v fused into one tensor; ours also without batch 1's float-activation path,
# GGML_Q3G_MMVQ_F32Y=0), F16 and stock files beside ours, alone on GPU 0 and outside MPS
# (CUDA_MPS_PIPE_DIRECTORY naming no daemon: the process makes an ordinary context).
speed() {
  if [ "$DEV" != cuda ] || [ $(( $(date +%s) - T_START )) -ge ${SPEED_BY:-1200} ]; then log "speed stage skipped (budget)"; return; fi
  local B=$(llama_bin) G=~/gg/$MODEL
  export CUDA_VISIBLE_DEVICES=0 CUDA_MPS_PIPE_DIRECTORY=$HOME/no-mps
  mkdir -p ~/no-mps
  $SPEED_CPUS $B/llama-quantize $G-F16.gguf $G-Q4_0.gguf Q4_0 >~/logs/q4_0.log 2>&1
  S="$G-F16.gguf $G-Q4_0.gguf $G-Q3_K_S+imat.gguf $G-IQ3_S+imat.gguf $G-Q3_K_M+imat.gguf $HOME/gg/rtn-g128.gguf $HOME/gg/rtn-g128-fqkv.gguf $HOME/gg/laq-g64.gguf $HOME/gg/kd-gptq-q3k.gguf $HOME/gg/kd-gptq-q3km.gguf"
  $SPEED_CPUS $B/llama-bench -ngl 99 -t 4 -p 512 -n 128 -r 3 -o json $(for f in $S; do [ -f $f ] && echo -m $f; done) \
    >~/results/llama-bench-$MODEL.json 2>~/logs/llama-bench.log; log "llama-bench rc=$?"
  # our type again with GGML_Q3G_MMVQ_F32Y=0 (a quantize kernel before each batch-1 mat-vec), with the RMS norms
  # launched rather than left to F32Y (GGML_Q3G_F32Y_NORM=0) and without the L2 prefetch of the first weight rows
  # (GGML_Q3G_PREFETCH=0), and with the down matrix (K = 8960) on F32Y too (-kall), under -f32y0 / -norm0 / -pf0 /
  # -kall names (each variant's environment: scripts/device_shapes.sh env)
  for sfx in f32y0 norm0 pf0 kall; do
    local envs; envs=$(bash scripts/device_shapes.sh env $sfx)
    mkdir -p ~/gg/$sfx
    for f in rtn-g128 rtn-g128-fqkv; do [ -f ~/gg/$f.gguf ] && ln -sf ../$f.gguf ~/gg/$sfx/$f-$sfx.gguf; done
    env $envs $SPEED_CPUS $B/llama-bench -ngl 99 -t 4 -p 512 -n 128 -r 3 -o json $(for f in ~/gg/$sfx/*.gguf; do echo -m $f; done) \
      >~/results/llama-bench-$MODEL-$sfx.json 2>~/logs/llama-bench-$sfx.log; log "llama-bench $envs rc=$?"
  done
  # -l32: the batch 2..8 kernel with 32 lanes a row where K has fewer than 16 weight blocks too (GGML_Q3G_WROW_LPR16=0;
  # qwen15's K = 1536 is 12 weight blocks)
  mkdir -p ~/gg/l32
  for f in rtn-g128 rtn-g128-fqkv; do [ -f ~/gg/$f.gguf ] && ln -sf ../$f.gguf ~/gg/l32/$f-l32.gguf; done
  for f in $G-F16.gguf $G-Q4_0.gguf $G-Q3_K_S+imat.gguf ~/gg/rtn-g128.gguf ~/gg/rtn-g128-fqkv.gguf w0:$HOME/gg/rtn-g128.gguf \
           ~/gg/f32y0/rtn-g128-f32y0.gguf ~/gg/f32y0/rtn-g128-fqkv-f32y0.gguf ~/gg/l32/rtn-g128-l32.gguf ~/gg/l32/rtn-g128-fqkv-l32.gguf; do
    w=1; case $f in w0:*) w=0 f=${f#w0:};; esac
    # a linked variant's folder names its environment (f32y0, l32); any other folder gives the defaults
    env $(bash scripts/device_shapes.sh env "$(basename "$(dirname "$f")")") GGML_Q3G_MMVQ_WROW=$w $SPEED_CPUS $B/llama-batched-bench -m $f -t 4 -ngl 99 -c 4096 -npp 128 -ntg 128 -npl 1,2,4,8 \
      --output-format jsonl 2>>~/logs/batched-bench.log | grep '^{"n_kv_max' | sed "s|^{|{\"file\": \"$(basename $f)\", \"wrow\": $w, |" \
      >>~/results/batched-bench-$MODEL.jsonl
  done
  log "batched-bench done"
  # per kernel (scripts/device_shapes.sh ncu, where the machine has ncu; scripts/ncu_breakdown.py reads the CSVs): the
  # plain RTN file under the build's defaults (F32Y but for the down matrix, the RMS norms left to it, the L2
  # prefetch), with the norms launched (norm0), without the prefetch (pf0), with F32Y off (f32y0); stock Q4_0 beside it
  for v in default norm0 pf0 f32y0 Q4_0; do
    local t=rtn-g128-$v f=~/gg/rtn-g128.gguf; [ $v = Q4_0 ] && t=Q4_0 f=$G-Q4_0.gguf
    env $(bash scripts/device_shapes.sh env $v) $SPEED_CPUS bash scripts/device_shapes.sh ncu $B $f \
      ~/results/ncu-$MODEL-$t.csv >>~/logs/ncu.log 2>&1
    log "ncu $t rc=$?"
  done
  # the F32Y path end to end (qwen2's q/k/v fused with their bias, gate/up with the GLU, the rest plain): the RTN file's
  # news KLD against compare_gguf's F16 log-probs, as deployed (every matrix, the RMS norms left to it) and
  # without it. -ub 1: one token a ubatch, so every mat-mul is a batch-1 mat-vec (run 16's check used -b 512
  # ubatches, the mat-mat path: it could not see F32Y)
  for e in 0 1; do
    GGML_Q3G_MMVQ_F32Y=$e $SPEED_CPUS $B/llama-perplexity -m ~/gg/rtn-g128.gguf --kl-divergence-base $LOGITS/$MODEL-f16-news.logits \
      --kl-divergence -ngl 99 -c 512 -b 512 -ub 1 -t 4 >~/results/kld-rtn-g128-f32y$e.log 2>&1
    log "KLD rtn-g128 F32Y=$e rc=$? $(grep -E 'Mean +KLD' ~/results/kld-rtn-g128-f32y$e.log | tr -s ' ')"
  done
}
# Issue 10: GSM pass@1 (250 held-out problems, llama-server, 64 slots) of our Q3_K and Q3_K_M files beside
# llama-quantize's files of the same types and F16, after speed() in its shell (same GPU, CPUs, no MPS). compare_gguf's
# F16, importance matrix and stock files (the same NS x 512 news+code tokens) are linked in under bench's names, so
# the bench makes none of them again; CHAMP KLD on 8 chunks only (compare_gguf has the full texts).
gsm_bench() {
  if [ "${BENCH_GSM:-0}" = 0 ]; then log "GSM bench skipped (BENCH_GSM=0)"; return; fi
  if [ "$DEV" != cuda ] || [ $(( $(date +%s) - T_START )) -ge ${GSM_BY:-1260} ]; then log "GSM bench skipped (budget)"; return; fi
  local W=~/bench-gsm/build tag=$CALIB-${NS}x512 t
  export CUDA_VISIBLE_DEVICES=0 CUDA_MPS_PIPE_DIRECTORY=$HOME/no-mps  # as speed() (which may have been skipped)
  mkdir -p $W ~/no-mps
  ln -sf ~/gg/$MODEL-F16.gguf $W/$MODEL-F16.gguf
  [ -f ~/gg/$MODEL.imatrix.gguf ] && ln -sf ~/gg/$MODEL.imatrix.gguf $W/$MODEL.imatrix-$tag.gguf
  for t in Q3_K_S Q3_K_M; do [ -f ~/gg/$MODEL-$t+imat.gguf ] && ln -sf ~/gg/$MODEL-$t+imat.gguf $W/$MODEL-$t-imat-$tag.gguf; done
  # compare_gguf converts our checkpoints (~2 min each): wait for those whose lane wrote one (GSM_WAIT s at most)
  local ours="kd-gptq-q3k kd-gptq-q3km" t0=$(date +%s) f missing
  while :; do
    missing=
    for f in $ours; do [ -f ~/bench/$f/manifest.json ] && [ ! -f ~/gg/$f.gguf ] && missing="$missing $f"; done
    [ -z "$missing" ] || [ $(( $(date +%s) - t0 )) -ge ${GSM_WAIT:-300} ] && break
    sleep 10
  done
  [ -n "$missing" ] && log "GSM bench without$missing (not converted in time)"
  $SPEED_CPUS python3 -m quant2gguf bench $(for f in $ours; do [ -f ~/gg/$f.gguf ] && echo ~/gg/$f.gguf; done) \
    --ref $MODEL --vs Q3_K_S,Q3_K_M --calib $CALIB --nsamples $NS --text champ --chunks 8 --gsm ${BENCH_GSM:-250} \
    --parallel 64 --threads 4 --cuda --force -o ~/bench-gsm >~/logs/gsm-bench.log 2>&1
  log "GSM bench rc=$?"
  cp ~/bench-gsm/report.json ~/results/bench-report.json 2>/dev/null; cp ~/bench-gsm/report.md ~/results/bench-report.md 2>/dev/null
}
# Issue 11 at the synthetic Qwen3-4B / 8B shapes (made by the background job above), on the GPU and CPUs given
shapes_bench() {  # shapes_bench GPU "taskset -c CPUS"
  if [ "$DEV" != cuda ] || [ $(( $(date +%s) - T_START )) -ge ${SHAPES_BY:-1440} ]; then log "shapes skipped (budget)"; return; fi
  for _ in $(seq 60); do [ -f ~/logs/shapes.made ] && break; sleep 10; done
  CUDA_VISIBLE_DEVICES=$1 CUDA_MPS_PIPE_DIRECTORY=$HOME/no-mps $2 bash scripts/device_shapes.sh bench ~/shapes \
    "$(llama_bin)" ~/results/shapes >>~/logs/shapes.log 2>&1
  log "shapes benched on GPU $1: $(grep -c . ~/results/shapes/batched-bench-shapes.jsonl 2>/dev/null) batched rows"
}
wait $L1 $L3 $L4 $L5 $L6 $L7
log "quantize lanes done"
# SPEED_ONLY: the RTN lane ends within a minute, long before compare_gguf has made the F16, stock files and F16
# log-probs that the speed stage times and compares against
[ "${SPEED_ONLY:-0}" = 1 ] && wait $P
if [ "$NGPU" -ge 2 ]; then  # GPU 0 is free once the lanes are: speeds, GSM and shapes there while compare_gguf measures
  # on the last GPU (the fourteenth run's shapes, made by minute 19, waited for compare_gguf and were never measured)
  log "speed stage, shapes and GSM bench on GPU 0 beside compare_gguf on GPU $(( NGPU - 1 ))"
  (speed; shapes_bench 0 "$SPEED_CPUS"; gsm_bench) &
  S0=$!
  wait $P
  mps_off
  wait $S0
  touch ~/logs/gpu.idle  # device_cuda_tbo.sh's perf part (on CUDA0) starts now
else
  wait $P
  mps_off  # speeds are measured without MPS, one process on the GPU
  (speed; shapes_bench 0 "$SPEED_CPUS"; gsm_bench)
  touch ~/logs/gpu.idle
fi
cp ~/gg/*.json ~/results/ 2>/dev/null
log "all done"
touch ~/logs/job.done
