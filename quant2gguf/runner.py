"""Run GGUF files through the patched llama.cpp tools: prompt, perplexity/KLD, speed, stock quants.

Every function checks the GGUF in Python first (a foreign or truncated file fails here with one
line, not deep inside llama.cpp), runs one tool of the cached build (`quant2gguf llama build`),
and parses what it prints. A failing tool raises RuntimeError with the command and its log tail.
"""
from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .cache import atomic_path

LOG_TAIL = 3000  # characters of a failing tool's output kept in the error


def _tool(name: str, cuda: bool = False) -> Path:
    from . import llama
    try:
        return llama.tool(name, cuda=cuda)  # RuntimeError telling to run `quant2gguf llama build`
    except RuntimeError as e:
        if cuda:
            raise
        try:  # a GPU machine may hold only the CUDA build: its tools run on the CPU as well
            return llama.tool(name, cuda=True)
        except RuntimeError:
            raise e from None


def check_gguf(path: str | Path) -> Path:
    """Raise ValueError unless `path` is a complete model GGUF whose tensor types this build knows
    (an imatrix or other data GGUF has no general.architecture and is refused here)."""
    from .export import scan_gguf
    r = scan_gguf(path)  # not read_gguf: GGUFReader takes ~10 s of Python on a 152k-token vocabulary
    if "general.architecture" not in r.fields or not r.tensors:
        kind = r.fields.get("general.type", "not a model")
        raise ValueError(f"{path} is a GGUF but not a model ({kind}: no general.architecture); "
                         "pass a model .gguf")
    return Path(path)


def _run(cmd: list, need: str | None = None, tries: int = 5, strict: bool = True) -> subprocess.CompletedProcess:
    """Run a tool; with `need` (a regex), re-run until its output has it (strict: else raise).

    The pinned llama.cpp logs from a worker thread that is never joined at exit (common/log.cpp,
    upstream issue 22142), so the last lines of a run, the final perplexity among them, are lost
    now and then; a re-run is the only remedy that needs no patch."""
    cmd = [str(c) for c in cmd]
    for n in range(1, tries + 1):
        r = _exec(cmd)
        r.tries = n
        out = r.stderr + r.stdout
        if (r.returncode and out.strip()) or (not r.returncode and (need is None or re.search(need, out))):
            break
    if r.returncode:
        tail = out[-LOG_TAIL:].strip() or "(it printed nothing; run the command by hand to see why)"
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {r.returncode}): {' '.join(cmd)}\n{tail}")
    if strict and need is not None and not re.search(need, out):
        raise RuntimeError(f"{Path(cmd[0]).name} did not print its result in {tries} runs: {' '.join(cmd)}\n"
                           f"{out[-LOG_TAIL:]}")
    return r


