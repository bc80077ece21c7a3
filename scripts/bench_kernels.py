#!/usr/bin/env python3
"""GPU benchmark of the Triton kernels (kernels/): packed 3-bit GEMV/GEMM vs torch fp16 (cuBLAS),
fake-quant fwd+bwd vs torch eager and torch.compile of the same math, and a model-level check.

Method (see the device README's METHOD.md): correctness of each kernel against a reference on the
real shape first; triton.testing.do_bench medians (it flushes L2 between repeats); weights rotated
over enough copies (>= 8, >= 128 MB in all) that L2 cannot hold them; device copy bandwidth measured
in the same run; plus CUDA-graph replays of the rotated calls (kernel time without launch gaps).
Writes bench_kernels.json and bench_kernels.md into --out; prints the markdown last.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

SMOKE = "--smoke" in sys.argv  # CPU dry run of this script's code paths: tiny shapes, interpreter
if SMOKE and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from quant2gguf import quantizer as Q
from quant2gguf.kernels import fakequant as FQ
from quant2gguf.kernels import launch as KL
from quant2gguf.kernels import qmatmul as QM

SHAPES = {  # (N out, K in) of every distinct linear
    "Qwen2.5-0.5B": [(896, 896), (128, 896), (4864, 896), (896, 4864)],
    "Qwen3-4B": [(4096, 2560), (1024, 2560), (2560, 4096), (9728, 2560), (2560, 9728)],
    "Qwen3-8B": [(4096, 4096), (1024, 4096), (12288, 4096), (4096, 12288)],
}
GEMM_SHAPES = [(4864, 896), (4096, 2560), (9728, 2560), (2560, 9728), (4096, 4096), (12288, 4096), (4096, 12288)]
ROT_BYTES = 128 << 20
RES: dict = {}  # the results so far, saved after every measured row (a timeout keeps what was done)
OUTDIR = Path("bench_out")
if SMOKE:
    SHAPES = {"tiny": [(48, 256), (32, 128)]}
    GEMM_SHAPES = [(48, 256)]
    ROT_BYTES = 1 << 14
T0 = time.time()


def save(section: str | None = None, rows=None):
    if section is not None:
        RES[section] = rows
    if RES:
        (OUTDIR / "bench_kernels.json").write_text(json.dumps(RES, indent=1))
        (OUTDIR / "bench_kernels.md").write_text(markdown(RES))


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def med(fn, **kw) -> float:
    """do_bench median in microseconds."""
    if DEV == "cpu":
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return do_bench(fn, warmup=25, rep=100, return_mode="median", **kw) * 1e3


def graph_us(fns: list, reps: int | None = None) -> float:
    """Median per-call time (us) of CUDA-graph replays of the rotated calls."""
    if DEV == "cpu":
        return float("nan")
    try:
        reps = reps or max(1, min(20, 4096 // len(fns)))
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                for f in fns:
                    f()
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(7):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / (reps * len(fns)))
        del g
        return statistics.median(ts)
    except Exception as e:  # noqa: BLE001 - report, never abort the run
        print(f"  graph timing failed: {type(e).__name__}: {e}")
        return float("nan")


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s, counting bytes read + written."""
    n = 1 << (16 if SMOKE else 28)  # 1 GiB of fp32 each way
    a = torch.empty(n, dtype=torch.float32, device=DEV).normal_()
    b = torch.empty_like(a)
    t = med(lambda: b.copy_(a))
    del a, b
    return 2 * n * 4 / t / 1e3


