"""Peak memory of a layer-wise quantize run with and without `--stream`, on a synthetic model of a
real shape (random bf16 weights, sharded safetensors like a hub checkpoint), each run in its own
process: peak RSS (and peak CUDA memory allocated with --device cuda), wall time, per-layer time.

usage: python scripts/stream_memory.py --shape 8b --layers 4 --method rtn gptq [--device cpu] \
           [--workdir DIR] [--out results.json]
       python scripts/stream_memory.py --plan 70b [--nsamples 128 --seqlen 512]   (estimate, no run)
       python scripts/stream_memory.py --shape tiny --method gptq laquant   (CPU smoke check, ~1.5 min)
Shapes: 8b (Llama-3-8B: hidden 4096, ffn 14336, 32/8 heads, vocab 128256), 70b (Llama-3-70B: 8192,
28672, 64/8), 1b (Llama-3.2-1B: 2048, 8192, 32/8), tiny (256, 768, 4/2, vocab 512: no real model;
it only checks that each method completes in both modes on a bf16 model, its memory figures mean
nothing). `--layers` builds fewer decoder layers than the real model (memory per layer is what is
measured; the whole-model figure grows with the layer count, the streamed one does not). The result
lists both and the extrapolation to the real layer count.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"tiny": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=512, real_layers=4),
          "1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256, real_layers=16),
          "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256, real_layers=32),
          "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                      vocab_size=128256, real_layers=80)}


def _tokenizer():
    """A 512-token byte-level BPE tokenizer built offline: calibration ids stay below 512."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. 12 + 30 = 42."] * 20,
                            trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build(shape: str, layers: int, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    s = {k: v for k, v in SHAPES[shape].items() if k != "real_layers"}
    cfg = LlamaConfig(**s, num_hidden_layers=layers, max_position_embeddings=4096,
                      tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    model.save_pretrained(folder, max_shard_size="2GB")
    _tokenizer().save_pretrained(folder)
    return folder


CHILD = """
import json, resource, sys, time, torch
from quant2gguf.pipeline import quantize_model
a = json.loads(sys.argv[1])
t0 = time.time()
quantize_model(a['model'], a['out'], method=a['method'], nsamples=a['nsamples'], seqlen=a['seqlen'],
               device=a['device'], group_size=128, calib='news', stream=a['stream'])
cuda = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
print('RESULT', json.dumps({'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                            'peak_cuda_gib': cuda, 'seconds': round(time.time() - t0, 1)}))
"""


def run(model: Path, out: Path, method: str, stream: bool, device: str, nsamples: int, seqlen: int) -> dict:
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    args = dict(model=str(model), out=str(out), method=method, stream=stream, device=device,
                nsamples=nsamples, seqlen=seqlen)
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"{method} stream={stream} failed:\n{p.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(line[7:])


def plan(shape: str, nsamples: int, seqlen: int, bits: int = 3, group_size: int = 128) -> dict:
    """Per-layer memory of a streamed layer-wise run, from the shapes (GiB): what --stream keeps
    resident besides the activations, GPTQ's largest Hessian group (calib.py runs one group of
    linears at a time: q/k/v, o, gate/up, down), LAQuant's fp32 latent weights with their gradient and
    two AdamW moments (and its lookahead layer l + 1, held in bf16 but computing in fp32 while the
    method runs), and the three activation streams (FP in, quantized in, FP out) in fp32. The result
    held in host RAM until the checkpoint is written: every layer's codes packed to `bits` bits
    (quantizer.pack_codes: ceil(K / 8) * bits bytes a row), plus fp16 d and m per group of `group_size`."""
    s = SHAPES[shape]
    h, f, nh, vocab = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["vocab_size"]
    kv = h // nh * s["num_key_value_heads"]
    p_layer = 2 * h * h + 2 * h * kv + 3 * h * f
    g = 2**30
    hess = max(3 * h * h, h * h, 2 * h * h, f * f) * 4 / g  # one group's Hessians, fp32
    acts = 3 * nsamples * seqlen * h * 4 / g
    return {"shape": shape, "layers": s["real_layers"], "params_per_layer_M": round(p_layer / 1e6, 1),
            "layer_bf16_gib": round(2 * p_layer / g, 2), "layer_fp32_compute_gib": round(4 * p_layer / g, 2),
            "gptq_largest_hessian_group_gib": round(hess, 2),
            "laquant_latent_grad_adam_gib": round(16 * p_layer / g, 2),
            "activations_3_streams_gib": round(acts, 2),
            "embeddings_bf16_gib": round(2 * vocab * h / g, 2),
            "codes_packed_all_layers_gib": round(p_layer * bits / 8 * s["real_layers"] / g, 1),
            "codes_and_scales_all_layers_gib": round(p_layer * (bits / 8 + 4 / group_size) * s["real_layers"] / g, 1),
            "codes_uint8_all_layers_gib_before_packing": round(p_layer * s["real_layers"] / g, 1),
            "gptq_peak_gpu_gib_est": round(4 * p_layer / g + 3 * hess + acts, 1),
            "laquant_peak_gpu_gib_est": round(4 * p_layer / g + 4 * p_layer / g + 16 * p_layer / g + acts, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--method", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--workdir", default="stream-memory")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plan", choices=list(SHAPES), help="print the per-layer memory estimate for a shape and exit")
    a = ap.parse_args()
    if a.plan:
        print(json.dumps(plan(a.plan, a.nsamples, a.seqlen), indent=1))
        return
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = build(a.shape, a.layers, wd / f"synth-{a.shape}-{a.layers}l")
    built = round(time.time() - t0, 1)
    real = SHAPES[a.shape]["real_layers"]
    rows = []
    for m in a.method:
        for stream in (False, True):
            r = {"method": m, "stream": stream, **run(model, wd / "ck", m, stream, a.device, a.nsamples, a.seqlen)}
            print(json.dumps(r), flush=True)
            rows.append(r)
    res = {"date": time.strftime("%Y-%m-%d"), "shape": a.shape, "layers": a.layers, "real_layers": real,
           "device": a.device, "calibration": f"{a.nsamples} x {a.seqlen} news tokens", "build_s": built,
           "shards_gib": round(sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30, 2), "rows": rows}
    # whole-model runs grow by one layer's share per layer where the model lives (RAM on the CPU,
    # VRAM on a GPU); streamed ones hold at most two layers. The share is clamped at 0: on a GPU the
    # streamed run's RAM can exceed the whole run's (shards read through host memory), and a negative
    # share extrapolated over 28 layers gave the sixth run's "0.3 GiB whole" nonsense.
    for m in a.method:
        w, s = (next(r for r in rows if r["method"] == m and r["stream"] is st) for st in (False, True))
        ext = {}
        for key in ("peak_rss_gib", "peak_cuda_gib"):
            if w.get(key) is None or s.get(key) is None:
                continue
            per_layer = max(w[key] - s[key], 0.0) / max(a.layers - 2, 1)
            ext[f"whole_{key}_at_real_layers"] = round(w[key] + per_layer * (real - a.layers), 1)
            ext[f"stream_{key}"] = round(s[key], 1)
        ext["seconds_per_layer_stream"] = round(s["seconds"] / a.layers, 1)
        res.setdefault("extrapolated", {})[m] = ext
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
