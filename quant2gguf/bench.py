"""`quant2gguf bench`: judge deployed GGUF files as a user would, against stock types made in the same run.

    bench(["ours.gguf"], ref="qwen05", vs=["Q4_0", "IQ3_S"], out="bench/")  -> the report as a dict

Every input is checked before the long work: the files are model GGUFs, the reference exists,
each stock type fits the model's dims (llama-quantize --dry-run names the tensors that would fall
back, and to what), the problem sets are large enough, the port is free and llama-server starts.
Then, each (file, phase) cached in OUT/cache (keyed by the file's path, size and mtime and the
phase's settings; answers also appended one by one), so an interrupted bench resumes:

  build    OUT/build/: the F16 GGUF of the reference (llama.cpp's converter), an importance matrix
           from the calibration split (compat.make_imatrix), each stock type by llama-quantize
  quality  llama-perplexity on held-out text: PPL; KLD against the F16 logits (mean, 99th
           percentile) and how often the top token is the same
  speed    llama-bench pp512 and tg128, and its peak resident memory
  gsm      greedy pass@1 on held-out GSM problems through llama-server's chat API (the chat
           template stored in each GGUF), with 95% Wilson intervals; the same problems for every
           file: the originals of templates 50-99 (never calibration data), then variants freshly
           rendered from those templates (seeded)
  long     the same on CHAMP eval problems with a numeric answer and a long generation budget

Report: OUT/report.md (one table), OUT/report.json, OUT/size_kld.png, accuracy.png, speed.png. A
phase that fails is recorded and the report is marked partial ("complete": false), never passed
off as complete.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

from . import data, llama, runner, server
from .cache import atomic_path

PHASES = ("quality", "speed", "gsm", "long")
PROMPTS = {  # one user message; the server wraps it in the model's own chat template
    "gsm": data.GSM_DEPLOY_PROMPT,  # traces (calibration) answer the same prompt
    "long": "{q}\nReason step by step. Write the final answer as a single number in \\boxed{{}}.",
}
_NUMERIC = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")  # CHAMP answers we can grade by value


# ------------------------------------------------------------------ problems and scoring --------

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, (mid - half) / (1 + z * z / n)), min(1.0, (mid + half) / (1 + z * z / n)))


def _problem(source: str, question: str, answer: str, **ids) -> dict:
    key = hashlib.sha256(question.encode()).hexdigest()[:12]
    return {"key": key, "source": source, **ids, "question": question, "answer": data._to_float(answer)}


def gsm_set(n: int, seed: int = 0) -> list[dict]:
    """n held-out GSM problems: the 50 originals of the eval templates (50-99), then n - 50
    variants rendered from the same templates with `seed`. Deterministic: same n, seed -> same list."""
    if n <= 0:
        return []
    probs = data.gsm_problems("eval")
    if n > len(probs):
        probs += data.gsm_variants(n - len(probs), seed, templates=data.GSM_EVAL_TEMPLATES)
    out = [_problem("gsm", p["question"], p["answer"], template=p["id"], variant=p["variant"]) for p in probs[:n]]
    if len({p["key"] for p in out}) < len(out) or any(p["answer"] is None for p in out):
        raise RuntimeError("GSM eval set: a rendered variant repeats a question or has no numeric answer")
    return out


def long_set(n: int) -> list[dict]:
    """The first n CHAMP eval problems whose reference answer is a number (or a/b)."""
    if n <= 0:
        return []
    probs = [p for p in data.champ_problems("eval") if _NUMERIC.fullmatch(p["answer"].strip())]
    if n > len(probs):
        raise ValueError(f"--long {n}: the CHAMP eval split has only {len(probs)} problems with a numeric answer")
    return [_problem("champ", p["question"], p["answer"].strip(), id=p["id"]) for p in probs[:n]]


def grade(text: str, gold: float) -> dict:
    pred = data.parse_answer(text)
    ok = pred is not None and abs(pred - gold) <= 1e-6 * max(1.0, abs(gold))
    return {"pred": pred, "correct": bool(ok)}


# ------------------------------------------------------------------------------ caching --------

def _file_id(path: Path) -> str:
    """Name, size and mtime: a rewritten file gets new keys; a copied report folder keeps its cache."""
    st = path.stat()
    return f"{path.name}|{st.st_size}|{st.st_mtime_ns}"


def _cache_file(out: Path, path: Path, phase: str, params: dict, suffix: str = "json") -> Path:
    h = hashlib.sha256(json.dumps([_file_id(path), phase, params], sort_keys=True, default=str).encode())
    return out / "cache" / f"{path.stem}.{phase}.{h.hexdigest()[:16]}.{suffix}"


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))


def _cached(cache: Path, fn):
    if cache.is_file():
        return json.loads(cache.read_text())
    res = fn()
    _write_json(cache, res)
    return res


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by an interrupt: that answer is asked again
            pass
    return rows


# ------------------------------------------------------------------------------- phases --------

def solve(gguf: Path, problems: list[dict], prompt: str, max_tokens: int, journal: Path, serve_kw: dict,
          progress=None) -> dict:
    """Greedy answers of one GGUF to `problems` through llama-server, -np parallel slots. Each
    answer is appended to `journal` as it comes, and answers already there are not asked again."""
    done = {r["key"]: r for r in _read_jsonl(journal)}
    todo = [p for p in problems if p["key"] not in done]
    if progress:
        progress(len(problems) - len(todo))
    memory = None
    if todo:
        journal.parent.mkdir(parents=True, exist_ok=True)
        with server.serve(gguf, **serve_kw) as s, open(journal, "a") as log:
            ex = ThreadPoolExecutor(serve_kw.get("parallel", 1))
            try:
                futs = [ex.submit(_ask, s, p, prompt, max_tokens) for p in todo]
                for fut in as_completed(futs):
                    r = fut.result()
                    log.write(json.dumps(r) + "\n")
                    log.flush()
                    done[r["key"]] = r
                    if progress:
                        progress(1)
            finally:  # on an error or Ctrl-C, stopping the server ends the requests in flight
                ex.shutdown(wait=False, cancel_futures=True)
        memory = s.memory
    rows = [done[p["key"]] for p in problems]
    k, n = sum(r["correct"] for r in rows), len(rows)
    return {"n": n, "correct": k, "pass1": k / n, "ci95": list(wilson(k, n)),
            "no_answer": sum(r["pred"] is None for r in rows),
            "truncated": sum(r["finish"] == "length" for r in rows),
            "mean_tokens": sum(r["tokens"] or 0 for r in rows) / n, "max_tokens": max_tokens,
            "server_memory": memory, "rows": rows}


def _ask(s: server.Server, p: dict, prompt: str, max_tokens: int) -> dict:
    r = s.chat([{"role": "user", "content": prompt.format(q=p["question"])}], max_tokens=max_tokens)
    return {"key": p["key"], "gold": p["answer"], **grade(r["text"], p["answer"]), "tokens": r["tokens"],
            "finish": r["finish"], "text": r["text"], "reasoning": r["reasoning"]}


# ------------------------------------------------------------------------------- inputs --------

def _check_inputs(files, ref, text, port, vs=("x",)) -> tuple[list[Path], Path, Path]:
    """The cheap checks, before llama.cpp is even built: GGUFs, reference, text, port."""
    from .fixtures import resolve_model
    if not files and not vs:
        raise ValueError("nothing to bench: give GGUF files, or --vs stock types to judge F16 and those alone")
    paths = [runner.check_gguf(f) for f in files]
    if len({p.resolve() for p in paths}) < len(paths):
        raise ValueError("a GGUF file is named twice")
    folder = resolve_model(ref)
    text_file = data.eval_text_file(text)
    if port:
        server.check_port(port)
    return paths, folder, text_file


def _fallback_summary(fb: list[dict]) -> str:
    groups: dict = {}
    for f in fb:
        key = (re.sub(r"blk\.\d+\.", "blk.*.", f["tensor"]), f["ncols"], f["block"], f["wanted"], f["got"])
        groups[key] = groups.get(key, 0) + 1
    parts = [f"{t} ({n} cols, not a multiple of {b}) {w}->{g} x{c}" for (t, n, b, w, g), c in groups.items()]
    return "; ".join(parts[:4]) + (f"; and {len(parts) - 4} more groups" if len(parts) > 4 else "")


def stock_plans(f16: Path, types: list[str], allow_fallback: bool, cuda: bool = False) -> dict:
    """llama-quantize --dry-run for each type: an unknown type, or one whose main ggml type some of
    the model's tensors cannot take (unless allow_fallback), fails here in one line. Fallbacks of
    the mix's few higher-precision tensors (output q6_K -> q8_0) only make the file larger: they are
    listed in the report, not refused."""
    plans = {}
    for t in types:
        try:
            plans[t] = runner.stock_plan(f16, t, cuda=cuda)
        except RuntimeError as e:
            why = next((ln.strip() for ln in str(e).splitlines()[1:] if re.search(r"ftype|invalid|error", ln, re.I)),
                       str(e).splitlines()[0])
            raise ValueError(f"--vs {t}: llama-quantize refuses this type ({why[:200]})") from None
        fb = [f for f in plans[t]["fallbacks"] if f["wanted"] == plans[t]["main"]]
        if fb and not allow_fallback:
            raise ValueError(f"--vs {t}: {len(fb)} tensor(s) of this model cannot take {t}'s blocks and would fall "
                             f"back: {_fallback_summary(fb)}; pass --allow-fallback to bench it anyway")
    return plans


# ------------------------------------------------------------------------------- driver --------

def bench(files: list, ref: str, vs: list[str] | tuple = ("Q4_0",), out: str | Path = "bench",
          calib: str = "news", text: str = "news", gsm: int = 50, long: int = 0, cuda: bool = False,
          threads: int | None = None, parallel: int = 4, ctx: int = 512, chunks: int | None = 32,
          gsm_max_tokens: int = 512, long_max_tokens: int = 1500, nsamples: int = 32, seqlen: int = 512,
          reps: int = 3, n_prompt: int = 512, n_gen: int = 128, port: int = 0, server_args: list | tuple = (),
          allow_fallback: bool = False, tokenizer_pre: str | None = None, seed: int = 0,
          command: str | None = None, progress: bool = True) -> dict:
    """Bench GGUF `files` against the F16 GGUF of `ref` and the stock `vs` types (llama-quantize with
    an importance matrix from `calib`), write OUT/report.md, report.json and PNG plots; returns the
    report. See the module docstring for the phases; `ctx`/`chunks` are llama-perplexity's."""
    out = Path(out)
    threads = threads or os.cpu_count() or 2
    vs = [t.strip() for t in vs if t.strip()]
    paths, folder, text_file = _check_inputs(files, ref, text, port, vs)
    problems = {"gsm": gsm_set(gsm, seed), "long": long_set(long)}
    llama.build(cuda=cuda)
    if problems["gsm"] or problems["long"]:
        runner._tool("llama-server", cuda)  # built on demand into an older cached build
    build = out / "build"
    build.mkdir(parents=True, exist_ok=True)
    name = Path(str(ref)).name
    f16 = build / f"{name}-F16.gguf"
    if not f16.is_file():
        with atomic_path(f16) as tmp:
            runner.fp16_gguf(folder, tmp, tokenizer_pre=tokenizer_pre)
    plans = stock_plans(f16, vs, allow_fallback, cuda)
    settings = {"text": text, "ctx": ctx, "chunks": chunks, "threads": threads, "cuda": cuda, "reps": reps,
                "n_prompt": n_prompt, "n_gen": n_gen, "parallel": parallel, "gsm_max_tokens": gsm_max_tokens,
                "long_max_tokens": long_max_tokens, "seed": seed}
    calib_tag = f"{Path(calib).stem}-{nsamples}x{seqlen}"
    entries = [{"label": "F16", "kind": "f16", "path": f16}]
    entries += [{"label": f"{t}+imat", "kind": "stock", "path": build / f"{name}-{t}-imat-{calib_tag}.gguf",
                 "plan": plans[t]} for t in vs]
    entries += [{"label": lab, "kind": "file", "path": p} for lab, p in zip(_labels(paths, ref), paths)]
    serve_kw = {"parallel": parallel, "threads": threads, "cuda": cuda, "port": port, "extra_args": list(server_args)}
    asks = [k for k in ("gsm", "long") if problems[k]]
    if any(_unanswered(out, e["path"], k, problems, settings) for e in entries for k in asks):
        # a server that cannot start fails now, not after hours (on F16: there may be no files)
        with server.serve(f16, ctx=256, **serve_kw):
            pass
    if vs:
        from .compat import make_imatrix
        imat = build / f"{name}.imatrix-{calib_tag}.gguf"
        if not imat.is_file():
            make_imatrix(str(folder), imat, calib, nsamples, seqlen, device="cuda" if cuda else "cpu")
        for e in entries:
            if e["kind"] == "stock" and not e["path"].is_file():
                runner.quantize_stock(f16, e["path"], e["label"].removesuffix("+imat"), imatrix=imat,
                                      threads=threads, cuda=cuda)

    base = _cache_file(out, f16, "logits", [text, ctx, chunks], "bin")
    results = []
    with _progress(progress) as prog:
        for e in entries:
            results.append(_bench_one(e, f16, base, text_file, problems, settings, serve_kw, out, prog))
    report = _report(results, ref, vs, calib, nsamples, seqlen, problems, settings, plans, command)
    write_report(report, out)
    return report


