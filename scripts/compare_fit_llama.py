"""Our stock-grid RTN fit against llama.cpp's own imatrix quantizer, tensor by tensor on a real model.

For a few decoder layers of MODEL: the importance E[x^2] per input channel from FP activations on the
calibration split (compat.imatrix_of: what llama-imatrix collects), then each linear quantized to TYPE by
  llama   ggml_quantize_chunk with that imatrix (what llama-quantize --imatrix runs per tensor)
  new     stock_quant.quantize_rtn with imp (llama.cpp's rule: imp * sqrt(sigma2 + w^2))
  old     the same fit with the importance alone (the rule before 2026-11-29)
and scored by llama.cpp's objective sum_j imp_j (sigma2 + w_j^2)^1/2 (w_j - y_j)^2 (relative to llama's),
the plain imp-weighted error, and the share of weights whose stored value equals llama's.

usage: python scripts/compare_fit_llama.py --model qwen15 --type Q3_K --layers 0 14 27 -o out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_stock_target import llama_imatrix_quant  # noqa: E402  (the tests' ctypes harness)
from test_stock_types import load_ggml_base  # noqa: E402

GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
        "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def importance(model: str, calib: str, nsamples: int) -> tuple[object, dict[str, np.ndarray]]:
    """(the HF model, GGUF tensor name -> E[x^2] per input channel) from compat.imatrix_of."""
    from gguf import GGUFReader

    from quant2gguf.compat import imatrix_of
    from quant2gguf.pipeline import load_hf
    m, tok, _ = load_hf(model)
    with tempfile.TemporaryDirectory() as d:
        path, _ = imatrix_of(m, tok, Path(d) / "imatrix.gguf", calib, nsamples, 512, "cpu")
        r = GGUFReader(path)
        t = {x.name: np.array(x.data, np.float64).reshape(-1) for x in r.tensors}
    imp = {k.removesuffix(".in_sum2"): (v / t[k.removesuffix(".in_sum2") + ".counts"][0]).astype(np.float32)
           for k, v in t.items() if k.endswith(".in_sum2")}
    return m, imp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen15")
    ap.add_argument("--type", default="Q3_K")
    ap.add_argument("--calib", default="news+code")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 14, 27])
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    from quant2gguf import stock_quant
    from quant2gguf.stock_types import stock_type
    cls = stock_type(a.type)
    base = load_ggml_base()
    m, imps = importance(a.model, a.calib, a.nsamples)
    rows, rule = [], stock_quant.element_weights
    from quant2gguf.arch import decoder_layers, get_arch
    arch = get_arch(m.config.model_type)
    layers = decoder_layers(m, arch)
    for i in a.layers:
        for lin in arch.linears:  # e.g. self_attn.q_proj
            g = GGUF[lin.rsplit(".", 1)[-1]]
            w = layers[i].get_submodule(lin).weight.detach().float()
            imp = torch.from_numpy(imps[f"blk.{i}.{g}.weight"])
            e = rule(w, imp, a.type).numpy()
            wn = w.numpy()
            ref = llama_imatrix_quant(base, cls, wn, imp.numpy())
            new = stock_quant.quantize_rtn(w, a.type, imp).dequantize().numpy()
            stock_quant.element_weights = lambda x, p, q: p.expand(*x.shape)  # the old rule
            try:
                old = stock_quant.quantize_rtn(w, a.type, imp).dequantize().numpy()
            finally:
                stock_quant.element_weights = rule
            obj = lambda y: float((e * (y - wn) ** 2).sum())  # noqa: E731
            ierr = lambda y: float((imp.numpy() * (y - wn) ** 2).sum())  # noqa: E731
            r = {"tensor": f"blk.{i}.{g}", "shape": list(w.shape),
                 "llama_obj_new": obj(new) / obj(ref), "llama_obj_old": obj(old) / obj(ref),
                 "imp_err_new": ierr(new) / ierr(ref), "imp_err_old": ierr(old) / ierr(ref),
                 "same_new": float((new == ref).mean()), "same_old": float((old == ref).mean())}
            rows.append(r)
            print(f"{r['tensor']:18s} llama-objective new {r['llama_obj_new']:.3f} old {r['llama_obj_old']:.3f}   "
                  f"imp-only error new {r['imp_err_new']:.3f} old {r['imp_err_old']:.3f}   "
                  f"same values as llama: new {r['same_new']:.3f} old {r['same_old']:.3f}", flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("tensor", "shape")}
    print("mean", json.dumps({k: round(v, 4) for k, v in mean.items()}))
    Path(a.out).write_text(json.dumps({"model": a.model, "type": a.type, "calib": a.calib, "nsamples": a.nsamples,
                                       "note": "ratios are to llama.cpp's ggml_quantize_chunk with the same imatrix",
                                       "mean": mean, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
