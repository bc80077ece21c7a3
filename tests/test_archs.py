"""Architectures beyond llama/qwen2/qwen3 (issue 12): mistral, gemma3_text (Gemma3ForCausalLM)
and phi3 (fused qkv_proj and gate_up_proj), on tiny random models.

For each: AWQ's folds keep the function (including the fused producers' partial folds and gemma's
(1 + w) norms), GPTQ and AWQ quantize, `convert` writes the GGUF through llama.cpp's converter
(phi3's fused tensors stay fused, gemma3's norms get +1 there), and the patched llama.cpp computes
what PyTorch computes on the checkpoint (perplexity within 1%, KLD, greedy tokens), as in
test_e2e_llama.py. These architectures are not in conftest.ARCHS (that would multiply CI time).
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_tokenizer
from test_e2e_llama import greedy_agreement, llama_vs_torch
from test_export import PRE
from test_quantlrm_awq import _awq_unrounded

from quant2gguf import export, llama
from quant2gguf.arch import ARCHS, get_arch

NEW = ("mistral", "gemma3_text", "phi3")
CTX, CHUNKS = 128, 2
# greedy tokens are compared up to the first step whose two best torch logits are this close:
# ggml rounds activations to 8 bits in its dot products (test_e2e_llama: 0.01), and its CPU GELU
# (gemma3's MLP) reads a fp16 table (ggml-cpu/vec.h GGML_GELU_FP16): measured a 0.012 tie flipping
TIE = {"gemma3_text": 0.03}
# a continuation is compared up to its first near tie: enough prompts that every tiny model gives >= 8 tokens
PROMPTS = ("the quick brown fox", "twelve plus thirty makes", "a lazy dog jumps over")
# which producers AWQ folds into under GQA (2 K/V heads for 4 query heads) and MHA
FOLDED = {
    "mistral": ({"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}, "self_attn.v_proj"),
    "gemma3_text": ({"input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"}, "self_attn.v_proj"),
    "phi3": ({"input_layernorm", "post_attention_layernorm", "mlp.gate_up_proj"}, "self_attn.qkv_proj"),
}


def build(arch: str, path, mha: bool = False, seed: int = 0, **over):
    """make_tiny_model with config overrides: gemma3 gets 6 layers (llama.cpp's and HF's default
    pattern: 5 sliding-window layers, then a global one) and a 32-token window, so the runtime
    comparison covers both attention kinds and the window at CTX=128. phi3 keeps the byte-level BPE
    tokenizer.json alone, as a checkpoint of Phi-4-mini has it (export takes the GPT-2 vocab path)."""
    from transformers import AutoModelForCausalLM
    if arch == "gemma3_text":
        # llama.cpp's gemma3 converter cuts token_embd to len(vocab) + len(added_tokens) of a
        # tokenizer.json (the tiny BPE's 298 entries, its one special counted twice): match it
        tj = tiny_tokenizer().backend_tokenizer.to_str()
        tj = json.loads(tj)
        over = {"num_hidden_layers": 6, "sliding_window": 32,
                "vocab_size": len(tj["model"]["vocab"]) + len(tj["added_tokens"]), **over}
    cfg = tiny_config(arch, tie=arch == "gemma3_text")
    if mha:
        cfg.num_key_value_heads = cfg.num_attention_heads
    for k, v in over.items():
        setattr(cfg, k, v)
    if arch == "gemma3_text":
        cfg.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                           for i in range(cfg.num_hidden_layers)]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
            elif arch == "gemma3_text":  # (1 + w) norms start at w = 0: spread them too
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", NEW)
def test_supported_and_model_type(arch, tmp_path):
    from transformers import AutoConfig
    hf = build(arch, tmp_path / "hf")
    assert AutoConfig.from_pretrained(hf).model_type == arch
    assert get_arch(arch) is ARCHS[arch]
    with pytest.raises(ValueError, match="unsupported architecture 'gemma3'.*gemma3_text.*phi3"):
        get_arch("gemma3")  # Gemma3ForConditionalGeneration (multimodal) is not


@pytest.mark.parametrize("mha", [False, True], ids=["gqa", "mha"])
@pytest.mark.parametrize("arch", NEW)
def test_awq_fold_preserves_function(arch, mha, tmp_path, monkeypatch):
    """Scales far from 1 folded into every producer AWQ can absorb exactly; the attention-output
    fold (v_proj, or the v third of phi3's qkv_proj) only under MHA."""
    hf = build(arch, tmp_path / "hf", mha=mha, num_hidden_layers=2, vocab_size=512)  # _awq_unrounded: ids < 512
    ref, out, folded = _awq_unrounded(hf, monkeypatch)
    gqa, attn = FOLDED[arch]
    assert folded == (gqa | {attn} if mha else gqa)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["rtn", "loaq", "laquant", "quantlrm", "kd"])
