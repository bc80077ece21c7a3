"""Our checkpoints as GGUF files against llama.cpp's stock types of the same model, in one run.

usage: python scripts/compare_gguf.py --model qwen15 --ckpts CK1 CK2 ... --types IQ3_S+imat Q3_K_M+imat Q3_G64
        [--texts news champ code] [--calib news] [--embd-type auto] [--workdir DIR] [--out results.json] [--cuda] [--wait 900]
        [--jobs 4] [--convert-jobs 4] [--no-tg128]

Stock rows: llama-quantize of the model's F16 GGUF (TYPE+imat: with an importance matrix from
--imat-nsamples x 512 tokens of the --calib source's calib split, quant2gguf.compat.make_imatrix; a
plain TYPE of ours, Q3_G64/Q3_G128, is llama-quantize's C RTN reference). Our rows: `convert`
with --embd-type for token_embd/output (the rule in docs/GGUF.md). Every file: whole-file MiB and
bpw over all parameters, llama-perplexity PPL and KLD against the F16 file (mean, p99, same top-1)
on the held-out eval split of each --texts source (ctx 512, all chunks), tg128 with -ngl 99 (only with
--jobs 1 and no --no-tg128: a speed taken beside other work is noise). Checkpoints that do not exist yet are
waited for (--wait seconds in all), so this can run beside the quantization jobs; a complete checkpoint goes
before the stock files still to do, which fill the time until one is. --jobs N makes and measures N files at once,
--convert-jobs M converts M checkpoints at once in workers of their own (the tenth qwen15 run lost its last five rows
to a serial queue, the eleventh all of them to stock files first, the twelfth most to conversions in measuring slots).
Each of the N + M workers owns a disjoint share of the CPUs this process may use (its thread's affinity, which the
programs it starts inherit: llama-perplexity's log-softmax workers, llama-quantize, a conversion's torch threads), and
conversions run as `quant2gguf convert` processes: the thirteenth run converted in this process's threads and let every
program take all 32 cores; conversions took ~580 s (144 s alone) and KLD passes ~250 s (GPU time 4 s).
Writes JSON, a markdown table and a size-KLD plot after every row.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from quant2gguf import checkpoint, export, llama, runner
from quant2gguf.data import eval_text_file
from quant2gguf.fixtures import resolve_model


def _say(msg: str) -> None:
    print(f"[compare] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def cpu_slots(n: int, cpus: list[int]) -> list[list[int]]:
    """`n` disjoint, contiguous CPU sets from `cpus`, sizes within one of each other; with fewer CPUs than sets the
    CPUs are shared round-robin (each set holds one)."""
    cpus = sorted(cpus)
    if n > len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(n)]
    q, r = divmod(len(cpus), n)
    out, at = [], 0
    for i in range(n):
        k = q + (i < r)
        out.append(cpus[at:at + k])
        at += k
    return out


class Pinner:
    """Gives each calling thread, on its first call, the next of `slots` as its CPU affinity (Linux sets it per
    thread; processes the thread starts inherit it) and returns that set's size: the thread count for its work."""

    def __init__(self, slots: list[list[int]]):
        self.slots, self.local, self.lock, self.next = slots, threading.local(), threading.Lock(), 0

    def threads(self) -> int:
        if not hasattr(self.local, "cpus"):
            with self.lock:
                self.local.cpus = self.slots[self.next % len(self.slots)]
                self.next += 1
            os.sched_setaffinity(0, self.local.cpus)
        return len(self.local.cpus)


def convert_process(ck: Path, out: Path, embd_type: str, threads: int, tokenizer_pre: str | None = None,
                    log: Path | None = None) -> dict:
    """`quant2gguf convert` in a process of its own (its own interpreter lock and torch threads), `threads` for
    torch/OpenMP and llama-quantize; returns the info the command prints. A failure raises with the log's tail."""
    # q/k/v kept apart: the methods job converts its fused twin (rtn-g128-fqkv) for the speed stage; same rows, same KLD
    cmd = [sys.executable, "-m", "quant2gguf", "convert", str(ck), "-o", str(out), "--embd-type", embd_type,
           "--threads", str(threads), "--no-fuse-qkv"] + (["--tokenizer-pre", tokenizer_pre] if tokenizer_pre else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if log:
        log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise RuntimeError(f"convert {ck} failed (rc {r.returncode}): {(r.stderr or r.stdout)[-1500:]}")
    m = re.search(r"^\{$.*^\}$", r.stdout, re.S | re.M)  # the command's last output: the info as indented JSON
    return json.loads(m.group(0)) if m else {"path": str(out)}


def _label(ck: Path) -> str:
    man = checkpoint.read_manifest(ck)
    init = man.get("init", {})
    via = f"{init.get('method')}→" if man["method"] == "kd" and init else ""
    grid = man.get("target") or f"W{man['bits']}G{man['group_size']}"  # a stock target names its type
    return f"ours {ck.name}: {via}{man['method']} {grid}"


def _measure(name, path, texts, bases, wd, a, params, threads: int) -> dict:
    """texts: {label: source}; a row holds one entry per label."""
    row = {"file": name, "path": str(path), "mib": path.stat().st_size / 2**20,
           "bpw": 8 * path.stat().st_size / params if params else None}
    for src, source in texts.items():
        t0 = time.time()
        if name == "F16":
            r = runner.perplexity(path, eval_text_file(source), ctx=512, save_logits=bases[src], cuda=a.cuda,
                                  threads=threads)
        else:
            r = runner.perplexity(path, None, ctx=512, kld_base=bases[src], cuda=a.cuda, threads=threads)
        row[src] = {k: r.get(k) for k in ("ppl", "kld", "kld_p99", "same_top_p_pct", "n_chunks", "s_per_pass",
                                           "tool_s", "tries")}
        row[src]["seconds"] = round(time.time() - t0, 1)  # where a run's measuring time goes
    if not a.tg128:
        _say(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'path'})}")
        return row
    try:
        b = runner.bench(path, threads=threads, n_gen=128, reps=2, cuda=a.cuda)
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
    plt.close(fig)


