"""Plots for docs/BENCHMARKS.md from the JSON the benchmark scripts write.

usage: python scripts/plot_results.py methods RESULTS.json [...] -o docs/results/methods.png
       python scripts/plot_results.py decode LLAMA_BENCH.json -o docs/results/decode.png
methods: KLD vs FP and perplexity per method, one panel row per model (bench_methods.py output).
decode: tok/s against file size per type (llama-bench -o json output).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["methods", "decode"])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    if a.kind == "methods":
        plot_methods(a.inputs, a.out)
    else:
        plot_decode(a.inputs[0], a.out)
    print(a.out)


if __name__ == "__main__":
    main()
