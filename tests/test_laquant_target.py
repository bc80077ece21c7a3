"""LAQuant in a stock llama.cpp type (`--method laquant --target q3_k`): the GPTQ init's codes stay
(unless --lr-w: learned rounding, each code one step at most), the type's stored scales are trained
on the layer-wise + lookahead loss (kd.StockFQLinear, whose
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
    return g, la, hf, root


def test_codes_kept_scales_trained_and_layer_error_lower(runs):
    g, la, _, _ = runs
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


def test_lr_w_learned_rounding_from_rtn_beats_frozen_codes(runs, monkeypatch):
    """--lr-w from an RTN init (AutoRound's setting): kd.StockFQLinear's rounding offsets start where each FP
    weight sits in its cell and train next to the scales; codes move by one step at most, every export is
    the forward bit for bit, and layer 0 (the same inputs in both runs) ends with a lower LAQuant loss than
    the same run with the codes frozen."""
    from quant2gguf.methods import kd
    _, _, hf, root = runs
    kw = dict(method="laquant", init="rtn", target="q3_k", epochs=4, **OPTS)
    frozen = json.loads((quantize_model(hf, root / "laq-rtn", **kw) / "manifest.json").read_text())["layers"][0]
    trained = {}
    real = kd.StockFQLinear.project_

    def project_seen(self):
        real(self)
        trained[id(self)] = self
    monkeypatch.setattr(kd.StockFQLinear, "project_", project_seen)
    la = quantize_model(hf, root / "laq-rtn-lrw", lr_w=0.01, **kw)
    ml = json.loads((la / "manifest.json").read_text())
    assert ml["options"]["lr_w"] == 0.01 and ml["target"] == "Q3_K"
    for m in trained.values():
        e = m.export()
        assert m.train_codes and m.v.abs().max() <= 1 and torch.equal(m.weight_q().detach(), e.dequantize())
    assert len(trained) == 14  # 7 linears in each of 2 layers
    st = ml["layers"][0]
    assert st["qat_kept"] and st["qat_loss_after"] < frozen["qat_loss_after"] < st["qat_loss_before"], (st, frozen)
    r = quantize_model(hf, root / "rtn", method="rtn", target="q3_k", **OPTS)
    _, qr = checkpoint.load_quantized(r)
    _, ql = checkpoint.load_quantized(la)
    first = [n for n in qr if ".layers.0." in n]  # layer 0's init is RTN's exactly
    moved = [(qr[n].codes.long() - ql[n].codes.long()).abs() for n in first]
    assert all(d.max() <= 1 for d in moved) and sum(int((d > 0).sum()) for d in moved) > 0


@pytest.mark.parametrize("args, pattern", [
    (["--lr-w", "-1e-5"], "--lr-w -1e-05: must be >= 0"),
    (["--init", "awq"], "--init awq: laquant --target q3_k starts from rtn | gptq | loaq"),
])
def test_stock_laquant_refuses_what_it_cannot_honour(args, pattern, tmp_path):
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "nomodel"), "-o", str(tmp_path / "ck"),
                                 "--method", "laquant", "--target", "q3_k", *args])
    assert r.exit_code == 1 and pattern in r.output, r.output
    assert len([ln for ln in r.output.strip().splitlines() if ln.startswith("error:")]) == 1, r.output
    assert "Traceback" not in r.output and not (tmp_path / "ck").exists()
