"""`quant2gguf convert` without a llama.cpp build: GGUF contents, bit-exactness, bad input.

The reference for every quantized tensor is llama.cpp's own converter run on the checkpoint's
dequantized weights at F32: our blocks must dequantize to exactly those values, which checks
packing and the converter's row transforms (llama's q/k rope permutation) together.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file, save_file

from quant2gguf import checkpoint, export, runner
from quant2gguf.quantizer import quantize

PRE = "gpt-2"  # the tiny byte-level BPE tokenizer uses GPT-2's pre-tokenizer; the converter can't hash it
CASES = {  # arch, group size, protected slots -> expected ggml type name
    "llama-g64": ("llama", 64, 0, "Q3_G64"),
    "qwen2-g128p": ("qwen2", 128, 2, "Q3_G128P"),
    "qwen3-g64p1": ("qwen3", 64, 1, "Q3_G64P"),  # one slot is padded to the type's two
}


def make_checkpoint(arch: str, root, group_size: int, slots: int = 0, bits: int = 3, **model_kw):
    """A tiny random model with every decoder linear RTN-quantized (protected: 1 weight a group);
    model_kw (hidden, tie, ...) go to make_tiny_model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = make_tiny_model(arch, root / "hf", **model_kw)
    model, tok = AutoModelForCausalLM.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)
    quantized = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            w = mod.weight.data
            protect = None
            if slots:
                protect = torch.zeros_like(w, dtype=torch.bool)
                protect[:, 3::group_size] = True
            quantized[name] = quantize(w, bits, group_size, protect=protect, slots=slots)
    man = {"method": "rtn", "bits": bits, "group_size": group_size, "slots": slots}
    return checkpoint.save(root / "ckpt", model, tok, quantized, man)


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    arch, g, slots, tname = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_checkpoint(arch, root, g, slots)
    # q/k/v apart, tensor for tensor against the reference (fused: test_fused_qkv_is_the_three_tensors_stacked)
    info = export.convert(ckpt, root / "model.gguf", tokenizer_pre=PRE, fuse_qkv=False)
    # llama.cpp's converter alone, on the dequantized weights: the reference
    model, tok, _, _ = checkpoint.load_model(ckpt)
    model.save_pretrained(root / "deq")
    tok.save_pretrained(root / "deq")
    export.convert_hf(root / "deq", root / "ref.gguf", outtype="f32", tokenizer_pre=PRE)
    return {"root": root, "ckpt": ckpt, "info": info, "type": tname, "group": g}


def _tensors(path):
    return {t.name: t for t in export.read_gguf(path).tensors}


def test_quantized_tensors_bit_exact(converted):
    from quant2gguf import gguf_types
    ours, ref = _tensors(converted["info"]["path"]), _tensors(converted["root"] / "ref.gguf")
    assert set(ours) == set(ref)
    _, quantized = checkpoint.load_quantized(converted["ckpt"])
    n_ours = 0
    for name, t in ours.items():
        want = np.asarray(ref[name].data, dtype=np.float32)
        if t.tensor_type.name.startswith("Q3_G"):
            n_ours += 1
            assert t.tensor_type.name == converted["type"], name
            got = np.asarray(gguf_types.dequantize(np.asarray(t.data), int(t.tensor_type), want.shape))
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{name} differs"
    assert n_ours == len(quantized) == converted["info"]["n_quantized"]


def test_other_tensors_follow_the_rule(converted):
    """Norms and 1-D tensors F32; embeddings, lm_head and any unquantized matrix at outtype (f16)."""
    for name, t in _tensors(converted["info"]["path"]).items():
        if t.tensor_type.name.startswith("Q3_G"):
            continue
        want = "F32" if len(t.shape) == 1 or name.endswith("_norm.weight") else "F16"
        assert t.tensor_type.name == want, name


