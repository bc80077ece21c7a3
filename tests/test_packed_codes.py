"""Codes packed to `bits` bits: in memory (QuantizedWeight, quantize_layers) and in the checkpoint (v2),
bit-exact both ways; version 1 checkpoints (one uint8 a code) still load."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from quant2gguf import checkpoint
from quant2gguf.arch import get_arch
from quant2gguf.calib import QuantConfig, _qw_from_record, _qw_record, quantize_layers
from quant2gguf.quantizer import PackedCodes, pack_codes, packed_row_bytes, quantize, unpack_codes


def _bitstream(codes: np.ndarray, bits: int, row_bytes: int) -> np.ndarray:
    """The layout spelled out: each row's codes' bits, lowest first, one stream, zero-padded, packed LSB first."""
    n = codes.shape[0]
    stream = ((codes[..., None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(n, -1)
    pad = np.zeros((n, row_bytes * 8), np.uint8)
    pad[:, :stream.shape[1]] = stream
    return np.packbits(pad, axis=1, bitorder="little")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 3, 8, 13, 64, 127, 200])
def test_pack_unpack_round_trip(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (7, k), dtype=torch.uint8, generator=g)
    codes[0] = 2**bits - 1  # every bit set in one row, zero in another
    codes[1] = 0
    p = pack_codes(codes, bits)
    assert p.dtype == torch.uint8 and tuple(p.shape) == (7, packed_row_bytes(k, bits)) == (7, (k + 7) // 8 * bits)
    assert np.array_equal(p.numpy(), _bitstream(codes.numpy(), bits, p.shape[1]))
    assert torch.equal(unpack_codes(p, bits, k), codes)


def test_pack_chunks_rows(monkeypatch):
    """Rows are packed a few at a time (PACK_CHUNK codes a step): the result does not depend on it."""
    from quant2gguf import quantizer
    codes = torch.randint(0, 8, (37, 24), dtype=torch.uint8)
    whole = pack_codes(codes, 3)
    monkeypatch.setattr(quantizer, "PACK_CHUNK", 50)  # 2 rows a step, the last step short
    assert torch.equal(pack_codes(codes, 3), whole)
    assert torch.equal(unpack_codes(whole, 3, 24), codes)


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match="exceed 3 bits"):
        pack_codes(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(2, 8, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="do not hold 16 codes of 3 bits"):
        unpack_codes(torch.zeros(2, 5, dtype=torch.uint8), 3, 16)
    assert tuple(pack_codes(torch.zeros(0, 16, dtype=torch.uint8), 3).shape) == (0, 6)


def _protected(n=12, k=192, g=64, slots=2, bits=3):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    protect = torch.zeros(n, k, dtype=torch.bool)
    protect[:, 5::g] = True
    return quantize(w, bits, g, protect=protect, slots=slots)


def test_quantized_weight_reads_packed_codes_unpacked():
    q = _protected()
    p = q.packed()
    assert p.is_packed and not q.is_packed and p.packed() is p
    assert isinstance(p.stored_codes, PackedCodes) and p.stored_codes.data.numel() == q.codes.numel() * 3 // 8
    assert torch.equal(p.codes, q.codes) and p.codes.dtype == torch.uint8 and p.shape == q.shape == (12, 192)
    assert torch.equal(p.dequantize(), q.dequantize())
    assert p.to("cpu").is_packed and torch.equal(p.to("cpu").codes, q.codes)
    rec = _qw_from_record(_qw_record(q))  # a finished layer's state file: packed too
    assert rec.is_packed and torch.equal(rec.codes, q.codes) and torch.equal(rec.pval, q.pval)
    old = {"bits": 3, "group_size": 64, "codes": q.codes, "scales": q.scales, "offsets": q.offsets}
    assert torch.equal(_qw_from_record(old).codes, q.codes)  # a state file written before packing


# ------------------------------------------------------------------------ checkpoint v2 / v1 ----

def _rtn_protected(ctx):
    """RTN with one protected weight a group (pidx/pval in use)."""
    out = {}
    for name in ctx.arch.linears:
        w = ctx.linear(name).weight.data
        protect = torch.zeros_like(w, dtype=torch.bool)
        protect[:, 3::64] = True
        out[name] = quantize(w, 3, 64, protect=protect, slots=2)
    return out


def _checkpoint(folder, root, slots=2):
    """An RTN checkpoint of a tiny model (quantize_layers: results held packed), protected slots on."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = QuantConfig(3, 64, slots=slots)
    q, stats = quantize_layers(model, get_arch(model.config.model_type), torch.randint(0, 512, (2, 32)),
                               _rtn_protected, cfg)
    man = {"method": "rtn", "bits": 3, "group_size": 64, "slots": slots, "layers": stats}
    return checkpoint.save(root / "ck", model, AutoTokenizer.from_pretrained(folder), q, man), q


