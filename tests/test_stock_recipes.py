"""quantize --target q3_k_s | q3_k_m | q3_k_l | q4_k_s | q4_k_m (issue 10): llama-quantize's mixed
recipes, each decoder linear's type chosen by stock_quant.recipe_type as llama_tensor_get_type does.

Checked against the real llama-quantize of the pinned tree: its --dry-run choice (before and after
the fallback) for every decoder linear of tiny llama/qwen2/phi3 models, deep enough (17 layers) for
the n/16, n/8 and use_more_bits layer rules to show, 80 layers for the 70B rule, one with in-dims 256
cannot divide (fallbacks); a real Q3_K_M file read back with gguf-py; and (slow) GPTQ --target
q3_k_m / q4_k_m / q3_k_l checkpoints converted and run by llama-perplexity within 1% of PyTorch.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_tiny_model
from typer.testing import CliRunner

from quant2gguf import export, runner, stock_quant
from quant2gguf.arch import get_arch
from quant2gguf.cli import app

PRE = "gpt-2"
RECIPES = ["Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M"]
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
# 80 layers: llama.cpp's LLM_TYPE_70B (llama with GQA, qwen2), whose attn_v gets Q5_K;
# phi3: fused qkv_proj (attn_v's rules) and gate_up_proj
MODELS = {"llama-256x17": ("llama", 256, 17), "qwen2-384x9": ("qwen2", 384, 9), "llama-256x80": ("llama", 256, 80),
          "qwen2-256x80": ("qwen2", 256, 80), "phi3-256x9": ("phi3", 256, 9)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF model, its F16 GGUF by llama.cpp's converter)."""
    from quant2gguf import llama
    llama.build()
    root = tmp_path_factory.mktemp("recipes")
    out = {}
    for name, (arch, hidden, layers) in MODELS.items():
        hf = make_tiny_model(arch, root / name, hidden=hidden, layers=layers)
        f16 = root / f"{name}.f16.gguf"
        export.convert_hf(hf, f16, "f16", tokenizer_pre=PRE)
        out[name] = (hf, f16)
    return out


def ours(hf) -> tuple[dict, object, object]:
    """(GGUF name -> HF name of every decoder linear, the loaded model, its arch)."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(hf)
    arch = get_arch(m.config.model_type)
    names = {f"blk.{i}.{GGUF_NAMES[n]}.weight": f"{arch.layers}.{i}.{n}"
             for i in range(m.config.num_hidden_layers) for n in arch.linears}
    return names, m, arch


@pytest.mark.parametrize("model", list(MODELS))
def test_recipes_choose_as_llama_quantize(models, model):
    """Per decoder linear: our recipe's type = llama-quantize's before the fallback, and ours after
    it = llama-quantize's, each fallback recorded by fallbacks()."""
    hf, f16 = models[model]
    names, m, arch = ours(hf)
    n_layers, big = m.config.num_hidden_layers, stock_quant.is_70b(m, arch)
    assert big == model.endswith("x80")
    for recipe in RECIPES:
        plan = runner.stock_plan(f16, recipe)
        r = runner._run([runner._tool("llama-quantize"), "--dry-run", f16, recipe, 1], need=r"quant size")
        theirs = export.parse_dry_run(r.stderr + r.stdout)
        wanted = {f["tensor"]: f["wanted"].upper() for f in plan["fallbacks"]}
        types = stock_quant.check_model(m, arch, recipe.lower())
        fb = stock_quant.fallbacks(m, arch, recipe.lower())
        bad = [f"{g}: recipe {stock_quant.recipe_type(h, recipe, int(g.split('.')[1]), n_layers, big)} -> {types[h]}, "
               f"llama-quantize {wanted.get(g, theirs[g])} -> {theirs[g]}" for g, h in names.items()
               if (stock_quant.recipe_type(h, recipe, int(g.split(".")[1]), n_layers, big), types[h])
               != (wanted.get(g, theirs[g]), theirs[g])]
        assert not bad, f"{model} {recipe}:\n" + "\n".join(bad)
        assert fb == {h: f"{wanted[g]} -> {theirs[g]}" for g, h in names.items() if g in wanted}
        if model.endswith("x80"):
            assert {t for h, t in types.items() if h.endswith("v_proj")} <= {"Q5_K", "Q6_K"}
        if MODELS[model][1] % 256 == 0:  # no fallback, and the layer rules show
            assert not fb, (recipe, fb)
            assert len(set(types.values())) >= (1 if recipe == "Q3_K_S" and not big else 2), (recipe, set(types.values()))
        else:
            assert fb and len(set(types.values())) >= 2


def test_real_q3_k_m_file_has_our_types(models, tmp_path):
    """The tensor types of llama-quantize's actual Q3_K_M file, read by gguf-py, are check_model's."""
    hf, f16 = models["llama-256x17"]
    names, m, arch = ours(hf)
    out = runner.quantize_stock(f16, tmp_path / "q3km.gguf", "Q3_K_M")
    got = {t.name: t.tensor_type.name for t in export.read_gguf(out).tensors}
    types = stock_quant.check_model(m, arch, "q3_k_m")
    assert {g: got[g] for g in names} == {g: types[h] for g, h in names.items()}
    assert {types[h] for h in names.values()} == {"Q3_K", "Q4_K", "Q5_K"}


