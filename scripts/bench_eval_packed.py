"""`quant2gguf eval` on a checkpoint with packed 3-bit Triton kernels vs the dequantized fp16 model (GPU).

usage: python scripts/bench_eval_packed.py CKPT [--ntokens 8192] [--out results.json]
Same checkpoint, same held-out news tokens, fp16 activations: perplexity and wall time of the
text pass (no reference model, so only the evaluated model runs); the ppl of the two must agree.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quant2gguf.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--ntokens", type=int, default=8192)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = {}
    for packed in (False, True, False, True):  # twice each: the first pass pays compile/autotune
        r = evaluate(a.ckpt, ref=None, ntokens=a.ntokens, device="cuda", packed=packed, dtype=torch.float16)
        rows["packed" if packed else "fp16"] = {"ppl": r["ppl"], "text_seconds": r["text_seconds"]}
    out = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "ckpt": a.ckpt,
           "ntokens": a.ntokens, **rows}
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