def write_v1(ckpt, dst):
    """`ckpt` rewritten as checkpoint version 1 writes it: unpacked uint8 (N, K) codes, no header metadata."""
    shutil.copytree(ckpt, dst)
    man = json.loads((dst / "manifest.json").read_text())
    _, quantized = checkpoint.load_quantized(ckpt)
    qt = {}
    for name, q in quantized.items():
        qt[f"{name}.codes"] = q.codes.contiguous()
        qt[f"{name}.scales"], qt[f"{name}.offsets"] = q.scales, q.offsets
        if q.pidx is not None:
            qt[f"{name}.pidx"], qt[f"{name}.pval"] = q.pidx, q.pval
    save_file(qt, dst / "quant.safetensors")
    (dst / "manifest.json").write_text(json.dumps({**man, "version": 1}, indent=1))
    return dst


@pytest.fixture(scope="module")
def v2(tiny_llama_dir, tmp_path_factory):
    return _checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("v2"))


def test_quantize_layers_holds_codes_packed(v2):
    _, q = v2
    assert q and all(w.is_packed and w.stored_codes.bits == 3 for w in q.values())


def test_checkpoint_round_trip_bit_exact(v2):
    ckpt, q = v2
    man, got = checkpoint.load_quantized(ckpt)
    assert man["version"] == checkpoint.VERSION == 2 and set(got) == set(q)
    assert any(w.pidx is not None and (w.pidx != 255).any() for w in q.values())  # protected slots in use
    for name, w in q.items():
        g = got[name]
        assert g.is_packed and g.bits == w.bits and g.group_size == w.group_size
        assert torch.equal(g.stored_codes.data, w.stored_codes.data) and torch.equal(g.codes, w.codes), name
        for f in ("scales", "offsets", "pidx", "pval"):
            assert getattr(g, f).dtype == getattr(w, f).dtype and torch.equal(getattr(g, f), getattr(w, f)), (name, f)
    with safe_open(ckpt / "quant.safetensors", "pt") as f:
        name = next(iter(q))
        assert json.loads(f.metadata()[f"{name}.codes"]) == {"bits": 3, "shape": list(q[name].shape)}


def test_v1_checkpoint_loads_and_v2_is_three_eighths_of_it(v2, tmp_path):
    ckpt, q = v2
    old = write_v1(ckpt, tmp_path / "v1")
    man, got = checkpoint.load_quantized(old)
    assert man["version"] == 1
    for name, w in q.items():
        assert torch.equal(got[name].codes, w.codes) and torch.equal(got[name].pval, w.pval), name
    a, b = load_file(old / "quant.safetensors"), load_file(ckpt / "quant.safetensors")
    codes_v1 = sum(t.numel() for k, t in a.items() if k.endswith(".codes"))
    codes_v2 = sum(t.numel() for k, t in b.items() if k.endswith(".codes"))
    assert codes_v2 * 8 == codes_v1 * 3  # K a multiple of 8: exactly 3 bits a code
    size_v1, size_v2 = (p.stat().st_size for p in (old / "quant.safetensors", ckpt / "quant.safetensors"))
    assert size_v2 < 0.5 * size_v1  # scales, offsets and slots are unchanged beside the codes
    m1, _, _, _ = checkpoint.load_model(old)
    m2, _, _, _ = checkpoint.load_model(ckpt)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)


def test_lazy_reader_reads_one_weight_at_a_time(v2):
    ckpt, q = v2
    _, lazy = checkpoint.load_quantized(ckpt, lazy=True)
    assert isinstance(lazy, checkpoint.QuantizedTensors) and list(lazy) == sorted(q) and len(lazy) == len(q)
    name = next(iter(q))
    h = lazy.header(name)
    assert h.shape == q[name].shape and h.scales.is_meta and h.slots == q[name].slots
    assert lazy[name] is not lazy[name] and torch.equal(lazy[name].codes, q[name].codes)  # read per lookup


