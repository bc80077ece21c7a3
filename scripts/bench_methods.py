"""FP vs quantization methods on real models: ppl, KLD, top-1, GSM accuracy, wall time.

usage: python scripts/bench_methods.py [--models smollm2:64 qwen05:128] [--methods rtn gptq]
                                       [--gsm 50] [--ntokens 8192] [--workdir out/bench] [--out results.json]
Each MODEL:G pair is quantized at W3G<G> with every method (calibration: news calib split,
32 x 512 tokens), then evaluated on the held-out news eval split against the FP model.
Prints a markdown table for docs/BENCHMARKS.md and writes the raw JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from quant2gguf.evaluate import evaluate
from quant2gguf.pipeline import quantize_model


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2:64", "qwen05:128"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--gsm", type=int, default=0)
    ap.add_argument("--ntokens", type=int, default=8192)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--workdir", default="out/bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-fp", action="store_true", help="do not evaluate the FP model (an earlier run did)")
    a = ap.parse_args()
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    rows = []
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "args": vars(a), "rows": rows}

    def record(row):
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "gsm_samples"}), flush=True)
        if a.out:  # after every row: a run cut short still leaves its numbers
            Path(a.out).write_text(json.dumps(out, indent=1))

    for spec in a.models:
        model, g = spec.split(":")
        g = int(g)
        t = time.time()
        if not a.skip_fp:
            fp = evaluate(model, ref=None, ntokens=a.ntokens, gsm=a.gsm, device=a.device)
            record({**fp, "model": model, "method": "fp", "group": None, "quant_s": 0.0, "eval_s": time.time() - t})
        for spec_m in a.methods:  # METHOD or METHOD+calib (e.g. laquant+traces)
            method, _, calib = spec_m.partition("+")
            ck = wd / f"{model}-{spec_m}-w3g{g}"
            t = time.time()
            if not ck.exists():
                quantize_model(model, ck, method=method, bits=3, group_size=g, nsamples=a.nsamples,
                               seqlen=a.seqlen, device=a.device, calib=calib or "news")
            tq = time.time() - t
            res = evaluate(str(ck), ref=model, ntokens=a.ntokens, gsm=a.gsm, device=a.device)
            slots = json.loads((ck / "manifest.json").read_text()).get("slots", 0)
            bpw = 3 + 32 / g + slots * 24 / g  # codes + fp16 d, m + (fp16 value + uint8 index) per slot
            record({**res, "model": model, "checkpoint_path": str(ck), "method": spec_m, "group": g, "bpw": bpw, "quant_s": tq,
                    "eval_s": time.time() - t - tq})
    print(f"\nmachine: {out['machine']}, date {out['date']}, eval: news eval split, {a.ntokens} tokens; GSM N={a.gsm}\n")
    print("| model | method | W/G | bpw | ppl | KLD | top-1 % | GSM acc | quantize s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "–")  # noqa: E731
        wg = "FP" if r["method"] == "fp" else f"W3G{r['group']}"
        top1 = f"{100 * r['top1']:.1f}" if r.get("top1") is not None else "–"
        print(f"| {r['model']} | {r['method']} | {wg} | {f('bpw', '{:.3f}')} | {f('ppl', '{:.2f}')} | {f('kld', '{:.4f}')} | {top1} "
              f"| {f('gsm_acc', '{:.2f}')} | {r['quant_s']:.0f} | {r['eval_s']:.0f} |")


if __name__ == "__main__":
    main()
