"""PyTorch evaluation: a model against itself has kld 0 and top-1 1; a perturbed copy does not."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_model
from quant2gguf.evaluate import evaluate, load_any


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    a = make_tiny_model("llama", tmp_path_factory.mktemp("a"))
    b = tmp_path_factory.mktemp("b")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(a)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2 and "layers" in n:
                p.add_(torch.randn_like(p) * 0.02)
    m.save_pretrained(b)
    AutoTokenizer.from_pretrained(a).save_pretrained(b)
    return a, b


def test_self_reference(pair):
    a, _ = pair
    r = evaluate(str(a), ref=str(a), ntokens=512, seqlen=128, device="cpu")
    assert r["tokens"] == 512 and r["predictions"] == 4 * 127
    assert r["kld"] == pytest.approx(0.0, abs=1e-6) and r["top1"] == 1.0
    assert r["ppl"] == pytest.approx(r["ref_ppl"], rel=1e-6)
    assert 1 < r["ppl"] < 1e4 and r["device"] == "cpu"
    assert "240-299" in r["text_split"]
    json.dumps(r)
    for k in ("ppl", "kld", "top1", "gsm_acc", "gsm_n", "tokens", "seconds", "device"):
        assert k in r


def test_perturbed_copy(pair):
    a, b = pair
    r = evaluate(str(b), ref=str(a), ntokens=512, seqlen=128, device="cpu")
    assert r["kld"] > 1e-4 and r["top1"] < 1.0
    assert r["ref_ppl"] != pytest.approx(r["ppl"], rel=1e-4)
    plain = evaluate(str(b), ntokens=512, seqlen=128, device="cpu")
    assert plain["kld"] is None and plain["top1"] is None
    assert plain["ppl"] == pytest.approx(r["ppl"], rel=1e-5)


def test_kld_matches_direct_computation(pair):
    """Chunked KLD equals KL computed on the full logits of both models at once."""
    from quant2gguf.data import eval_tokens
    a, b = pair
    ma, tok, _, _ = load_any(a)
    mb, _, _, _ = load_any(b)
    ids = eval_tokens(tok, "news", 256, 128)
    with torch.no_grad():
        pa = torch.log_softmax(ma(ids).logits[:, :-1].float(), -1)
        pb = torch.log_softmax(mb(ids).logits[:, :-1].float(), -1)
    kl = (pa.exp() * (pa - pb)).sum(-1).mean().item()
    r = evaluate(str(b), ref=str(a), ntokens=256, seqlen=128, device="cpu")
    assert r["kld"] == pytest.approx(kl, rel=1e-4)
    nll = -pb.gather(-1, ids[:, 1:, None]).mean().item()
    assert r["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_gsm_runs_on_tiny_model(pair):
    a, _ = pair
    r = evaluate(str(a), ntokens=128, seqlen=128, gsm=2, device="cpu")
    assert r["gsm_n"] == 2 and 0.0 <= r["gsm_acc"] <= 1.0 and len(r["gsm_samples"]) == 2
    assert "templates 50-99" in r["gsm_split"]


def test_errors(pair, tmp_path):
    a, _ = pair
    with pytest.raises(RuntimeError, match="CUDA"):
        evaluate(str(a), packed=True, device="cpu", ntokens=128, seqlen=128)
    with pytest.raises(ValueError, match="not a model folder"):
        evaluate(str(tmp_path), ntokens=128, seqlen=128, device="cpu")
    with pytest.raises(ValueError, match="ntokens"):
        evaluate(str(a), ntokens=64, seqlen=128, device="cpu")


def test_checkpoint_defaults_ref_to_source(pair, tmp_path):
    """A checkpoint evaluates with its manifest's source_model as the reference."""
    from quant2gguf import checkpoint
    from quant2gguf.quantizer import quantize
    a, _ = pair
    model, tok, _, _ = load_any(a)
    q = {n: quantize(m.weight.data, 3, 64) for n, m in model.named_modules() if n.endswith("mlp.up_proj")}
    ck = checkpoint.save(tmp_path / "ck", model, tok, q, {"method": "rtn", "bits": 3, "group_size": 64,
                                                           "source_model": str(a)})
    r = evaluate(str(ck), ntokens=256, seqlen=128, device="cpu")
    assert r["ref"] == str(a) and r["kld"] > 0 and r["top1"] <= 1.0 and r["checkpoint"]["method"] == "rtn"
