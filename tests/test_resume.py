"""`quantize --resume`: an interrupted layer-wise run continues from its last finished layer and
writes the checkpoint an uninterrupted run writes, bit for bit."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file
from typer.testing import CliRunner

import quant2gguf.pipeline as P
from quant2gguf.pipeline import quantize_model
from quant2gguf.cli import app

OPTS = dict(group_size=64, nsamples=4, seqlen=64, device="cpu", epochs=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("resume") / "hf", layers=3)


def _tensors(ck):
    return {**load_file(ck / "quant.safetensors"), **load_file(ck / "model.safetensors")}


def _interrupt_at(monkeypatch, method, layer):
    real = P.METHODS[method]

    @functools.wraps(real)  # same signature: the same options reach it
    def method_fn(ctx, **kw):
        if ctx.index == layer:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill between layers) leaves behind
        return real(ctx, **kw)
    monkeypatch.setitem(P.METHODS, method, method_fn)


# laquant trains with shuffled batches: the resumed run must also continue the random stream
@pytest.mark.parametrize("method", ["gptq", "laquant"])
def test_resumed_run_writes_the_uninterrupted_checkpoint(tiny, tmp_path, monkeypatch, method):
    a = P.quantize_model(tiny, tmp_path / "a", method=method, **OPTS)
    assert not (tmp_path / ".a.state").exists()  # removed once the checkpoint is written
    with monkeypatch.context() as m:
        _interrupt_at(m, method, 2)
        with pytest.raises(KeyboardInterrupt):
            P.quantize_model(tiny, tmp_path / "b", method=method, **OPTS)
    state = tmp_path / ".b.state"
    assert sorted(p.name for p in state.glob("layer-*.pt")) == ["layer-0000.pt", "layer-0001.pt"]
    assert not (tmp_path / "b").exists()
    b = P.quantize_model(tiny, tmp_path / "b", method=method, resume=True, **OPTS)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta), [k for k in ta if not ta[k].equal(tb[k])]
    man = json.loads((b / "manifest.json").read_text())
    assert man["resumed_layers"] == 2 and [bool(st.get("resumed")) for st in man["layers"]] == [True, True, False]
    assert not state.exists()


def test_resumed_stock_target_run_writes_the_uninterrupted_checkpoint(tmp_path, monkeypatch):
    """--target runs keep their layers' stock blocks in the state and resume like the others."""
    hf = make_tiny_model("llama", tmp_path / "hf", hidden=256, layers=3)
    kw = dict(method="gptq", target="q3_k", nsamples=4, seqlen=64, device="cpu")
    a = P.quantize_model(hf, tmp_path / "a", **kw)
    with monkeypatch.context() as m:
        _interrupt_at(m, "gptq", 2)
        with pytest.raises(KeyboardInterrupt):
            P.quantize_model(hf, tmp_path / "b", **kw)
    with pytest.raises(ValueError, match="other target"):  # a state is only resumed with its own settings
        P.quantize_model(hf, tmp_path / "b", resume=True, **{**kw, "target": "q4_k"})
    b = P.quantize_model(hf, tmp_path / "b", resume=True, **kw)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)
    assert any(k.endswith(".blocks") for k in ta)
    assert json.loads((b / "manifest.json").read_text())["resumed_layers"] == 2


def test_interrupted_state_needs_resume_and_the_same_settings(tiny, tmp_path, monkeypatch):
    run = CliRunner().invoke
    base = ["quantize", str(tiny), "-o", str(tmp_path / "c"), "-g", "64", "--seqlen", "64", "--device", "cpu"]
    with monkeypatch.context() as m:
        _interrupt_at(m, "gptq", 1)
        r = run(app, [*base, "--nsamples", "4"])
        assert r.exit_code != 0 and not (tmp_path / "c").exists() and (tmp_path / ".c.state" / "layer-0000.pt").is_file()
    r = run(app, [*base, "--nsamples", "4"])
    assert r.exit_code == 1 and "holds an interrupted run: add --resume" in r.output
    r = run(app, [*base, "--nsamples", "8", "--resume"])
    assert r.exit_code == 1 and "was started with other nsamples" in r.output
    r = run(app, [*base, "--nsamples", "4", "--method", "kd", "--resume"])
    assert r.exit_code == 1 and "kd runs are not resumable" in r.output
    r = run(app, [*base, "--nsamples", "4", "--resume"])
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert man["resumed_layers"] == 1 and not (tmp_path / ".c.state").exists()


def test_quickstart_keys_its_outputs_by_settings_and_resumes(tmp_path, monkeypatch):
    """quickstart's cached checkpoint and GGUF are named by every setting that shapes them, and an
    interrupted quantize of the same settings is continued, not refused (the pipeline is mocked: it
    runs SmolLM2, too slow here)."""
    from quant2gguf import bench, export, llama, runner
    calls = []

    def fake_quantize(model, out, **kw):
        calls.append((Path(out).name, kw))
        Path(out).mkdir()
    monkeypatch.setattr(P, "quantize_model", fake_quantize)
    monkeypatch.setattr(export, "convert", lambda ck, out, **kw: Path(out).write_bytes(b"gguf"))
    monkeypatch.setattr(llama, "build", lambda *a, **k: None)
    monkeypatch.setattr(runner, "run_prompt", lambda *a, **k: "Paris")
    monkeypatch.setattr(bench, "bench", lambda *a, **k: {})
    for n in (32, 16, 32):
        P.quickstart("smollm2", tmp_path, nsamples=n, seqlen=256)
    assert [c[0] for c in calls] == ["smollm2-gptq-w3g64-n32x256", "smollm2-gptq-w3g64-n16x256"]
    assert all(c[1]["resume"] for c in calls)


# ---------------------------------------------------------------- --dtype: held in bf16, computed in fp32

@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_bf16_held_model_quantizes_bit_for_bit_like_fp32(method, tmp_path, monkeypatch):
    """A model stored in bf16 and loaded as stored (--dtype auto) is held in bf16 (half the memory:
    layers not reached yet are still bf16 when a method runs) yet gives exactly the checkpoint of
    the same model loaded in fp32, every layer computing in fp32."""
    from transformers import AutoModelForCausalLM

    from quant2gguf import checkpoint
    from quant2gguf.methods import METHODS
    src = make_tiny_model("qwen2", tmp_path / "fp32", layers=3)
    AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / f).write_bytes((src / f).read_bytes())
    real, seen = METHODS[method], []

    def spy(ctx, **kw):
        layers = ctx.layer, *([ctx.next_layer] if ctx.next_layer is not None else [])
        seen.append((ctx.index, [next(m.parameters()).dtype for m in layers]))
        return real(ctx, **kw)
    monkeypatch.setitem(METHODS, method, spy)
    kw = dict(method=method, group_size=64, nsamples=4, seqlen=32, device="cpu")
    a = quantize_model(tmp_path / "bf16", tmp_path / "auto", **kw)
    assert seen[0] == (0, [torch.float32, torch.bfloat16])  # this layer in fp32, the next still bf16
    b = quantize_model(tmp_path / "bf16", tmp_path / "fp32ck", dtype="fp32", **kw)
    _, qa = checkpoint.load_quantized(a)
    _, qb = checkpoint.load_quantized(b)
    for n in qb:
        assert torch.equal(qa[n].codes, qb[n].codes) and torch.equal(qa[n].scales, qb[n].scales), n
        assert torch.equal(qa[n].offsets, qb[n].offsets), n
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    assert ta["model.embed_tokens.weight"].dtype == torch.bfloat16  # saved as stored
    for k in tb:
        assert torch.equal(ta[k].float(), tb[k].float()), k
