"""AWQ and QuantLRM on tiny models: scale folding keeps the function, importance follows the paper's map."""
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from quant2gguf.arch import get_arch
from quant2gguf.calib import QuantConfig, quantize_layers
from quant2gguf.methods import awq, quantlrm


def test_importance_map_protects_both_ends():
    d = torch.tensor([[0.0, 1.0, 5.0, 9.0], [0.0, 1.0, 5.0, 9.0]])
    x_min, x_mid, x_max = quantlrm.global_thresholds({"a": d})
    assert (x_min, x_mid, x_max) == (1.0, 5.0, 9.0)
    imp = quantlrm.channel_importance(d, x_min, x_mid, x_max)
    # dW=0 -> y=1, times (1 + 2 zero rows); ends -> y=R; median -> y=1
    assert imp.tolist() == [3.0, 10.0, 1.0, 10.0]


def test_protected_mask_top_slots_per_group():
    imp = torch.arange(128.0)
    mask = quantlrm.protected_mask(imp, 3, 64, 2)
    assert mask.shape == (3, 128) and mask.sum().item() == 3 * 4
    assert mask[:, [62, 63, 126, 127]].all()


def _awq_unrounded(path, monkeypatch):
    """The project's AWQ over every layer with scales far from 1 (any s must keep the function),
    then each linear set back to the weights it had right before rounding: what remains is only
    the scaling and the folds. Returns (logits before, logits after, the producers folded into)."""
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (4, 16))
    with torch.no_grad():
        ref = model(ids).logits
    folded, real_fold = set(), awq.fold

    def fold(ctx, prev, s):
        folded.add(prev)
        real_fold(ctx, prev, s)
    monkeypatch.setattr(awq, "fold", fold)
    monkeypatch.setattr(awq, "search_scale", lambda ws, x, stat, *a: (torch.rand(stat.numel()) * 1.5 + 0.25, 0.5, []))
    pre = {}

    def method(ctx):
        out = awq.quantize_layer(ctx, clip=False)
        pre.update({f"model.layers.{ctx.index}.{n}": w for n, w in ctx.prequant.items()})
        return out
    quantize_layers(model, get_arch(model.config.model_type), ids, method, QuantConfig(3, 64))
    with torch.no_grad():
        for n, w in pre.items():
            model.get_submodule(n).weight.copy_(w)
        out = model(ids).logits
    return ref, out, folded


def test_awq_fold_preserves_function(tiny_model_dir, monkeypatch):
    """GQA (every arch): norms and up_proj absorb 1/s; v_proj cannot (fewer rows than o_proj's input)."""
    ref, out, folded = _awq_unrounded(tiny_model_dir, monkeypatch)
    assert folded == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_awq_fold_into_v_proj_preserves_function(tiny_mha_dir, monkeypatch):
    """MHA: o_proj's scale is folded into v_proj's rows."""
    ref, out, folded = _awq_unrounded(tiny_mha_dir, monkeypatch)
    assert "self_attn.v_proj" in folded
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_quantlrm_layer_protects_exact_fp16(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    arch = get_arch("llama")
    deltas = {f"model.layers.{i}.{n}": torch.rand_like(model.get_submodule(f"model.layers.{i}.{n}").weight)
              for i in range(2) for n in arch.linears}
    imp = quantlrm.importances(deltas)
    q, stats = quantize_layers(model, arch, torch.randint(0, 512, (4, 32)),
                               functools.partial(quantlrm.quantize_layer, importance=imp), QuantConfig(3, 64, slots=2))
    w = q["model.layers.0.mlp.up_proj"]
    assert w.pidx is not None and (w.pidx != 255).all()
    # up_proj protects gate_proj's most important channels (they share the input)
    top = imp["model.layers.0.mlp.gate_proj"].view(-1, 64).topk(2).indices.sort().values
    assert torch.equal(w.pidx[0].long().sort(-1).values, top)
    deq = w.dequantize()
    cols = w.pidx.long() + torch.arange(0, w.shape[1], 64).view(1, -1, 1)  # (N, groups, slots)
    assert torch.equal(torch.gather(deq, 1, cols.flatten(1)), w.pval.float().flatten(1))
    assert torch.equal(model.get_submodule("model.layers.0.mlp.up_proj").weight.data, deq)


def test_awq_search_prefers_scaling_with_outlier_channels():
    torch.manual_seed(0)
    x = torch.randn(1024, 128)
    x[:, :4] *= 30  # salient channels, as in real activations
    w = torch.randn(64, 128) * 0.05
    s, alpha, losses = awq.search_scale([w], x, x.abs().mean(0), 3, 64)
    assert alpha > 0 and min(losses) < losses[0]
