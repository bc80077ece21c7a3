"""Our GPTQ / RTN on a stock llama.cpp grid (--target) against llama-quantize of the same type with an
importance matrix from the same calibration tokens (issue 10), by held-out KLD against the F16 file.

usage: python scripts/compare_stock_target.py [--model smollm2] [--target q4_0] [--calib news+code]
        [--nsamples 32] [--texts news code champ] [--chunks N] [--variants gptq rtn gptq-d10 gptq-ao]
        [--workdir out/stock-target] [--out results.json] [--threads 2]

Rows: F16 (llama.cpp's converter), TYPE+imat (llama-quantize with quant2gguf.compat.make_imatrix
over --nsamples x 512 tokens of the --calib source's calib split), plain TYPE (llama-quantize, no
imatrix), and each variant: `quantize --method M --target T --calib C --nsamples N` (variants:
gptq, rtn, gptq-d10 = --damp 0.1, gptq-ao = --act-order, gptq-d10-ao) converted with
--embd-type auto:TYPE, so token_embd/output get the types llama-quantize gives them in the stock
file. Every file: bytes, MiB, ggml type of every tensor (checked equal to the stock file's),
llama-perplexity PPL / KLD / same top-1 against the F16 file on each --texts source's eval split
(ctx 512, --chunks chunks or all). Everything is cached in --workdir; reruns only add what is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

from quant2gguf import checkpoint, runner
from quant2gguf.cache import atomic_path
from quant2gguf.data import eval_text_file
from quant2gguf.export import convert, read_gguf
from quant2gguf.fixtures import resolve_model
from quant2gguf.pipeline import quantize_model

VARIANTS = {  # name -> quantize_model options (the CLI flags in the comment)
    "gptq": {"method": "gptq"},  # --method gptq
    "rtn": {"method": "rtn"},  # --method rtn
    "gptq-d10": {"method": "gptq", "damp": 0.1},  # --method gptq --damp 0.1
    "gptq-ao": {"method": "gptq", "act_order": True},  # --method gptq --act-order
    "gptq-d10-ao": {"method": "gptq", "damp": 0.1, "act_order": True},
}


def _say(msg: str) -> None:
    print(f"[stock-target] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in read_gguf(path).tensors}


def cli_line(model, variant, target, calib, nsamples, ck) -> str:
    o = VARIANTS[variant]
    flags = [f"--method {o['method']}", f"--target {target}", f"--calib {calib}", f"--nsamples {nsamples}",
             "--seqlen 512", "--device cpu"]
    if o.get("damp") is not None:
        flags.append(f"--damp {o['damp']}")
    if o.get("act_order"):
        flags.append("--act-order")
    return f"quant2gguf quantize {model} -o {ck} " + " ".join(flags)


def build_files(wd: Path, model: str = "smollm2", target: str = "q4_0", calib: str = "news+code",
                nsamples: int = 32, variants=("gptq", "rtn"), threads: int = 2, plain: bool = True) -> list[dict]:
    """Make (or reuse) every file: [{"file", "path", "cmd"}], F16 first."""
    from quant2gguf.compat import make_imatrix
    wd.mkdir(parents=True, exist_ok=True)
    stock = target.upper()
    f16 = wd / f"{model}-F16.gguf"
    files = [{"file": "F16", "path": f16, "cmd": f"llama.cpp convert_hf_to_gguf {resolve_model(model)} --outtype f16"}]
    if not f16.exists():
        _say("F16 GGUF")
        runner.fp16_gguf(resolve_model(model), f16)
    imat = wd / f"{model}-{calib}-{nsamples}x512.imatrix.gguf"
    if not imat.exists():
        _say(f"imatrix: {nsamples} x 512 tokens of {calib}")
        make_imatrix(model, imat, calib, nsamples, 512, device="cpu")
    p = wd / f"{model}-{stock}-imat.gguf"
    if not p.exists():
        _say(f"llama-quantize {stock} + imatrix")
        runner.quantize_stock(f16, p, stock, imatrix=imat, threads=threads)
    files.append({"file": f"{stock}+imat (llama-quantize)", "path": p,
                  "cmd": f"quant2gguf.compat.make_imatrix({model!r}, IMAT, {calib!r}, {nsamples}, 512); "
                         f"llama-quantize --imatrix IMAT F16.gguf OUT {stock}"})
    # llama-quantize's Q4_0/Q5_0 mix with an imatrix stores the first n_layer/8 ffn_down as Q4_1/Q5_1
    # (a bigger file); --pure with the stock file's token_embd/output types is the same types as ours
    st = tensor_types(files[1]["path"])
    extra = []
    for name, flag in (("token_embd.weight", "--token-embedding-type"), ("output.weight", "--output-tensor-type")):
        if name in st:
            extra += [flag, st[name].lower()]
    p = wd / f"{model}-{stock}-imat-pure.gguf"
    if not p.exists():
        with atomic_path(p) as tmp:
            runner._run([runner._tool("llama-quantize"), "--pure", *extra, "--imatrix", imat, f16, tmp, stock, threads])
    files.append({"file": f"{stock}+imat --pure (llama-quantize)", "path": p,
                  "cmd": " ".join(["llama-quantize --pure", *extra, f"--imatrix IMAT F16.gguf OUT {stock}"])})
    if plain:
        p = wd / f"{model}-{stock}.gguf"
        if not p.exists():
            runner.quantize_stock(f16, p, stock, threads=threads)
        files.append({"file": f"{stock} (llama-quantize, no imatrix)", "path": p,
                      "cmd": f"llama-quantize F16.gguf OUT {stock}"})
    for v in variants:
        ck = wd / f"ck-{v}"
        if not checkpoint.is_checkpoint(ck):
            _say(f"quantize {v}")
            t0 = time.time()
            quantize_model(model, ck, calib=calib, nsamples=nsamples, seqlen=512, device="cpu", target=target,
                           **VARIANTS[v])
            _say(f"quantize {v}: {time.time() - t0:.0f} s")
        p = wd / f"{model}-{v}-{target}.gguf"
        if not p.exists():
            convert(ck, p, outtype="f16", embd_type=f"auto:{stock}", threads=threads)
        files.append({"file": f"ours {v} --target {target}", "path": p,
                      "cmd": cli_line(model, v, target, calib, nsamples, ck.name)
                      + f"; quant2gguf convert {ck.name} -o OUT --embd-type auto:{stock}"})
    return files


def measure(files: list[dict], texts=("news", "code"), chunks: int | None = None, threads: int = 2,
            wd: Path | None = None, done: dict | None = None) -> list[dict]:
    """KLD / PPL / top-1 of every file against files[0] (the F16 file) on each text's eval split.
    Stock files first (files[1] is the TYPE+imat one the others' tensor types are compared with).
    done: file label -> a row measured before with the same texts and chunks (not run again)."""
    wd = wd or files[0]["path"].parent
    bases = {t: wd / f"f16-{t}-c{chunks or 'all'}.logits" for t in texts}
    stock_types = tensor_types(files[1]["path"])
    rows = []
    for f in files:
        path = f["path"]
        types = tensor_types(path)
        row = {"file": f["file"], "path": path.name, "bytes": path.stat().st_size,
               "mib": round(path.stat().st_size / 2**20, 3), "cmd": f["cmd"],
               "tensor_types": dict(Counter(types.values()))}
        if f["file"] != "F16":  # tensor -> [type in the stock TYPE+imat file, type here] where they differ
            row["types_unlike_stock_imat"] = {n: [stock_types.get(n), t] for n, t in types.items()
                                              if stock_types.get(n) != t}
            row["types"] = types  # dropped from the saved JSON
        if done and f["file"] in done and f["file"] != "F16":
            rows.append({**done[f["file"]], **{k: v for k, v in row.items() if k not in texts}})
            continue
        for t in texts:
            if f["file"] == "F16":
                if not bases[t].exists():
                    runner.perplexity(path, eval_text_file(t), chunks=chunks, save_logits=bases[t], threads=threads)
                r = {"ppl": runner.ppl_from_logits_file(bases[t])}
                r["n_chunks"] = runner.read_logits_file(bases[t])["n_chunk"]
            else:
                r = runner.perplexity(path, None, chunks=chunks, kld_base=bases[t], threads=threads)
            row[t] = {k: r.get(k) for k in ("ppl", "kld", "kld_err", "kld_p99", "same_top_p_pct", "n_chunks")}
        _say(json.dumps({k: v for k, v in row.items() if k not in ("cmd", "path", "types")}))
        rows.append(row)
    return rows


def table(rows, texts) -> str:
    head = "| file | bytes | MiB | " + " | ".join(f"{t} KLD | {t} top-1 % | {t} PPL" for t in texts) + " |"
    out = [head, "|" + "---|" * (3 + 3 * len(texts))]
    for r in rows:
        cells = [r["file"], str(r["bytes"]), f"{r['mib']:.2f}"]
        for t in texts:
            m = r[t]
            cells += [f"{m['kld']:.5f}" if m.get("kld") is not None else "–",
                      f"{m['same_top_p_pct']:.2f}" if m.get("same_top_p_pct") is not None else "–", f"{m['ppl']:.3f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--target", default="q4_0")
    ap.add_argument("--calib", default="news+code")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--texts", nargs="+", default=["news", "code", "champ"])
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=["gptq", "rtn"], choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-plain", action="store_true", help="skip plain TYPE (llama-quantize without an imatrix)")
    ap.add_argument("--workdir", default="out/stock-target")
    ap.add_argument("--reuse", default=None, help="a results JSON of this script (same texts, chunks): its rows are not measured again")
    ap.add_argument("--out", default=None, help="JSON results (default WORKDIR/results.json)")
    a = ap.parse_args()
    wd = Path(a.workdir)
    t0 = time.time()
    files = build_files(wd, a.model, a.target, a.calib, a.nsamples, a.variants, a.threads, plain=not a.no_plain)
    done = {r["file"]: r for r in json.loads(Path(a.reuse).read_text())["rows"]} if a.reuse else None
    rows = measure(files, a.texts, a.chunks, a.threads, wd, done)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"this CPU, {os.cpu_count()} cores",
           "cpu": platform.processor() or platform.machine(), "model": a.model, "target": a.target,
           "calib": f"{a.nsamples} x 512 tokens of the {a.calib} calib split (imatrix and GPTQ alike)",
           "eval": {t: f"{t} eval split, ctx 512, {a.chunks or 'all'} chunks (llama-perplexity, KLD vs F16)" for t in a.texts},
           "command": " ".join(["python", *sys.argv]), "wall_s": round(time.time() - t0), "rows": [{k: v for k, v in r.items() if k != "types"} for r in rows]}
    out = Path(a.out) if a.out else wd / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(rows, a.texts))


if __name__ == "__main__":
    main()
