#!/usr/bin/env python3
"""Host (Python) cost of one packed GEMV call and one fake-quant fwd+bwd on the GPU: cProfile of
back-to-back calls, top entries by total time. usage: python scripts/profile_host.py"""
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as B  # noqa: E402
from quant2gguf.kernels import fakequant as FQ  # noqa: E402
from quant2gguf.kernels import launch as KL  # noqa: E402
from quant2gguf.kernels import qmatmul as QM  # noqa: E402

pw = B.rand_packed(4096, 4096)
x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
w = (torch.randn(4096, 4096, device="cuda") * 0.02).requires_grad_()
d = torch.full((4096, 32), 0.01, device="cuda", requires_grad=True)
m = torch.full((4096, 32), -0.03, device="cuda", requires_grad=True)
g = torch.randn(4096, 4096, device="cuda")
for _ in range(5):
    QM.qmatmul(x, pw)
    FQ.fake_quant(w, d, m, 3, 128).backward(g)
torch.cuda.synchronize()
print("direct launch enabled:", KL.ENABLED, "cached:", len(KL._CACHE))
for name, fn, n in (("qmatmul", lambda: QM.qmatmul(x, pw), 2000),
                    ("fake_quant fwd+bwd", lambda: FQ.fake_quant(w, d, m, 3, 128).backward(g), 200)):
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    print(f"== {name}: {n} calls")
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)
print("direct launch enabled after:", KL.ENABLED)
