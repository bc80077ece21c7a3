"""`straces`: on-policy distillation data. The kd init student (the init's dequantized weights, as
exported, before training) answers the GSM calibration prompts of `traces`; the teacher scores them
like any calibration text. Tiny qwen2 with a ChatML template, 6 prompts of 24 new tokens."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from quant2gguf import checkpoint, data, pipeline, traces
from quant2gguf.cli import app
from quant2gguf.pipeline import quantize_model

N, NEW = 6, 24


@pytest.fixture(scope="module")
def init_ckpt(chat_model, tmp_path_factory):
    return quantize_model(chat_model, tmp_path_factory.mktemp("straces-init") / "gptq", method="gptq",
                          group_size=64, calib="news", nsamples=8, seqlen=64, device="cpu")


@pytest.fixture
def small(tmp_path, monkeypatch):
    """Few, short traces in a private cache; counts the generations of each kind."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(traces, "cache_dir", lambda *p: cache.joinpath(*p).mkdir(parents=True, exist_ok=True)
                        or cache.joinpath(*p))
    monkeypatch.setattr(traces, "TRACES_N", N)
    made = {"teacher": 0, "student": 0}
    real_t, real_s, real_w = traces.traces_file, traces.student_traces_file, traces._write_traces
    monkeypatch.setattr(traces, "traces_file", lambda *a, **k: real_t(*a, **dict(k, max_new_tokens=NEW)))
    monkeypatch.setattr(traces, "student_traces_file", lambda *a, **k: real_s(*a, **dict(k, max_new_tokens=NEW)))

    def write(model, tok, dest, *a, **k):
        made["student" if "student" in dest.name else "teacher"] += 1
        return real_w(model, tok, dest, *a, **k)
    monkeypatch.setattr(traces, "_write_traces", write)
    return made


def _rows(path) -> list[str]:
    return [json.loads(x)["text"] for x in open(path).read().splitlines()]


def _greedy(model, tok) -> list[str]:
    """A direct greedy generate of the traces' prompts (one left-padded batch, as traces batch them)."""
    prompts = traces.trace_prompts(tok, data.gsm_problems("calib", N))
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.eval().generate(**enc, do_sample=False, max_new_tokens=NEW, pad_token_id=tok.pad_token_id)
    stops = traces._stop_ids(model, tok)
    return [p + traces._answer(tok, s.tolist(), stops) for p, s in zip(prompts, out[:, enc["input_ids"].shape[1]:])]


def _kd(model, init, out, calib, **kw):
    return quantize_model(model, out, method="kd", init=str(init), group_size=64, calib=calib, seqlen=64,
                          device="cpu", **{**dict(steps=4, batch=2, eval_every=2, heldout=2), **kw})


def test_straces_are_the_quantized_inits_answers_not_the_teachers(chat_model, init_ckpt, small, tmp_path):
    """kd --calib news+straces from a 3-bit init: the straces file holds exactly what a greedy generate
    of the dequantized init (checkpoint.load_model) gives, which is not what the teacher answers; the
    manifest names the file and says the init student made it."""
    ck = _kd(chat_model, init_ckpt, tmp_path / "kd", "news+straces")
    man = json.loads((ck / "manifest.json").read_text())["calibration"]
    st = man["student_traces"]
    assert man["source"] == "news+straces" and man["files"] == f"news+{st['file']}"
    assert "init student" in st["generated_by"] and st["init"] == str(init_ckpt)
    got = _rows(st["file"])
    student, tok, _, _ = checkpoint.load_model(init_ckpt)
    assert got == _greedy(student, tok) and len(got) == N
    teacher = AutoModelForCausalLM.from_pretrained(chat_model)
    teacher_rows = _rows(traces.traces_file(teacher, AutoTokenizer.from_pretrained(chat_model), chat_model))
    assert teacher_rows == _greedy(teacher, AutoTokenizer.from_pretrained(chat_model))
    assert sum(a != b for a, b in zip(got, teacher_rows)) >= N // 2, (got, teacher_rows)
    prompts = traces.trace_prompts(tok, data.gsm_problems("calib", N))
    assert all(r.startswith(p) and len(r) > len(p) for r, p in zip(got, prompts))  # the same prompts as traces
    assert small == {"teacher": 1, "student": 1}


def test_straces_cache_is_keyed_by_the_init(chat_model, small, tmp_path):
    """Same init: the cached file is reused. The init re-made at the same path (other calibration
    windows): a new key and new traces. The fingerprint also differs between inits."""
    init = tmp_path / "init"
    make = lambda ns: quantize_model(chat_model, init, method="gptq", group_size=64, calib="news",  # noqa: E731
                                     nsamples=ns, seqlen=64, device="cpu")
    make(8)
    file = lambda d: json.loads((d / "manifest.json").read_text())["calibration"]["student_traces"]  # noqa: E731
    a = file(_kd(chat_model, init, tmp_path / "kd1", "news+straces", steps=2, eval_every=1))
    b = file(_kd(chat_model, init, tmp_path / "kd2", "news+straces", steps=2, eval_every=1))
    assert a == b and small["student"] == 1  # the second from the cache
    _, q1 = checkpoint.load_quantized(init)
    fp1 = traces.init_fingerprint(str(init.resolve()), q1)
    shutil.rmtree(init)
    make(4)
    _, q2 = checkpoint.load_quantized(init)
    assert traces.init_fingerprint(str(init.resolve()), q2) != fp1
    c = file(_kd(chat_model, init, tmp_path / "kd3", "news+straces", steps=2, eval_every=1))
    assert c["file"] != a["file"] and c["init_id"] != a["init_id"] and small["student"] == 2