def test_recipe_rules_by_hand():
    rt = stock_quant.recipe_type
    v, d, o, q = "model.layers.0.self_attn.v_proj", "x.mlp.down_proj", "x.self_attn.o_proj", "x.self_attn.q_proj"
    assert [rt(v, "q3_k_m", i, 28) for i in (0, 1, 2, 27)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert [rt(d, "q3_k_m", i, 28) for i in (0, 1, 2, 27)] == ["Q5_K", "Q4_K", "Q4_K", "Q4_K"]  # 28 // 16 = 1
    assert rt(o, "q3_k_m", 5, 28) == "Q4_K" and rt(q, "q3_k_m", 5, 28) == "Q3_K"
    assert rt("x.self_attn.qkv_proj", "q3_k_m", 0, 28) == "Q5_K"  # phi3's fused qkv takes attn_v's rule
    assert {rt(n, "q3_k_s", 0, 28) for n in (v, d, o, q)} == {"Q3_K"}
    assert {rt(n, "q3_k_l", 9, 28) for n in (v, d, o)} == {"Q5_K"}
    # Q4_K_M: use_more_bits = first 1/8, last 1/8 and every third between
    more = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]
    assert [i for i in range(28) if rt(d, "q4_k_m", i, 28) == "Q6_K"] == more
    assert rt(v, "q3_k_s", 0, 80, is_70b=True) == "Q5_K" and rt(v, "q4_k_m", 11, 80, is_70b=True) == "Q5_K"
    assert rt(v, "q3_k", 0, 28) == "Q3_K" and stock_quant.base_type("q4_k_m") == "Q4_K"
    # 896 = 3.5 x 256: llama-quantize's fallbacks
    assert [stock_quant.tensor_type(v, "q3_k_m", 896, i, 24) for i in (0, 5)] == ["Q5_1", "Q5_0"]
    assert stock_quant.tensor_type(q, "q3_k_m", 896, 0, 24) == "Q4_0"
    assert stock_quant.tensor_type(v, "q4_k_m", 896, 0, 24) == "Q8_0"


# ------------------------------------------------------------------- quantize and run ----

E2E = {  # target, hidden, layers -> the decoder linears' type counts
    ("q3_k_m", 256, 4): {"Q3_K": 16, "Q4_K": 10, "Q5_K": 2},
    ("q4_k_m", 384, 3): {"Q5_0": 17, "Q8_0": 1, "Q6_K": 1, "Q4_K": 2},  # use_more_bits(i, 3): i = 2 only
    ("q3_k_l", 384, 2): {"Q4_0": 8, "Q5_1": 4, "Q5_K": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("target,hidden,layers", list(E2E))
def test_gptq_recipe_runs_in_llama_cpp(target, hidden, layers, tmp_path):
    """GPTQ --target RECIPE on a tiny llama: the manifest and GGUF hold the recipe's type (or its
    llama-quantize fallback, 384 wide) for every tensor, general.file_type is the recipe's, and
    llama-perplexity matches PyTorch within 1%."""
    import gguf as pypi_gguf
    from test_e2e_llama import llama_vs_torch
    from test_stock_target import plain_gguf_types
    hf = make_tiny_model("llama", tmp_path / "hf", hidden=hidden, layers=layers)
    ck = tmp_path / "ck"
    r = CliRunner().invoke(app, [str(a) for a in ("quantize", hf, "-o", ck, "--method", "gptq", "--target", target,
                                                  "--nsamples", "8", "--seqlen", "64", "--device", "cpu")])
    assert r.exit_code == 0, r.output
    man = json.loads((ck / "manifest.json").read_text())
    names, m, arch = ours(hf)
    want = stock_quant.check_model(m, arch, target)
    assert man["target"] == target.upper() and man["types"] == want
    assert man.get("fallbacks", {}) == stock_quant.fallbacks(m, arch, target)
    assert bool(man.get("fallbacks")) == (hidden == 384)
    assert (man["bits"], man["group_size"]) == ((3, 256) if target.startswith("q3") else (4, 256))
    gguf = tmp_path / "m.gguf"
    info = export.convert(ck, gguf, tokenizer_pre=PRE)
    types = plain_gguf_types(gguf)
    assert info["tensor_types"] == types  # convert's report: every tensor's type
    assert {g: types[g] for g in names} == {g: want[h] for g, h in names.items()}
    counts = {t: sum(want[h] == t for h in names.values()) for t in E2E[target, hidden, layers]}
    assert counts == E2E[target, hidden, layers] and sum(counts.values()) == len(names)
    f = {k: v.contents() for k, v in export.read_gguf(gguf).fields.items()}
    assert f["quant2gguf.target"] == target.upper()
    assert f["general.file_type"] == int(pypi_gguf.LlamaFileType[f"MOSTLY_{target.upper()}"])

    words = "the quick brown fox jumps over a lazy dog while twelve plus thirty makes forty two".split()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(np.random.default_rng(0).choice(words, 3000)) + ".\n")
    res = llama_vs_torch(gguf, ck, text, 128, 3, tmp_path)
    assert res["ppl"] == pytest.approx(res["ppl_torch"], rel=0.01), (res["ppl"], res["ppl_torch"])
    assert res["kld"] < 1e-3, res["kld"]