def _answer_params(kind: str, problems: dict, st: dict) -> dict:
    """What a gsm/long result depends on besides the file (its cache key)."""
    return {"keys": [p["key"] for p in problems[kind]], "max_tokens": st[f"{kind}_max_tokens"], "cuda": st["cuda"],
            "prompt": PROMPTS[kind]}


def _unanswered(out: Path, path: Path, kind: str, problems: dict, st: dict) -> bool:
    """Whether some problem of `kind` still needs the server for this file (no result, no full journal)."""
    if not path.is_file():
        return True
    params = _answer_params(kind, problems, st)
    if _cache_file(out, path, kind, params).is_file():
        return False
    have = {r["key"] for r in _read_jsonl(_cache_file(out, path, kind, params, "jsonl"))}
    return not set(params["keys"]) <= have


def _labels(paths: list[Path], ref: str = "") -> list[str]:
    """File stems (parent/stem where two share one); the fixture GGUF that `ref`'s FP weights were dequantized
    from is said to be that: its KLD against F16 measures only F16's rounding, not a quantizer."""
    from .fixtures import SPLIT_MODELS
    src = SPLIT_MODELS.get(str(ref))
    stems = [p.stem for p in paths]
    out = [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [f"{lab} (fixture: the FP reference's source grid)"
            if src and p.name == src.file and p.stat().st_size == src.size else lab for lab, p in zip(out, paths)]


def _bench_one(e: dict, f16: Path, base: Path, text_file: Path, problems: dict, st: dict, serve_kw: dict,
               out: Path, prog) -> dict:
    """All phases of one file; a failing phase is recorded in "errors", the others still run."""
    path = e["path"]
    row = {k: v for k, v in e.items() if k != "path"}
    row.update(path=str(path), mib=round(path.stat().st_size / 2**20, 2), errors={})
    qparams = {"text": st["text"], "ctx": st["ctx"], "chunks": st["chunks"], "cuda": st["cuda"],
               "base": _file_id(f16)}

    def quality():
        if path == f16 or not base.is_file():  # the F16 run also writes the KLD base logits
            with atomic_path(base) as tmp:  # an interrupted run leaves no half base behind
                res = runner.perplexity(f16, text_file, ctx=st["ctx"], chunks=st["chunks"], threads=st["threads"],
                                        save_logits=tmp, cuda=st["cuda"])
            _write_json(_cache_file(out, f16, "quality", qparams), res)
            if path == f16:
                return res
        return runner.perplexity(path, None, ctx=st["ctx"], chunks=st["chunks"], threads=st["threads"],
                                 kld_base=base, cuda=st["cuda"])

    def speed():
        return runner.bench(path, threads=st["threads"], n_gen=st["n_gen"], n_prompt=st["n_prompt"],
                            reps=st["reps"], cuda=st["cuda"])

    def answers(kind: str, max_tokens: int):
        probs, params = problems[kind], _answer_params(kind, problems, st)
        journal = _cache_file(out, path, kind, params, "jsonl")
        task = prog.add_task(f"{kind} {e['label']}", total=len(probs)) if prog else None
        tick = (lambda k: prog.advance(task, k)) if prog else None
        kw = dict(serve_kw, ctx=max_tokens + 1024)  # prompt + answer per slot
        res = _cached(_cache_file(out, path, kind, params),
                      lambda: solve(path, probs, PROMPTS[kind], max_tokens, journal, kw, tick))
        if prog:
            prog.update(task, completed=len(probs))
        return res

    sparams = {k: st[k] for k in ("threads", "cuda", "reps", "n_prompt", "n_gen")}
    phases = {"quality": lambda: _cached(_cache_file(out, path, "quality", qparams), quality),
              "speed": lambda: _cached(_cache_file(out, path, "speed", sparams), speed),
              "gsm": lambda: answers("gsm", st["gsm_max_tokens"]),
              "long": lambda: answers("long", st["long_max_tokens"])}
    for ph in PHASES:
        if ph in ("gsm", "long") and not problems[ph]:
            continue
        task = prog.add_task(f"{ph} {e['label']}", total=None) if prog and ph in ("quality", "speed") else None
        try:
            row[ph] = phases[ph]()
        except (RuntimeError, ValueError, OSError) as err:  # recorded; the report says partial
            row["errors"][ph] = str(err).splitlines()[0][:400]
        if task is not None:
            prog.update(task, total=1, completed=1)
    return row


@contextmanager
def _progress(enabled: bool):
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as p:
        yield p


# ------------------------------------------------------------------------------- report --------

def _machine(cuda: bool) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    card = None
    if cuda and shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        card = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    return {"host": platform.node(), "os": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "card": card}


def _report(rows, ref, vs, calib, nsamples, seqlen, problems, st, plans, command) -> dict:
    for r in rows:  # the per-problem texts stay in OUT/cache; the report keeps what was graded
        for ph in ("gsm", "long"):
            if ph in r:
                r[ph] = {**r[ph], "rows": [{k: v for k, v in x.items() if k not in ("text", "reasoning")}
                                           for x in r[ph]["rows"]]}
        if r.get("speed") and r["speed"].get("model_n_params"):
            r["bpw"] = round(Path(r["path"]).stat().st_size * 8 / r["speed"]["model_n_params"], 3)
    f16 = next((r for r in rows if r.get("kind") == "f16"), None)
    for r in rows:
        for ph in ("gsm", "long"):
            if f16 is not None and r is not f16 and r.get(ph) and f16.get(ph):
                r[ph]["vs_f16"] = paired(f16[ph]["rows"], r[ph]["rows"])
    failed = [f"{r['label']}/{ph}: {msg}" for r in rows for ph, msg in r["errors"].items()]
    return {
        "complete": not failed, "failed": failed,
        "command": command or " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": _machine(st["cuda"]), "llama_cpp": {**llama.pin(), "patch_hash": llama.patch_hash()},
        "ref": str(ref), "vs": list(vs),
        "calibration": {"source": calib, "split": data.describe_split(calib, "calib"), "nsamples": nsamples,
                        "seqlen": seqlen},
        "text": data.describe_split(st["text"], "eval"), "settings": st,
        "problems": {k: [{x: p[x] for x in p if x != "question"} for p in v] for k, v in problems.items()},
        "fallbacks": {t: p["fallbacks"] for t, p in plans.items() if p["fallbacks"]},
        "files": rows,
    }


def paired(ref_rows: list[dict], rows: list[dict]) -> dict:
    """The same problems graded for the reference (F16) and a file: how many the file lost (reference right,
    file wrong) and gained, and the exact two-sided McNemar p of that split. Intervals of two accuracies
    overlap long before a paired difference stops being significant."""
    ref = {x["key"]: bool(x["correct"]) for x in ref_rows}
    both = [(ref[x["key"]], bool(x["correct"])) for x in rows if x["key"] in ref]
    lost, gained = sum(a and not b for a, b in both), sum(b and not a for a, b in both)
    n, k = lost + gained, min(lost, gained)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"n": len(both), "lost": lost, "gained": gained, "p": p}


