"""Data sources: calibration and evaluation splits never overlap; eval tokens are deterministic."""
from __future__ import annotations

import json

import pytest
import torch

from quant2gguf import data as D
from conftest import tiny_tokenizer


def test_news_split_disjoint_and_complete():
    calib, ev = D.news_articles("calib"), D.news_articles("eval")
    assert len(calib) == 240 and len(ev) == 60
    assert not set(calib) & set(ev)
    assert calib + ev == D.news_articles("all")


def test_gsm_split_disjoint():
    calib, ev = D.gsm_problems("calib"), D.gsm_problems("eval")
    assert len(calib) == 50 and len(ev) == 50
    assert not {p["id"] for p in calib} & {p["id"] for p in ev}
    assert not {p["id_orig"] for p in calib} & {p["id_orig"] for p in ev}
    assert not {p["question"] for p in calib} & {p["question"] for p in ev}
    for p in ev:  # every eval answer is a number and the worked solution agrees with it
        assert D.parse_answer(p["solution"]) == pytest.approx(float(p["answer"]))
    assert [p["id"] for p in D.gsm_problems("eval", 5)] == list(range(50, 55))
    assert D.gsm_problems("calib", 7, seed=1) == D.gsm_problems("calib", 7, seed=1)


def test_gsm_variants_come_from_calibration_templates_only():
    ev = D.gsm_problems("eval")
    v = D.gsm_variants(120, seed=0)
    assert len(v) == 120 and {p["id"] for p in v} <= set(range(50))
    assert len({p["id"] for p in v}) == 50  # round-robin reaches every calibration template
    assert not {p["question"] for p in v} & {p["question"] for p in ev}
    assert not {p["id_orig"] for p in v} & {p["id_orig"] for p in ev}
    for p in v:  # rendered worked solutions end in the rendered answer
        assert D.parse_answer(p["solution"]) == pytest.approx(float(p["answer"]))
    assert D.gsm_variants(5, seed=3) == D.gsm_variants(5, seed=3)
    assert D.gsm_variants(5, seed=3) != D.gsm_variants(5, seed=4)
    calib = D.gsm_problems("calib", 80)
    assert len(calib) == 80 and sum(p["variant"] == 0 for p in calib) == 50


def test_champ_split_disjoint():
    calib, ev = D.champ_problems("calib"), D.champ_problems("eval")
    assert len(calib) + len(ev) == 270 and len(ev) == 54
    assert not {p["id"] for p in calib} & {p["id"] for p in ev}
    assert all(p["question"] and p["solution"] for p in ev)


def test_code_split_disjoint_and_whole_functions():
    calib, ev = D.code_problems("calib"), D.code_problems("eval")
    assert len(calib) + len(ev) == 164 and len(ev) == 32
    assert not {p["id"] for p in calib} & {p["id"] for p in ev}
    for p in ev:  # prompt + canonical solution: a function that compiles
        compile(p["text"], p["id"], "exec")


def test_mixed_source_interleaves_its_parts_and_keeps_splits_apart():
    mix = D.texts("news+code", "calib")
    news, code = D.texts("news", "calib"), D.texts("code", "calib")
    assert sorted(mix) == sorted(news + code) and mix[:3] == [news[0], code[0], news[1]]
    assert code[-1] in mix[-3:]  # spread evenly: no part runs out before the end
    assert not set(D.texts("news+code", "eval")) & set(mix)
    assert "news calib" in D.describe_split("news+code", "calib") and "code calib" in D.describe_split("news+code", "calib")
    for bad in ("news+news", "news+wiki", "news+"):
        with pytest.raises(ValueError, match="join distinct sources"):
            D.texts(bad, "calib")
    tok = tiny_tokenizer()  # KD's held-out tail of a mix holds text of every part
    _, held = D.train_heldout_batches(tok, "news+code", 4, 16, 64)
    tail = tok.decode(held.flatten().tolist())
    assert "def " in tail or "return" in tail


def test_token_batches_and_eval_tokens():
    tok = tiny_tokenizer()
    a = D.eval_tokens(tok, "news", ntokens=1024, seqlen=128)
    b = D.eval_tokens(tok, "news", ntokens=1024, seqlen=128)
    assert a.shape == (8, 128) and a.dtype == torch.long and torch.equal(a, b)
    c = D.token_batches(tok, "news", "calib", nsamples=4, seqlen=64, seed=0)
    assert c.shape == (4, 64) and torch.equal(c, D.token_batches(tok, "news", "calib", 4, 64, seed=0))
    assert not torch.equal(c, D.token_batches(tok, "news", "calib", 4, 64, seed=1))
    # calibration windows come from the calib split only: none of them occurs in the eval stream
    ev = D._token_stream(tok, D.texts("news", "eval")).tolist()
    evs = " ".join(map(str, ev))
    assert all(" ".join(map(str, w.tolist())) not in evs for w in c)
    for src in ("gsm", "champ", "code", "news+champ"):
        assert D.token_batches(tok, src, "calib", 2, 64).shape == (2, 64)


def test_eval_text_file_is_the_eval_split():
    p = D.eval_text_file("news")
    body = p.read_text(encoding="utf-8")
    assert body.startswith(D.news_articles("eval")[0]) and D.news_articles("calib")[-1] not in body
    assert D.eval_text_file("news") == p


def test_user_files(tmp_path):
    tok = tiny_tokenizer()
    txt = tmp_path / "notes.txt"
    txt.write_text("\n".join(f"line {i} the quick brown fox" for i in range(50)))
    calib, ev = D.file_texts(txt, "calib"), D.file_texts(txt, "eval")
    assert len(calib) == 40 and len(ev) == 10 and not set(calib) & set(ev)
    js = tmp_path / "qa.jsonl"
    js.write_text("\n".join(json.dumps({"question": f"q{i}?", "answer": f"{i}"}) for i in range(10)))
    assert D.texts(str(js), "eval") == ["q8?\n8", "q9?\n9"]
    assert D.token_batches(tok, str(txt), "calib", 2, 16).shape == (2, 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(ValueError, match="none of the fields"):
        D.texts(str(bad), "calib")
    with pytest.raises(ValueError, match="unknown data source"):
        D.texts("nope", "calib")
    with pytest.raises(ValueError, match="unknown split"):
        D.news_articles("test")


@pytest.mark.parametrize("text,want", [
    ("so the total is 5 + 7 = 12.\n#### 12", 12.0),
    ("#### 1,234", 1234.0),
    ("#### $1,234.50\nQuestion: 99", 1234.5),
    ("The answer is \\boxed{42}. Then 7", 42.0),
    ("\\boxed{\\frac{3}{4}}", 0.75),
    ("\\boxed{3/4}", 0.75),
    ("It costs $5,000 in total.", 5000.0),
    ("temperature drops to -3 degrees", -3.0),
    ("#### -5\nnext 7", -5.0),
    ("60%", 60.0),
    ("no numbers here", None),
    ("", None),
])
def test_parse_answer(text, want):
    got = D.parse_answer(text)
    assert got == (pytest.approx(want) if want is not None else None)