def test_metadata_and_tokenizer(converted):
    from quant2gguf import gguf_types
    r = export.read_gguf(converted["info"]["path"])
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == PRE
    assert len(f["tokenizer.ggml.tokens"]) == 512 and len(f["tokenizer.ggml.merges"]) > 0
    assert f["quant2gguf.method"] == "rtn" and f["quant2gguf.group_size"] == converted["group"]
    assert f["general.architecture"] in ("llama", "qwen2", "qwen3")
    assert f["general.file_type"] == gguf_types.TYPES[converted["type"]].id


def test_summary(converted):
    info = converted["info"]
    bpw = {"Q3_G64": 3.5, "Q3_G128P": 3.625, "Q3_G64P": 4.25}[converted["type"]]
    assert info["bpw_quantized"] == bpw
    assert info["size"] == (converted["root"] / "model.gguf").stat().st_size
    assert info["tensors"][converted["type"]] == info["n_quantized"]


def test_no_temp_files_left(converted):
    assert not [p for p in converted["root"].iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------ bad input ----

@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return make_checkpoint("llama", root, 64)


def _copy(ckpt, dst):
    shutil.copytree(ckpt, dst)
    return dst


def _assert_refused(tmp_path, fn, match):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".gguf" or p.name.startswith(".")]


@pytest.mark.parametrize("file,key,pattern", [
    ("quant.safetensors", "model.layers.1.mlp.up_proj.scales", "missing model.layers.1.mlp.up_proj.scales"),
    ("model.safetensors", "model.layers.0.input_layernorm.weight", "missing .*input_layernorm"),
])
def test_missing_tensor(small_ckpt, tmp_path, file, key, pattern):
    bad = _copy(small_ckpt, tmp_path / "ck")
    t = load_file(bad / file)
    del t[key]
    save_file(t, bad / file)
    _assert_refused(tmp_path, lambda: export.convert(bad, tmp_path / "x.gguf", tokenizer_pre=PRE), pattern)


def test_unsupported_architecture(small_ckpt, tmp_path):
    bad = _copy(small_ckpt, tmp_path / "ck")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    _assert_refused(tmp_path, lambda: export.convert(bad, tmp_path / "x.gguf", tokenizer_pre=PRE),
                    "NoSuchModelForCausalLM is not supported")


def test_unsupported_group_size(tmp_path):
    ckpt = make_checkpoint("llama", tmp_path / "m", 32)
    _assert_refused(tmp_path, lambda: export.convert(ckpt, tmp_path / "x.gguf", tokenizer_pre=PRE),
                    "no GGUF type for W3G32")


def test_unknown_pre_tokenizer(small_ckpt, tmp_path):
    _assert_refused(tmp_path, lambda: export.convert(small_ckpt, tmp_path / "x.gguf"), "tokenizer_pre")


def test_not_a_checkpoint(tmp_path):
    _assert_refused(tmp_path, lambda: export.convert(tmp_path, tmp_path / "x.gguf"), "not a quant2gguf checkpoint")


