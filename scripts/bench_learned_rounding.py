"""Learned rounding in a stock grid (AutoRound's V: kd / laquant `--lr-w` with a stock target) against frozen
codes, on the tests' tiny qwen2 (256 wide, 2 layers, random weights), CPU, about two minutes.

usage: python scripts/bench_learned_rounding.py [-o docs/results/learned-rounding-tiny-cpu.json]
Prints a markdown table: KD held-out KL (30 steps, batch 4, 64-token windows of news) from RTN and GPTQ Q3_K
inits at several --lr-w (0 = codes frozen), and LAQuant (init rtn, 4 epochs) per-layer loss before/after.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

KD_RATES = (0, 0.001, 0.003, 0.01, 0.035)
LAQ_RATES = (None, 0.003, 0.01, 0.03, 0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", type=Path)
    a = ap.parse_args()
    from conftest import make_tiny_model

    from quant2gguf.pipeline import quantize_model
    root = Path(tempfile.mkdtemp())
    m = make_tiny_model("qwen2", root / "m", hidden=256)
    base = dict(seqlen=64, device="cpu")
    rows = []
    for init in ("rtn", "gptq"):
        ck = quantize_model(m, root / f"init-{init}", method=init, target="q3_k", nsamples=8, **base)
        for lr in KD_RATES:
            out = quantize_model(m, root / f"kd-{init}-{lr}", method="kd", init=str(ck), steps=30, batch=4,
                                 eval_every=5, heldout=4, lr_w=lr, **base)
            st = json.loads((out / "manifest.json").read_text())["kd"]
            rows.append({"method": "kd", "init": init, "lr_w": lr, "kl_init": st["kd_heldout_kl_init"],
                         "kl_best": st["kd_heldout_kl_best"], "best_step": st["kd_best_step"]})
    for lr in LAQ_RATES:
        out = quantize_model(m, root / f"laq-{lr}", method="laquant", init="rtn", target="q3_k", epochs=4,
                             lr_w=lr, nsamples=8, **base)
        layers = json.loads((out / "manifest.json").read_text())["layers"]
        rows.append({"method": "laquant", "init": "rtn", "lr_w": lr,
                     "layers": [{k: x[k] for k in ("qat_loss_before", "qat_loss_after", "qat_kept")} for x in layers]})
    print("| method | init | --lr-w | result |\n|---|---|---|---|")
    for r in rows:
        res = (f"held-out KL {r['kl_init']:.4f} -> {r['kl_best']:.4f} (step {r['best_step']})" if r["method"] == "kd"
               else "; ".join(f"layer {i} {x['qat_loss_before']:.3f} -> {x['qat_loss_after']:.3f}"
                              f"{'' if x['qat_kept'] else ' (init kept)'}" for i, x in enumerate(r["layers"])))
        print(f"| {r['method']} | {r['init']} | {r['lr_w'] or 'frozen'} | {res} |")
    if a.out:
        a.out.write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": platform.processor() or
                                     platform.machine(), "command": "python scripts/bench_learned_rounding.py",
                                     "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
