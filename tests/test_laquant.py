"""LAQuant on tiny models: QAT lowers its own objective, and what it exports is what it trained."""
import functools

import torch
from transformers import AutoModelForCausalLM

from quant2gguf.arch import get_arch
from quant2gguf.calib import QuantConfig, quantize_layers
from quant2gguf.methods import laquant


def test_qat_improves_on_rtn_init_and_exports_exactly(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    arch = get_arch(model.config.model_type)
    batches = torch.randint(0, 512, (8, 32))
    # rates in grid cells a step (kd.FQLinear units): 20 steps of a few % of a cell
    fn = functools.partial(laquant.quantize_layer, init="rtn", epochs=5, lr_w=2e-2, lr_q=1e-2, lam=1.0, mu=1.0)
    q, stats = quantize_layers(model, arch, batches, fn, QuantConfig(3, 64), batch_size=2)
    for st in stats:
        assert st["qat_kept"] and st["qat_loss_after"] < 0.95 * st["qat_loss_before"], st
    # the model holds exactly the exported deployed weights
    for name, w in q.items():
        assert torch.equal(model.get_submodule(name).weight.data, w.dequantize())


def test_lookahead_terms_switch_off_cleanly(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    fn = functools.partial(laquant.quantize_layer, init="rtn", epochs=1, lam=0.0, mu=0.0)
    q, stats = quantize_layers(model, get_arch("llama"), torch.randint(0, 512, (4, 32)), fn, QuantConfig(3, 64))
    assert len(q) == 14 and all("qat_loss_after" in s for s in stats)


def test_gptq_options_reach_the_init(tiny_model_dir):
    """`--method laquant --damp 0.1 --act-order` starts from the GPTQ those options give when GPTQ runs alone:
    with epochs=0 LAQuant returns its init, so it must equal that GPTQ bit for bit (and differ from default damp)."""
    from quant2gguf.methods import gptq
    batches = torch.randint(0, 512, (8, 32))

    def run(fn):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return quantize_layers(model, get_arch(model.config.model_type), batches, fn, QuantConfig(3, 64))[0]
    alone = run(functools.partial(gptq.quantize_layer, damp=0.5, act_order=True))
    laq = run(functools.partial(laquant.quantize_layer, init="gptq", epochs=0, damp=0.5, act_order=True))
    default = run(functools.partial(laquant.quantize_layer, init="gptq", epochs=0))
    assert all(torch.equal(alone[n].codes, laq[n].codes) and torch.equal(alone[n].scales, laq[n].scales) for n in alone)
    assert any(not torch.equal(alone[n].codes, default[n].codes) for n in alone)
