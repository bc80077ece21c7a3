"""The CLI end to end on a tiny model, and bad input: one-line errors, exit 1, nothing left behind."""
import json

import pytest
import torch
from typer.testing import CliRunner

from quant2gguf.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_quantize_then_eval(tiny_llama_dir, tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    r = _run("quantize", tiny_llama_dir, "-o", ck, "--method", "gptq", "-g", "64", "--nsamples", "4",
             "--seqlen", "64", "--device", "cpu")
    assert r.exit_code == 0, r.output
    man = json.loads((ck / "manifest.json").read_text())
    assert man["method"] == "gptq" and man["group_size"] == 64 and len(man["layers"]) == 2
    out = tmp_path / "eval.json"
    r = _run("eval", ck, "--ntokens", "256", "--seqlen", "64", "--device", "cpu", "--json", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    for key in ("ppl", "kld", "top1", "gsm_acc", "tokens"):
        assert key in res
    assert res["kld"] > 0 and 0 < res["top1"] <= 1 and res["tokens"] == 256


def _assert_clean_failure(r, tmp_path, pattern):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [l for l in r.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], r.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".ck", "ck"))]


def test_missing_folder(tmp_path):
    r = _run("quantize", tmp_path / "nope", "-o", tmp_path / "ck")
    _assert_clean_failure(r, tmp_path, "nope")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _run("quantize", tmp_path / "empty", "-o", tmp_path / "ck")
    _assert_clean_failure(r, tmp_path, "config.json")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=128)).save_pretrained(tmp_path / "gpt2")
    r = _run("quantize", tmp_path / "gpt2", "-o", tmp_path / "ck", "--device", "cpu")
    _assert_clean_failure(r, tmp_path, "unsupported architecture 'gpt2'; supported: llama, qwen2, qwen3")


def test_group_not_dividing(tmp_path):
    from conftest import make_tiny_model
    odd = make_tiny_model("llama", tmp_path / "odd", hidden=96)
    r = _run("quantize", odd, "-o", tmp_path / "ck2", "-g", "64", "--device", "cpu", "--nsamples", "2", "--seqlen", "32")
    _assert_clean_failure(r, tmp_path, "input dim 96 is not divisible by group size 64 (use --group-size 32)")


def test_nan_weights(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[3, 7] = float("nan")
    m.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path / "nan")
    r = _run("quantize", tmp_path / "nan", "-o", tmp_path / "ck", "--device", "cpu", "-g", "64")
    _assert_clean_failure(r, tmp_path, "model.layers.1.mlp.down_proj: 1 NaN/Inf weights")


def test_existing_output_refused(tiny_llama_dir, tmp_path):
    (tmp_path / "ck").mkdir()
    r = _run("quantize", tiny_llama_dir, "-o", tmp_path / "ck")
    assert r.exit_code == 1 and "exists" in r.output


@pytest.mark.parametrize("method", ["laquant", "loaq"])
def test_quantize_method_options_reach_only_their_method(method, tiny_llama_dir, tmp_path):
    """The CLI passes every method's options (kd's --steps too): each method takes only its own
    keyword parameters, never a name that merely is one of its local variables."""
    ck = tmp_path / "ck"
    r = _run("quantize", tiny_llama_dir, "-o", ck, "--method", method, "-g", "64", "--nsamples", "4",
             "--seqlen", "64", "--device", "cpu", "--epochs", "1")
    assert r.exit_code == 0, r.output
    man = json.loads((ck / "manifest.json").read_text())
    assert man["method"] == method and "steps" not in man["options"]
