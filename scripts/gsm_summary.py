"""GSM and long-decode results of every file in a `bench` cache, even one whose run was cut short.

A bench writes its report only at the end; on the GPU machine the budget often ends first (the seventh qwen15
run), but each (file, phase) result is already cached as OUT/cache/<stem>.<phase>.<hash>.json. This reads them
all and writes the summary `scripts/plot_results.py gsm` plots: per file its pass@1 with a 95 % Wilson
interval, the exact McNemar split against F16 and against a named reference (default IQ3_S), its CHAMP/--text
KLD from the quality phase, the long-decode score, and how early its answers leave F16's text (median share of
F16's answer kept before the first differing character: each file reasons on its own trajectory).

usage: python scripts/gsm_summary.py BENCH_DIR [BENCH_DIR ...] -o gsm.json [--vs IQ3_S] [--model qwen15]
       [--card 'NVIDIA H200'] [--command '...']   (several dirs: bench A and B of one job; the first F16 wins)
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path


def _results(dirs: list[Path]) -> dict[str, dict[str, dict]]:
    """{file stem: {phase: result}} from the caches; a stem seen in an earlier dir keeps that dir's result."""
    out: dict[str, dict[str, dict]] = {}
    for d in dirs:
        for p in sorted((d / "cache").glob("*.json")):
            stem, phase = p.name.rsplit(".", 3)[:2]  # <stem>.<phase>.<hash>.json; a stem may hold dots
            if phase in ("gsm", "long", "quality"):
                out.setdefault(stem, {}).setdefault(phase, json.loads(p.read_text()))
    return out


def _label(stem: str, model: str | None = None) -> str:
    """qwen15-IQ3_S-imat-news+code-128x512 -> IQ3_S+imat; qwen15-F16 -> F16; our files keep their names; the
    fixture GGUF of --model (the FP reference was dequantized from it) is said to be that, as bench says it."""
    from quant2gguf.fixtures import SPLIT_MODELS
    src = SPLIT_MODELS.get(str(model))
    if src and stem == Path(src.file).stem:
        return f"{stem.rsplit('.', 1)[-1]} fixture (FP reference's source grid)"
    parts = stem.split("-")
    if len(parts) > 1 and parts[1] == "F16":
        return "F16"
    if "imat" in parts:
        return f"{parts[parts.index('imat') - 1]}+imat"
    return f"ours {stem}"


def _kept(ref: dict, rows: list[dict]) -> float | None:
    """Median share of F16's answer text a file's answer repeats before it first differs."""
    shares = []
    for r in rows:
        a, b = ref.get(r["key"]), r.get("text")
        if a and b is not None:
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            shares.append(n / len(a))
    return round(statistics.median(shares), 3) if shares else None


def summarize(dirs: list[Path], vs: str = "IQ3_S", model: str | None = None) -> list[dict]:
    from quant2gguf.bench import paired, wilson
    res = _results(dirs)
    by_label = {_label(s, model): r for s, r in res.items()}
    f16 = by_label.get("F16", {}).get("gsm")
    ref = next((r.get("gsm") for lab, r in by_label.items() if lab.startswith(vs)), None)
    f16_text = {x["key"]: x.get("text") for x in f16["rows"]} if f16 else {}
    rows = []
    for lab, r in sorted(by_label.items(), key=lambda kv: (kv[0] != "F16", kv[0].startswith("ours"), kv[0])):
        g = r.get("gsm")
        if not g:
            continue
        lo, hi = wilson(g["correct"], g["n"])
        row = {"file": lab, "champ_kld": (r.get("quality") or {}).get("kld"), "correct": g["correct"], "n": g["n"],
               "pass1": g["correct"] / g["n"], "ci95": [round(lo, 4), round(hi, 4)], "truncated": g.get("truncated"),
               "per_problem": {x["key"]: bool(x["correct"]) for x in g["rows"]}}
        if f16 and lab != "F16":
            row["vs_f16"] = paired(f16["rows"], g["rows"])
            row["f16_text_kept_median"] = _kept(f16_text, g["rows"])
        if ref and not lab.startswith(vs):
            row[f"vs_{vs}"] = paired(ref["rows"], g["rows"])
        if r.get("long"):
            row["long_correct"], row["long_n"] = r["long"]["correct"], r["long"]["n"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="bench output folders (each with cache/)")
    ap.add_argument("-o", "--out", required=True, type=Path)
    ap.add_argument("--vs", default="IQ3_S", help="the stock reference for a second McNemar split")
    ap.add_argument("--model", default="qwen15")
    ap.add_argument("--card", default="")
    ap.add_argument("--command", default="")
    a = ap.parse_args()
    missing = [str(d) for d in a.dirs if not (d / "cache").is_dir()]
    if missing:
        raise SystemExit(f"no bench cache in {', '.join(missing)}: pass the folders bench -o wrote")
    rows = summarize(a.dirs, a.vs, a.model)
    if not rows:
        raise SystemExit(f"no GSM results in {', '.join(map(str, a.dirs))}")
    out = {"model": a.model, "date": datetime.date.today().isoformat(), "card": a.card, "command": a.command,
           "note": "GSM pass@1 from bench caches; champ_kld: the quality phase's KLD vs F16 (its --text)",
           "rows": rows}
    a.out.write_text(json.dumps(out, indent=1))
    for r in rows:
        vs = r.get("vs_f16")
        pair = f"  vs F16 -{vs['lost']} +{vs['gained']} p {vs['p']:.2g}" if vs else ""
        print(f"{r['file']:<40} {100 * r['pass1']:5.1f} % ({r['correct']}/{r['n']}){pair}")


if __name__ == "__main__":
    main()
