"""quant2gguf import: a llama-quantize GGUF in stock types -> a checkpoint, its blocks as stored.

A tiny llama 256 wide (every in-dim a multiple of 256: no K-type fallback) -> our F16 GGUF ->
llama-quantize Q3_K_S with an importance matrix (compat.make_imatrix) and Q4_0 --pure -> import.
Checked: every imported linear dequantizes bit for bit to libggml's dequantization of its GGUF
tensor; `convert` of the import writes every linear's bytes (and type, and file type) unchanged;
kd --init the import starts at exactly its weights (StockFQLinear's forward weight and export, and
the step-0 held-out KL the run reports); the manifest is rtn --target's; refusals (an IQ-typed
linear, a missing file, an existing -o) are one line, exit 1, before any model loads, and leave
no output. Needs the patched llama.cpp CPU build (llama-quantize, libggml-base).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from test_stock_types import c_to_float, ggml  # noqa: F401  (ggml: libggml-base fixture)
from typer.testing import CliRunner

from quant2gguf import checkpoint, export, gguf_import
from quant2gguf.cli import app
from quant2gguf.stock_quant import StockWeight
from quant2gguf.stock_types import stock_type

PRE = "gpt-2"  # the tiny byte-level BPE tokenizer's pre-tokenizer (as test_export)
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _llama_quantize():
    from quant2gguf import runner as rn
    try:
        return rn._tool("llama-quantize")
    except RuntimeError as e:
        pytest.skip(f"llama-quantize of the patched llama.cpp CPU build is missing ({e})")


def _quantize(f16, out, qtype, *extra):
    from quant2gguf import runner as rn
    rn._run([_llama_quantize(), *extra, f16, out, qtype, 2])
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(root, HF folder, F16 GGUF, {name: stock GGUF}): Q3_K_S + imatrix, Q4_0 --pure."""
    from quant2gguf.compat import make_imatrix
    _llama_quantize()
    root = tmp_path_factory.mktemp("gguf-import")
    hf = make_tiny_model("llama", root / "hf", hidden=256)
    f16 = root / "f16.gguf"
    export.convert_hf(hf, f16, tokenizer_pre=PRE)
    imat, _, _ = make_imatrix(str(hf), root / "imatrix.gguf", nsamples=4, seqlen=32)
    ggufs = {"Q3_K_S": _quantize(f16, root / "q3ks.gguf", "Q3_K_S", "--imatrix", imat),
             "Q4_0": _quantize(f16, root / "q40.gguf", "Q4_0", "--pure")}
    return root, hf, f16, ggufs


@pytest.fixture(scope="module")
def imported(files):
    """{name: checkpoint} imported through the CLI."""
    root, hf, _, ggufs = files
    out = {}
    for name, g in ggufs.items():
        ck = root / f"ck-{name}"
        r = _run("import", g, "--model", hf, "-o", ck)
        assert r.exit_code == 0, r.output
        assert json.loads(r.output[r.output.index("{"):])["target"] == name
        out[name] = ck
    return out


def _linears(path):
    """GGUF tensor name -> (type name, raw uint8 (rows, row_bytes)) of every decoder linear."""
    return {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).reshape(int(t.shape[-1]), -1))
            for t in export.read_gguf(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2}


@pytest.mark.parametrize("name, types, bits_block", [("Q3_K_S", {"Q3_K"}, (3, 256)), ("Q4_0", {"Q4_0"}, (4, 32))])
def test_manifest_is_rtn_targets(files, imported, name, types, bits_block):
    _, _, _, ggufs = files
    man = checkpoint.read_manifest(imported[name])
    assert man["method"] == "import" and man["target"] == name and (man["bits"], man["group_size"]) == bits_block
    assert man["slots"] == 0 and "fallbacks" not in man and man["arch"] == "llama"
    assert len(man["quantized"]) == 14 and set(man["types"]) == set(man["quantized"])
    assert set(man["types"].values()) == types
    assert man["import"]["file"] == ggufs[name].name and man["import"]["file_type"] == name
    assert man["calibration"]["source"] is None  # kd --init takes any --calib
    if name == "Q3_K_S":  # llama-quantize recorded the imatrix in the file; the import keeps it
        assert man["calibration"]["imatrix"] and "file" in man["calibration"]["imatrix"]


