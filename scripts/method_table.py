"""Issue 8's method table from one run: compare_gguf's rows (llama.cpp) joined with each checkpoint's manifest
(quantize wall time, peak GPU memory, distillation's held-out calibration KL).

usage: python scripts/method_table.py GGUF_JSON MANIFEST_DIR [--prefix P] [--suffix=S] [-o OUT.md]
A checkpoint row's file is NAME.gguf; its manifest MANIFEST_DIR/manifest-{P}NAME{S}.json (the job writes
manifest-NAME.json; docs/results keeps e.g. manifest-qwen15-NAME-run13-h200x2.json: --prefix qwen15- --suffix
-run13-h200x2). A distilled checkpoint's time is its init's plus its own ("233 + 256"). Rows sorted by file size.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fmt(v, f="{:.4f}"):
    return f.format(v) if isinstance(v, (int, float)) else "–"


def ckpt_cells(man: dict | None, manifests: dict[str, dict]) -> list[str]:
    """quantize s, peak GPU GiB, held-out KL for one checkpoint's manifest (None: a stock file)."""
    if man is None:
        return ["", "", ""]
    kd = man.get("kd")
    if not kd:
        return [_fmt(man.get("seconds"), "{:.0f}"), _fmt(man.get("peak_gpu_gib"), "{:.2f}"), ""]
    init = manifests.get(Path(man.get("init", {}).get("checkpoint", "")).name)
    secs = f"{_fmt(init.get('seconds'), '{:.0f}')} + " if init else ""
    peak = f"{_fmt(init.get('peak_gpu_gib'), '{:.2f}')} → " if init else ""
    kl = (f"{_fmt(kd.get('kd_heldout_kl_init'))} → {_fmt(kd.get('kd_heldout_kl_best'))} "
          f"(best step {kd.get('kd_best_step')} of {kd.get('kd_steps_run')}{', init kept' if kd.get('kd_kept_init') else ''})")
    return [secs + _fmt(man.get("seconds"), "{:.0f}"), peak + _fmt(kd.get("kd_peak_gpu_gib"), "{:.2f}"), kl]


def table(res: dict, manifests: dict[str, dict]) -> str:
    texts = res["texts"]
    first, rest = texts[0], texts[1:]
    head = (f"| file | MiB | bpw | {first} KLD / top-1 % / PPL | " + "".join(f"{t} KLD | " for t in rest)
            + "quantize s | peak GPU GiB | held-out calib KL (PyTorch) |")
    lines = [head, "|" + "---|" * (4 + len(rest) + 3)]
    for r in sorted(res["rows"], key=lambda r: r["mib"]):
        name = Path(r.get("path", "")).stem
        man = manifests.get(name) if r["file"].startswith("ours ") else None
        m = r.get(first, {})
        cells = [r["file"], f"{r['mib']:.0f}", _fmt(r.get("bpw"), "{:.2f}"),
                 f"{_fmt(m.get('kld'))} / {_fmt(m.get('same_top_p_pct'), '{:.1f}')} / {_fmt(m.get('ppl'), '{:.2f}')}"]
        cells += [_fmt(r.get(t, {}).get("kld")) for t in rest]
        cells += ckpt_cells(man, manifests)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_manifests(folder: Path, prefix: str = "", suffix: str = "") -> dict[str, dict]:
    out = {}
    for p in folder.glob(f"manifest-{prefix}*{suffix}.json"):
        name = p.name[len(f"manifest-{prefix}"):-len(f"{suffix}.json")]
        out[name] = json.loads(p.read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf_json")
    ap.add_argument("manifest_dir")
    ap.add_argument("--prefix", default="")
    ap.add_argument("--suffix", default="")
    ap.add_argument("-o", "--out", default=None)
    a = ap.parse_args()
    md = table(json.loads(Path(a.gguf_json).read_text()), load_manifests(Path(a.manifest_dir), a.prefix, a.suffix))
    if a.out:
        Path(a.out).write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