def _fmt(v, spec: str = ".3f", scale: float = 1.0) -> str:
    return "–" if v is None else format(v * scale, spec)


def _acc(res: dict | None) -> str:
    if not res:
        return "–"
    lo, hi = res["ci95"]
    vs = res.get("vs_f16")
    pair = f"; vs F16 −{vs['lost']} +{vs['gained']}, p {vs['p']:.2g}" if vs else ""
    return f"{100 * res['pass1']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({res['correct']}/{res['n']}{pair})"


COLUMNS = ["file", "MiB", "bpw", "PPL", "KLD", "KLD p99", "same top %", "GSM pass@1 % [95% CI]",
           "long pass@1 % [95% CI]", "pp512 t/s", "tg128 t/s", "peak RSS MiB"]


def table_rows(report: dict) -> list[list[str]]:
    """One row of strings per file, in COLUMNS order (the markdown and the rich table share it)."""
    out = []
    for r in report["files"]:
        q, s = r.get("quality") or {}, r.get("speed") or {}
        tests = s.get("tests", {})
        tok = lambda k: _fmt(tests.get(k, {}).get("tok_s"), ".1f")  # noqa: E731
        out.append([r["label"] + (" (partial)" if r["errors"] else ""), f"{r['mib']:.1f}", _fmt(r.get("bpw"), ".2f"),
                    _fmt(q.get("ppl"), ".3f"), _fmt(q.get("kld"), ".4f"), _fmt(q.get("kld_p99"), ".4f"),
                    _fmt(q.get("same_top_p_pct"), ".1f"), _acc(r.get("gsm")), _acc(r.get("long")),
                    tok(f"pp{report['settings']['n_prompt']}"), tok(f"tg{report['settings']['n_gen']}"),
                    _fmt(s.get("peak_rss_mib"), ".0f")] + ([_fmt(_vram(r), ".0f")] if report["settings"]["cuda"] else []))
    return out


