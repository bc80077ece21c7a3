"""Models held in bf16/fp16 (stored so and loaded as stored, or --dtype): every layer-wise method
quantizes them end to end, computing in fp32, and the result is the fp32-loaded run's bit for bit.

LAQuant once failed here: its frozen lookahead layer l + 1 was still held in bf16 while the fp32
FP stream went through it (q_proj: "expected mat1 and mat2 to have the same dtype")."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from quant2gguf import checkpoint
from quant2gguf.methods import METHODS
from quant2gguf.pipeline import quantize_model

OPTS = dict(group_size=64, nsamples=4, seqlen=32, device="cpu")
# LAQuant from an RTN init with the learning rates test_laquant uses, so its QAT result is kept
# (the lookahead and KV terms then shape the exported weights, not only the accept/reject test)
LAQ = dict(init="rtn", epochs=2, lr_w=2e-2, lr_q=1e-2)  # grid cells a step: a few % in the 4 steps here
# Relative error of the logits, ||L_q - L|| / ||L||, on held-out tokens. Measured on this model:
# 0.35-0.45 for every method (3-bit groups of 64 Gaussian weights: step ~ range / 7 ~ 0.7 sigma,
# so ~20% noise per weight, accumulated over two layers). A model that says nothing (zero logits)
# scores 1.0 and one of the same shape with other random weights ~sqrt(2) (1.41 here, asserted
# below): 0.6 is well above a working quantization and well below any broken one.
MAX_REL_ERR = 0.6


def _opts(method):
    return {"method": method, **OPTS, **(LAQ if method == "laquant" else {})}


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    """A tiny 2-layer llama (layer 0 has a lookahead layer) stored in bf16, as hub checkpoints are."""
    root = tmp_path_factory.mktemp("bf16-llama")
    src = make_tiny_model("llama", root / "fp32", hidden=64, layers=2)
    AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(root / "bf16")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / "bf16" / f).write_bytes((src / f).read_bytes())
    return root / "bf16"


@pytest.fixture(scope="module")
def rel_err(bf16_llama, tmp_path_factory):
    """rel_err(model): logits error against the FP model on a held-out batch (not the calibration text)."""
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(bf16_llama, dtype=torch.float32).eval()(ids).logits

    def err(model) -> float:
        with torch.no_grad():
            return float((model.float().eval()(ids).logits - ref).norm() / ref.norm())
    junk = make_tiny_model("llama", tmp_path_factory.mktemp("junk"), hidden=64, layers=2, seed=1)
    assert err(AutoModelForCausalLM.from_pretrained(junk)) > 2 * MAX_REL_ERR  # the metric tells garbage apart
    return err


@pytest.mark.parametrize("method", ["laquant", "gptq", "loaq", "awq", "rtn"])
def test_bf16_model_quantizes_like_fp32_and_stays_close(method, bf16_llama, rel_err, tmp_path, monkeypatch):
    real, seen = METHODS[method], []

    @functools.wraps(real)  # its signature: quantize_model passes the method the options it names
    def spy(ctx, **kw):  # the model really is held in bf16, and a method leaves layer l + 1 so
        nxt = ctx.next_layer
        before = None if nxt is None else {p.dtype for p in nxt.parameters()}
        out = real(ctx, **kw)
        seen.append((ctx.index, before, None if nxt is None else {p.dtype for p in nxt.parameters()}))
        return out
    monkeypatch.setitem(METHODS, method, spy)
    a = quantize_model(bf16_llama, tmp_path / "auto", **_opts(method))  # as stored: bf16
    assert seen == [(0, {torch.bfloat16}, {torch.bfloat16}), (1, None, None)]
    b = quantize_model(bf16_llama, tmp_path / "fp32", dtype="fp32", **_opts(method))
    _, qa = checkpoint.load_quantized(a)
    _, qb = checkpoint.load_quantized(b)
    assert qa.keys() == qb.keys() and len(qa) == 14
    for n in qb:
        for f in ("codes", "scales", "offsets"):
            assert torch.equal(getattr(qa[n], f), getattr(qb[n], f)), (n, f)
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k].float(), tb[k].float()) for k in tb)
    # per-layer stats (out_rel_err; laquant's QAT losses, which go through the lookahead layer) equal too
    la, lb = ([{k: v for k, v in st.items() if k != "seconds"}  # wall times differ
               for st in json.loads((p / "manifest.json").read_text())["layers"]] for p in (a, b))
    assert la == lb
    if method == "laquant":  # the QAT result, not the guard's fallback, in the layer with a lookahead layer
        assert la[0]["qat_kept"] and la[0]["qat_loss_after"] < la[0]["qat_loss_before"], la
    assert rel_err(checkpoint.load_model(a)[0]) < MAX_REL_ERR


def test_laquant_fp16_held_model(bf16_llama, rel_err, tmp_path):
    """--dtype fp16 (the model rounded to fp16 on load): LAQuant runs and the result stays close."""
    ck = quantize_model(bf16_llama, tmp_path / "fp16", dtype="fp16", **_opts("laquant"))
    man = json.loads((ck / "manifest.json").read_text())
    assert len(man["layers"]) == 2 and man["layers"][0]["qat_kept"], man["layers"]  # layer 0: the lookahead's
    assert rel_err(checkpoint.load_model(ck)[0]) < MAX_REL_ERR


def test_run_layer_feeds_a_layer_in_its_own_dtype(bf16_llama):
    """run_layer on a layer held in bf16 and the fp32 streams (the case LAQuant hit): inputs and
    floating arguments (rotary tables) go in as bf16, the output comes back in the stream's fp32,
    equal to the fp32 layer's up to bf16 rounding (2^-8 relative per operation: ~1e-2 over a layer)."""
    from quant2gguf.arch import get_arch
    from quant2gguf.calib import _to_compute, capture_inputs, decoder_layers, run_layer
    model = AutoModelForCausalLM.from_pretrained(bf16_llama, dtype=torch.float32).eval()
    arch, cpu = get_arch("llama"), torch.device("cpu")
    xs, kwargs = capture_inputs(model, arch, torch.randint(0, 512, (2, 16)), 2, cpu, cpu)
    layer = decoder_layers(model, arch)[0]
    want = run_layer(layer, xs, _to_compute(kwargs[0]), cpu)[0]
    got = run_layer(layer.to(torch.bfloat16), xs, _to_compute(kwargs[0]), cpu)[0]
    assert got.dtype == torch.float32 and xs[0].dtype == torch.float32
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 2e-2, rel