@pytest.mark.parametrize("name", ["Q3_K_S", "Q4_0"])
def test_imported_linears_are_ggmls_dequantization(ggml, files, imported, name):
    """Each imported linear, in HF row order, is libggml's to_float of the GGUF tensor's rows moved
    back by the converter's permutation (q/k: llama's rope permutation), bit for bit."""
    _, hf, _, ggufs = files
    src = _linears(ggufs[name])
    _, quantized = checkpoint.load_quantized(imported[name])
    shapes = {n: q.shape for n, q in quantized.items()}
    mapping = gguf_import.gguf_names(hf, shapes)
    moved = 0
    for hf_name, q in quantized.items():
        assert isinstance(q, StockWeight)
        gname, rows = mapping[hf_name]
        tname, data = src[gname]
        assert q.qtype == tname
        cls = stock_type(tname)
        n, k = q.shape
        want = c_to_float(ggml, cls, data.reshape(-1, cls.type_size)).reshape(n, k)
        got = q.dequantize().numpy()[rows.numpy()]
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), hf_name
        moved += not torch.equal(rows, torch.arange(n))
    assert moved == 4  # q_proj and k_proj of both layers


@pytest.mark.parametrize("name", ["Q3_K_S", "Q4_0"])
def test_convert_writes_the_source_bytes_back(files, imported, name, tmp_path):
    _, _, _, ggufs = files
    out = tmp_path / "back.gguf"
    r = _run("convert", imported[name], "-o", out, "--tokenizer-pre", PRE)
    assert r.exit_code == 0, r.output
    src, back = _linears(ggufs[name]), _linears(out)
    assert set(src) == set(back) and len(src) == 14
    for gname, (tname, data) in src.items():
        assert back[gname][0] == tname, gname
        assert np.array_equal(back[gname][1], data), gname
    ft = lambda p: export.read_gguf(p).fields["general.file_type"].contents()  # noqa: E731
    assert ft(out) == ft(ggufs[name])


