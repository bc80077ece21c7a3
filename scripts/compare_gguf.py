"""Our checkpoints as GGUF files against llama.cpp's stock types of the same model, in one run.

usage: python scripts/compare_gguf.py --model qwen15 --ckpts CK1 CK2 ... --types IQ3_S+imat Q3_K_M+imat Q3_G64
        [--texts news champ code] [--calib news] [--embd-type auto] [--workdir DIR] [--out results.json] [--cuda] [--wait 900]

Stock rows: llama-quantize of the model's F16 GGUF (TYPE+imat: with an importance matrix from
--imat-nsamples x 512 tokens of the --calib source's calib split, quant2gguf.compat.make_imatrix; a
plain TYPE of ours, Q3_G64/Q3_G128, is llama-quantize's C RTN reference). Our rows: `convert`
with --embd-type for token_embd/output (the rule in docs/GGUF.md). Every file: whole-file MiB and
bpw over all parameters, llama-perplexity PPL and KLD against the F16 file (mean, p99, same top-1)
on the held-out eval split of each --texts source (ctx 512, all chunks), tg128 with -ngl 99.
Checkpoints that do not exist yet are waited for (--wait seconds in all), so this can run beside the
quantization jobs and start with the stock files. Writes JSON, a markdown table and a size-KLD plot.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from quant2gguf import checkpoint, llama, runner
from quant2gguf.data import eval_text_file
from quant2gguf.export import convert
from quant2gguf.fixtures import resolve_model


def _say(msg: str) -> None:
    print(f"[compare] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def _label(ck: Path) -> str:
    man = checkpoint.read_manifest(ck)
    init = man.get("init", {})
    via = f"{init.get('method')}→" if man["method"] == "kd" and init else ""
    grid = man.get("target") or f"W{man['bits']}G{man['group_size']}"  # a stock target names its type
    return f"ours {ck.name}: {via}{man['method']} {grid}"


def _measure(name, path, texts, bases, wd, a, params) -> dict:
    """texts: {label: source}; a row holds one entry per label."""
    row = {"file": name, "path": str(path), "mib": path.stat().st_size / 2**20,
           "bpw": 8 * path.stat().st_size / params if params else None}
    for src, source in texts.items():
        if name == "F16":
            r = runner.perplexity(path, eval_text_file(source), ctx=512, save_logits=bases[src], cuda=a.cuda,
                                  threads=a.threads)
        else:
            r = runner.perplexity(path, None, ctx=512, kld_base=bases[src], cuda=a.cuda, threads=a.threads)
        row[src] = {k: r.get(k) for k in ("ppl", "kld", "kld_p99", "same_top_p_pct", "n_chunks")}
    try:
        b = runner.bench(path, threads=a.threads, n_gen=128, reps=2, cuda=a.cuda)
        row["tg128"] = b.get("tg_tok_s")
    except RuntimeError as e:
        row["tg128_error"] = str(e)[:200]
    _say(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'path'})}")
    return row


def _table(rows, texts) -> str:
    head = "| file | MiB | bpw | " + " | ".join(f"{t} KLD | {t} p99 | {t} top-1 % | {t} PPL" for t in texts) + " | tg128 |"
    lines = [head, "|" + "---|" * (3 + 4 * len(texts) + 1)]
    for r in sorted(rows, key=lambda r: r["mib"]):
        cells = [r["file"], f"{r['mib']:.0f}", f"{r['bpw']:.2f}" if r.get("bpw") else "–"]
        for t in texts:
            m = r.get(t, {})
            f = lambda k, fmt: fmt.format(m[k]) if m.get(k) is not None else "–"  # noqa: E731
            cells += [f("kld", "{:.4f}"), f("kld_p99", "{:.3f}"), f("same_top_p_pct", "{:.1f}"), f("ppl", "{:.3f}")]
        cells.append(f"{r['tg128']:.0f}" if r.get("tg128") else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows, text, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plot_results import size_kld_panel  # scripts/ is on sys.path when this runs as a script
    fig, ax = plt.subplots(figsize=(7, 4.5))
    size_kld_panel(ax, rows, text)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen15")
    ap.add_argument("--ckpts", nargs="*", default=[])
    ap.add_argument("--types", nargs="*", default=["IQ3_S+imat", "Q3_K_M+imat"])
    ap.add_argument("--texts", nargs="+", default=["news", "champ", "code"],
                    help="eval sources (their eval splits); LABEL=FILE.jsonl names a data file's column")
    ap.add_argument("--calib", default="news", help="the importance matrix's source (the checkpoints' calibration source)")
    ap.add_argument("--embd-type", default="auto")
    ap.add_argument("--imat-nsamples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--workdir", default="out/compare")
    ap.add_argument("--out", default="out/compare/results.json")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--tokenizer-pre", default=None, help="for tokenizers llama.cpp's converter cannot hash (tiny test models: gpt-2)")
    ap.add_argument("--wait", type=int, default=900, help="seconds (from when the checkpoints are first looked for) to wait for them to appear")
    a = ap.parse_args()
    sources = dict(t.split("=", 1) if "=" in t else (t, t) for t in a.texts)
    a.texts = list(sources)  # labels: columns, logits files and plot names
    wd, out = Path(a.workdir), Path(a.out)
    wd.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    llama.build(cuda=a.cuda)
    folder = resolve_model(a.model)
    name = Path(str(a.model)).name
    f16 = wd / f"{name}-F16.gguf"
    if not f16.exists():
        runner.fp16_gguf(folder, f16, tokenizer_pre=a.tokenizer_pre)
    params = None
    rows, bases = [], {t: wd / f"f16-{t}.logits" for t in a.texts}
    imat = wd / f"{name}.imatrix.gguf"

    def save():
        res = {"date": time.strftime("%Y-%m-%d"), "model": a.model, "cuda": a.cuda, "texts": a.texts, "sources": sources,
               "embd_type": a.embd_type, "imatrix": f"{a.imat_nsamples} x 512 tokens of the {a.calib} calib split",
               "rows": rows}
        out.write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(_table(rows, a.texts) + "\n")
        for t in a.texts:
            _plot(rows, t, out.with_name(f"{out.stem}-{t}.png"))

    rows.append(_measure("F16", f16, sources, bases, wd, a, params))
    import gguf
    params = sum(int(t.n_elements) for t in gguf.GGUFReader(f16).tensors)
    rows[0]["bpw"] = 8 * f16.stat().st_size / params
    save()
    for t in a.types:
        p = wd / f"{name}-{t}.gguf"
        stock, use_imat = t.removesuffix("+imat"), t.endswith("+imat")
        if not p.exists():
            if use_imat and not imat.exists():
                from quant2gguf.compat import make_imatrix
                make_imatrix(a.model, imat, a.calib, a.imat_nsamples, 512, device="cuda" if a.cuda else "cpu")
            runner.quantize_stock(f16, p, stock, imatrix=imat if use_imat else None,
                                  threads=os.cpu_count() or 2, cuda=a.cuda)
        rows.append(_measure(t + (" (C RTN, ours)" if stock.startswith("Q3_G") else ""), p, sources, bases, wd, a, params))
        save()
    t0 = time.time()  # one deadline for all: a lane that died must not hold the rest (and the job) per checkpoint
    for ck in map(Path, a.ckpts):
        while not checkpoint.is_checkpoint(ck) and time.time() - t0 < a.wait:
            time.sleep(10)
        if not checkpoint.is_checkpoint(ck):
            _say(f"{ck}: not there after {a.wait} s, skipped")
            continue
        p = wd / f"{ck.name}.gguf"
        if not p.exists():
            # a stock-target checkpoint's token_embd/output as llama-quantize gives them at that type's _S
            # recipe (Q3_K -> Q3_K_S), or at the recipe itself (Q3_K_M): as in the stock file it is compared with
            target = checkpoint.read_manifest(ck).get("target")
            embd = f"auto:{target}{'_S' if target in ('Q3_K', 'Q4_K', 'Q5_K') else ''}" \
                if target and a.embd_type == "auto" else a.embd_type
            info = convert(ck, p, outtype="f16", embd_type=embd, threads=os.cpu_count() or 2,
                           tokenizer_pre=a.tokenizer_pre)
            _say(f"converted {ck.name}: {json.dumps(info)[:400]}")
        rows.append(_measure(_label(ck), p, sources, bases, wd, a, params))
        save()
    _say("done")


if __name__ == "__main__":
    main()
