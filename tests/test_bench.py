"""`quant2gguf bench` (quant2gguf/bench.py, server.py): answer extraction on real model outputs,
held-out problem sets, a tiny-model bench end to end through the patched llama.cpp (CPU build,
cached) with llama-server driven over HTTP, resuming from the cache, partial reports, bad input."""
from __future__ import annotations

import json
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quant2gguf import bench as B
from quant2gguf import data as D
from quant2gguf import export, llama, runner, server
from quant2gguf.cli import app

DATA = Path(__file__).parent / "data"
OUTPUTS = [json.loads(line) for line in (DATA / "gsm_model_outputs.jsonl").read_text().splitlines() if line.strip()]
# a CPU-sized bench of a tiny model: every phase runs, each in seconds
SMALL = dict(vs=["Q4_0"], gsm=3, long=1, threads=2, parallel=2, ctx=128, chunks=2, gsm_max_tokens=16,
             long_max_tokens=24, nsamples=2, seqlen=64, reps=1, n_prompt=64, n_gen=16, tokenizer_pre="gpt-2",
             # the tiny model was trained for 256 positions; the server caps a slot there, and a GSM
             # prompt in its byte-level tokens is ~500
             server_args=["--override-kv", "llama.context_length=int:2048"], progress=False)


# ------------------------------------------------------------------------ no llama.cpp --------

@pytest.mark.parametrize("rec", OUTPUTS, ids=[f"{i}-{r['case']}" for i, r in enumerate(OUTPUTS)])
def test_parse_answer_on_model_outputs(rec):
    got = D.parse_answer(rec["text"])
    assert got == (pytest.approx(rec["want"]) if rec["want"] is not None else None), rec["text"][-200:]


def test_model_outputs_cover_every_case():
    assert {"chat-template", "####", "boxed", "units", "no answer"} <= {r["case"] for r in OUTPUTS}
    assert sum(r["source"].startswith("SmolLM2") for r in OUTPUTS) >= 5  # real outputs, not only hand-written


def test_wilson_interval():
    assert B.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = B.wilson(0, 20)
    assert lo == 0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert B.wilson(20, 20)[1] == pytest.approx(1) and B.wilson(20, 20)[0] == pytest.approx(0.8389, abs=1e-4)


def test_paired_comparison_with_f16():
    """The fifth qwen15 run's GSM split: 45 lost, 16 gained against F16 on 179 shared problems."""
    keys = [f"k{i}" for i in range(179)]
    ref = [{"key": k, "correct": i < 76} for i, k in enumerate(keys)]
    ours = [{"key": k, "correct": 45 <= i < 92} for i, k in enumerate(keys)]  # 0-44 lost, 76-91 gained
    vs = B.paired(ref, ours + [{"key": "not-in-ref", "correct": True}])
    assert (vs["n"], vs["lost"], vs["gained"]) == (179, 45, 16)
    assert vs["p"] == pytest.approx(2.6428e-4, rel=1e-3)  # exact binomial, 16 or fewer of 61 discordant
    same = B.paired(ref, ref)
    assert (same["lost"], same["gained"], same["p"]) == (0, 0, 1.0)
    balanced = B.paired(ref, [{"key": k, "correct": 10 <= i < 86} for i, k in enumerate(keys)])
    assert balanced["lost"] == balanced["gained"] == 10 and balanced["p"] == pytest.approx(1.0)


def test_problem_sets_held_out_and_seeded():
    s = B.gsm_set(53, seed=1)
    assert len(s) == 53 and len({p["key"] for p in s}) == 53
    assert [p["template"] for p in s[:50]] == list(range(50, 100)) and all(p["variant"] == 0 for p in s[:50])
    assert all(p["template"] in D.GSM_EVAL_TEMPLATES and p["variant"] > 0 for p in s[50:])
    assert [p["key"] for p in B.gsm_set(53, seed=1)] == [p["key"] for p in s]
    assert [p["key"] for p in B.gsm_set(53, seed=2)][50:] != [p["key"] for p in s][50:]
    calib = {p["question"] for p in D.gsm_problems("calib")}
    assert not calib & {p["question"] for p in s}
    champ = B.long_set(4)
    assert len(champ) == 4 and all(isinstance(p["answer"], float) for p in champ)
    with pytest.raises(ValueError, match="numeric answer"):
        B.long_set(1000)


def test_fallback_summary_names_tensors_and_types():
    fb = [{"tensor": f"blk.{i}.ffn_down.weight", "ncols": 896, "block": 256, "wanted": "q3_K", "got": "q4_0"}
          for i in range(3)]
    s = B._fallback_summary(fb)
    assert "blk.*.ffn_down.weight" in s and "896" in s and "q3_K->q4_0 x3" in s