def test_truncated_and_foreign_gguf(converted, tmp_path):
    data = (converted["root"] / "model.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        export.read_gguf(cut)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        runner.check_gguf(cut)
    foreign = tmp_path / "f.gguf"
    foreign.write_bytes(b"PK\x03\x04" + data[4:1000])
    with pytest.raises(ValueError, match="not a GGUF file"):
        runner.check_gguf(foreign)


def test_row_permutation_refuses_column_moves():
    idx = torch.arange(12).view(3, 4)
    assert torch.equal(export.row_permutation("w", idx[[2, 0, 1]], (3, 4)), torch.tensor([2, 0, 1]))
    with pytest.raises(ValueError, match="moves columns"):
        export.row_permutation("w", idx[:, [1, 0, 2, 3]], (3, 4))
    with pytest.raises(ValueError, match="reshapes"):
        export.row_permutation("w", idx.T, (3, 4))


def test_parse_perplexity():
    text = ("perplexity: calculating perplexity over 4 chunks, n_ctx=128\n"
            "Final estimate: PPL = 28.9213 +/- 0.51234\n")
    assert runner.parse_perplexity(text) == {"ppl": 28.9213, "ppl_err": 0.51234, "n_chunks": 4}
    kld = ("kl_divergence: 0.52 seconds per pass - ETA 0.25 minutes\n"
           "Mean PPL(Q)                   :  31.372901 ±   0.571234\n"
           "Mean PPL(base)                :  28.921300 ±   0.512340\n"
           "Mean    KLD:   0.094112 ±   0.001234\n"
           "RMS Δp    :  8.123 ± 0.100 %\nSame top p: 80.912 ± 0.123 %\n")
    r = runner.parse_perplexity(kld)
    assert r["ppl"] == 31.372901 and r["ppl_base"] == 28.9213 and r["kld"] == 0.094112
    assert r["same_top_p_pct"] == 80.912 and r["rms_dp_pct"] == 8.123 and r["s_per_pass"] == 0.52


# ------------------------------------------------ --embd-type: token_embd / output by llama-quantize ----

def test_embd_type_values():
    assert export._embd_ref("keep") is None and export._embd_ref("q6_k") is None
    assert export._embd_ref("auto") == export.AUTO_REF == "IQ3_S"
    assert export._embd_ref("auto:q3_k_m") == "Q3_K_M"
    with pytest.raises(ValueError, match="not one of"):
        export._embd_ref("q2_k")


def test_parse_dry_run():
    text = ("[   1/  30]                        output.weight - [  576, 49152,     1,     1], type =    f16, "
            "size =   54.000 MiB ->    28.69 MiB (q8_0)\n"
            "[   2/  30]                  blk.0.attn_k.weight - [  576,   192,     1,     1], type = q3_g64, "
            "size =    0.047 MiB\n")
    assert export.parse_dry_run(text) == {"output.weight": "Q8_0", "blk.0.attn_k.weight": "Q3_G64"}


def test_embd_type_refuses_a_width_the_type_cannot_hold(small_ckpt, tmp_path):
    """q6_k has 256-value blocks; the tiny model's rows are 128 wide: one line, no file left."""
    _assert_refused(tmp_path, lambda: export.convert(small_ckpt, tmp_path / "x.gguf", tokenizer_pre=PRE,
                                                     embd_type="q6_k"), "not a multiple of Q6_K's block of 256")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Hidden 256 (a multiple of every K-quant block), untied: the same checkpoint converted three ways."""
    from quant2gguf import llama
    llama.build()
    root = tmp_path_factory.mktemp("embd256")
    ckpt = make_checkpoint("qwen2", root, 128, hidden=256)
    files = {}
    for name, kw in {"keep": {}, "q6_k": {"embd_type": "q6_k"}, "q8_0": {"outtype": "q8_0"}}.items():
        files[name] = export.convert(ckpt, root / f"{name}.gguf", tokenizer_pre=PRE, **kw)
    return root, files


@pytest.mark.slow
def test_embd_q6k_keeps_our_tensors_byte_identical(wide):
    root, files = wide
    keep, q6 = _tensors(files["keep"]["path"]), _tensors(files["q6_k"]["path"])
    assert set(keep) == set(q6)
    for name, t in keep.items():
        if name in export.EMBD_TENSORS:
            assert t.tensor_type.name == "F16" and q6[name].tensor_type.name == "Q6_K", name
            continue
        assert q6[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(q6[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    assert files["q6_k"]["other_types"] == {"norms_1d": "F32", "output": "Q6_K", "token_embd": "Q6_K"}
    assert files["keep"]["other_types"]["token_embd"] == "F16"
    assert files["q6_k"]["size"] < files["keep"]["size"]
    assert files["q6_k"]["size_mib"] == round(files["q6_k"]["size"] / 2**20, 2)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.slow
def test_embd_q6k_runs_close_to_q8_0(wide, tmp_path):
    root, files = wide
    words = "the quick brown fox jumps over a lazy dog while twelve plus thirty makes forty two".split()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(np.random.default_rng(0).choice(words, 3000)) + ".\n")
    assert runner.run_prompt(files["q6_k"]["path"], "The quick brown", n=8)
    ppl = {k: runner.perplexity(files[k]["path"], text, ctx=128, chunks=3)["ppl"] for k in ("q6_k", "q8_0")}
    assert abs(ppl["q6_k"] / ppl["q8_0"] - 1) < 0.03, ppl


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_embd_auto_576_wide_is_q8_0(tmp_path, tie):
    """576 is not a multiple of 256: llama-quantize at IQ3_S puts the output (or the tied embedding)
    in Q8_0 and an untied embedding in IQ3_S's 32-block fallback, IQ4_NL; auto copies that."""
    from quant2gguf import llama
    llama.build()
    ckpt = make_checkpoint("llama", tmp_path, 64, hidden=576, layers=1, tie=tie)
    info = export.convert(ckpt, tmp_path / "auto.gguf", tokenizer_pre=PRE, embd_type="auto")
    types = {n: t.tensor_type.name for n, t in _tensors(info["path"]).items() if n in export.EMBD_TENSORS}
    assert types == ({"token_embd.weight": "Q8_0"} if tie else {"token_embd.weight": "IQ4_NL", "output.weight": "Q8_0"})
    assert info["tensors"]["Q3_G64"] == info["n_quantized"] == 5  # q/k/v as one attn_qkv, o, gate, up, down


def test_a_changed_tensor_fails_loudly(small_ckpt, tmp_path):
    """The check after llama-quantize: one flipped byte in one of our tensors is named in the error."""
    a = export.convert(small_ckpt, tmp_path / "a.gguf", tokenizer_pre=PRE)["path"]
    t = next(t for t in export.read_gguf(a).tensors if t.tensor_type.name == "Q3_G64")
    data = bytearray((tmp_path / "a.gguf").read_bytes())
    data[int(t.data_offset) + 5] ^= 0xFF
    (tmp_path / "b.gguf").write_bytes(bytes(data))
    before, after = export.read_gguf(a), export.read_gguf(tmp_path / "b.gguf")
    export._check_unchanged(before, before, set(), tmp_path / "a.gguf")
    with pytest.raises(ValueError, match=f"llama-quantize changed {t.name} "):
        export._check_unchanged(before, after, set(), tmp_path / "b.gguf")


@pytest.mark.parametrize("arch,g,slots", [("llama", 64, 0), ("qwen2", 128, 2)])
def test_v1_and_v2_checkpoints_convert_identically(arch, g, slots, tmp_path):
    """Codes packed in the checkpoint (v2) and read one tensor at a time change nothing in the GGUF: the
    same weights as a version 1 checkpoint (unpacked codes) give the same tensors, byte for byte, and
    the same metadata but quant2gguf.format_version."""
    from test_packed_codes import write_v1
    v2 = make_checkpoint(arch, tmp_path / "m", g, slots)
    v1 = write_v1(v2, tmp_path / "v1" / "ckpt")  # the same folder name: general.name comes from it
    r2 = export.read_gguf(export.convert(v2, tmp_path / "v2.gguf", tokenizer_pre=PRE)["path"])
    r1 = export.read_gguf(export.convert(v1, tmp_path / "v1.gguf", tokenizer_pre=PRE)["path"])
    t1, t2 = ({t.name: t for t in r.tensors} for r in (r1, r2))
    assert list(t1) == list(t2)
    for name, a in t1.items():
        b = t2[name]
        assert int(a.tensor_type) == int(b.tensor_type) and int(a.data_offset) == int(b.data_offset), name
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), name
    f1, f2 = ({k: v.contents() for k, v in r.fields.items()} for r in (r1, r2))
    assert f1.pop("quant2gguf.format_version") == 1 and f2.pop("quant2gguf.format_version") == 2
    assert f1 == f2
    n1, n2 = ((tmp_path / f).stat().st_size for f in ("v1.gguf", "v2.gguf"))
    assert n1 == n2


