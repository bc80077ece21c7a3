# Sourced by the device scripts that run the package on real fixtures (device_quality.sh,
# device_real.sh): the machine has no PyPI, so the fixture cache and missing wheels come from what
# earlier calls of the same warm machine staged under ~/stage (device-bundle.sh chunks, wheels for
# datasets, dill, multiprocess, xxhash, gguf; news text and GSM templates) or from the carried
# .device/data. Sets REPO, OUT, QUANT2GGUF_CACHE, PYTHONPATH; installs the package (no deps).
REPO=$PWD
OUT=${OUT:-$REPO/device_out}
mkdir -p "$OUT"
export QUANT2GGUF_CACHE=$HOME/q2gcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$QUANT2GGUF_CACHE/gguf" "$QUANT2GGUF_CACHE/data"
for d in .device/data ~/stage/data; do
  [ -d "$d" ] && cp -rn "$d"/* "$QUANT2GGUF_CACHE/data/" 2>/dev/null
done
for m in qwen05 smollm2; do  # model chunks (sha256 in .device/model) -> one file
  if [ ! -f ~/stage/$m.gguf ] && ls ~/stage/$m.part* >/dev/null 2>&1; then
    cat ~/stage/$m.part0* > ~/stage/$m.gguf
  fi
done
[ -f ~/stage/qwen05.gguf ] && ln -sf ~/stage/qwen05.gguf "$QUANT2GGUF_CACHE/gguf/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
[ -f ~/stage/smollm2.gguf ] && ln -sf ~/stage/smollm2.gguf "$QUANT2GGUF_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site ~/stage/whl/*.whl
export PYTHONPATH=/tmp/site
python3 -c "import quant2gguf.kernels" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
