"""Plots for docs/BENCHMARKS.md from the JSON the benchmark scripts write.

usage: python scripts/plot_results.py methods RESULTS.json [...] -o docs/results/methods.png
       python scripts/plot_results.py decode LLAMA_BENCH.json -o docs/results/decode.png
       python scripts/plot_results.py gemv BENCH_KERNELS.json -o docs/results/gemv.png
methods: KLD vs FP and perplexity per method, one panel row per model (bench_methods.py output).
decode: tok/s against file size per type (llama-bench -o json output).
gemv: batch-1 packed GEMV time vs cuBLAS fp16 per shape, and % of copy bandwidth (bench_kernels.py).
"""
from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["methods", "decode", "gemv"])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    if a.kind == "methods":
        plot_methods(a.inputs, a.out)
    elif a.kind == "gemv":
        plot_gemv(a.inputs[0], a.out)
    else:
        plot_decode(a.inputs[0], a.out)
    print(a.out)


if __name__ == "__main__":
    main()
