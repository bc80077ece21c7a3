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
    _assert_clean_failure(r, tmp_path, "unsupported architecture 'gpt2'; supported: gemma3_text, llama, mistral, phi3, qwen2, qwen3")


def test_group_not_dividing(tmp_path):
    from conftest import make_tiny_model
    odd = make_tiny_model("llama", tmp_path / "odd", hidden=96)
    r = _run("quantize", odd, "-o", tmp_path / "ck2", "-g", "64", "--device", "cpu", "--nsamples", "2", "--seqlen", "32")
    _assert_clean_failure(r, tmp_path, "input dim 96 is not divisible by group size 64 (no group size our types hold (64/128) divides it)")


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


@pytest.mark.parametrize("method, flag, option", [("laquant", "--epochs", ("epochs", 1)),
                                                  ("loaq", "--act-order", ("act_order", True)),
                                                  ("gptq", "--damp", ("damp", 0.1)),
                                                  ("loaq", "--alpha", ("alpha", 0.25))])
def test_quantize_method_options_reach_only_their_method(method, flag, option, tiny_llama_dir, tmp_path):
    """The CLI passes every method's options (kd's --steps too): each method takes only its own
    keyword parameters, never a name that merely is one of its local variables."""
    ck = tmp_path / "ck"
    r = _run("quantize", tiny_llama_dir, "-o", ck, "--method", method, "-g", "64", "--nsamples", "4",
             "--seqlen", "64", "--device", "cpu", flag, *({"--epochs": [1], "--damp": [0.1], "--alpha": [0.25]}.get(flag, [])))
    assert r.exit_code == 0, r.output
    man = json.loads((ck / "manifest.json").read_text())
    assert man["method"] == method and "steps" not in man["options"] and man["options"][option[0]] == option[1]


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if any model weights are loaded (the options must be refused before)."""
    import quant2gguf.pipeline as P
    calls = []

    def load_hf(*a, **k):
        calls.append(a)
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(P, "load_hf", load_hf)
    return calls


@pytest.mark.parametrize("args, pattern", [
    (["--bits", "4"], "--bits 4: the GGUF types hold 3-bit codes; use --bits 3"),
    (["-g", "32"], "--group-size 32: the GGUF types have groups of 64 or 128"),
    (["--slots", "1", "--method", "quantlrm"], "--slots 1: the GGUF types hold 0 or 2 protected weights"),
    (["--slots", "2"], "--slots 2: gptq does not choose protected weights"),
    (["--dtype", "int8"], "--dtype int8: use one of auto | fp32 | bf16 | fp16"),
    (["--method", "kd", "--dtype", "bf16"], "--dtype bf16: kd holds its student in fp32"),
    (["--slots", "2", "--method", "rtn"], "--slots 2: rtn does not choose protected weights"),
    (["--slots", "2", "--method", "awq"], "--slots 2: awq does not choose protected weights"),
    (["--method", "laquant", "--init", "rtn", "--act-order"], "--act-order: --method laquant ignores it; drop it"),
    (["--method", "laquant", "--no-clip", "--epochs", "1"], "--no-clip: --method laquant ignores it"),
    (["--method", "laquant", "--init", "quantlrm"], "--init quantlrm: laquant starts from rtn | gptq | awq | loaq"),
    (["--method", "gptq", "--epochs", "3", "--base", "x"], "--epochs --base: --method gptq ignores them"),
    (["--method", "rtn", "--act-order"], "--act-order: --method rtn ignores it"),
    (["--method", "awq", "--damp", "0.1"], "--damp: --method awq ignores it"),
    (["--method", "gptq", "--alpha", "0.5"], "--alpha: --method gptq ignores it"),
    (["--method", "loaq", "--alpha", "1.5"], "--alpha 1.5: LoaQ's correction share lies in 0..1"),
    (["--method", "kd", "--init", "ck0", "--no-clip"], "--no-clip: --method kd ignores it"),
    (["--method", "nope"], "unknown method 'nope'"),
])
def test_bad_options_refused_before_loading(args, pattern, tiny_llama_dir, tmp_path, no_loading):
    r = _run("quantize", tiny_llama_dir, "-o", tmp_path / "ck", "--device", "cpu", *args)
    _assert_clean_failure(r, tmp_path, pattern)
    assert not no_loading


def test_group_size_the_model_cannot_take_is_refused_before_loading(tmp_path, no_loading):
    """SmolLM2's 576 columns do not split into groups of 128: said from the config, before any weight is read."""
    from conftest import make_tiny_model
    src = make_tiny_model("llama", tmp_path / "m192", hidden=192)
    r = _run("quantize", src, "-o", tmp_path / "ck", "--device", "cpu", "-g", "128")
    _assert_clean_failure(r, tmp_path, "input dim 192 is not divisible by group size 128 (use --group-size 64)")
    assert not no_loading