def test_perplexity_parser_reads_kld_percentile():
    log = ("Mean    KLD:   0.123456 ±   0.001000\nMaximum KLD:   3.500000\n99.9%   KLD:   2.000000\n"
           "99.0%   KLD:   0.987654\nSame top p: 91.234 ± 0.100 %\nMean PPL(Q)                   :  12.5 ±   0.3\n")
    r = runner.parse_perplexity(log)
    assert r["kld"] == 0.123456 and r["kld_p99"] == 0.987654 and r["kld_max"] == 3.5
    assert r["same_top_p_pct"] == 91.234 and r["ppl"] == 12.5


def test_old_cached_build_gets_llama_server_on_demand(tmp_path):
    """The build cache key is pin + patch hash; a build made before llama-server was a target must
    be seen as missing it (then llama.build() / llama.tool() build it into the same dir)."""
    bdir = tmp_path / "build"
    (bdir / "bin").mkdir(parents=True)
    assert llama._missing_targets(bdir) == llama.TARGETS  # no marker: not built
    for t in llama.TARGETS:
        if t != "llama-server":
            (bdir / "bin" / t).touch()
    (bdir / llama.MARKER).write_text(json.dumps({"pin": llama.pin(), "cuda": False}))  # an old marker
    assert llama._missing_targets(bdir) == ["llama-server"]
    (bdir / llama.MARKER).write_text(json.dumps({"targets": [t for t in llama.TARGETS if t != "llama-server"]}))
    assert llama._missing_targets(bdir) == ["llama-server"]
    (bdir / llama.MARKER).write_text(json.dumps({"targets": llama.TARGETS}))
    assert llama._missing_targets(bdir) == []
    assert "llama-server" in llama.TARGETS


def test_the_fixture_gguf_is_labelled_as_the_references_source(tmp_path, monkeypatch):
    """qwen15's FP reference is its Q4_K_M fixture dequantized: that file in a bench is named as such (its
    KLD vs F16 is F16's own rounding), a file that only shares its name is not."""
    from quant2gguf import fixtures
    monkeypatch.setitem(fixtures.SPLIT_MODELS, "fake", fixtures.SplitGGUF("M.Q4_K_M.gguf", [], "", 10, ""))
    (tmp_path / "a").mkdir()
    fix, other, ours = tmp_path / "M.Q4_K_M.gguf", tmp_path / "a" / "M.Q4_K_M.gguf", tmp_path / "ours.gguf"
    fix.write_bytes(b"x" * 10), other.write_bytes(b"x" * 11), ours.write_bytes(b"x")
    labels = B._labels([fix, other, ours], "fake")
    assert labels[0] == f"{tmp_path.name}/M.Q4_K_M (fixture: the FP reference's source grid)"
    assert labels[1:] == ["a/M.Q4_K_M", "ours"] and B._labels([fix], "qwen05") == ["M.Q4_K_M"]


def test_server_log_device_buffers():
    """VRAM with --cuda comes from llama-server's own allocation lines (no GPU here: its log format)."""
    log = ("load_tensors:        CUDA0 model buffer size =   850.50 MiB\n"
           "load_tensors:   CPU_Mapped model buffer size =   136.12 MiB\n"
           "llama_kv_cache:      CUDA0 KV buffer size =   224.00 MiB\n"
           "sched_reserve:      CUDA0 compute buffer size =   300.75 MiB\n")
    assert server.device_buffers(log) == {"CUDA0": 1375.2, "CPU_Mapped": 136.1}
    row = {"gsm": {"server_memory": {"buffers_mib": server.device_buffers(log)}}}
    assert B._vram(row) == pytest.approx(1375.2)


# ------------------------------------------------------------------- tiny model end to end --------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama W3G64 GGUF of ours and its HF folder."""
    from test_export import PRE, make_checkpoint
    llama.build()
    root = tmp_path_factory.mktemp("bench")
    ckpt = make_checkpoint("llama", root, 64)
    gguf = root / "ours-w3g64.gguf"
    export.convert(ckpt, gguf, tokenizer_pre=PRE)
    return {"root": root, "hf": root / "hf", "gguf": gguf}


@pytest.fixture(scope="module")
def benched(tiny):
    out = tiny["root"] / "report"
    rep = B.bench([tiny["gguf"]], str(tiny["hf"]), out=out, **SMALL)
    return rep, out


slow = pytest.mark.slow