def _mixed_checkpoint(root, arch: str, g: int, odd_v: int | None = None):
    """make_checkpoint, with layer `odd_v`'s v_proj in another of our types (protected slots): a layer whose
    q, k, v cannot share one tensor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = make_tiny_model(arch, root / "hf")
    model, tok = AutoModelForCausalLM.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)
    quantized = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            odd = odd_v is not None and name == f"model.layers.{odd_v}.self_attn.v_proj"
            protect = torch.zeros_like(mod.weight.data, dtype=torch.bool)
            protect[:, 3::g] = odd
            quantized[name] = quantize(mod.weight.data, 3, g, protect=protect if odd else None, slots=2 if odd else 0)
    return checkpoint.save(root / "ckpt", model, tok, quantized, {"method": "rtn", "bits": 3, "group_size": g, "slots": 0})


@pytest.mark.parametrize("arch,g,odd_v", [("llama", 64, None), ("qwen2", 128, 1)])
def test_fused_qkv_is_the_three_tensors_stacked(arch, g, odd_v, tmp_path):
    """--fuse-qkv: each layer's attn_qkv holds attn_q's, attn_k's and attn_v's blocks in that order, byte for byte
    (llama's q/k rope permutation applied to each part), checked against the checkpoint like any tensor; a layer
    whose v has another type keeps three tensors; nothing else changes."""
    ckpt = _mixed_checkpoint(tmp_path, arch, g, odd_v)
    plain_info = export.convert(ckpt, tmp_path / "plain.gguf", tokenizer_pre=PRE, fuse_qkv=False)
    info = export.convert(ckpt, tmp_path / "fused.gguf", tokenizer_pre=PRE, fuse_qkv=True)
    plain, fused = _tensors(plain_info["path"]), _tensors(info["path"])
    layers = {int(export.QKV.fullmatch(n)[1]) for n in plain if export.QKV.fullmatch(n)}
    assert layers == {0, 1}
    for name, t in plain.items():
        if export.QKV.fullmatch(name) and int(export.QKV.fullmatch(name)[1]) != odd_v:
            assert name not in fused, name
            continue
        assert fused[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(fused[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    for bid in layers - {odd_v}:
        qkv = fused[f"blk.{bid}.attn_qkv.weight"]
        parts = [plain[f"blk.{bid}.attn_{x}.weight"] for x in "qkv"]
        assert qkv.tensor_type == parts[0].tensor_type
        assert int(qkv.shape[1]) == sum(int(p.shape[1]) for p in parts) and int(qkv.shape[0]) == int(parts[0].shape[0])
        want = np.concatenate([np.asarray(p.data).view(np.uint8).reshape(int(p.shape[1]), -1) for p in parts])
        assert np.array_equal(np.asarray(qkv.data).view(np.uint8).reshape(want.shape), want)
    assert info["n_quantized"] == plain_info["n_quantized"] - 2 * len(layers - {odd_v})
    assert 0 <= plain_info["size"] - info["size"] < 4096  # the same blocks; fewer tensor headers


@pytest.mark.slow
def test_fused_qkv_runs_in_llama_cpp_as_the_plain_file(small_ckpt, tmp_path):
    """The pinned llama.cpp loads attn_qkv for our types and gives the plain file's perplexity (rows are the same;
    only float summation order in the attention inputs may differ)."""
    from quant2gguf import llama
    llama.build()
    words = "the quick brown fox jumps over a lazy dog while twelve plus thirty makes forty two".split()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(np.random.default_rng(0).choice(words, 3000)) + ".\n")
    ppl = {}
    for fuse in (False, True):
        p = export.convert(small_ckpt, tmp_path / f"f{int(fuse)}.gguf", tokenizer_pre=PRE, fuse_qkv=fuse)["path"]
        ppl[fuse] = runner.perplexity(p, text, ctx=128, chunks=3)["ppl"]
    assert abs(ppl[True] / ppl[False] - 1) < 1e-4, ppl


def test_convert_fuses_qkv_of_our_types_by_default(tmp_path):
    """convert's default writes q/k/v of our types as one attn_qkv (the file needs the patched llama.cpp anyway, and
    one mat-vec is faster there); fuse_qkv=False (--no-fuse-qkv) keeps three. Stock-type q/k/v stay apart by
    default (test_stock_target's mixed file), as Ollama reads them."""
    ckpt = make_checkpoint("llama", tmp_path, 64)
    dflt = _tensors(export.convert(ckpt, tmp_path / "d.gguf", tokenizer_pre=PRE)["path"])
    plain = _tensors(export.convert(ckpt, tmp_path / "p.gguf", tokenizer_pre=PRE, fuse_qkv=False)["path"])
    assert {"blk.0.attn_qkv.weight", "blk.1.attn_qkv.weight"} <= set(dflt) and "blk.0.attn_q.weight" not in dflt
    assert "blk.0.attn_q.weight" in plain and "blk.0.attn_qkv.weight" not in plain
    assert set(dflt) - {"blk.0.attn_qkv.weight", "blk.1.attn_qkv.weight"} == \
        set(plain) - {f"blk.{i}.attn_{x}.weight" for i in (0, 1) for x in "qkv"}


def test_fuse_script_writes_what_convert_fuses(tmp_path):
    """scripts/fuse_qkv_gguf.py on the plain file gives `convert --fuse-qkv`'s tensors byte for byte (the route for
    files made elsewhere: stock llama-quantize outputs, synthetic shapes), and refuses nothing it cannot fuse."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from fuse_qkv_gguf import fuse
    ckpt = make_checkpoint("llama", tmp_path, 64)
    plain = export.convert(ckpt, tmp_path / "plain.gguf", tokenizer_pre=PRE, fuse_qkv=False)["path"]
    fused = export.convert(ckpt, tmp_path / "fused.gguf", tokenizer_pre=PRE, fuse_qkv=True)["path"]
    assert fuse(Path(plain), tmp_path / "script.gguf") == 2
    a, b = _tensors(tmp_path / "script.gguf"), _tensors(fused)
    assert set(a) == set(b) and "blk.0.attn_qkv.weight" in a
    for n, t in a.items():
        assert t.tensor_type == b[n].tensor_type and list(t.shape) == list(b[n].shape), n
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)), n
    r = {k: v.contents() for k, v in export.read_gguf(tmp_path / "script.gguf").fields.items() if not k.startswith("GGUF.")}
    assert r["tokenizer.ggml.pre"] == PRE and r["quant2gguf.group_size"] == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_scan_gguf_matches_reader(converted, tmp_path):
    """check_gguf's header scan (no array parsing) reads the same tensor table and scalars as GGUFReader,
    and refuses a file cut inside its tensor data, where the header alone is intact."""
    path = converted["root"] / "model.gguf"
    head, r = export.scan_gguf(path), export.read_gguf(path)
    assert [(t.name, t.shape, int(t.tensor_type), t.n_elements, t.n_bytes) for t in head.tensors] == \
        [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.n_elements), int(t.n_bytes)) for t in r.tensors]
    for mine, ref in zip(head.tensors, r.tensors):  # the same bytes, as [rows, bytes per row]
        assert np.array_equal(mine.data, np.asarray(ref.data).reshape(mine.data.shape[0], -1).view(np.uint8))
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        want = len(f.data) if f.types[0].name == "ARRAY" else f.contents()
        assert head.fields[f.name] == (pytest.approx(want) if isinstance(want, float) else want), f.name
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-1])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        runner.check_gguf(cut)
