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