@pytest.mark.parametrize("arch", NEW)
def test_every_method_quantizes_evaluates_and_converts(arch, method, tmp_path):
    """The methods not run end to end below: a checkpoint with every decoder linear, `eval` on it
    and `convert` (laquant's KV term reads phi3's whole qkv_proj output: arch.kv)."""
    from quant2gguf.evaluate import evaluate
    from quant2gguf.pipeline import quantize_model
    hf = build(arch, tmp_path / "hf", num_hidden_layers=2)
    kw = dict(group_size=64, nsamples=2, seqlen=32, device="cpu")
    if method == "quantlrm":
        kw.update(ft_steps=1, ft_calib="news")
    if method == "laquant":
        kw.update(epochs=1)
    if method == "kd":
        init = quantize_model(str(hf), tmp_path / "init", method="rtn", **kw)
        kw.update(init=str(init), steps=2, batch=2, eval_every=2, heldout=2)
    ckpt = quantize_model(str(hf), tmp_path / "ckpt", method=method, **kw)
    res = evaluate(ckpt, ntokens=128, seqlen=32, device="cpu")
    assert np.isfinite(res["ppl"]) and res["kld"] is not None and np.isfinite(res["kld"])
    info = export.convert(ckpt, tmp_path / "model.gguf", tokenizer_pre=PRE)
    assert info["n_quantized"] == 2 * gguf_linears(arch)


def gguf_linears(arch: str) -> int:
    """Quantized tensors a layer has in convert's default GGUF: separate q/k/v of ours become one attn_qkv."""
    lin = get_arch(arch).linears
    return len(lin) - (2 if "self_attn.q_proj" in lin else 0)


# ------------------------------------------------------------------ end to end through llama.cpp

@pytest.fixture(scope="module")
def bin_dir():
    return llama.build()  # cached in ~/.cache/quant2gguf/llama


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = "the quick brown fox jumps over a lazy dog while twelve plus thirty makes forty two".split()
    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(" ".join(rng.choice(words, 1500)) + ".\n")
    return p


