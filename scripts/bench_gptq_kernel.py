"""GPTQ's column loop: Triton kernel (kernels/gptq.py) vs the torch loop, at qwen15's linear shapes.

usage: python scripts/bench_gptq_kernel.py [--device cuda] [--out results.json] [--shapes N:K ...] [--reps 2]

Per shape (rows N x columns K, a random Hessian from 4K tokens with uneven channels, W3G128, act-order, damp
0.01 as `quantize --method gptq --act-order`): wall seconds of gptq_quantize with each loop (best of --reps, the
kernel's first call compiling it is reported apart), the share of codes that agree, and each result's output error
tr(E H E^T) / tr(W H W^T). On a CPU the kernel runs only under TRITON_INTERPRET=1 (slow: use small --shapes).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from quant2gguf.methods.gptq import gptq_quantize

QWEN15 = ["1536:1536", "256:1536", "8960:1536", "1536:8960"]  # q/o, k/v, gate/up, down


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev, reps):
    best, out = float("inf"), None
    for _ in range(reps):
        _sync(dev)
        t = time.perf_counter()
        out = fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=QWEN15)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    rows = []
    for sh in a.shapes:
        n, k = map(int, sh.split(":"))
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(4 * k, k, generator=g, device=dev) * torch.linspace(0.2, 3.0, k, device=dev)
        w = torch.randn(n, k, generator=g, device=dev) * 0.05
        h = 2 * x.t() @ x / x.shape[0]
        del x

        def run(kernel):
            return gptq_quantize(w, h, 3, 128, act_order=True, return_prequant=True, kernel=kernel)[0]

        first, _ = _time(lambda: run(True), dev, 1)
        t_kernel, qk = _time(lambda: run(True), dev, a.reps)
        t_torch, qt = _time(lambda: run(False), dev, a.reps)

        def out_err(q):
            e = q.dequantize().float() - w
            return ((e @ h) * e).sum().item() / ((w @ h) * w).sum().item()

        row = {"shape": [n, k], "kernel_s": round(t_kernel, 4), "kernel_first_s": round(first, 4),
               "torch_s": round(t_torch, 4), "speedup": round(t_torch / t_kernel, 1),
               "codes_agree_pct": round(100 * (qk.codes == qt.codes).float().mean().item(), 4),
               "out_err_kernel": out_err(qk), "out_err_torch": out_err(qt)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        with open(a.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "device": name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