def _exec(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run to completion; the result also carries the child's peak resident memory (.peak_rss_mib,
    its VmHWM sampled every 2 ms for the first second, then every 20 ms). Not wait4's ru_maxrss: Linux carries the parent's high-water
    mark across fork + exec, so from a Python process holding torch every tool would report that."""
    import time
    with tempfile.TemporaryFile("w+", errors="replace") as out, tempfile.TemporaryFile("w+", errors="replace") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)  # never wait on a prompt
        peak, t0 = 0.0, time.monotonic()
        try:
            while p.poll() is None:
                peak = max(peak, vm_hwm_mib(p.pid) or 0.0)
                # VmHWM only rises, but an exited child has none: sample fast at first, so a run of a
                # few ms (a tiny model's llama-bench) is seen after it loaded, not only at its exec
                time.sleep(0.002 if time.monotonic() - t0 < 1 else 0.02)
        except BaseException:
            p.kill()
            p.wait()
            raise
        out.seek(0)
        err.seek(0)
        r = subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read())
    r.peak_rss_mib, r.wall_s = peak, time.monotonic() - t0
    return r


def vm_hwm_mib(pid: int) -> float | None:
    """Peak resident memory (VmHWM) of a live process in MiB; None once it has exited."""
    try:
        m = re.search(r"VmHWM:\s*(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def _gpu_args(cuda: bool) -> list:
    return ["-ngl", "99"] if cuda else []  # a CPU build warns about any -ngl


def run_prompt(gguf: str | Path, prompt: str, n: int = 64, threads: int = 2, cuda: bool = False) -> str:
    """Greedy completion of `prompt` (n new tokens) with llama-completion; returns the new text."""
    check_gguf(gguf)
    cmd = [_tool("llama-completion", cuda), "-m", gguf, "-p", prompt, "-n", n, "-t", threads, "--temp", 0,
           "-no-cnv", "--no-display-prompt", "--simple-io", "--no-warmup", *_gpu_args(cuda)]
    # the perf summary comes last: when it shows, no generated text was lost (see _run)
    out = _run(cmd, need=r"total time", strict=False).stdout
    return out.removesuffix("\n").removesuffix(" [end of text]").strip("\n")


# -------------------------------------------------------------------------- perplexity --------

_FLOAT = r"([-+0-9.eE]+|nan|inf)"
_PATTERNS = {  # key -> regex over llama-perplexity's output (tools/perplexity/perplexity.cpp)
    "ppl": rf"Final estimate: PPL = {_FLOAT} \+/- {_FLOAT}",
    "ppl_q": rf"Mean PPL\(Q\)\s*:\s*{_FLOAT}\s*±\s*{_FLOAT}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_FLOAT}\s*±\s*{_FLOAT}",
    "kld": rf"Mean\s+KLD:\s*{_FLOAT}\s*±\s*{_FLOAT}",
    "rms_dp_pct": rf"RMS Δp\s*:\s*{_FLOAT}\s*±\s*{_FLOAT} %",
    "same_top_p_pct": rf"Same top p:\s*{_FLOAT}\s*±\s*{_FLOAT} %",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_FLOAT}",
    "kld_max": rf"Maximum KLD:\s*{_FLOAT}",
    "n_chunks": r"(?:calculating perplexity|computing) over (\d+) chunks",
    "s_per_pass": rf"{_FLOAT} seconds per pass",  # the first chunk's wall time: tells model time from the rest
}


def parse_perplexity(text: str) -> dict:
    """Numbers llama-perplexity printed: ppl (and ppl_err), and in KLD mode ppl_base, kld,
    rms_dp_pct, same_top_p_pct (each with _err), kld_p99 and kld_max (99th percentile and maximum
    over the scored tokens), n_chunks, s_per_pass (the first chunk's seconds)."""
    res: dict = {}
    for key, pat in _PATTERNS.items():
        m = re.search(pat, text)
        if m is None:
            continue
        if key == "n_chunks":
            res[key] = int(m.group(1))
        elif m.re.groups == 1:
            res[key] = float(m.group(1))
        else:
            res[key], res[key + "_err"] = float(m.group(1)), float(m.group(2))
    q = (res.pop("ppl_q", None), res.pop("ppl_q_err", None))
    if "ppl" not in res and q[0] is not None:  # KLD mode prints Mean PPL(Q) instead of a final estimate
        res["ppl"], res["ppl_err"] = q
    return res


def perplexity(gguf: str | Path, text_file: str | Path | None, ctx: int = 512, chunks: int | None = None,
               threads: int = 2, kld_base: str | Path | None = None, save_logits: str | Path | None = None,
               cuda: bool = False, batch: int | None = None) -> dict:
    """llama-perplexity over `text_file` (chunks of ctx tokens, scored on each chunk's second half).

    save_logits=FILE also stores the tokens and log-probs (a KLD base, see read_logits_file);
    kld_base=FILE instead scores the tokens stored there and adds KL divergence and top-1
    agreement against that base (text_file is then not needed)."""
    check_gguf(gguf)
    if kld_base and save_logits:
        raise ValueError("pass kld_base (compare against saved logits) or save_logits (save them), not both")
    cmd = [_tool("llama-perplexity", cuda), "-m", gguf, "-c", ctx, "-b", batch or ctx, "-t", threads,
           *_gpu_args(cuda)]
    if kld_base:
        if not Path(kld_base).is_file():
            raise ValueError(f"{kld_base}: no such KLD base file; make it with perplexity(..., save_logits=FILE)")
        cmd += ["--kl-divergence-base", kld_base, "--kl-divergence"]
    else:
        if text_file is None or not Path(text_file).is_file():
            raise ValueError(f"{text_file}: no such text file for perplexity")
        cmd += ["-f", text_file]
        if save_logits:
            cmd += ["--kl-divergence-base", save_logits]
    if chunks:
        cmd += ["--chunks", chunks]
    if save_logits:  # the saved log-probs give the perplexity even if the log's last lines are lost
        r = _run(cmd)
        res = parse_perplexity(r.stderr + r.stdout)
        if "ppl" not in res:
            res["ppl"], res["ppl_source"] = ppl_from_logits_file(save_logits), "logits file"
    else:
        r = _run(cmd, need=_PATTERNS["same_top_p_pct"] if kld_base else _PATTERNS["ppl"])
        res = parse_perplexity(r.stderr + r.stdout)
    # the tool's own wall time of its last run and the runs it took: where a caller's time went
    return {**res, "ctx": ctx, "tool_s": round(r.wall_s, 1), "tries": getattr(r, "tries", 1)}


def _open_logits_file(path: str | Path) -> dict:
    """Header, tokens and the raw 16-bit log-prob records (memory-mapped) of a logits file."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{path} is not a llama-perplexity logits file")
        n_ctx, n_vocab, n_chunk = (int(v) for v in np.fromfile(f, dtype="<i4", count=3))
    # per scored position: float32 scale, float32 min log-prob, uint16 codes padded to an even count
    nv, n_tok = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    head = 8 + 12 + 4 * n_chunk * n_ctx
    if path.stat().st_size < head + 2 * n_chunk * n_tok * nv:
        raise ValueError(f"{path} is truncated")
    tokens = np.memmap(path, dtype="<i4", mode="r", offset=20, shape=(n_chunk, n_ctx))
    raw = np.memmap(path, dtype="<u2", mode="r", offset=head, shape=(n_chunk, n_tok, nv))
    return {"n_ctx": n_ctx, "n_vocab": n_vocab, "n_chunk": n_chunk, "tokens": tokens, "raw": raw}


def _scale_min(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sm = np.ascontiguousarray(rec[..., :4]).view("<f4")
    return sm[..., :1], sm[..., 1:2]


def read_logits_file(path: str | Path, logprobs: bool = False) -> dict:
    """A llama-perplexity --kl-divergence-base file: n_ctx, n_vocab, n_chunk, the evaluated token
    ids (int32 (n_chunk, n_ctx), before BOS substitution) and, with logprobs=True, the log-probs
    llama.cpp computed for the scored positions n_ctx//2 .. n_ctx-2 of each chunk, decoded from
    their 16-bit form (float32 (n_chunk, n_ctx - 1 - n_ctx//2, n_vocab); mind the size)."""
    f = _open_logits_file(path)
    res = {k: f[k] for k in ("n_ctx", "n_vocab", "n_chunk")}
    res["tokens"] = np.array(f["tokens"])
    if logprobs:
        scale, lo = _scale_min(f["raw"])
        res["logprobs"] = (scale * f["raw"][..., 4:4 + f["n_vocab"]] + lo).astype(np.float32)
    return res


def ppl_from_logits_file(path: str | Path) -> float:
    """Perplexity of the scored tokens from llama.cpp's saved 16-bit log-probs (within ~1e-4 relative)."""
    f = _open_logits_file(path)
    first = f["n_ctx"] // 2
    nll = []
    for c in range(f["n_chunk"]):  # one chunk at a time: a chunk is n_ctx/2 x n_vocab records
        rec = f["raw"][c]
        target = np.asarray(f["tokens"][c, first + 1:], dtype=np.int64)
        scale, lo = _scale_min(rec)
        q = rec[np.arange(len(target)), 4 + target].astype(np.float64)
        nll.append(-(scale[:, 0] * q + lo[:, 0]))
    return float(np.exp(np.concatenate(nll).mean()))


# ------------------------------------------------------------------------------- speed --------

def bench(gguf: str | Path, threads: int = 2, n_gen: int = 128, n_prompt: int = 0, reps: int = 3,
          ngl: int = 0, cuda: bool = False) -> dict:
    """llama-bench -o json: model size and params, tokens/s (mean, std) of each test (tgN, ppN),
    and llama-bench's peak resident memory (peak_rss_mib; with -ngl the weights live in VRAM)."""
    check_gguf(gguf)
    ngl = ngl or (99 if cuda else 0)  # a CUDA build with -ngl 0 decodes on the CPU
    cmd = [_tool("llama-bench", cuda), "-m", gguf, "-t", threads, "-n", n_gen, "-p", n_prompt, "-r", reps,
           *(["-ngl", ngl] if ngl else []), "-o", "json"]
    r = _run(cmd)
    try:
        rows = json.loads(r.stdout[r.stdout.index("["):])
    except ValueError:
        raise RuntimeError(f"llama-bench printed no JSON: {' '.join(map(str, cmd))}\n{r.stdout[-LOG_TAIL:]}") from None
    tests = {}
    for row in rows:
        name = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        tests[name] = {"tok_s": row["avg_ts"], "std": row["stddev_ts"]}
    first = rows[0] if rows else {}
    pick = lambda prefix: next((v["tok_s"] for k, v in tests.items() if k.startswith(prefix)), None)  # noqa: E731
    return {"tg_tok_s": pick("tg"), "pp_tok_s": pick("pp"), "model_size": first.get("model_size"),
            "model_n_params": first.get("model_n_params"), "threads": threads, "ngl": ngl, "backend": first.get("backends"), "cpu": first.get("cpu_info"),
            "gpu": first.get("gpu_info"), "tests": tests, "peak_rss_mib": round(r.peak_rss_mib, 1)}


# ---------------------------------------------------------------------- stock baselines -------

def quantize_stock(f16_gguf: str | Path, out: str | Path, type: str, imatrix: str | Path | None = None,
                   threads: int = 2, cuda: bool = False) -> Path:
    """llama-quantize f16_gguf -> out as a stock type (Q4_0, Q3_K_S, ...), optionally with an imatrix."""
    check_gguf(f16_gguf)
    out = Path(out)
    cmd = [_tool("llama-quantize", cuda)]
    if imatrix:
        cmd += ["--imatrix", imatrix]
    with atomic_path(out) as tmp:
        _run([*cmd, f16_gguf, tmp, type, threads])
        check_gguf(tmp)
    return out


_FALLBACK = re.compile(r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
                       r"[^\n]*?-> falling back to\s+(\S+)")
_QUANT_SIZE = re.compile(r"quant size\s*=\s*([0-9.]+) MiB \(([0-9.]+) BPW\)")
_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-.*->.*\((\w+)\)\s*$", re.MULTILINE)


def stock_plan(f16_gguf: str | Path, type: str, cuda: bool = False) -> dict:
    """What llama-quantize would make of f16_gguf as `type`, without quantizing (--dry-run):
    {"type", "mib", "bpw", "main", "fallbacks": [{"tensor", "ncols", "block", "wanted", "got"}]}.
    A fallback is a tensor whose row width is not a multiple of the block of the ggml type the
    mix wants for it (256 for K and IQ types), stored as another type instead; `main` is the ggml
    type the mix wants for most tensors (q3_K for Q3_K_M). An unknown type raises."""
    check_gguf(f16_gguf)
    # no thread count here: after an unknown type, llama-quantize would read it as a numeric type
    r = _run([_tool("llama-quantize", cuda), "--dry-run", f16_gguf, type], need=_QUANT_SIZE.pattern)
    out = r.stderr + r.stdout
    m = _QUANT_SIZE.search(out)
    fb = [{"tensor": t, "ncols": int(n), "block": int(b), "wanted": w, "got": g}
          for t, n, b, w, g in _FALLBACK.findall(out)]
    wanted = dict(_TENSOR_LINE.findall(out)) | {f["tensor"]: f["wanted"] for f in fb}
    main = max(set(wanted.values()), key=list(wanted.values()).count) if wanted else None
    return {"type": type, "mib": float(m.group(1)), "bpw": float(m.group(2)), "main": main, "fallbacks": fb}


def fp16_gguf(hf_folder: str | Path, out: str | Path, outtype: str = "f16", tokenizer_pre: str | None = None) -> dict:
    """The FP16 baseline: a plain HF folder converted by llama.cpp's own converter (pinned tree)."""
    from .export import convert_hf
    return convert_hf(hf_folder, out, outtype=outtype, tokenizer_pre=tokenizer_pre)
