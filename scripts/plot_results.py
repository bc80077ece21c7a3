"""Plots for docs/BENCHMARKS.md from the JSON the benchmark scripts write.

usage: python scripts/plot_results.py methods RESULTS.json [...] -o docs/results/methods.png
       python scripts/plot_results.py decode LLAMA_BENCH.json -o docs/results/decode.png
       python scripts/plot_results.py gemv BENCH_KERNELS.json -o docs/results/gemv.png
methods: KLD vs FP and perplexity per method, one panel row per model (bench_methods.py output).
decode: tok/s against file size per type (llama-bench -o json output).
gemv: batch-1 packed GEMV time vs cuBLAS fp16 per shape, and % of copy bandwidth (bench_kernels.py).
gsm: GSM pass@1 (95% Wilson interval) against CHAMP KLD per file, from a gsm-*.json summary of bench answers.
sizekld: whole-file MiB vs llama.cpp KLD, one panel per text, from compare_gguf.py JSON files: the first
  file's rows solid; stock rows of later files (earlier runs, same protocol) hollow where the first lacks them.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_methods(paths: list[str], out: str) -> None:
    by_model = defaultdict(list)
    machine = set()
    for p in paths:
        d = json.load(open(p))
        machine.add(d.get("machine", "?"))
        for r in d["rows"]:
            by_model[r.get("ref") or r["model"]].append(r)  # quantized rows: ref = the fixture
    fig, axes = plt.subplots(len(by_model), 2, figsize=(11, 3.2 * len(by_model)), squeeze=False)
    for ax, (model, rows) in zip(axes, by_model.items()):
        fp = next((r for r in rows if r["method"] == "fp"), None)
        q = [r for r in rows if r["method"] != "fp"]
        names = [f"{r['method']}\n{r.get('bpw', 0):.2f} bpw" for r in q]
        ax[0].bar(names, [r.get("kld") or 0 for r in q], color="tab:blue")
        ax[0].set_title(f"{model}: KLD vs FP (lower is better)")
        ax[1].bar(names, [r.get("ppl") or 0 for r in q], color="tab:orange")
        if fp:
            ax[1].axhline(fp["ppl"], color="k", ls="--", label=f"FP {fp['ppl']:.2f}")
            ax[1].legend()
        ax[1].set_title(f"{model}: perplexity, held-out news")
        for a in ax:
            a.tick_params(axis="x", labelsize=8)
    fig.suptitle(", ".join(sorted(machine)), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_decode(path: str, out: str) -> None:
    rows = json.load(open(path))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ours = "Q3_G" in r["model_type"]
        ax.scatter(r["model_size"] / 2**30, r["avg_ts"], color="tab:red" if ours else "tab:gray", s=40)
        ax.annotate(r["model_type"].split(" ")[2] if len(r["model_type"].split(" ")) > 2 else r["model_type"],
                    (r["model_size"] / 2**30, r["avg_ts"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("file size (GiB)")
    ax.set_ylabel("decode tok/s (tg128)")
    ax.set_title(f"{rows[0].get('gpu_info') or rows[0].get('cpu_info')}: decode speed vs size (ours in red)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_gemv(path: str, out: str) -> None:
    d = json.load(open(path))
    rows = [r for r in d["gemv"] if r["batch"] == 1 and r["slots"] == 0]
    names = [f"{r['n']}x{r['k']}" for r in rows]
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = range(len(rows))
    a0.bar([i - 0.2 for i in x], [r["fp16_graph_us"] for r in rows], 0.4, label="cuBLAS fp16", color="tab:gray")
    a0.bar([i + 0.2 for i in x], [r["q_graph_us"] for r in rows], 0.4, label="packed 3.25 bpw (ours)", color="tab:red")
    a0.set_ylabel("µs per call (CUDA-graph replay)")
    a0.set_title("GEMV batch 1: time per call")
    a0.legend()
    a1.bar(list(x), [r["speedup_graph"] for r in rows], color="tab:red")
    a1.axhline(3, color="k", ls="--", label="goal 3x")
    a1.set_ylabel("x fp16")
    a1.set_title("speedup over fp16 (numbers: % of copy bandwidth)")
    for i, r in zip(x, rows):
        a1.annotate(f"{100 * r['q_graph_frac_copy']:.0f}%", (i, r["speedup_graph"]), ha="center", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    a1.legend()
    for a in (a0, a1):
        a.set_xticks(list(x))
        a.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    fig.suptitle(f"{d['device']}, {d['date']}, triton {d['triton']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def size_kld_panel(ax, rows: list[dict], text: str, earlier: frozenset = frozenset()) -> None:
    """One size-vs-KLD panel: our files red circles, stock files blue squares, the stock frontier dashed
    (stock files that no smaller stock file beats); rows named in `earlier` hollow."""
    pts = [(r["mib"], r[text]["kld"], r["file"]) for r in rows if (r.get(text) or {}).get("kld") is not None]
    front, best = [], float("inf")
    for p in sorted((p for p in pts if not p[2].startswith("ours") and "Q3_G" not in p[2]), key=lambda p: p[0]):
        if p[1] < best:
            front.append(p)
            best = p[1]
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="stock frontier (imatrix)")
    for x, y, n in pts:
        ours = n.startswith("ours") or "Q3_G" in n
        c = "tab:red" if ours else "tab:blue"
        ax.scatter(x, y, marker="o" if ours else "s", facecolors="none" if n in earlier else c, edgecolors=c)
        ax.annotate(n.replace("ours ", "") + (" (earlier run)" if n in earlier else ""), (x, y), fontsize=6.5,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("whole file MiB")
    ax.set_ylabel(f"KLD vs F16 ({text} eval split)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)


def plot_size_kld(paths: list[str], out: str, texts: list[str]) -> None:
    first = json.load(open(paths[0]))
    rows, have = list(first["rows"]), {r["file"] for r in first["rows"]}
    earlier = set()
    for p in paths[1:]:
        for r in json.load(open(p))["rows"]:
            if r["file"] not in have and not r["file"].startswith("ours"):
                rows.append(r)
                have.add(r["file"])
                earlier.add(r["file"])
    rows = [r for r in rows if r["file"] != "F16"]
    fig, axes = plt.subplots(1, len(texts), figsize=(6.5 * len(texts), 5), squeeze=False)
    for ax, t in zip(axes[0], texts):
        size_kld_panel(ax, rows, t, frozenset(earlier))
        ax.set_title(f"{t}")
    fig.suptitle(f"{first['model']}, {first['date']}: KLD vs F16 in llama.cpp ({first.get('imatrix', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def plot_gsm(path: str, out: str) -> None:
    """Teacher-forced KLD does not rank generation: each file's GSM accuracy against its CHAMP KLD."""
    res = json.load(open(path))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in res["rows"]:
        lo, hi = wilson(r["correct"], r["n"])
        p, x = r["correct"] / r["n"], r["champ_kld"] or 0.0
        ours = r["file"].startswith("ours")
        c = "tab:red" if ours else ("k" if r["file"] == "F16" else "tab:blue")
        ax.errorbar(x, 100 * p, yerr=[[100 * (p - lo)], [100 * (hi - p)]], fmt="o" if ours else "s", color=c, capsize=3)
        ax.annotate(r["file"], (x, 100 * p), fontsize=6.5, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("KLD vs F16, CHAMP eval text (F16: 0)")
    ax.set_ylabel(f"GSM pass@1 %, {res['rows'][0]['n']} held-out problems (95% CI)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{res['model']}, {res['date']}, {res['card']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["methods", "decode", "gemv", "sizekld", "gsm"])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--texts", nargs="+", default=["news", "champ", "code"], help="sizekld: one panel each")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    if a.kind == "methods":
        plot_methods(a.inputs, a.out)
    elif a.kind == "sizekld":
        plot_size_kld(a.inputs, a.out, a.texts)
    elif a.kind == "gsm":
        plot_gsm(a.inputs[0], a.out)
    elif a.kind == "gemv":
        plot_gemv(a.inputs[0], a.out)
    else:
        plot_decode(a.inputs[0], a.out)
    print(a.out)


if __name__ == "__main__":
    main()