def rand_packed(n: int, k: int, g: int = 128, slots: int = 0) -> QM.PackedWeight:
    codes = torch.randint(0, 8, (n, k), dtype=torch.uint8, device=DEV)
    d = (torch.rand(n, k // g, device=DEV) * 0.01 + 1e-3).half()
    m = (-torch.rand(n, k // g, device=DEV) * 0.03).half()
    pidx = pval = None
    if slots:
        pidx = torch.randint(0, g, (n, k // g, slots), device=DEV).to(torch.uint8)
        pidx[..., 1:] = Q.EMPTY  # one protected weight per group
        pval = torch.randn(n, k // g, slots, device=DEV).half() * 0.05
    return QM.pack(Q.QuantizedWeight(codes, d, m, 3, g, pidx, pval))


def ncopies(nbytes: int) -> int:
    return int(min(4096, max(8, math.ceil(ROT_BYTES / nbytes))))


def rel(y, ref) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def bench_gemv(copy_gbs: float, batches=(1, 8), slots_shapes=((4096, 4096),)) -> list[dict]:
    rows = []
    for model, shapes in SHAPES.items():
        for (n, k) in shapes:
            for slots in (0, 1) if (n, k) in slots_shapes or (SMOKE and n == 48) else (0,):
                base = [rand_packed(n, k, slots=slots) for _ in range(8)]
                nq = ncopies(base[0].nbytes)
                pws = base + [_clone(base[i % 8]) for i in range(8, nq)]
                wf = [QM.dequantize_dense(pws[i], torch.float16) for i in range(min(nq, 8))]
                nf = ncopies(n * k * 2)
                wf = [wf[i] if i < len(wf) else wf[i % len(wf)].clone() for i in range(nf)]
                for b in batches:
                    x = torch.randn(b, k, device=DEV, dtype=torch.float16)
                    QM.qmatmul(x, pws[0])  # compiles here
                    y = QM.qmatmul(x, pws[0])  # the cached direct launch (what is timed)
                    cfg = str(QM._CFG.get((n, k, QM._next_pow2(b))))
                    err = rel(y, x.float() @ QM.dequantize_dense(pws[0], torch.float32).T)
                    itq, itf = itertools.cycle(pws), itertools.cycle(wf)
                    tq = med(lambda: QM.qmatmul(x, next(itq)))
                    tf = med(lambda: torch.matmul(x, next(itf).T))
                    gq = graph_us([lambda p=p: QM.qmatmul(x, p) for p in pws])
                    gf = graph_us([lambda w=w: torch.matmul(x, w.T) for w in wf])
                    qb, fb = pws[0].nbytes, n * k * 2
                    r = dict(model=model, n=n, k=k, batch=b, slots=slots, rel_err=err,
                             q_us=tq, fp16_us=tf, q_graph_us=gq, fp16_graph_us=gf,
                             q_bytes=qb, q_GBs=qb / tq / 1e3, fp16_GBs=fb / tf / 1e3,
                             q_graph_GBs=qb / gq / 1e3, q_frac_copy=qb / tq / 1e3 / copy_gbs,
                             q_graph_frac_copy=qb / gq / 1e3 / copy_gbs,
                             speedup=tf / tq, speedup_graph=gf / gq, copies=(nq, nf), config=cfg)
                    if b == 1 and (n, k) == (4096, 4096) and DEV == "cuda":
                        r.update(host_overhead(x, pws[0]))
                    rows.append(r)
                    save("gemv", rows)
                    print(f"gemv {model:13s} {n:6d}x{k:<6d} b={b} P={slots}: q {tq:7.2f} us "
                          f"({r['q_GBs']:6.0f} GB/s, {100 * r['q_frac_copy']:4.1f}% copy; graph {gq:6.2f} us "
                          f"{100 * r['q_graph_frac_copy']:4.1f}%)  fp16 {tf:7.2f} us  x{r['speedup']:.2f} "
                          f"(graph x{r['speedup_graph']:.2f})  err {err:.1e}  {cfg}", flush=True)
                del pws, wf
                if DEV == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _clone(pw: QM.PackedWeight) -> QM.PackedWeight:
    # every tensor field (the first run's copies lacked prot_rowptr: None reached the kernel)
    import dataclasses
    return dataclasses.replace(pw, **{f.name: getattr(pw, f.name).clone() for f in dataclasses.fields(pw)
                                      if isinstance(getattr(pw, f.name), torch.Tensor)})


def host_overhead(x, pw, calls: int = 300) -> dict:
    """Host (Python) time per qmatmul call: back-to-back calls without syncs on an idle GPU; the GPU
    side (a few us) is shorter, so this is the CPU cost. Direct launch vs the plain JIT launch."""
    out = {}
    for tag, fast in (("fast", True), ("jit", False)):
        KL.ENABLED = fast
        KL.clear()
        for _ in range(3):
            QM.qmatmul(x, pw)
        sync()
        t = time.perf_counter()
        for _ in range(calls):
            QM.qmatmul(x, pw)
        out[f"host_us_{tag}"] = (time.perf_counter() - t) * 1e6 / calls
        sync()
    KL.ENABLED = True
    KL.clear()
    print(f"  host time per qmatmul call: direct launch {out['host_us_fast']:.1f} us, "
          f"JIT launch {out['host_us_jit']:.1f} us", flush=True)
    return out


def bench_gemm(token_list=(16,) if SMOKE else (32, 2048)) -> list[dict]:
    """Prefill: qmatmul's default path (what it picks: dense = dequant kernel + cuBLAS above 8 rows)
    vs torch fp16; plus the dequant kernel alone."""
    rows = []
    for (n, k) in GEMM_SHAPES:
        pw = rand_packed(n, k)
        wf = QM.dequantize_dense(pw, torch.float16)
        for tokens in token_list:
            x = torch.randn(tokens, k, device=DEV, dtype=torch.float16)
            ref = x.float() @ wf.float().T
            r = dict(n=n, k=k, tokens=tokens)
            r["path"] = "gemv" if tokens < QM.DENSE_MIN_ROWS else "dense"
            tf = med(lambda: torch.matmul(x, wf.T))
            r["fp16_us"], r["fp16_TFLOPs"] = tf, 2 * tokens * n * k / tf / 1e6
            y = QM.qmatmul(x, pw)
            r["q_rel_err"] = rel(y, ref)
            t = med(lambda: QM.qmatmul(x, pw))
            r["q_us"], r["q_TFLOPs"], r["q_vs_fp16"] = t, 2 * tokens * n * k / t / 1e6, tf / t
            r["dequant_us"] = med(lambda: QM.dequantize_dense(pw, torch.float16))
            rows.append(r)
            save("gemm", rows)
            print(f"gemm {n:6d}x{k:<6d} M={tokens}: fp16 {tf:8.1f} us ({r['fp16_TFLOPs']:.0f} TF/s)  "
                  f"qmatmul[{r['path']}] {t:8.1f} us (x{r['q_vs_fp16']:.2f})  dequant {r['dequant_us']:.1f} us  "
                  f"err {r['q_rel_err']:.1e}", flush=True)
    return rows


def bench_fakequant(shapes=((4096, 4096), (9728, 2560)), g: int = 128) -> list[dict]:
    rows = []

    def ref_fn(w, d, m, pidx):
        return FQ.reference_fake_quant(w, d.to(torch.float16).float(), m.to(torch.float16).float(), 3, g, pidx)

    compiled = ref_fn if SMOKE else torch.compile(ref_fn)
    if SMOKE:
        shapes = ((64, 256),)
    for (n, k) in shapes:
        for slots in (0, 2):
            w = (torch.randn(n, k, device=DEV) * 0.02).requires_grad_()
            wg = w.detach().reshape(n, k // g, g)
            d = ((wg.amax(-1) - wg.amin(-1)) / 7).requires_grad_()
            m = wg.amin(-1).clone().requires_grad_()
            pidx = None
            if slots:
                pidx = torch.randint(0, g, (n, k // g, slots), device=DEV).to(torch.uint8)
                pidx[..., 1:] = Q.EMPTY
            gout = torch.randn(n, k, device=DEV)
            # correctness on this shape: forward bits and gradients vs the eager reference
            out = FQ.fake_quant(w, d, m, 3, g, pidx)
            ref = ref_fn(w, d, m, pidx)
            fwd_mismatch = int((out != ref).sum().item())
            grads = torch.autograd.grad(out, (w, d, m), gout)
            rgrads = torch.autograd.grad(ref, (w, d, m), gout)
            gerr = [rel(a, b) for a, b in zip(grads, rgrads)]
            r = dict(n=n, k=k, g=g, slots=slots, fwd_mismatch=fwd_mismatch, grad_rel_err=gerr)
            for name, fn in (("triton", lambda: FQ.fake_quant(w, d, m, 3, g, pidx)), ("eager", lambda: ref_fn(w, d, m, pidx)),
                             ("compile", lambda: compiled(w, d, m, pidx))):
                try:
                    fn().backward(gout)  # warm up / compile
                    r[f"{name}_fwd_us"] = med(lambda: fn())
                    r[f"{name}_fwdbwd_us"] = med(lambda: fn().backward(gout), grad_to_none=[w, d, m])
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} failed: {type(e).__name__}: {e}")
                    r[f"{name}_fwd_us"] = r[f"{name}_fwdbwd_us"] = float("nan")
            r["vs_compile"] = r["compile_fwdbwd_us"] / r["triton_fwdbwd_us"]
            r["vs_eager"] = r["eager_fwdbwd_us"] / r["triton_fwdbwd_us"]
            # bytes: fwd reads W writes out (8 B/elt); bwd reads W, g, writes gW (12 B/elt)
            r["triton_fwdbwd_GBs"] = 20 * n * k / r["triton_fwdbwd_us"] / 1e3
            rows.append(r)
            save("fakequant", rows)
            print(f"fakequant {n}x{k} P={slots}: triton {r['triton_fwdbwd_us']:.1f} us "
                  f"({r['triton_fwdbwd_GBs']:.0f} GB/s)  eager {r['eager_fwdbwd_us']:.1f}  compile "
                  f"{r['compile_fwdbwd_us']:.1f}  x{r['vs_compile']:.2f} vs compile  fwd mismatches "
                  f"{fwd_mismatch}  grad err {['%.1e' % e for e in gerr]}", flush=True)
    return rows


def bench_model(tokens: int = 2048, new_tokens: int = 32) -> dict:
    """Random-weight Qwen2.5-0.5B-shaped model: prefill (perplexity-style) time and greedy decode
    tok/s, fp16 dense vs packed QuantLinear (all decoder linears, RTN 3-bit G=128)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from quant2gguf.kernels.qlinear import swap_linears
    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    if SMOKE:
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
        tokens, new_tokens = 16, 2
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg).half().eval()
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=DEV)
    res = {}

    def run(tag):
        with torch.no_grad():
            logits = model(ids).logits
            res[f"{tag}_prefill_ms"] = med(lambda: model(ids)) / 1e3
            model.generation_config.pad_token_id = 0
            model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)
            sync()
            t = time.time()
            model.generate(ids[:, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            sync()
            res[f"{tag}_decode_tok_s"] = new_tokens / (time.time() - t)
            # kernel-bound decode numbers (no Python in the loop): every decoder linear once at batch 1
            # in a CUDA graph, and a whole 1-token forward (no KV cache) replayed as a graph
            mods = [m for nm, m in model.named_modules() if nm.startswith("model.layers.") and
                    hasattr(m, "in_features") and not list(m.children())]
            xs = {m.in_features: torch.randn(1, m.in_features, device=DEV, dtype=torch.float16) for m in mods}
            per = graph_us([lambda m=m: m(xs[m.in_features]) for m in mods], reps=5)
            res[f"{tag}_linears_graph_us"] = per * len(mods)
        return logits.float()

    with torch.no_grad():
        quantized = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
                qw = Q.quantize(mod.weight.float(), 3, 32 if SMOKE else 128)
                quantized[name] = qw
                mod.weight.copy_(qw.dequantize().half())
    ref = run("fp16")
    import copy
    fp16_model = copy.deepcopy(model)
    swap_linears(model, quantized)
    got = run("packed")
    res["logits_rel_err"] = rel(got, ref)
    res["prefill_speedup"] = res["fp16_prefill_ms"] / res["packed_prefill_ms"]
    res["decode_speedup"] = res["packed_decode_tok_s"] / res["fp16_decode_tok_s"]
    res["linears_graph_speedup"] = res["fp16_linears_graph_us"] / res["packed_linears_graph_us"]
    save("model", res)
    # last, as it may fail (HF code that syncs cannot be captured): a whole 1-token forward
    # (no KV cache) replayed as a CUDA graph, fp16 copy vs packed
    one = ids[:, :1]
    with torch.no_grad():
        for tag, mdl in (("fp16", fp16_model), ("packed", model)):
            res[f"{tag}_step_graph_us"] = graph_us([lambda mdl=mdl: mdl(one, use_cache=False)], reps=3)
    res["step_graph_speedup"] = res["fp16_step_graph_us"] / res["packed_step_graph_us"]
    print(f"model 0.5B-shape: prefill {tokens} tok fp16 {res['fp16_prefill_ms']:.2f} ms packed "
          f"{res['packed_prefill_ms']:.2f} ms; decode fp16 {res['fp16_decode_tok_s']:.0f} tok/s packed "
          f"{res['packed_decode_tok_s']:.0f} tok/s; logits err {res['logits_rel_err']:.1e}", flush=True)
    return res


def markdown(res: dict) -> str:
    L = [f"# Kernel benchmark: {res['device']}, {res['date']}", "",
         f"torch {res['torch']}, triton {res['triton']}; device copy {res['copy_GBs']:.0f} GB/s (read+write). "
         "Times: do_bench medians (L2 flushed, weights rotated); graph = CUDA-graph replay per call.", ""]
    if res.get("gemv"):
        L += ["## GEMV (decode), packed 3.25 bpw vs torch fp16 (cuBLAS)", "",
              "| model | N x K | batch | P | packed us | GB/s | % copy | graph us | graph % copy | fp16 us | "
              "x fp16 | x fp16 (graph) | rel err |", "|" + "---|" * 13]
        for r in res["gemv"]:
            L.append(f"| {r['model']} | {r['n']}x{r['k']} | {r['batch']} | {r['slots']} | {r['q_us']:.2f} | "
                     f"{r['q_GBs']:.0f} | {100 * r['q_frac_copy']:.0f} | {r['q_graph_us']:.2f} | "
                     f"{100 * r['q_graph_frac_copy']:.0f} | {r['fp16_us']:.2f} | {r['speedup']:.2f} | "
                     f"{r['speedup_graph']:.2f} | {r['rel_err']:.1e} |")
        L.append("")
        for r in res["gemv"]:
            if "host_us_fast" in r:
                L += [f"Host time per qmatmul call (4096x4096, batch 1, no syncs): direct launch "
                      f"{r['host_us_fast']:.1f} us, plain Triton JIT launch {r['host_us_jit']:.1f} us.", ""]
        L += ["Configs: " + "; ".join(sorted({f"{r['n']}x{r['k']} b{r['batch']}: {r['config']}" for r in res["gemv"]})), ""]
    if res.get("gemm"):
        L += ["## GEMM (prefill): qmatmul's default path vs torch fp16", "",
              "| N x K | tokens | fp16 us | TFLOP/s | qmatmul path | qmatmul us | x fp16 | dequant us | rel err |",
              "|" + "---|" * 9]
        for r in res["gemm"]:
            L.append(f"| {r['n']}x{r['k']} | {r['tokens']} | {r['fp16_us']:.1f} | {r['fp16_TFLOPs']:.0f} | {r['path']} | "
                     f"{r['q_us']:.1f} | {r['q_vs_fp16']:.2f} | {r['dequant_us']:.1f} | {r['q_rel_err']:.1e} |")
        L.append("")
    if res.get("fakequant"):
        L += ["## Fake-quant fwd+bwd (G=128, fp32 master weights)", "",
              "| N x K | P | triton us | GB/s | eager us | torch.compile us | x compile | x eager | fwd bit mismatches |",
              "|" + "---|" * 9]
        for r in res["fakequant"]:
            L.append(f"| {r['n']}x{r['k']} | {r['slots']} | {r['triton_fwdbwd_us']:.1f} | {r['triton_fwdbwd_GBs']:.0f} | "
                     f"{r['eager_fwdbwd_us']:.1f} | {r['compile_fwdbwd_us']:.1f} | {r['vs_compile']:.2f} | "
                     f"{r['vs_eager']:.2f} | {r['fwd_mismatch']} |")
        L.append("")
    if res.get("model"):
        m = res["model"]
        L += ["## Model level: random Qwen2.5-0.5B-shaped model (fp16), all decoder linears packed", "",
              f"prefill 2048 tokens: fp16 {m['fp16_prefill_ms']:.2f} ms, packed {m['packed_prefill_ms']:.2f} ms "
              f"(x{m['prefill_speedup']:.2f}); HF generate decode: fp16 {m['fp16_decode_tok_s']:.0f} tok/s, packed "
              f"{m['packed_decode_tok_s']:.0f} tok/s (x{m['decode_speedup']:.2f}); logits rel err vs dequantized "
              f"fp16 model {m['logits_rel_err']:.1e}", "",
              f"CUDA graph (kernel-bound): all {24 * 7} decoder linears at batch 1: fp16 "
              f"{m.get('fp16_linears_graph_us', float('nan')):.0f} us, packed {m.get('packed_linears_graph_us', float('nan')):.0f} us "
              f"(x{m.get('linears_graph_speedup', float('nan')):.2f}); whole 1-token forward (no KV cache): fp16 "
              f"{m.get('fp16_step_graph_us', float('nan')):.0f} us, packed {m.get('packed_step_graph_us', float('nan')):.0f} us "
              f"(x{m.get('step_graph_speedup', float('nan')):.2f})", ""]
    for e in res.get("errors", []):
        L.append(f"- error: {e}")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--budget", type=float, default=330, help="seconds; later sections are skipped past it")
    ap.add_argument("--only", default="gemv,gemm,fakequant,model")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run (tiny shapes, TRITON_INTERPRET)")
    a = ap.parse_args()
    if DEV == "cpu" and not SMOKE:
        sys.exit("bench_kernels: no CUDA device; use --smoke for a CPU dry run")
    global OUTDIR
    OUTDIR = a.out
    a.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True  # cuBLAS default
    res = RES
    res.update(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               torch=torch.__version__, triton=triton.__version__, errors=[])
    res["copy_GBs"] = copy_bandwidth()
    print(f"{res['device']}: copy {res['copy_GBs']:.0f} GB/s", flush=True)
    steps = [("gemv", lambda: bench_gemv(res["copy_GBs"])), ("fakequant", bench_fakequant),
             ("gemm", bench_gemm), ("model", bench_model)]
    for name, fn in steps:
        if name not in a.only.split(","):
            continue
        if time.time() - T0 > a.budget:
            res["errors"].append(f"{name}: skipped, over the {a.budget:.0f} s budget")
            continue
        try:
            t = time.time()
            res[name] = fn()
            print(f"[{name}: {time.time() - t:.0f} s]", flush=True)
        except Exception as e:  # noqa: BLE001 - keep the other sections
            import traceback
            traceback.print_exc()
            res["errors"].append(f"{name}: {type(e).__name__}: {e}")
        save()
    md = markdown(res)
    (a.out / "bench_kernels.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
