# Steps shared by the GPU-machine scripts (device_qwen15.sh, device_speed_quick.sh), sourced: the carried wheels, the
# repo's editable install, and the patched llama.cpp's CUDA build in the background.
export PYTHONPATH=/tmp/site QUANT2GGUF_CACHE=$HOME/q2gcache
mkdir -p ~/logs

# device_install WHEELS REPO: the carried wheels (folder WHEELS) into /tmp/site, then REPO installed editable
device_install() {
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$1"/*.whl || return 1
  (cd "$2" && python3 -m pip install -q --no-deps --no-build-isolation -e .) >~/logs/install.log 2>&1 \
    || { tail ~/logs/install.log; return 1; }
}

# device_build REPO TARBALL JOBS: unpack and patch the pinned llama.cpp from TARBALL (an absolute path), then start its
# CUDA build with JOBS compile jobs in the background (setsid: it outlives the call); ~/logs/build.done when it ends
device_build() {
  rm -f ~/logs/build.done
  (cd "$1" && python3 -c "from quant2gguf import llama; print('source:', llama.source_dir('$2'))") || return 1
  (cd "$1" && setsid nohup bash -c "python3 -m quant2gguf llama build --cuda -j $3 >~/logs/llama-build.log 2>&1; \
      touch ~/logs/build.done" </dev/null >/dev/null 2>&1 &)
  echo "CUDA build started"
}

# device_bin: the CUDA build's bin folder (empty when there is none yet)
device_bin() { ls -d "$QUANT2GGUF_CACHE"/llama/build-*-cuda-*/bin 2>/dev/null | head -1; }
