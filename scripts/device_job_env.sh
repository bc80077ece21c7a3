# Sourced by the GPU-machine jobs (scripts/qwen15_job.sh, scripts/qwen15_methods_job.sh): environment, caches, the
# staged fixture and data in place, log(), then MODEL's fixture assembled. MODEL defaults to qwen15.
export PYTHONPATH=/tmp/site QUANT2GGUF_CACHE=$HOME/q2gcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
C=$QUANT2GGUF_CACHE MODEL=${MODEL:-qwen15} CALIB=${CALIB:-news+code}
mkdir -p "$C/gguf" "$C/data" ~/bench ~/results ~/logs
cp -rn ~/stage/data/* "$C/data/" 2>/dev/null
[ -f "$C/data/champ_v0.json.xz" ] && [ ! -f "$C/data/champ_v0.json" ] && xz -dk "$C/data/champ_v0.json.xz"
[ -f ~/stage/qwen15.gguf ] && ln -sf ~/stage/qwen15.gguf "$C/gguf/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
log() { echo "[job] $(date +%T) $*"; }
log "fixture $MODEL (calib $CALIB)"
python3 -m quant2gguf fixtures fetch "$MODEL" >~/logs/fetch.log 2>&1 || { log "fetch failed"; tail ~/logs/fetch.log; touch ~/logs/job.done; exit 1; }
log "fixture ready"
# CUDA MPS for jobs that run several processes on the GPU at once: their kernels then share the SMs instead of
# time-slicing the whole GPU (the eleventh qwen15 run's five lanes: RTN 196 s, GPTQ 590 s for a 1.5B model, mostly
# launch-bound small kernels waiting their turn). Checked with one allocation; off again (and said so) if it fails.
mps_on() {
  command -v nvidia-cuda-mps-control >/dev/null || { log "MPS: no nvidia-cuda-mps-control, lanes time-slice the GPU"; return; }
  # a process already on the GPU without MPS would hold the MPS server back: let it finish (60 s at most)
  for _ in $(seq 12); do [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ] && break; sleep 5; done
  nvidia-cuda-mps-control -d 2>~/logs/mps.log
  if timeout 120 python3 -c "import torch; x = torch.empty(2**28, device='cuda'); x.fill_(1); print(x[:4].sum().item())" \
      >~/logs/mps-check.log 2>&1; then log "MPS on"
  else mps_off; log "MPS check failed, off: $(tail -1 ~/logs/mps-check.log)"; fi
}
mps_off() { command -v nvidia-cuda-mps-control >/dev/null && echo quit | timeout 30 nvidia-cuda-mps-control 2>/dev/null; }