@slow
def test_report_written_and_complete(benched):
    rep, out = benched
    assert rep["complete"] and rep["failed"] == []
    assert [f["label"] for f in rep["files"]] == ["F16", "Q4_0+imat", "ours-w3g64"]
    md = (out / "report.md").read_text()
    assert "Status: complete" in md and "| F16 |" in md and "| ours-w3g64 |" in md and "| Q4_0+imat |" in md
    assert rep["llama_cpp"]["version"] in md and rep["machine"]["cpu"] in md
    assert json.loads((out / "report.json").read_text())["complete"] is True
    import matplotlib.image as mpimg
    for name in ("size_kld.png", "accuracy.png", "speed.png"):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0


@slow
def test_every_phase_measured(benched):
    rep, out = benched
    f16, stock, ours = rep["files"]
    assert f16["quality"]["ppl"] > 1 and "kld" not in f16["quality"]
    for f in (stock, ours):
        q = f["quality"]
        assert q["kld"] > 0 and q["kld_p99"] >= q["kld"] and 0 < q["same_top_p_pct"] <= 100 and q["ppl"] > 1
    for f in rep["files"]:
        assert f["speed"]["tests"]["tg16"]["tok_s"] > 0 and f["speed"]["tests"]["pp64"]["tok_s"] > 0
        assert f["speed"]["peak_rss_mib"] > 1 and f["bpw"] > 0
        assert f["gsm"]["n"] == 3 and f["long"]["n"] == 1 and f["gsm"]["server_memory"]["peak_rss_mib"] > 1
    for f in (stock, ours):  # graded against F16 problem by problem
        vs = f["gsm"]["vs_f16"]
        assert vs["n"] == 3 and vs["lost"] + vs["gained"] <= 3 and 0 < vs["p"] <= 1
    assert "vs_f16" not in f16["gsm"]
    types = {int(t.tensor_type) for t in export.read_gguf(stock["path"]).tensors}
    assert 2 in types  # GGML_TYPE_Q4_0: the stock file really is Q4_0
    assert f16["mib"] > stock["mib"] and ours["mib"] < f16["mib"]


@slow
def test_same_problems_for_every_file(benched):
    rep, out = benched
    for kind in ("gsm", "long"):
        want = [p["key"] for p in rep["problems"][kind]]
        assert len(want) == {"gsm": 3, "long": 1}[kind]
        for f in rep["files"]:
            assert [r["key"] for r in f[kind]["rows"]] == want
            assert [r["gold"] for r in f[kind]["rows"]] == [p["answer"] for p in rep["problems"][kind]]