def _vram(row: dict) -> float | None:
    """MiB llama-server allocated on CUDA devices (weights, KV cache for its slots, compute)."""
    for ph in ("gsm", "long"):
        bufs = ((row.get(ph) or {}).get("server_memory") or {}).get("buffers_mib") or {}
        if any(k.startswith("CUDA") for k in bufs):
            return sum(v for k, v in bufs.items() if k.startswith("CUDA"))
    return None


def _columns(report: dict) -> list[str]:
    st = report["settings"]
    cols = [c.replace("pp512", f"pp{st['n_prompt']}").replace("tg128", f"tg{st['n_gen']}") for c in COLUMNS]
    return cols + (["VRAM MiB (serving)"] if st["cuda"] else [])


def markdown(report: dict) -> str:
    st, m, pin = report["settings"], report["machine"], report["llama_cpp"]
    lines = [f"# quant2gguf bench: {Path(report['ref']).name}", ""]
    if report["complete"]:
        lines.append("**Status: complete.**")
    else:
        lines += ["**Status: PARTIAL — these phases failed, their cells are empty:**", ""]
        lines += [f"- {f}" for f in report["failed"]]
    probs = report["problems"]
    n_var = sum(p.get("variant", 0) > 0 for p in probs["gsm"])
    lines += [
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; machine: {m['cpu']}, {m['cores']} cores, {m['os']}; card: {m['card'] or 'none (CPU run)'}",
        f"- llama.cpp: {pin['package']} {pin['version']} sdist (sha256 {pin['sha256'][:12]}…), patches {pin['patch_hash']}; "
        + ("CUDA build, all layers on the GPU" if st["cuda"] else f"CPU build, threads: {st['threads']}"),
        f"- quality: llama-perplexity on {report['text']}, ctx {st['ctx']}, {st['chunks'] or 'all'} chunks; "
        "KLD and same top token against the F16 GGUF's logits",
        f"- stock types: llama-quantize with an importance matrix from {report['calibration']['split']} "
        f"({report['calibration']['nsamples']} x {report['calibration']['seqlen']} tokens)",
    ]
    if probs["gsm"]:
        lines.append(f"- GSM: {len(probs['gsm'])} held-out problems ({len(probs['gsm']) - n_var} GSM8K originals of "
                     f"templates 50-99 + {n_var} variants rendered from them, seed {st['seed']}), greedy, at most "
                     f"{st['gsm_max_tokens']} tokens, llama-server chat API with the GGUF's chat template, "
                     f"{st['parallel']} slots")
    if probs["long"]:
        lines.append(f"- long: {len(probs['long'])} CHAMP eval problems with a numeric answer, at most "
                     f"{st['long_max_tokens']} tokens")
    if probs["gsm"] or probs["long"]:
        lines.append("- intervals: 95% Wilson; the same problems for every file; vs F16: problems lost (F16 right, file wrong) and gained, exact McNemar p")
    for t, fb in report["fallbacks"].items():
        lines.append(f"- {t}: {len(fb)} tensor(s) fell back to another type ({_fallback_summary(fb)})")
    cols = _columns(report)
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += ["", "![size vs KLD](size_kld.png) ![accuracy](accuracy.png) ![speed](speed.png)", ""]
    return "\n".join(lines)