@pytest.fixture(scope="module", params=[(a, m) for a in NEW for m in ("gptq", "awq")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def converted(request, tmp_path_factory, bin_dir):
    from quant2gguf.pipeline import quantize_model
    arch, method = request.param
    root = tmp_path_factory.mktemp(f"{arch}-{method}")
    # MHA phi3 under AWQ, so the fold into qkv_proj's v rows reaches the GGUF too
    hf = build(arch, root / "hf", mha=arch == "phi3" and method == "awq")
    t0 = time.time()
    ckpt = quantize_model(str(hf), root / "ckpt", method=method, group_size=64, nsamples=4, seqlen=64, device="cpu")
    info = export.convert(ckpt, root / "model.gguf", tokenizer_pre=PRE)
    print(f"{arch} {method}: quantize + convert {time.time() - t0:.1f}s")
    return arch, ckpt, root / "model.gguf", info


@pytest.mark.slow  # needs the llama.cpp build (cached; minutes the first time)
def test_convert_layout(converted):
    """Every decoder linear is ours, q/k/v as one attn_qkv (phi3's already are; convert fuses the others by
    default); phi3's ffn_up stays fused (2*ff rows), gemma3's norms are written as 1 + w."""
    arch, ckpt, gguf, info = converted
    cfg = json.loads((ckpt / "config.json").read_text())
    n_lin = gguf_linears(arch) * cfg["num_hidden_layers"]
    assert info["n_quantized"] == n_lin and info["tensors"]["Q3_G64"] == n_lin
    t = {x.name: x for x in export.read_gguf(gguf).tensors}
    assert "blk.0.attn_qkv.weight" in t and "blk.0.attn_q.weight" not in t
    if arch == "phi3":
        assert "blk.0.ffn_gate.weight" not in t
        assert list(t["blk.0.ffn_up.weight"].shape) == [cfg["hidden_size"], 2 * cfg["intermediate_size"]]
    if arch == "gemma3_text":
        from safetensors import safe_open
        with safe_open(ckpt / "model.safetensors", "pt") as f:
            w = f.get_tensor("model.layers.0.pre_feedforward_layernorm.weight").float()
        got = torch.tensor(np.asarray(t["blk.0.ffn_norm.weight"].data, dtype=np.float32))
        torch.testing.assert_close(got, w + 1, atol=1e-3, rtol=1e-3)


@pytest.mark.slow  # needs the llama.cpp build (cached; minutes the first time)
def test_llama_cpp_matches_torch(converted, text_file, tmp_path):
    arch, ckpt, gguf, _ = converted
    r = llama_vs_torch(gguf, ckpt, text_file, CTX, CHUNKS, tmp_path)
    print(f"{arch}: llama.cpp ppl {r['ppl']:.4f} torch ppl {r['ppl_torch']:.4f} kld {r['kld']:.2e}")
    assert r["ppl"] == pytest.approx(r["ppl_torch"], rel=0.01), (r["ppl"], r["ppl_torch"])
    assert r["kld"] < 1e-3, r["kld"]


@pytest.mark.slow  # needs the llama.cpp build (cached; minutes the first time)
def test_greedy_tokens_match_torch(converted):
    """llama-server's greedy continuation == PyTorch's on the checkpoint, up to a near tie (TIE)."""
    arch, ckpt, gguf, _ = converted
    compared = greedy_agreement(gguf, ckpt, PROMPTS, tie=TIE.get(arch, 1e-2))
    assert compared >= 8, compared


@pytest.mark.parametrize("arch", NEW)
def test_calibration_streams_are_the_models_own_hidden_states(arch, tmp_path):
    """Layer by layer, the driver's FP stream is exactly what the whole model computes: each layer
    gets its own mask and rotary table (gemma3's global layer 5 has another window and rope base
    than the sliding ones; with layer 0's it was 5-8 % off)."""
    from transformers import AutoModelForCausalLM

    from quant2gguf.calib import capture_inputs, run_layer
    hf = build(arch, tmp_path / "hf", **({} if arch == "gemma3_text" else {"num_hidden_layers": 3}))
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = torch.randint(3, 250, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states
        arch_ = get_arch(model.config.model_type)
        xs, kwargs = capture_inputs(model, arch_, ids, 2, torch.device("cpu"), torch.device("cpu"))
        layers = model.model.layers
        assert len(kwargs) == len(layers) and torch.equal(xs[0], want[0])
        for i, layer in enumerate(layers):
            xs = run_layer(layer, xs, kwargs[i], torch.device("cpu"))
            got = model.model.norm(xs[0]) if i == len(layers) - 1 else xs[0]  # the last entry is after the final norm
            torch.testing.assert_close(got, want[i + 1], rtol=1e-5, atol=1e-5, msg=f"layer {i}")
