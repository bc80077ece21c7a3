#!/usr/bin/env python3
"""Launch-parameter sweeps for the Triton kernels on the GPU (what the heuristics in kernels/ are
fitted to): GEMV batch 1 over tile, warps, prefetch and split-K, fake-quant fwd and bwd over rows
a program and warps, plus a torch.profiler breakdown of one fake-quant fwd+bwd step.

Same timing method as bench_kernels.py: weights rotated over copies that L2 cannot hold, CUDA-graph
replay medians, torch fp16 (cuBLAS) in the same run. Writes tune_kernels.json into --out.
usage: python scripts/tune_kernels.py --out DIR [--only gemv,fq] [--budget S]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as B  # noqa: E402  (shared timing helpers)
from quant2gguf.kernels import fakequant as FQ  # noqa: E402
from quant2gguf.kernels import qmatmul as QM  # noqa: E402

# (num_warps, BN, BW): 4..16 tile elements a thread
TILES = [(4, 128, 4), (4, 128, 8), (4, 128, 16), (4, 256, 4), (4, 256, 8), (4, 64, 8), (4, 64, 16),
         (4, 32, 16), (4, 32, 32), (8, 128, 8), (8, 128, 16), (8, 256, 8), (8, 64, 16), (8, 64, 32)]
PFS = (0, 1)
CTAS_PER_SM = (1, 2, 3, 4, 8)
SHAPES = [(4096, 4096), (12288, 4096), (4096, 12288), (9728, 2560), (2560, 9728), (4096, 2560),
          (896, 4864), (4864, 896)]
T0 = time.time()


def split_for(n: int, k: int, bn: int, bw: int, per_sm: int) -> int:
    nrb = triton.cdiv(n, bn)
    iters = triton.cdiv(k // 32, bw)
    return max(1, min(iters, QM.SPLIT_MAX, round(per_sm * QM.NUM_SMS / nrb)))


def gemv_shape(n: int, k: int, cands: list[dict], budget: float) -> dict:
    base = [B.rand_packed(n, k) for _ in range(8)]
    nq = B.ncopies(base[0].nbytes)
    pws = base + [B._clone(base[i % 8]) for i in range(8, nq)]
    wf0 = QM.dequantize_dense(pws[0], torch.float16)
    nf = B.ncopies(n * k * 2)
    wf = [wf0] + [wf0.clone() for _ in range(nf - 1)]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = x.double() @ QM.dequantize_dense(pws[0], torch.float32).double().T
    fp16 = B.graph_us([lambda w=w: torch.matmul(x, w.T) for w in wf])
    QM._CFG.clear()
    heur = QM.gemv_config(n, k, 1)
    rows = []
    seen = set()
    for cfg in [dict(heur, tag="heuristic")] + cands:
        c = {a: b for a, b in cfg.items() if a != "tag"}
        key = tuple(sorted(c.items()))
        if key in seen:
            continue
        seen.add(key)
        if time.time() - T0 > budget:
            break
        try:
            y = QM.qmatmul(x, pws[0], config=c, force="gemv")
            err = B.rel(y, ref)
            t = B.graph_us([lambda p=p: QM.qmatmul(x, p, config=c, force="gemv") for p in pws]) if err < 1e-2 else float("nan")
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
            err, t = float("nan"), float("nan")
            print(f"  {c}: {type(e).__name__}: {str(e)[:120]}")
        rows.append(dict(cfg=c, tag=cfg.get("tag", ""), us=t, err=err))
    ok = [r for r in rows if r["us"] == r["us"]]
    ok.sort(key=lambda r: r["us"])
    qb = pws[0].nbytes
    out = dict(n=n, k=k, q_bytes=qb, fp16_graph_us=fp16, rows=rows,
               best=ok[0] if ok else None, heuristic=rows[0])
    if ok:
        b = ok[0]
        print(f"gemv {n}x{k}: fp16 {fp16:.2f} us | heuristic {rows[0]['us']:.2f} us | best {b['us']:.2f} us "
              f"x{fp16 / b['us']:.2f} fp16, {qb / b['us'] / 1e3:.0f} GB/s  {b['cfg']}", flush=True)
        for r in ok[:6]:
            print(f"    {r['us']:7.2f}  {r['cfg']}")
    del pws, wf
    torch.cuda.empty_cache()
    return out


def all_cands(n: int, k: int) -> list[dict]:
    out = []
    for nw, bn, bw in TILES:
        for pf in PFS:
            for per in CTAS_PER_SM:
                out.append(dict(BN=bn, BW=bw, SPLIT=split_for(n, k, bn, bw, per), PF=pf, num_warps=nw))
    return out


def tune_gemv(budget: float) -> list[dict]:
    res = []
    first = gemv_shape(*SHAPES[0], all_cands(*SHAPES[0]), budget * 0.35)
    res.append(first)
    # other shapes: the 10 best tiles of the first shape, every split target
    ranked = sorted([r for r in first["rows"] if r["us"] == r["us"]], key=lambda r: r["us"])
    tiles = []
    for r in ranked:
        t = (r["cfg"]["num_warps"], r["cfg"]["BN"], r["cfg"]["BW"], r["cfg"].get("PF", 0))
        if t not in tiles:
            tiles.append(t)
    for (n, k) in SHAPES[1:]:
        cands = [dict(BN=bn, BW=bw, SPLIT=split_for(n, k, bn, bw, per), PF=pf, num_warps=nw)
                 for nw, bn, bw, pf in tiles[:8] for per in CTAS_PER_SM]
        if time.time() - T0 < budget * 0.7:
            res.append(gemv_shape(n, k, cands, budget * 0.7))
    return res


def tune_fq(budget: float) -> dict:
    out = {"profile": {}, "sweep": []}
    g = 128
    for (n, k) in ((4096, 4096), (9728, 2560)):
        for slots in (0, 2):
            w = torch.randn(n, k, device="cuda") * 0.02
            wg = w.reshape(n, k // g, g)
            d = (wg.amax(-1) - wg.amin(-1)) / 7
            m = wg.amin(-1).clone()
            pidx = None
            if slots:
                pidx = torch.randint(0, g, (n, k // g, slots), device="cuda").to(torch.uint8)
                pidx[..., 1:] = FQ.EMPTY
            gout = torch.randn(n, k, device="cuda")
            ng = n * (k // g)
            pi = pidx if slots else d
            o = torch.empty(n, k, device="cuda")
            gw, gd, gm = torch.empty_like(w), torch.empty_like(d), torch.empty_like(d)
            for br in (2, 4, 8, 16, 32):
                for nw in (2, 4, 8):
                    if time.time() - T0 > budget:
                        break
                    grid = (triton.cdiv(ng, br),)
                    r = dict(n=n, k=k, slots=slots, BLOCK_R=br, num_warps=nw)
                    try:
                        r["fwd_us"] = B.med(lambda: FQ._fq_fwd_kernel[grid](
                            w, d, m, pi, o, ng, G=g, P=slots, QMAX=7, BLOCK_R=br, num_warps=nw))
                        r["bwd_us"] = B.med(lambda: FQ._fq_bwd_kernel[grid](
                            w, d, m, pi, gout, gw, gd, gm, ng, G=g, P=slots, QMAX=7, BLOCK_R=br, num_warps=nw))
                    except Exception as e:  # noqa: BLE001
                        r["error"] = f"{type(e).__name__}: {str(e)[:100]}"
                    out["sweep"].append(r)
                    print(f"fq {n}x{k} P={slots} BR={br} nw={nw}: fwd {r.get('fwd_us', float('nan')):.1f} "
                          f"bwd {r.get('bwd_us', float('nan')):.1f} us", flush=True)
            # where the time of one autograd fwd+bwd goes (the benchmark's measured call)
            wl = w.clone().requires_grad_()
            dl, ml = d.clone().requires_grad_(), m.clone().requires_grad_()
            for _ in range(3):
                FQ.fake_quant(wl, dl, ml, 3, g, pidx).backward(gout)
            torch.cuda.synchronize()
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    wl.grad = dl.grad = ml.grad = None
                    FQ.fake_quant(wl, dl, ml, 3, g, pidx).backward(gout)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
            out["profile"][f"{n}x{k}P{slots}"] = table
            print(table, flush=True)
    return out


def floor_us() -> dict:
    """Per-call floor of the graph-replay timing: tiny GEMVs (256 x 256) where no time goes to data,
    cuBLAS fp16 and ours; what every measured shape pays on top of its data time."""
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    pws = [B.rand_packed(256, 256) for _ in range(64)]
    wf = [QM.dequantize_dense(p, torch.float16) for p in pws]
    out = dict(fp16_us=B.graph_us([lambda w=w: torch.matmul(x, w.T) for w in wf]),
               q_us=B.graph_us([lambda p=p: QM.qmatmul(x, p) for p in pws]))
    print(f"floor (256x256 GEMV, graph replay): fp16 {out['fp16_us']:.2f} us, packed {out['q_us']:.2f} us", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tune_out"))
    ap.add_argument("--only", default="floor,gemv,fqbench", help="of floor, gemv, fq (sweep), fqbench")
    ap.add_argument("--budget", type=float, default=520, help="seconds for the whole run")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    B.OUTDIR = a.out  # bench_kernels' sections save their rows there
    QM.NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch": torch.__version__}
    for name in a.only.split(","):
        t = time.time()
        try:
            fn = {"fq": lambda: tune_fq(a.budget), "gemv": lambda: tune_gemv(a.budget * 0.8),
                  "floor": floor_us, "fqbench": B.bench_fakequant}[name]
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - keep what the other section measured
            import traceback
            traceback.print_exc()
            res[name + "_error"] = f"{type(e).__name__}: {e}"
        print(f"[{name}: {time.time() - t:.0f} s]", flush=True)
        (a.out / "tune_kernels.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
