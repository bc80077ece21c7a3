"""`quantize --stream`: decoder layers read from the safetensors shards one at a time and dropped
once quantized give the whole-model run's checkpoint bit for bit, with at most two layers resident."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from quant2gguf.cli import app
from quant2gguf.methods import METHODS
from quant2gguf.pipeline import quantize_model

OPTS = dict(group_size=64, nsamples=4, seqlen=64, device="cpu")


def _sharded(tmp_path, tie: bool):
    """A tiny 4-layer qwen2 saved over several shards with an index (as large models ship)."""
    src = make_tiny_model("qwen2", tmp_path / "one", layers=4, tie=tie)
    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(out, max_shard_size="150KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((src / f).read_bytes())
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 2
    return out


def _tensors(ck):
    return {**load_file(ck / "quant.safetensors"), **load_file(ck / "model.safetensors")}


@pytest.mark.parametrize("method,tie", [("gptq", False), ("laquant", True), ("awq", False)])
def test_streamed_run_writes_the_whole_model_checkpoint(method, tie, tmp_path, monkeypatch):
    src = _sharded(tmp_path, tie)
    opts = dict(OPTS, epochs=1) if method == "laquant" else OPTS
    a = quantize_model(src, tmp_path / "whole", method=method, **opts)
    real, seen = METHODS[method], []

    @functools.wraps(real)  # its signature: quantize_model passes a method only the options it names
    def spy(ctx, **kw):  # which layers hold weights while layer i is quantized
        seen.append((ctx.index, ctx.layer.self_attn.q_proj.weight.device.type,
                     None if ctx.next_layer is None else ctx.next_layer.self_attn.q_proj.weight.device.type))
        return real(ctx, **kw)
    monkeypatch.setitem(METHODS, method, spy)
    b = quantize_model(src, tmp_path / "streamed", method=method, stream=True, **opts)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert all(ta[k].equal(tb[k]) for k in ta), [k for k in ta if not ta[k].equal(tb[k])]
    assert seen == [(0, "cpu", "cpu"), (1, "cpu", "cpu"), (2, "cpu", "cpu"), (3, "cpu", None)]
    man = json.loads((b / "manifest.json").read_text())
    assert man["stream"] == {"max_layers_resident": 2}


def test_streamed_layers_are_read_late_and_dropped_early(tmp_path, monkeypatch):
    """While layer i is quantized, layers past i + 1 were never read and quantized linears before i
    hold no weights (meta): the whole model is never in memory."""
    import quant2gguf.calib as C
    src = _sharded(tmp_path, tie=False)
    real, states = METHODS["rtn"], []

    def spy(ctx, **kw):
        layers = C.decoder_layers(spy.model, ctx.arch)
        states.append([l.mlp.down_proj.weight.device.type for l in layers])
        return real(ctx, **kw)
    orig = C.quantize_layers

    def grab(model, *a, **kw):
        spy.model = model
        return orig(model, *a, **kw)
    monkeypatch.setattr("quant2gguf.pipeline.quantize_layers", grab)
    monkeypatch.setitem(METHODS, "rtn", spy)
    quantize_model(src, tmp_path / "ck", method="rtn", stream=True, **OPTS)
    assert states == [["cpu", "cpu", "meta", "meta"], ["meta", "cpu", "cpu", "meta"],
                      ["meta", "meta", "cpu", "cpu"], ["meta", "meta", "meta", "cpu"]]


def test_stream_refused_for_whole_model_methods(tmp_path):
    src = make_tiny_model("qwen2", tmp_path / "m", layers=2)
    r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(tmp_path / "o"), "--method", "kd", "--stream"])
    assert r.exit_code != 0 and "--stream: --method kd needs the whole model" in r.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="--calib traces"):
        quantize_model(src, tmp_path / "o2", method="gptq", calib="traces", stream=True, **OPTS)


def test_stream_needs_safetensors(tmp_path):
    src = make_tiny_model("qwen2", tmp_path / "m", layers=2)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        quantize_model(src, tmp_path / "o", method="rtn", stream=True, **OPTS)
