#!/usr/bin/env bash
# LoaQ's correction share (--alpha) on SmolLM2 W3G64, CPU: GPTQ vs LoaQ at alpha 1 (the paper's closed form) and
# 0.25 (GPTAQ's released default for the same asymmetric term), calibrated on news+code, judged by PyTorch KLD against
# the FP model on the news and code eval splits and on CHAMP (in no calibration). GPTQ settings as on qwen15 (damp 0.1,
# act-order). usage: scripts/bench_loaq_alpha.sh [WORKDIR] [NSAMPLES]   (docs/BENCHMARKS.md)
set -u
W=${1:-out/loaq-alpha} NS=${2:-32}
mkdir -p "$W"
C="--calib news+code --nsamples $NS -g 64 --damp 0.1 --act-order --device cpu"
q() { local t0=$(date +%s); quant2gguf quantize smollm2 -o "$W/$1" "${@:2}" $C >/dev/null 2>>"$W/err.log" || exit 1
      echo "$1 $(( $(date +%s) - t0 )) s"; }
[ -d "$W/gptq" ] || q gptq --method gptq
[ -d "$W/loaq-a1" ] || q loaq-a1 --method loaq --alpha 1
[ -d "$W/loaq-a025" ] || q loaq-a025 --method loaq --alpha 0.25
for c in gptq loaq-a1 loaq-a025; do
  for t in news code champ; do
    [ -f "$W/eval-$c-$t.json" ] || quant2gguf eval "$W/$c" --ref smollm2 --text $t --ntokens 4096 --seqlen 512 --device cpu \
      --json "$W/eval-$c-$t.json" >/dev/null 2>>"$W/err.log" || exit 1
  done
done
python3 - "$W" <<'P'
import json, sys
w = sys.argv[1]
print("| file | news KLD | code KLD | CHAMP KLD (held out) | news PPL |")
print("|---|---|---|---|---|")
for c in ("gptq", "loaq-a1", "loaq-a025"):
    r = {t: json.load(open(f"{w}/eval-{c}-{t}.json")) for t in ("news", "code", "champ")}
    print(f"| {c} | {r['news']['kld']:.4f} | {r['code']['kld']:.4f} | {r['champ']['kld']:.4f} | {r['news']['ppl']:.2f} |")
P