def run_queue(jobs: int, ckpts: list, types: list, ready, ckpt_row, stock_row, wait: float, poll: float = 10.0,
              prepare=None, prepare_jobs: int = 1, prepare_stock=None) -> None:
    """`jobs` measuring workers; a free one takes a complete checkpoint first, in the order given, else the next
    stock type, else waits `poll` s for one. With `prepare` (a checkpoint's conversion), `prepare_jobs` workers of
    their own run it as soon as a checkpoint is complete, and a checkpoint is measured once prepared (in the order
    they finish): measuring never waits for a conversion. With `prepare_stock` too (making a stock file), those
    workers make the stock files, in order, whenever no checkpoint is waiting for them, and a stock type is measured
    only once made: the measuring workers only measure. Checkpoints not ready `wait` s after the start are
    skipped (one deadline for all: a lane that died must not hold the job). The first failure stops the queue and
    is raised. Why this order: the eleventh qwen15 run queued the stock files first and ran out of device time before
    any checkpoint was measured; in the twelfth each conversion (~4.5 min) held a measuring slot; in the fourteenth
    the measuring workers also made the IQ files (minutes of llama-quantize each)."""
    lock, types, waiting, errors, t0 = threading.Lock(), list(types), list(ckpts), [], time.time()
    prepared, made, busy = [], [], [0]  # checkpoints converted / stock types made, not yet measured; preparing now

    def take_ready():  # under lock: the first complete checkpoint, or None (skips all at the deadline)
        done = [c for c in waiting if ready(c)]
        if done:
            waiting.remove(done[0])
            return done[0]
        if waiting and time.time() - t0 >= wait:
            _say(f"{', '.join(map(str, waiting))}: not there after {wait} s, skipped")
            waiting.clear()
        return None

    def next_measure():
        with lock:
            ck = (prepared.pop(0) if prepared else None) if prepare else take_ready()
            if ck is not None:
                return lambda: ckpt_row(ck)
            stock = made if prepare_stock else types
            if stock:
                t = stock.pop(0)
                return lambda: stock_row(t)
            return "wait" if waiting or prepared or busy[0] or (prepare_stock and types) else None

    def next_prepare():
        with lock:
            item, fn, into = take_ready(), prepare, prepared
            if item is None and prepare_stock and types:
                item, fn, into = types.pop(0), prepare_stock, made
            if item is None:
                return "wait" if waiting else None
            busy[0] += 1

        def task():
            try:
                fn(item)
                with lock:
                    into.append(item)
            finally:
                with lock:
                    busy[0] -= 1
        return task

    def worker(next_task):
        while not errors:
            task = next_task()
            if task is None:
                return
            if task == "wait":
                time.sleep(poll)
                continue
            try:
                task()
            except BaseException as e:  # noqa: BLE001 - a failed row stops the run with its error
                errors.append(e)

    workers = [threading.Thread(target=worker, args=(next_measure,)) for _ in range(jobs)]
    if prepare:
        workers += [threading.Thread(target=worker, args=(next_prepare,)) for _ in range(prepare_jobs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


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
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads of the F16 row (default: all this process may use); the workers' follow their CPU share")
    ap.add_argument("--workdir", default="out/compare")
    ap.add_argument("--out", default="out/compare/results.json")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--tokenizer-pre", default=None, help="for tokenizers llama.cpp's converter cannot hash (tiny test models: gpt-2)")
    ap.add_argument("--wait", type=int, default=900, help="seconds (from when the checkpoints are first looked for) to wait for them to appear")
    ap.add_argument("--jobs", type=int, default=1, help="files made and measured at once (after F16); >1 leaves tg128 out")
    ap.add_argument("--logits-dir", default=None,
                    help="where the F16 log-prob files go (default: --workdir); every row re-reads them (~5 GB for "
                         "qwen15's three texts): a RAM disk such as /dev/shm where the work disk is slow")
    ap.add_argument("--convert-jobs", type=int, default=None,
                    help="checkpoints converted and stock files made at once, beside the measuring jobs (default: --jobs)")
    ap.add_argument("--no-tg128", dest="tg128", action="store_false", help="no decode speed column")
    a = ap.parse_args()
    a.convert_jobs = a.jobs if a.convert_jobs is None else a.convert_jobs
    if a.jobs < 1 or a.convert_jobs < 1:
        ap.error(f"--jobs {a.jobs} / --convert-jobs {a.convert_jobs}: give 1 or more")
    a.tg128 = a.tg128 and a.jobs == 1
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
    ld = Path(a.logits_dir or wd)
    ld.mkdir(parents=True, exist_ok=True)
    rows, bases = [], {t: ld / f"{name}-f16-{t}.logits" for t in a.texts}
    imat = wd / f"{name}.imatrix.gguf"

    def save():
        res = {"date": time.strftime("%Y-%m-%d"), "model": a.model, "cuda": a.cuda, "texts": a.texts, "sources": sources,
               "embd_type": a.embd_type, "imatrix": f"{a.imat_nsamples} x 512 tokens of the {a.calib} calib split",
               "rows": rows}
        out.write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(_table(rows, a.texts) + "\n")
        for t in a.texts:
            _plot(rows, t, out.with_name(f"{out.stem}-{t}.png"))

    cpus = sorted(os.sched_getaffinity(0))
    rows.append(_measure("F16", f16, sources, bases, wd, a, params, a.threads or len(cpus)))
    params = sum(t.n_elements for t in export.scan_gguf(f16).tensors)  # not GGUFReader: ~9 s on Qwen's vocabulary
    rows[0]["bpw"] = 8 * f16.stat().st_size / params
    save()
    lock, pin = threading.Lock(), Pinner(cpu_slots(a.jobs + a.convert_jobs, cpus))  # a CPU share per worker
    _say(f"{len(cpus)} CPUs: {a.jobs} measuring + {a.convert_jobs} converting workers, {len(pin.slots[0])} CPUs each")

    def add(row):
        with lock:
            rows.append(row)
            save()

    imat_lock = threading.Lock()

    def make_stock(t):
        p = wd / f"{name}-{t}.gguf"
        stock, use_imat = t.removesuffix("+imat"), t.endswith("+imat")
        with imat_lock:  # made by the first stock file that needs it
            if use_imat and not imat.exists():
                from quant2gguf.compat import make_imatrix
                make_imatrix(a.model, imat, a.calib, a.imat_nsamples, 512, device="cuda" if a.cuda else "cpu")
        if not p.exists():  # written under a temp name, then renamed: the import lane may wait for it
            t0 = time.time()
            runner.quantize_stock(f16, p, stock, imatrix=imat if use_imat else None, threads=pin.threads(), cuda=a.cuda)
            _say(f"made {t} in {time.time() - t0:.0f} s")
        return p

    def stock_row(t):
        p = make_stock(t)
        add(_measure(t + (" (C RTN, ours)" if t.startswith("Q3_G") else ""), p, sources, bases, wd, a, params,
                     pin.threads()))

    def convert_ckpt(ck):
        p = wd / f"{ck.name}.gguf"
        if not p.exists():
            # a stock-target checkpoint's token_embd/output as llama-quantize gives them at that type's _S
            # recipe (Q3_K -> Q3_K_S), or at the recipe itself (Q3_K_M): as in the stock file it is compared with
            target = checkpoint.read_manifest(ck).get("target")
            embd = f"auto:{target}{'_S' if target in ('Q3_K', 'Q4_K', 'Q5_K') else ''}" \
                if target and a.embd_type == "auto" else a.embd_type
            t0 = time.time()
            info = convert_process(ck, p, embd, pin.threads(), a.tokenizer_pre, log=wd / f"convert-{ck.name}.log")
            _say(f"converted {ck.name} in {time.time() - t0:.0f} s: {json.dumps(info)[:300]}")

    def ckpt_row(ck):
        add(_measure(_label(ck), wd / f"{ck.name}.gguf", sources, bases, wd, a, params, pin.threads()))

    run_queue(a.jobs, list(map(Path, a.ckpts)), a.types, checkpoint.is_checkpoint, ckpt_row, stock_row, a.wait,
              prepare=convert_ckpt, prepare_jobs=a.convert_jobs, prepare_stock=make_stock)
    _say("done")


if __name__ == "__main__":
    main()
