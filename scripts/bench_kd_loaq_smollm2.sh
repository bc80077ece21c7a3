set -x  # SmolLM2 W3G64: GPTQ, LoaQ and KD from each, evaluated on news and CHAMP (docs/BENCHMARKS.md). usage: scripts/bench_kd_loaq_smollm2.sh [WORKDIR]

W=${1:-out/kd-loaq}; mkdir -p $W
for m in gptq loaq; do
  /usr/bin/time -f "$m %e s" quant2gguf quantize smollm2 -o $W/$m --method $m -g 64 --nsamples 16 --seqlen 512 --device cpu >/dev/null 2>>$W/err.log
done
for m in gptq loaq; do
  /usr/bin/time -f "kd-$m %e s" quant2gguf quantize smollm2 -o $W/kd-$m --method kd --init $W/$m -g 64 --seqlen 256 --steps 40 --batch 2 --eval-every 20 --heldout 4 --device cpu >/dev/null 2>>$W/err.log
done
for c in gptq loaq kd-gptq kd-loaq; do
  for t in news champ; do
    quant2gguf eval $W/$c --ref smollm2 --text $t --ntokens 4096 --seqlen 512 --device cpu --json $W/eval-$c-$t.json >/dev/null 2>>$W/err.log
  done
done
echo done
