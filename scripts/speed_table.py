"""Issue 11's speed table from one run: llama-bench JSON (tg128 / pp512 per file), optionally llama-batched-bench
JSONL rows (decode at 1/2/4/8 sequences) and the copy roof scripts/device_cuda_mmvq.sh measured.

usage: python scripts/speed_table.py [LLAMA_BENCH.json ...] [--batched ROWS.jsonl] [--roof CUDA_MMVQ.jsonl] [-o OUT.md]
(several llama-bench files of one run are merged: e.g. a second process under GGML_Q3G_MMVQ_F32Y=1, its files linked
under -f32y names)
tg128 is also given as × the F16 file's (the shortest name with F16: not a fused variant) and as achieved bandwidth: the file's bytes
(llama-bench's model_size: every weight is read once a token) × tokens/s, and that as a share of the device-to-device
copy bandwidth (the roof). The achieved figure ignores the KV cache and activations: at ctx 128 they are small.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _name(r: dict) -> str:
    return Path(r.get("model_filename") or r.get("file", "?")).name


def bench_rows(rows: list[dict]) -> dict[str, dict]:
    """file -> {tg, tg_sd, pp, bytes} from llama-bench's JSON rows (one per file and test)."""
    out: dict[str, dict] = {}
    for r in rows:
        d = out.setdefault(_name(r), {"bytes": r["model_size"]})
        if r["n_gen"] and not r["n_prompt"]:
            d["tg"], d["tg_sd"] = r["avg_ts"], r["stddev_ts"]
        elif r["n_prompt"] and not r["n_gen"]:
            d["pp"] = r["avg_ts"]
    return out


def roof_gbps(path: Path) -> float | None:
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("roof") == "d2d_copy":
            return r["gbps"]
    return None


def table(files: dict[str, dict], roof: float | None = None) -> str:
    ref = min((k for k, v in files.items() if "F16" in k and "tg" in v), key=len, default=None)  # F16, not F16-fqkv
    f16 = files[ref]["tg"] if ref else None
    head = "| file | GiB | tg128 tok/s | × F16 | pp512 tok/s | achieved GB/s |" + (" share of copy roof |" if roof else "")
    lines = [head, "|" + "---|" * (6 + bool(roof))]
    for k, v in sorted(files.items(), key=lambda kv: -kv[1].get("tg", 0)):
        tg = v.get("tg")
        gbps = v["bytes"] * tg / 1e9 if tg else None
        cells = [k, f"{v['bytes'] / 2**30:.2f}", f"{tg:.1f} ± {v['tg_sd']:.1f}" if tg else "–",
                 f"{tg / f16:.2f}" if tg and f16 else "–", f"{v['pp']:.0f}" if v.get("pp") else "–",
                 f"{gbps:.0f}" if gbps else "–"]
        if roof:
            cells.append(f"{gbps / roof:.0%}" if gbps else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def batched_table(rows: list[dict]) -> str:
    """decode tok/s at each parallel-sequence count (pl), one row per file (and kernel switch, where recorded)."""
    by: dict[str, dict[int, float]] = {}
    for r in rows:
        key = r["file"] + ("" if r.get("wrow", 1) else " (batch 2..8 kernel off)")
        by.setdefault(key, {})[r["pl"]] = r["speed_tg"]
    pls = sorted({p for v in by.values() for p in v})
    lines = ["| file | " + " | ".join(f"{p} seq" for p in pls) + " |", "|" + "---|" * (1 + len(pls))]
    for k, v in by.items():
        lines.append(f"| {k} | " + " | ".join(f"{v[p]:.0f}" if p in v else "–" for p in pls) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("llama_bench_json", nargs="*")
    ap.add_argument("--batched", default=None)
    ap.add_argument("--roof", default=None)
    ap.add_argument("-o", "--out", default=None)
    a = ap.parse_args()
    if not (a.llama_bench_json or a.batched):
        ap.error("give a llama-bench JSON file, --batched rows, or both")
    md = ""
    if a.llama_bench_json:
        rows = [r for f in a.llama_bench_json for r in json.loads(Path(f).read_text())]
        md = table(bench_rows(rows), roof_gbps(Path(a.roof)) if a.roof else None)
    if a.batched:
        md += ("\n" if md else "") + batched_table([json.loads(x) for x in Path(a.batched).read_text().splitlines() if x.strip()])
    if a.out:
        Path(a.out).write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
