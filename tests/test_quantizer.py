"""Properties of the one reference quantizer, on fresh random weights each run."""
import pytest
import torch

from quant2gguf import quantizer as Q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_error_bound_and_fp16_params(bits, group):
    w = torch.randn(16, 256) * torch.rand(16, 1) * 3
    q = Q.quantize(w, bits, group)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.scales.dtype == torch.float16 and q.offsets.dtype == torch.float16
    deq = q.dequantize()
    # min-max RTN: error at most half a step, plus the fp16 rounding of d and m spread over the range
    d = Q.expand(q.scales.float(), group)
    slack = (2**bits - 1) * d * 2**-10 + Q.expand(q.offsets.float().abs(), group) * 2**-10
    assert ((deq - w).abs() <= d / 2 + slack + 1e-6).all()
    # dequant is exactly fp32(d)*q + fp32(m), computed the way the kernels do it
    g = q.codes.float().reshape(16, -1, group)
    manual = (q.scales.float().unsqueeze(-1) * g + q.offsets.float().unsqueeze(-1)).reshape(16, 256)
    assert torch.equal(deq, manual)


def test_codes_round_half_even_and_clamp():
    d = torch.tensor([1.0], dtype=torch.float16)
    m = torch.tensor([0.0], dtype=torch.float16)
    w = torch.tensor([0.5, 1.5, 2.5, -3.0, 99.0])
    assert Q.codes_for(w, d, m, 3).tolist() == [0.0, 2.0, 2.0, 0.0, 7.0]


def test_constant_group_is_exact():
    w = torch.full((4, 64), 0.25)
    q = Q.quantize(w, 3, 64)
    assert torch.equal(q.dequantize(), w) and int(q.codes.max()) == 0


def test_protected_positions_exact_and_range_excludes_them():
    w = torch.randn(8, 128) * 0.02
    protect = torch.zeros_like(w, dtype=torch.bool)
    protect[:, 5] = True
    protect[:, 70] = True
    w[:, 5] = 40.0  # an outlier that would wreck the range
    q = Q.quantize(w, 3, 64, protect=protect, slots=2)
    deq = q.dequantize()
    assert torch.equal(deq[:, 5], w[:, 5].half().float()) and torch.equal(deq[:, 70], w[:, 70].half().float())
    assert (q.pidx[:, 0, 0] == 5).all() and (q.pidx[:, 0, 1] == Q.EMPTY).all() and (q.pidx[:, 1, 0] == 6).all()
    assert (deq - w)[~protect].abs().max() < 0.02  # the outlier did not set the step
    with pytest.raises(ValueError, match="more than 2"):
        bad = torch.zeros_like(protect)
        bad[0, :3] = True
        Q.quantize(w, 3, 64, protect=bad, slots=2)


@pytest.mark.parametrize("weighted", [False, True])
def test_clip_search_finds_the_brute_force_optimum(weighted):
    """Per group, the searched ratio's error is the minimum over the search's grid of ratios (each
    tried by the deployed quantize/dequantize path), on weights with outliers where min-max loses."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.01] *= 6  # heavy tails: clipping the range pays
    x = torch.rand(256, generator=g) * 4 if weighted else torch.ones(256)

    def err(ratio):  # (rows, groups) weighted squared error
        return ((Q.quantize(w, 3, 64, clip=ratio).dequantize() - w) ** 2 * x).reshape(16, 4, 64).sum(-1)
    grid = [1.0 - 0.5 * i / 19 for i in range(20)]  # search_clip's defaults: 20 ratios in [0.5, 1]
    best = torch.stack([err(r) for r in grid]).amin(0)
    ratio = Q.search_clip(w, 3, 64, x=x if weighted else None)
    torch.testing.assert_close(err(ratio), best, rtol=1e-6, atol=0)
    assert (best < err(1.0)).float().mean() > 0.5 and (ratio < 1).float().mean() > 0.5  # min-max is not optimal here


def test_weighted_clip_search_keeps_outliers_on_loud_input_channels():
    """RTN's clip search (methods/rtn.py) weights each input channel by its activation second moment.
    An outlier weight on a channel with large activations (Qwen2.5's outlier channels) is reproduced
    (its group's range is not cut), where plain weight MSE clips it by a fifth or more; the same
    outlier on a quiet channel is still clipped, so the search is not simply "never clip"."""
    from quant2gguf.methods import rtn
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    w[:, 5] = 6.0 * torch.where(torch.rand(64, generator=g) < 0.5, -1.0, 1.0)  # one outlier per row, group 0
    loud, quiet = torch.ones(256), torch.ones(256)
    loud[5], quiet[5] = 100.0, 0.01

    def outlier_err(x):  # relative error of the outlier after quantize/dequantize, per row
        deq = rtn.quantize_weight(w, 3, 128, x=x).dequantize()
        return (deq[:, 5] - w[:, 5]).abs() / w[:, 5].abs()
    assert (outlier_err(None) > 0.2).float().mean() > 0.5  # plain MSE cuts it in most rows
    assert outlier_err(loud).max() < 0.01  # fp16 rounding only: min-max kept the outlier
    assert (Q.search_clip(w, 3, 128, x=loud)[:, 0] == 1.0).all()
    assert (Q.search_clip(w, 3, 128, x=quiet)[:, 0] < 1.0).all()  # a quiet channel's outlier is clipped
    assert (outlier_err(quiet) > 0.2).float().mean() > 0.5


def test_rtn_clip_search_uses_the_layer_inputs(tiny_llama_dir):
    """quantize_layer measures E[x^2] per input channel of each linear on the layer's inputs and
    weights the clip search with it: the deployed weights equal quantize_weight(w, x=that moment)."""
    import functools
    from transformers import AutoModelForCausalLM
    from quant2gguf.arch import get_arch
    from quant2gguf.calib import QuantConfig, quantize_layers
    from quant2gguf.methods import rtn
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    layer = model.get_decoder().layers[0]
    w = {n: layer.get_submodule(n).weight.data.clone() for n in ("self_attn.q_proj", "mlp.down_proj")}
    seen = {}

    def hook(name):
        def fn(_m, args, _out):
            seen[name] = args[0].reshape(-1, args[0].shape[-1]).float()
        return fn
    hooks = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in w]
    batches = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(batches)  # layer 0's inputs are the same FP inputs quantize_layers feeds it
    for h in hooks:
        h.remove()
    q, _ = quantize_layers(model, get_arch("llama"), batches, functools.partial(rtn.quantize_layer), QuantConfig(3, 64))
    for n, wn in w.items():
        x = (seen[n] ** 2).mean(0)
        want = rtn.quantize_weight(wn, 3, 64, x=x).dequantize()
        plain = rtn.quantize_weight(wn, 3, 64).dequantize()
        got = q[f"model.layers.0.{n}"].dequantize()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.equal(got, plain)  # the statistics changed some group's ratio


def test_check_weight_messages():
    with pytest.raises(ValueError, match=r"blk\.w: input dim 576 is not divisible by group size 128 \(use --group-size 64\)"):
        Q.check_weight("blk.w", torch.zeros(4, 576), 128)
    w = torch.zeros(4, 128)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        Q.check_weight("blk.w", w, 64)
