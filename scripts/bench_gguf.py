"""An exported checkpoint in llama.cpp against stock types of the same model, in one run.

usage: python scripts/bench_gguf.py CKPT [--model qwen05] [--types Q4_0 Q3_K_S Q3_K_S+imat] [--threads 2]
                                        [--chunks 8] [--workdir out/gguf] [--out results.json] [--cuda]
Steps: convert CKPT (ours); FP16 GGUF of the source model with llama.cpp's converter; stock types
by llama-quantize of that F16 file (TYPE+imat: with an importance matrix from the checkpoint's
calibration set, quant2gguf.compat); llama-perplexity on the held-out news eval text
(ctx 512, first --chunks chunks) with KL divergence against the F16 logits; llama-bench tg128 on
--threads threads (--cuda: the CUDA build, all layers on the GPU); and `quant2gguf eval` (PyTorch) perplexity of CKPT on the same text for the
llama.cpp-vs-PyTorch check (different scoring windows: llama.cpp scores each chunk's second half).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from quant2gguf import checkpoint, llama, runner
from quant2gguf.data import eval_text_file
from quant2gguf.export import convert
from quant2gguf.fixtures import resolve_model


def _machine(a) -> str:
    if a.cuda:
        import torch
        return f"{torch.cuda.get_device_name(0)} (llama.cpp CUDA, -ngl 99)"
    return f"CPU {platform.machine()}, {a.threads} threads"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--model", default=None, help="source model (default: the checkpoint's)")
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q3_K_S"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--outtype", default="f16", help="our file's embedding/lm_head type")
    ap.add_argument("--workdir", default="out/gguf")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cuda", action="store_true", help="llama.cpp's CUDA build, -ngl 99 (GPU machine)")
    a = ap.parse_args()
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    man = checkpoint.read_manifest(a.ckpt)
    model = a.model or man["source_model"]
    llama.build(cuda=a.cuda)
    text = eval_text_file("news")
    f16 = wd / f"{Path(model).name}-F16.gguf"
    if not f16.exists():
        runner.fp16_gguf(resolve_model(model), f16)
    ours = wd / f"{Path(a.ckpt).name}-{a.outtype}.gguf"
    info = convert(a.ckpt, ours, outtype=a.outtype) if not ours.exists() else {}
    files = {"F16": f16, f"ours {man['method']} W{man['bits']}G{man['group_size']}": ours}
    imat = wd / f"{Path(model).name}.imatrix.gguf"
    for t in a.types:  # TYPE+imat: llama-quantize with our importance matrix (quant2gguf compat)
        p = wd / f"{Path(model).name}-{t}.gguf"
        stock, use_imat = t.removesuffix("+imat"), t.endswith("+imat")
        if not p.exists():
            if use_imat and not imat.exists():
                from quant2gguf.compat import make_imatrix
                cal = man.get("calibration", {})
                make_imatrix(model, imat, cal.get("source", "news"), cal.get("nsamples", 32), cal.get("seqlen", 512))
            runner.quantize_stock(f16, p, stock, imatrix=imat if use_imat else None,
                                  threads=os.cpu_count() or 2, cuda=a.cuda)
        files[t] = p
    base = wd / "f16.logits"
    rows = []
    for name, path in files.items():
        t0 = time.time()
        if name == "F16":
            ppl = runner.perplexity(path, text, ctx=512, chunks=a.chunks, threads=a.threads, save_logits=base,
                                    cuda=a.cuda)
        else:
            ppl = runner.perplexity(path, text, ctx=512, chunks=a.chunks, threads=a.threads, kld_base=base,
                                    cuda=a.cuda)
        b = runner.bench(path, threads=a.threads, n_gen=128, reps=a.reps, cuda=a.cuda)
        rows.append({"file": name, "path": str(path), "mib": path.stat().st_size / 2**20, **ppl,
                     "tg128": b.get("tg_tok_s"), "tg128_std": b["tests"].get("tg128", {}).get("std"), "seconds": time.time() - t0})
        print(json.dumps(rows[-1]), flush=True)
    from quant2gguf.evaluate import evaluate
    torch_eval = evaluate(a.ckpt, ref=model, ntokens=512 * a.chunks, seqlen=512, device="cuda" if a.cuda else "cpu")
    out = {"date": time.strftime("%Y-%m-%d"), "machine": _machine(a),
           "ckpt": a.ckpt, "convert": info, "rows": rows,
           "torch": {k: torch_eval.get(k) for k in ("ppl", "ref_ppl", "kld", "top1", "tokens")}}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"\n{out['date']}, {out['machine']}; news eval split, ctx 512, {a.chunks} chunks; KLD vs F16\n")
    print("| file | MiB | PPL | KLD | same top-1 % | tg128 tok/s |\n|---|---|---|---|---|---|")
    for r in rows:
        kld = f"{r['kld']:.4f}" if r.get("kld") is not None else "–"
        top = f"{r['same_top_p_pct']:.1f}" if r.get("same_top_p_pct") is not None else "–"
        tg = f"{r['tg128']:.1f}" if r.get("tg128") else "–"
        print(f"| {r['file']} | {r['mib']:.1f} | {r['ppl']:.3f} | {kld} | {top} | {tg} |")
    print(f"\nPyTorch eval of the checkpoint (first {a.chunks} x 512 tokens, all positions): ppl "
          f"{torch_eval['ppl']:.3f} (FP {torch_eval.get('ref_ppl')}), KLD {torch_eval.get('kld')}")


if __name__ == "__main__":
    main()