def test_import_overwrites_only_with_force(files, imported, tmp_path):
    _, hf, _, ggufs = files
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "old").write_text("x")
    r = _run("import", ggufs["Q4_0"], "--model", hf, "-o", ck, "--force")
    assert r.exit_code == 0, r.output
    assert not (ck / "old").exists() and checkpoint.read_manifest(ck)["target"] == "Q4_0"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_kd_init_starts_at_the_import(files, imported, tmp_path):
    """kd --init IMPORT trains from exactly the stock file: StockFQLinear's forward weight is the
    import's dequantized weight and its untrained export the imported blocks, and the step-0
    held-out KL the run records is that of the import itself."""
    from quant2gguf.data import train_heldout_batches
    from quant2gguf.methods import kd
    from quant2gguf.pipeline import load_hf
    _, hf, _, _ = files
    ck = imported["Q3_K_S"]
    student, tok, _, quantized = checkpoint.load_model(ck)
    for n, q in quantized.items():
        fq = kd.StockFQLinear(student.get_submodule(n), q)
        with torch.no_grad():
            assert torch.equal(fq.weight_q(), q.dequantize()), n
            assert torch.equal(fq.export().blocks, q.blocks), n
    out = tmp_path / "kd"
    steps, batch, held, seqlen = 1, 1, 2, 32
    r = _run("quantize", hf, "-o", out, "--method", "kd", "--init", ck, "--steps", steps, "--batch", batch,
             "--heldout", held, "--eval-every", 1, "--seqlen", seqlen, "--device", "cpu")
    assert r.exit_code == 0, r.output
    man = checkpoint.read_manifest(out)
    assert man["target"] == "Q3_K_S" and man["init"]["method"] == "import"
    assert set(man["types"].values()) == {"Q3_K"}
    _, heldout = train_heldout_batches(tok, "news", steps * batch, held, seqlen, seed=0)
    teacher, _, _ = load_hf(hf)
    kl = kd.heldout_kl(student, teacher, heldout, torch.device("cpu"), batch, 1024)
    assert man["kd"]["kd_heldout_kl_init"] == pytest.approx(kl, rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------------------ refusals ----

@pytest.fixture
def no_loading(monkeypatch):
    import quant2gguf.pipeline as P

    def load_hf(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(P, "load_hf", load_hf)


def _one_error(r) -> str:
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_iq_typed_linear_refused_by_name(files, tmp_path, no_loading):
    root, hf, f16, _ = files
    iq = _quantize(f16, root / "iq4nl.gguf", "IQ4_NL", "--pure")
    ck = tmp_path / "ck"
    line = _one_error(_run("import", iq, "--model", hf, "-o", ck))
    assert line.startswith("error: blk.0.attn_q.weight (model.layers.0.self_attn.q_proj) is IQ4_NL; import takes Q4_0"), line
    assert "re-quantize with llama-quantize --pure/--tensor-type or pick another type" in line
    assert not ck.exists() and not list(tmp_path.iterdir())


def test_missing_file_not_gguf_and_existing_out_refused(files, tmp_path, no_loading):
    _, hf, _, ggufs = files
    ck = tmp_path / "ck"
    line = _one_error(_run("import", tmp_path / "nope.gguf", "--model", hf, "-o", ck))
    assert "nope.gguf: no such GGUF file" in line
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" * 10)
    assert "is not a GGUF file" in _one_error(_run("import", bad, "--model", hf, "-o", ck))
    assert "does not exist" in _one_error(_run("import", ggufs["Q4_0"], "--model", tmp_path / "nomodel", "-o", ck))
    assert not ck.exists()
    ck.mkdir()
    (ck / "keep").write_text("x")
    line = _one_error(_run("import", ggufs["Q4_0"], "--model", hf, "-o", ck))
    assert "exists; pass --force" in line and (ck / "keep").read_text() == "x"


def test_file_from_another_model_refused(files, tmp_path, no_loading):
    """A file made from a model of other dims: refused naming the first tensor whose shape differs."""
    _, _, _, ggufs = files
    other = make_tiny_model("llama", tmp_path / "other", hidden=512)
    line = _one_error(_run("import", ggufs["Q4_0"], "--model", other, "-o", tmp_path / "ck"))
    assert "blk.0.attn_q.weight (model.layers.0.self_attn.q_proj) is [256, 256] in the GGUF" in line, line
    assert not (tmp_path / "ck").exists()


def test_fallbacks_recorded_as_rtn_target_would(files, tmp_path):
    """A tiny llama 384 wide: llama-quantize Q3_K_S falls back to Q4_0 where the in-dim (384) is no
    multiple of 256; the import records the types and fallbacks rtn --target q3_k_s records."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quant2gguf import stock_quant
    from quant2gguf.arch import get_arch
    hf = make_tiny_model("llama", tmp_path / "hf", hidden=384)
    f16 = tmp_path / "f16.gguf"
    export.convert_hf(hf, f16, tokenizer_pre=PRE)
    g = _quantize(f16, tmp_path / "q3ks.gguf", "Q3_K_S")
    r = _run("import", g, "--model", hf, "-o", tmp_path / "ck")
    assert r.exit_code == 0, r.output
    man = checkpoint.read_manifest(tmp_path / "ck")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf))
    arch = get_arch("llama")
    assert man["target"] == "Q3_K_S"
    assert man["types"] == stock_quant.check_model(meta, arch, "Q3_K_S")
    assert man["fallbacks"] == stock_quant.fallbacks(meta, arch, "Q3_K_S") and len(man["fallbacks"]) == 12
    assert "not_recipe" not in man["import"]