@slow
def test_rerun_resumes_from_cache(benched, tiny, monkeypatch):
    """Nothing is recomputed, and answers journalled one by one survive a lost phase result."""
    rep, out = benched
    for f in (out / "cache").glob("ours-w3g64.gsm.*.json"):
        f.unlink()  # as if interrupted after the last answer: the journal still holds them

    def boom(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(server, "serve", boom)
    monkeypatch.setattr(runner, "bench", boom)
    monkeypatch.setattr(runner, "perplexity", boom)
    again = B.bench([tiny["gguf"]], str(tiny["hf"]), out=out, **SMALL)
    for a, b in zip(rep["files"], again["files"]):
        assert a["quality"] == b["quality"] and a["speed"] == b["speed"]
        assert [r["pred"] for r in a["gsm"]["rows"]] == [r["pred"] for r in b["gsm"]["rows"]]
    alone = B.bench([], str(tiny["hf"]), out=out, **SMALL)  # no files: F16 and the stock types, from the cache
    assert [f["kind"] for f in alone["files"]] == ["f16", "stock"] and alone["complete"]
    assert alone["files"][1]["gsm"] == again["files"][1]["gsm"]


@slow
def test_no_files_with_unanswered_problems(benched, tiny, tmp_path):
    """bench with no files still checks the server (on F16) before answering: the sixth GPU run's
    phase 1 died here on an empty file list (IndexError) and lost 17 device minutes."""
    _, out = benched
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    gone = [f for f in (copy / "cache").glob("*F16.gsm.*")]
    assert gone
    for f in gone:
        f.unlink()
    rep = B.bench([], str(tiny["hf"]), out=copy, **SMALL)
    assert rep["complete"] and [f["kind"] for f in rep["files"]] == ["f16", "stock"]
    assert rep["files"][0]["gsm"]["n"] == 3 and list((copy / "cache").glob("*F16.gsm.*.json"))


@slow
def test_failed_phase_makes_the_report_partial(benched, tiny, monkeypatch, tmp_path):
    _, out = benched
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # the cache is keyed by name, size and mtime: it travels with the folder

    def fail(*a, **k):
        raise RuntimeError("llama-bench failed (exit 1): simulated")
    monkeypatch.setattr(runner, "bench", fail)
    rep = B.bench([tiny["gguf"]], str(tiny["hf"]), out=copy, **{**SMALL, "reps": 2})  # new speed key
    assert rep["complete"] is False and len(rep["failed"]) == 3 and all("/speed:" in f for f in rep["failed"])
    md = (copy / "report.md").read_text()
    assert "PARTIAL" in md and "Status: complete" not in md and "(partial)" in md
    assert json.loads((copy / "report.json").read_text())["complete"] is False
    assert all(f["gsm"]["n"] == 3 for f in rep["files"])  # the other phases still reported


@slow
def test_llama_server_over_http(tiny):
    """The real server, a real HTTP client, two requests in two slots at once; the server is gone
    after the block and its peak memory was read."""
    msgs = [{"role": "user", "content": "What is 12 + 30?"}]
    with server.serve(tiny["gguf"], parallel=2, ctx=256, threads=2, extra_args=SMALL["server_args"]) as s:
        res = [None, None]

        def ask(i):
            res[i] = s.chat(msgs, max_tokens=12)
        ts = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        proc = s.proc
    assert all(isinstance(r["text"], str) and 0 < r["tokens"] <= 12 for r in res)
    assert all(r["finish"] in ("stop", "length") for r in res)
    assert proc.poll() is not None and s.memory["peak_rss_mib"] > 1
    assert s.memory["buffers_mib"].get("CPU", 0) > 0, s.memory  # its own allocation lines were read


# ------------------------------------------------------------------------------ bad input --------

def _cli(*args):
    return CliRunner().invoke(app, ["bench", *map(str, args)])


def _one_line_failure(r, pattern):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    errs = [ln for ln in r.output.strip().splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and pattern in errs[0], r.output


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"definitely not a gguf file")
    _one_line_failure(_cli(bad, "--ref", "smollm2", "-o", tmp_path / "r"), "not a GGUF file")
    assert not (tmp_path / "r").exists()


def test_nothing_to_bench(tmp_path):
    _one_line_failure(_cli("--ref", "smollm2", "--vs", "", "-o", tmp_path / "r"), "nothing to bench")
    assert not (tmp_path / "r").exists()


def test_existing_report_needs_force(tmp_path, monkeypatch):
    """A finished report is not overwritten without --force; an OUT without one (interrupted) resumes."""
    monkeypatch.setattr(B, "bench", lambda *a, **k: pytest.fail("ran"))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.md").write_text("keep me")
    _one_line_failure(_cli(tmp_path / "x.gguf", "--ref", "smollm2", "-o", tmp_path / "r"), "report.md exists; pass --force")
    assert (tmp_path / "r" / "report.md").read_text() == "keep me"


def test_gguf_that_is_not_a_model(tmp_path):
    import torch

    from quant2gguf.compat import write_imatrix
    imat = write_imatrix(tmp_path / "x.imatrix.gguf", {"blk.0.attn_q.weight": torch.ones(64)}, 64, 64, "t")
    _one_line_failure(_cli(imat, "--ref", "smollm2", "-o", tmp_path / "r"), "not a model")


@slow
def test_missing_reference(tiny, tmp_path):
    _one_line_failure(_cli(tiny["gguf"], "--ref", tmp_path / "nowhere", "-o", tmp_path / "r"), "does not exist")


@slow
def test_port_in_use(tiny, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _one_line_failure(_cli(tiny["gguf"], "--ref", tiny["hf"], "--port", port, "-o", tmp_path / "r"),
                          f"port {port} is in use")


@slow
def test_server_that_fails_to_start(benched, tiny):
    _, out = benched  # the F16 is built there already
    r = _cli(tiny["gguf"], "--ref", tiny["hf"], "-o", out, "--tokenizer-pre", "gpt-2", "--vs", "",
             "--gsm", "1", "--server-args", "--no-such-flag", "--force")  # over the finished report
    _one_line_failure(r, "llama-server failed to start")
    assert "--no-such-flag" in r.output


@slow
@pytest.mark.parametrize("qtype,pattern", [("Q3_K_S", "would fall back"), ("Q9_NOPE", "refuses this type")])
def test_stock_type_the_dims_cannot_take(benched, tiny, qtype, pattern):
    _, out = benched
    r = _cli(tiny["gguf"], "--ref", tiny["hf"], "-o", out, "--tokenizer-pre", "gpt-2", "--vs", qtype, "--gsm", "0",
             "--force")
    _one_line_failure(r, pattern)
    if qtype == "Q3_K_S":  # hidden 128: every K-quant row falls back, and the line says to what
        assert "not a multiple of 256" in r.output and re.search(r"q\d_K->q\d_\d", r.output)


@slow
def test_cli_bench_prints_the_table(benched, tiny, monkeypatch):
    """The command line over the same cache (only the speed phase is new: default pp512/tg128)."""
    _, out = benched
    monkeypatch.setenv("COLUMNS", "250")  # rich sizes the table to the terminal
    r = _cli(tiny["gguf"], "--ref", tiny["hf"], "-o", out, "--tokenizer-pre", "gpt-2", "--vs", "Q4_0",
             "--gsm", 3, "--long", 1, "--gsm-max-tokens", 16, "--long-max-tokens", 24, "--chunks", 2,
             "--ctx", 128, "--nsamples", 2, "--seqlen", 64, "-np", 2, "-t", 2,
             "--server-args", "--override-kv llama.context_length=int:2048", "--force")
    assert r.exit_code == 0, r.output
    assert "ours-w3g64" in r.output and "Q4_0+imat" in r.output and str(out / "report.md") in r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] and rep["command"].startswith("quant2gguf ") and "tg128" in rep["files"][0]["speed"]["tests"]


@slow
def test_cli_quickstart_prints_the_bench_table(benched, monkeypatch):
    """quickstart's command prints the bench table (the pipeline itself runs SmolLM2: too slow here)."""
    rep, out = benched
    monkeypatch.setenv("COLUMNS", "250")
    import quant2gguf.pipeline as P
    monkeypatch.setattr(P, "quickstart", lambda *a, **k: {"report": rep, "sample": "Paris",
                                                          "report_md": str(out / "report.md")})
    r = CliRunner().invoke(app, ["quickstart", "--workdir", str(out)])
    assert r.exit_code == 0, r.output
    assert "ours-w3g64" in r.output and "GSM pass@1" in r.output and "{" not in r.output


@slow
def test_gsm_transcripts_are_f16s_conversations(benched, tiny, tmp_path):
    """scripts/gsm_transcripts.py: F16's cached answers re-asked in the chat template, readable as an
    eval text (KLD in the deployed regime)."""
    import subprocess
    import sys
    from transformers import AutoTokenizer
    from quant2gguf import data
    rep, out = benched
    hf = tmp_path / "hf"
    shutil.copytree(tiny["hf"], hf)
    tok = AutoTokenizer.from_pretrained(hf)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(hf)
    dest = tmp_path / "chat.jsonl"
    r = subprocess.run([sys.executable, "scripts/gsm_transcripts.py", str(out), "--model", str(hf), "-o", str(dest)],
                       capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line)["text"] for line in dest.read_text().splitlines()]
    f16 = next(f for f in rep["files"] if f["kind"] == "f16")
    answers = json.loads(next((out / "cache").glob("*F16.gsm.*.json")).read_text())["rows"]
    questions = {p["key"]: p["question"] for p in B.gsm_set(3)}
    assert len(rows) == f16["gsm"]["n"] == 3
    for text, a in zip(rows, answers):
        assert text == (f"<|user|>{data.GSM_DEPLOY_PROMPT.format(q=questions[a['key']])}</s>"
                        f"<|assistant|>{a['text']}</s>")
    assert data.file_texts(dest, "all") == rows  # read back by the data layer as they were written


@slow
def test_gsm_summary_reads_what_the_report_says(benched, tmp_path):
    """scripts/gsm_summary.py (for a bench cut short: it reads the cache alone) gives each file the GSM
    counts and the McNemar split against F16 that the finished report gives."""
    import subprocess
    import sys
    rep, out = benched
    dest = tmp_path / "gsm.json"
    r = subprocess.run([sys.executable, "scripts/gsm_summary.py", str(out), "-o", str(dest), "--vs", "Q4_0"],
                       capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    rows = {x["file"]: x for x in json.loads(dest.read_text())["rows"]}
    want = {("ours " + f["label"] if f["kind"] == "file" else f["label"]): f for f in rep["files"] if f.get("gsm")}
    assert set(rows) == set(want) and len(want) >= 2
    for lab, f in want.items():
        assert (rows[lab]["correct"], rows[lab]["n"]) == (f["gsm"]["correct"], f["gsm"]["n"])
        if lab != "F16":
            assert {k: rows[lab]["vs_f16"][k] for k in ("lost", "gained", "p")} == \
                {k: f["gsm"]["vs_f16"][k] for k in ("lost", "gained", "p")}