def rich_table(report: dict):
    from rich.table import Table
    t = Table(title=f"quant2gguf bench: {Path(report['ref']).name}" + ("" if report["complete"] else " (PARTIAL)"))
    for c in _columns(report):
        t.add_column(c, justify="left" if c == "file" else "right", no_wrap=c == "file")
    for r in table_rows(report):
        t.add_row(*r)
    return t


def plot(report: dict, out: Path) -> list[Path]:
    """size_kld.png (size vs KLD, stock frontier), accuracy.png (pass@1 with intervals), speed.png."""
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend state
    rows = report["files"]
    paths = []

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    pts = [(r["mib"], r["quality"]["kld"], r) for r in rows if (r.get("quality") or {}).get("kld") is not None]
    stock = sorted((x, y) for x, y, r in pts if r["kind"] == "stock")
    front, best = [], math.inf
    for x, y in stock:  # Pareto: each point smaller than the next and with a higher KLD
        if y < best:
            front.append((x, y))
            best = y
    if front:
        ax.step(*zip(*front), where="post", color="tab:blue", alpha=0.5, label="stock frontier")
    for x, y, r in pts:
        ours = r["kind"] == "file"
        ax.scatter([x], [y], marker="*" if ours else "o", s=120 if ours else 40,
                   color="tab:red" if ours else "tab:blue")
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if pts and all(y > 0 for _, y, _ in pts):
        ax.set_yscale("log")
    if not pts:
        ax.text(0.5, 0.5, "no KLD measured", ha="center", transform=ax.transAxes)
    ax.set(xlabel="file size (MiB)", ylabel="mean KLD vs F16", title="size vs KLD (lower left is better)")
    if front:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out / "size_kld.png"))

    kinds = [k for k in ("gsm", "long") if report["problems"][k]]
    fig = Figure(figsize=(6.4, 1.2 + 0.45 * len(rows) * max(1, len(kinds))))
    axes = [fig.add_subplot(max(1, len(kinds)), 1, i + 1) for i in range(max(1, len(kinds)))]
    for ax, kind in zip(axes, kinds or [None]):
        res = [(r["label"], r.get(kind)) for r in rows] if kind else []
        res = [(lab, x) for lab, x in res if x]
        if not res:
            ax.text(0.5, 0.5, "no accuracy measured", ha="center", transform=ax.transAxes)
            continue
        p = [100 * x["pass1"] for _, x in res]
        err = [[100 * (x["pass1"] - x["ci95"][0]) for _, x in res], [100 * (x["ci95"][1] - x["pass1"]) for _, x in res]]
        ax.barh(range(len(res)), p, xerr=err, capsize=3, color="tab:green")
        ax.set_yticks(range(len(res)), [lab for lab, _ in res], fontsize=8)
        ax.set(xlim=(0, 100), xlabel=f"{kind} pass@1 % (95% Wilson interval, n={res[0][1]['n']})")
    fig.tight_layout()
    paths.append(_save(fig, out / "accuracy.png"))

    fig = Figure(figsize=(8, 1.2 + 0.45 * len(rows)))
    st = report["settings"]
    for i, test in enumerate((f"tg{st['n_gen']}", f"pp{st['n_prompt']}")):
        ax = fig.add_subplot(1, 2, i + 1)
        vals = [((r.get("speed") or {}).get("tests", {}).get(test) or {}) for r in rows]
        ax.barh(range(len(rows)), [v.get("tok_s") or 0 for v in vals], xerr=[v.get("std") or 0 for v in vals],
                color="tab:purple")
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows] if i == 0 else [""] * len(rows), fontsize=8)
        ax.set(xlabel=f"{test} tokens/s")
    fig.tight_layout()
    paths.append(_save(fig, out / "speed.png"))
    return paths


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def write_report(report: dict, out: str | Path) -> dict:
    """OUT/report.md, report.json and the PNG plots."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot(report, out)
    _write_json(out / "report.json", report)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown(report))
    return report
