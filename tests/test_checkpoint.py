"""Checkpoint round trip: what was quantized in memory is what loads back, bit for bit."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quant2gguf import checkpoint
from quant2gguf.arch import get_arch
from quant2gguf.calib import QuantConfig, quantize_layers
from quant2gguf.methods import rtn


def _quantized_model(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    q, stats = quantize_layers(model, get_arch(model.config.model_type),
                               torch.randint(0, 512, (2, 32)), rtn.quantize_layer, QuantConfig(3, 64))
    return model, AutoTokenizer.from_pretrained(folder), q, stats


def test_round_trip(tiny_model_dir, tmp_path):
    model, tok, q, stats = _quantized_model(tiny_model_dir)
    path = checkpoint.save(tmp_path / "ck", model, tok, q, {"method": "rtn", "bits": 3, "group_size": 64,
                                                           "layers": stats, "source_model": str(tiny_model_dir)})
    man = json.loads((path / "manifest.json").read_text())
    assert man["format"] == "quant2gguf-ckpt" and len(man["quantized"]) == 14 and "torch" in man["versions"]
    loaded, _, man2, q2 = checkpoint.load_model(path)
    for name, w in q.items():
        assert torch.equal(q2[name].codes, w.codes) and torch.equal(q2[name].scales, w.scales)
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_refuses_existing_and_reports_missing_tensor(tiny_llama_dir, tmp_path):
    model, tok, q, stats = _quantized_model(tiny_llama_dir)
    man = {"method": "rtn", "bits": 3, "group_size": 64}
    path = checkpoint.save(tmp_path / "ck", model, tok, q, man)
    with pytest.raises(FileExistsError):
        checkpoint.save(path, model, tok, q, man)
    from safetensors.torch import load_file, save_file
    t = load_file(path / "quant.safetensors")
    del t["model.layers.1.mlp.up_proj.scales"]
    save_file(t, path / "quant.safetensors")
    with pytest.raises(ValueError, match=r"missing model\.layers\.1\.mlp\.up_proj\.scales"):
        checkpoint.load_quantized(path)
    with pytest.raises(ValueError, match="not a quant2gguf checkpoint"):
        checkpoint.read_manifest(tmp_path)


def test_sentencepiece_model_copied_from_the_source(tiny_llama_dir, tmp_path):
    """A fast tokenizer's save_pretrained does not write tokenizer.model; llama.cpp's converter needs it
    for sentencepiece vocabularies (phi3), so the checkpoint takes it from the source folder."""
    import shutil
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    (src / "tokenizer.model").write_bytes(b"\x0a\x05spm-bytes")  # stands in for a sentencepiece model
    model, tok, q, stats = _quantized_model(src)
    man = {"method": "rtn", "bits": 3, "group_size": 64, "layers": stats}
    a = checkpoint.save(tmp_path / "a", model, tok, q, man, source=src)
    assert (a / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    b = checkpoint.save(tmp_path / "b", model, tok, q, man, source=tiny_llama_dir)  # none there: none copied
    assert not (b / "tokenizer.model").exists()
