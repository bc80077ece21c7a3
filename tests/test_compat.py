"""Compatibility export (quant2gguf/compat.py) on the real SmolLM2 fixture through the pinned,
patched llama.cpp (built once, cached): our importance matrix must be read by llama-quantize and
must make the stock 3-bit file better on held-out text than the same type without it.

AWQ fold, on a tiny model: the scales recovered from the checkpoint are AWQ's, folding them keeps
the model's function, and compat's F16 weights are the unfolded ones times the scales."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from quant2gguf import checkpoint, compat, export, llama, runner
from quant2gguf.arch import get_arch
from quant2gguf.data import eval_text_file

PRE = "gpt-2"  # the tiny byte-level BPE tokenizer's pre-tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    llama.build()
    wd = tmp_path_factory.mktemp("compat")
    info = compat.compat_export("smollm2", wd / "smollm2-Q3_K_S-imat.gguf", "Q3_K_S", nsamples=8, seqlen=256)
    return wd, info


@pytest.mark.slow
def test_imatrix_file_layout(exported):
    """Every decoder linear (7 a layer, 30 layers; the lm_head is tied) has sums and a count, F32,
    under its GGUF tensor name, and the token count is what was run."""
    _, info = exported
    r = export.read_gguf(info["imatrix"])
    names = {t.name: t for t in r.tensors}
    sums = [n for n in names if n.endswith(".in_sum2")]
    assert len(sums) == 7 * 30 and "blk.0.attn_q.weight.in_sum2" in names and "blk.29.ffn_down.weight.in_sum2" in names
    assert names["blk.0.ffn_down.weight.in_sum2"].data.size == 1536  # SmolLM2 intermediate size
    assert float(names["blk.3.attn_k.weight.counts"].data.ravel()[0]) == 8 * 256
    assert all((names[n].data > 0).all() for n in sums)
    fields = {f.name for f in r.fields.values()}
    assert {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= fields


@pytest.mark.slow
def test_imatrix_improves_stock_quant(exported):
    wd, info = exported
    plain = runner.quantize_stock(info["f16"], wd / "smollm2-Q3_K_S.gguf", "Q3_K_S")
    text = eval_text_file("news")
    with_imat = runner.perplexity(info["gguf"], text, ctx=256, chunks=6)["ppl"]
    without = runner.perplexity(plain, text, ctx=256, chunks=6)["ppl"]
    assert with_imat < without, (with_imat, without)


@pytest.mark.slow
def test_existing_output_refused(exported):
    wd, info = exported
    with pytest.raises(FileExistsError, match="exists"):
        compat.compat_export("smollm2", info["gguf"], "Q3_K_S")


# ------------------------------------------------------------------------------- AWQ fold ----

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


@pytest.fixture(scope="module")
def awq(tmp_path_factory):
    """A tiny llama without GQA (so v_proj -> o_proj folds too), norms away from 1, its AWQ
    checkpoint, and the scales AWQ folded (recorded from methods.awq.fold)."""
    from conftest import tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    from quant2gguf.methods import awq as awq_method
    from quant2gguf.pipeline import quantize_model
    root = tmp_path_factory.mktemp("awq-fold")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, 0.05) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    model.save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    true, fold = {}, awq_method.fold

    def record(ctx, prev, s):
        true[f"model.layers.{ctx.index}.{prev}"] = s.double().cpu().clone()
        return fold(ctx, prev, s)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(awq_method, "fold", record)
        ckpt = quantize_model(str(root / "hf"), root / "ckpt", method="awq", group_size=64, nsamples=8, seqlen=64,
                              device="cpu")
    return {"root": root, "hf": root / "hf", "ckpt": ckpt, "true": true}


def test_recovered_scales_are_awqs(awq):
    from transformers import AutoModelForCausalLM
    src = AutoModelForCausalLM.from_pretrained(awq["hf"])
    got = compat.awq_scales(src, awq["ckpt"], get_arch("llama"))
    assert got.keys() == awq["true"].keys()
    for name, s in awq["true"].items():
        rel = ((got[name] - s).abs() / s).max().item()
        exact = "norm" in name  # norm producers: FP weight / checkpoint weight
        assert rel < (1e-6 if exact else 3e-2), (name, rel)
    assert sum((s - 1).abs().max().item() > 0.05 for s in awq["true"].values()) >= 6  # AWQ did fold here


def test_fold_keeps_the_model_function(awq):
    from transformers import AutoModelForCausalLM
    src = AutoModelForCausalLM.from_pretrained(awq["hf"]).eval()
    folded, _, scales, man = compat.awq_folded_model(awq["ckpt"])
    assert man["method"] == "awq"
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = src(ids).logits, folded.eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    w0 = src.model.layers[0].mlp.down_proj.weight
    w1 = folded.model.layers[0].mlp.down_proj.weight
    assert not torch.allclose(w0, w1, rtol=1e-2)  # the weights did change


def test_compat_f16_is_the_unfolded_f16_times_the_scales(awq):
    """Every tensor of compat's F16 file = the plain converter's F16 tensor with its input columns
    times s of its group and (v_proj, up_proj) its rows divided by the next group's s; the norms
    (F32) divided by s. Within fp16 rounding of both files."""
    root = awq["root"]
    m, tok, scales, _ = compat.awq_folded_model(awq["ckpt"])
    compat.model_f16(m, tok, root / "folded.gguf", tokenizer_pre=PRE)
    export.convert_hf(awq["hf"], root / "plain.gguf", outtype="f16", tokenizer_pre=PRE)
    folded = {t.name: np.asarray(t.data, np.float64) for t in export.read_gguf(root / "folded.gguf").tensors}
    plain = {t.name: np.asarray(t.data, np.float64) for t in export.read_gguf(root / "plain.gguf").tensors}
    assert not [p.name for p in root.iterdir() if p.name.startswith(".folded-")]  # temp folder removed
    arch, checked = get_arch("llama"), 0
    for i in range(2):
        col = {}  # module -> scale of its input columns
        row = {}  # module -> scale dividing its rows
        for g in arch.groups:
            s = scales[f"model.layers.{i}.{g.prev}"].numpy()
            col.update(dict.fromkeys(g.linears, s))
            row[g.prev] = s
        for mod, short in GGUF_NAMES.items():
            name = f"blk.{i}.{short}.weight"
            want = plain[name].copy()
            if mod in col:
                want = want * col[mod][None, :]
            if mod in row:
                want = want / (row[mod][:, None] if want.ndim == 2 else row[mod])
            tol = 1e-6 if want.ndim == 1 else 1.5e-3  # norms stay F32; fp16 rounding in each file
            np.testing.assert_allclose(folded[name], want, rtol=tol, atol=1e-7, err_msg=name)
            checked += 1
    assert checked == 2 * len(GGUF_NAMES)
    for name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        np.testing.assert_array_equal(folded[name], plain[name])


def test_folded_imatrix_is_the_plain_one_over_s_squared(awq, tmp_path):
    """The importance matrix compat takes from the folded model sees inputs x / s."""
    m, tok, scales, _ = compat.awq_folded_model(awq["ckpt"])
    compat.imatrix_of(m, tok, tmp_path / "f.gguf", nsamples=4, seqlen=64)
    compat.make_imatrix(str(awq["hf"]), tmp_path / "p.gguf", nsamples=4, seqlen=64)
    f = {t.name: np.asarray(t.data, np.float64).ravel() for t in export.read_gguf(tmp_path / "f.gguf").tensors}
    p = {t.name: np.asarray(t.data, np.float64).ravel() for t in export.read_gguf(tmp_path / "p.gguf").tensors}
    s = scales["model.layers.1.mlp.up_proj"].numpy()
    np.testing.assert_allclose(f["blk.1.ffn_down.weight.in_sum2"], p["blk.1.ffn_down.weight.in_sum2"] / s**2, rtol=1e-4)
    s = scales["model.layers.0.input_layernorm"].numpy()
    np.testing.assert_allclose(f["blk.0.attn_q.weight.in_sum2"], p["blk.0.attn_q.weight.in_sum2"] / s**2, rtol=1e-4)


def test_non_awq_checkpoint_refused(awq, tmp_path):
    fake = tmp_path / "gptq-ckpt"
    shutil.copytree(awq["ckpt"], fake)
    man = json.loads((fake / checkpoint.MANIFEST).read_text())
    (fake / checkpoint.MANIFEST).write_text(json.dumps({**man, "method": "gptq"}))
    with pytest.raises(ValueError, match="gptq checkpoint: compat can use only AWQ's channel scales"):
        compat.awq_folded_model(fake)


@pytest.mark.slow
def test_compat_export_of_an_awq_checkpoint(awq, tmp_path):
    """The whole path: folded F16, imatrix, llama-quantize to a stock type; the file loads."""
    info = compat.compat_export(str(awq["ckpt"]), tmp_path / "tiny-Q4_0.gguf", "Q4_0", nsamples=4, seqlen=64,
                                tokenizer_pre=PRE)
    assert info["awq_fold"]["method"] == "awq" and info["awq_fold"]["groups"] == 8
    assert info["f16"].endswith(".awq.f16.gguf")
    runner.check_gguf(info["gguf"])
    types = {t.name: t.tensor_type.name for t in export.read_gguf(info["gguf"]).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_0"
