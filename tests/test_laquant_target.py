"""LAQuant in a stock llama.cpp type (`--method laquant --target q3_k`): the GPTQ init's codes stay,
the type's stored scales are trained on the layer-wise + lookahead loss (kd.StockFQLinear, whose
repacked blocks are bit-exact: test_kd_loaq)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from typer.testing import CliRunner

from quant2gguf import checkpoint
from quant2gguf.cli import app
from quant2gguf.pipeline import quantize_model

OPTS = dict(nsamples=8, seqlen=64, device="cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("laq-target")
    hf = make_tiny_model("llama", root / "hf", hidden=256, layers=2)
    g = quantize_model(hf, root / "gptq", method="gptq", target="q3_k", **OPTS)
    la = quantize_model(hf, root / "laq", method="laquant", target="q3_k", epochs=4, **OPTS)
    return g, la


def test_codes_kept_scales_trained_and_layer_error_lower(runs):
    g, la = runs
    mg, ml = (json.loads((p / "manifest.json").read_text()) for p in (g, la))
    assert ml["target"] == "Q3_K" and set(ml["types"].values()) == {"Q3_K"}
    _, qg = checkpoint.load_quantized(g)
    _, ql = checkpoint.load_quantized(la)
    assert qg.keys() == ql.keys()
    # layer 0 sees the same inputs in both runs, so its init is GPTQ's exactly: same codes, new scales
    first = [n for n in qg if ".layers.0." in n]
    assert all(torch.equal(qg[n].codes, ql[n].codes) for n in first)
    assert any(not torch.equal(qg[n].blocks, ql[n].blocks) for n in first)
    st = ml["layers"][0]
    assert st["qat_kept"] and st["qat_loss_after"] < st["qat_loss_before"]
    assert st["out_rel_err"] < mg["layers"][0]["out_rel_err"]


@pytest.mark.parametrize("args, pattern", [
    (["--lr-w", "1e-5"], "--lr-w: laquant --target q3_k keeps its init's codes"),
    (["--init", "awq"], "--init awq: laquant --target q3_k starts from rtn | gptq | loaq"),
])
def test_stock_laquant_refuses_what_it_cannot_honour(args, pattern, tmp_path):
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "nomodel"), "-o", str(tmp_path / "ck"),
                                 "--method", "laquant", "--target", "q3_k", *args])
    assert r.exit_code == 1 and pattern in r.output, r.output
    assert not (tmp_path / "ck").exists()