def test_api_refuses_what_the_types_cannot_hold(tiny_llama_dir, tmp_path, no_loading):
    from quant2gguf.pipeline import quantize_model
    with pytest.raises(ValueError, match="groups of 64 or 128"):
        quantize_model(tiny_llama_dir, tmp_path / "ck", group_size=32)
    with pytest.raises(ValueError, match="awq does not choose protected weights"):
        quantize_model(tiny_llama_dir, tmp_path / "ck", method="awq", slots=2)
    assert not no_loading and not (tmp_path / "ck").exists()


def test_method_options_follow_the_signatures():
    """What the check allows is what the pipeline routes to the method (its signature)."""
    from quant2gguf.gguf_types import TYPES
    from quant2gguf.validate import GROUP_SIZES, method_options
    assert GROUP_SIZES == sorted({t.group_size for t in TYPES.values()})
    assert {"act_order", "clip"} <= method_options("gptq", None)
    assert not {"act_order", "clip", "damp"} & method_options("laquant", "rtn")
    assert {"act_order", "damp"} <= method_options("laquant", "gptq") == method_options("laquant", None)  # its init's
    assert {"base", "ft_steps", "clip"} <= method_options("quantlrm", None)
    assert "act_order" in method_options("kd", "gptq") and "act_order" not in method_options("kd", "ck/")


@pytest.mark.parametrize("cmd", ["convert", "eval"])
def test_existing_output_needs_force(cmd, tmp_path, monkeypatch):
    import quant2gguf.evaluate as E
    import quant2gguf.export as X
    monkeypatch.setattr(X, "convert", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: pytest.fail("ran"))
    old = tmp_path / "old.out"
    old.write_text("keep me")
    args = ["convert", tmp_path / "ck", "-o", old] if cmd == "convert" else ["eval", tmp_path / "ck", "--json", old]
    r = _run(*args)
    assert r.exit_code == 1 and "old.out exists; pass --force" in r.output, r.output
    assert old.read_text() == "keep me"


@pytest.mark.parametrize("flag,want", [([], None), (["--fuse-qkv"], True), (["--no-fuse-qkv"], False)])
def test_convert_fuse_qkv_flag(flag, want, tmp_path, monkeypatch):
    """No flag leaves the choice to export.convert (fused where q/k/v are our types); the pair forces it."""
    import quant2gguf.export as X
    seen = {}
    monkeypatch.setattr(X, "convert", lambda *a, **k: seen.update(k) or {"path": str(a[1])})
    r = _run("convert", tmp_path / "ck", "-o", tmp_path / "m.gguf", *flag)
    assert r.exit_code == 0, r.output
    assert seen["fuse_qkv"] is want


def test_eval_json_force_overwrites_atomically(tmp_path, monkeypatch):
    import quant2gguf.evaluate as E
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: {"ppl": 1.5})
    out = tmp_path / "res.json"
    out.write_text("old")
    r = _run("eval", tmp_path / "ck", "--json", out, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text()) == {"ppl": 1.5} and [p.name for p in tmp_path.iterdir()] == ["res.json"]


@pytest.mark.parametrize("exc, pattern", [
    (OSError(28, "No space left on device", "/out/model.safetensors"),
     "No space left on device writing /out/model.safetensors: free disk space"),
    (PermissionError(13, "Permission denied", "/ro/x"), "Permission denied writing /ro/x: choose a folder"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n" + "stats\n" * 50),
     "GPU out of memory: lower --batch"),
])
def test_os_and_gpu_memory_errors_are_one_line(exc, pattern, tiny_llama_dir, tmp_path, monkeypatch):
    """A full disk or an exhausted GPU mid-run: one line naming the file and the fix, exit 1, no traceback."""
    import quant2gguf.pipeline as pipeline

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(pipeline, "quantize_model", boom)
    r = CliRunner().invoke(app, ["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "out")])
    lines = [ln for ln in r.output.strip().splitlines() if ln]
    assert r.exit_code == 1 and len(lines) == 1 and pattern in lines[0], r.output
    assert "Traceback" not in r.output