def test_kd_on_a_mix_with_traces_and_straces_from_a_method_init(chat_model, small, tmp_path, monkeypatch):
    """news+traces+straces with --init rtn: the teacher's traces calibrate the init (never the straces),
    the rtn init then answers, and kd trains on all three parts; the manifest names both files."""
    seen = []
    real = data.token_batches
    monkeypatch.setattr(data, "token_batches", lambda tok, source, *a, **k: seen.append(source) or real(tok, source, *a, **k))
    ck = _kd(chat_model, "rtn", tmp_path / "kd", "news+traces+straces", nsamples=4)
    man = json.loads((ck / "manifest.json").read_text())
    cal = man["calibration"]
    tr, st = cal["files"].split("+")[1:]
    assert cal["source"] == "news+traces+straces" and st == cal["student_traces"]["file"] and tr != st
    assert seen == [f"news+{tr}"]  # the init calibrated without the student's answers
    assert man["init"]["method"] == "rtn" and small == {"teacher": 1, "student": 1}
    assert _rows(st) != _rows(tr)


def test_straces_bad_input_fails_before_a_model_loads(chat_model, init_ckpt, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(pipeline, "load_hf", no_load)
    monkeypatch.setattr(pipeline, "load_streamed", no_load)
    for args, pattern in (
            (["--method", "gptq", "--calib", "news+straces"],
             "straces: the student's own answers exist only in distillation (--method kd); use traces for other methods"),
            (["--method", "rtn", "--calib", "straces"], "exist only in distillation (--method kd)"),
            (["--method", "gptq", "--calib", "news+straces", "--stream"], "exist only in distillation"),
            (["--method", "kd", "--init", str(init_ckpt), "--calib", "self+straces"], "does not mix with straces"),
            (["--method", "kd", "--init", "rtn", "--calib", "straces"], "--calib straces alone"),
            (["--method", "kd", "--init", str(init_ckpt), "--calib", "code+straces"],
             "differs from the init's calibration (news)"),
            (["--method", "kd", "--init", str(init_ckpt), "--calib", "news+straces", "--stream"], "--stream")):
        r = CliRunner().invoke(app, ["quantize", str(chat_model), "-o", str(tmp_path / "out"), "-g", "64",
                                     "--device", "cpu", *args])
        assert r.exit_code == 1, (args, r.output)
        lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and pattern in lines[0], (args, r.output)
        assert "Traceback" not in r.output and not (tmp_path / "out").exists()
    # the init-source check accepts the init's source plus straces (and straces alone), and is kept otherwise
    o = dict(steps=1, batch=1, lr_w=0.0, lr_q=1e-3, eval_every=1, heldout=1)
    for ok in ("news", "news+straces", "straces"):
        pipeline.check_kd_options(chat_model, str(init_ckpt), 3, 64, ok, **o)
    with pytest.raises(ValueError, match="pass --calib news\\+straces"):
        pipeline.check_kd_options(chat_model, str(init_ckpt), 3, 64, "news+traces+straces", **o)


def test_straces_as_a_data_source():
    assert data.parts("news+code+traces+straces") == ["news", "code", "traces", "straces"]
    with pytest.raises(ValueError, match="generated by the kd init student"):
        data.texts("straces", "calib")
    with pytest.raises(ValueError, match="generated by the kd init student"):
        data.texts("news+straces", "calib")
    assert "quantized init student" in data.describe_split("news+straces", "calib")


def test_straces_from_a_stock_target_init(chat_model, small, tmp_path):
    """An init in a stock llama.cpp type (--target: its blocks are what is exported) answers through its
    blocks' dequantization, exactly as checkpoint.load_model (gguf-py's, bit-exact with ggml) gives it."""
    init = quantize_model(chat_model, tmp_path / "q4", method="rtn", target="q4_0", calib="news", nsamples=8,
                          seqlen=64, device="cpu")
    ck = quantize_model(chat_model, tmp_path / "kd", method="kd", init=str(init), calib="news+straces", seqlen=64,
                        device="cpu", steps=2, batch=2, eval_every=1, heldout=2)
    got = _rows(json.loads((ck / "manifest.json").read_text())["calibration"]["student_traces"]["file"])
    student, tok, _, _ = checkpoint.load_model(init)
    assert got == _greedy(student, tok) and small["student"] == 1