def test_corrupt_packed_codes_refused(v2, tmp_path):
    ckpt, q = v2
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    with safe_open(bad / "quant.safetensors", "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(iter(q))
    t[f"{name}.codes"] = t[f"{name}.codes"][:, :-1].contiguous()
    save_file(t, bad / "quant.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=f"{name}.codes .* packed 3-bit codes; the checkpoint is corrupt"):
        checkpoint.load_quantized(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pack_on_cuda_matches_cpu():
    """quantize_layers packs where the layer was computed: the GPU gives the CPU's bytes."""
    codes = torch.randint(0, 8, (33, 200), dtype=torch.uint8)
    p = pack_codes(codes.cuda(), 3)
    assert p.is_cuda and torch.equal(p.cpu(), pack_codes(codes, 3))
    assert torch.equal(unpack_codes(p, 3, 200).cpu(), codes)


# ------------------------------------------------------------- stock types (--target): lean ----

def _resident(q) -> int:
    """Bytes of the tensors a weight actually holds (its instance fields, packed codes' data)."""
    held = [v.data if isinstance(v, PackedCodes) else v for v in vars(q).values()]
    return sum(t.nbytes for t in held if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("qtype", ["Q3_K", "Q4_K"])
def test_stock_weight_packed_holds_only_its_blocks(qtype):
    """StockWeight.packed(): the blocks alone; codes, scales, offsets unpack from them bit for bit."""
    from quant2gguf import export, stock_quant
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 768, generator=g) * 0.02
    full = stock_quant.quantize_rtn(w, qtype, torch.rand(768, generator=g))
    lean = full.packed()
    assert isinstance(lean, stock_quant.StockWeight) and lean.is_lean and lean.is_packed and not full.is_lean
    assert lean.packed() is lean and lean.blocks is full.blocks
    assert (lean.qtype, lean.bits, lean.group_size, lean.shape, lean.slots) == \
        (full.qtype, full.bits, full.group_size, full.shape, 0)
    for f in ("codes", "scales", "offsets"):
        a, b = getattr(lean, f), getattr(full, f)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f
        if f != "codes":  # bit for bit (-0 is not +0)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f
    assert torch.equal(lean.dequantize().view(torch.int32), full.dequantize().view(torch.int32))
    moved = lean.to("cpu")
    assert moved.is_lean and torch.equal(moved.blocks, full.blocks) and torch.equal(moved.codes, full.codes)
    rows = torch.tensor([5, 0, 47])
    sub = export._take_rows(lean, rows)  # convert's sample rows: blocks rows, nothing unpacked
    assert sub.is_lean and torch.equal(sub.codes, full.codes[rows]) and torch.equal(sub.scales, full.scales[rows])
    assert torch.equal(sub.dequantize(), full.dequantize()[rows])
    # what it holds: the blocks and nothing else (a few bytes of Python besides)
    assert _resident(lean) == lean.blocks.nbytes == full.blocks.nbytes
    assert lean.blocks.untyped_storage().nbytes() <= lean.blocks.nbytes + 64
    assert _resident(full) > 3 * _resident(lean)  # codes a byte each + two fp32 grids beside the blocks


def _same_file_tensors(a, b) -> None:
    ta, tb = load_file(a), load_file(b)
    assert set(ta) == set(tb) and ta
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k


def test_stock_target_checkpoint_and_gguf_unchanged_by_lean_packing(tmp_path, monkeypatch):
    """quantize_model(--target q3_k) holding its weights lean writes the checkpoint (and GGUF) it wrote
    holding them whole (StockWeight.packed() returning itself), tensor for tensor, byte for byte."""
    from conftest import make_tiny_model

    from quant2gguf import export, stock_quant
    from quant2gguf.pipeline import quantize_model
    hf = make_tiny_model("llama", tmp_path / "hf", hidden=256)
    kw = dict(method="gptq", target="q3_k", nsamples=4, seqlen=64, device="cpu")
    held = []
    real = stock_quant.StockWeight.packed

    def spy(self):
        out = real(self)
        held.append(out)
        return out
    with monkeypatch.context() as m:
        m.setattr(stock_quant.StockWeight, "packed", spy)
        lean = quantize_model(hf, tmp_path / "lean" / "ck", **kw)
    assert held and all(q.is_lean for q in held)
    with monkeypatch.context() as m:
        m.setattr(stock_quant.StockWeight, "packed", lambda self: self)  # the old behaviour: all resident
        full = quantize_model(hf, tmp_path / "full" / "ck", **kw)
    for f in ("quant.safetensors", "model.safetensors"):
        _same_file_tensors(lean / f, full / f)
    ml, mf = (json.loads((p / "manifest.json").read_text()) for p in (lean, full))
    assert ml["types"] == mf["types"] and set(ml["types"].values()) == {"Q3_K"}
    _, got = checkpoint.load_quantized(lean)  # loads lean too (what KD / LAQuant read of an init)
    assert all(isinstance(q, stock_quant.StockWeight) and q.is_lean for q in got.values())
    ggufs = [export.convert(ck, ck.parent / "m.gguf", tokenizer_pre="gpt-2") and ck.parent / "m.gguf"
             for ck in (lean, full)]
    assert ggufs[0].read_bytes() == ggufs[1].read_bytes()
