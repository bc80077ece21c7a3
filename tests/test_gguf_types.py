"""numpy pack/dequantize of our GGUF types == quantizer.dequantize bit for bit; gguf-py round trip."""
import numpy as np
import pytest
import torch

from quant2gguf import gguf_types as gt
from quant2gguf import quantizer as qz

FP16_SPECIAL = np.array([0.0, -0.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-24), 2.0**-14, 6.1e-5, 1.0, 0.5,
                         1e-3, 7.0, 1e4], np.float16)


def bits(a) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def assert_same(qw: qz.QuantizedWeight, t=None):
    packed = gt.pack(qw, t)
    t = gt.qtype(t) if t is not None else gt.type_for(qw)
    assert packed.shape == (qw.shape[0], t.row_bytes(qw.shape[1]))
    got = gt.dequantize(packed, t, qw.shape)
    ref = qw.dequantize()
    bad = np.nonzero(bits(got) != bits(ref))
    assert bad[0].size == 0, (f"{t.name}: {bad[0].size} values differ, first at row {bad[0][0]} col {bad[1][0]}: "
                              f"{got[bad][0]} vs {ref.numpy()[bad][0]}")


def random_protect(n, k, g, slots, gen):
    prot = torch.zeros(n, k, dtype=torch.bool)
    for r in range(n):
        for b in range(k // g):
            cnt = int(torch.randint(0, slots + 1, (1,), generator=gen))
            idx = torch.randperm(g, generator=gen)[:cnt] + b * g
            prot[r, idx] = True
    return prot


@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("slots", [0, 2])
def test_quantized_weights_match_reference(g, slots):
    gen = torch.Generator().manual_seed(g + slots)
    for case in range(12):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        k = g * int(torch.randint(1, 5, (1,), generator=gen))
        scale = [1.0, 1e-6, 3e4, 0.02][case % 4]
        w = torch.randn(n, k, generator=gen) * scale
        if case % 3 == 0:
            w[0, :g] = 0.25  # constant group: d == 0
        prot = random_protect(n, k, g, slots, gen) if slots else None
        qw = qz.quantize(w.clamp(-60000, 60000), 3, g, protect=prot, slots=slots)
        assert_same(qw)


@pytest.mark.parametrize("name", list(gt.TYPES))
def test_raw_blocks_with_extreme_values(name):
    """Arbitrary codes, fp16 max/subnormal/zero/negative scales and offsets, random slots."""
    t = gt.TYPES[name]
    rng = np.random.default_rng(t.id)
    n, k = 7, t.group_size * 5
    nb = k // t.group_size
    pick = lambda *s: rng.choice(FP16_SPECIAL, size=s) * rng.choice([1, 1, -1], size=s)  # noqa: E731
    codes = torch.from_numpy(rng.integers(0, 8, (n, k), dtype=np.uint8))
    d = torch.from_numpy(np.where(rng.random((n, nb)) < 0.5, pick(n, nb),
                                  rng.standard_normal((n, nb)) * 0.1).astype(np.float16))
    m = torch.from_numpy(np.where(rng.random((n, nb)) < 0.5, pick(n, nb),
                                  rng.standard_normal((n, nb))).astype(np.float16))
    pidx = pval = None
    if t.slots:
        pidx = rng.integers(0, t.group_size, (n, nb, t.slots)).astype(np.uint8)
        pidx[..., 1] = np.where(pidx[..., 1] == pidx[..., 0], gt.EMPTY, pidx[..., 1])  # distinct slots
        pidx[rng.random((n, nb, t.slots)) < 0.3] = gt.EMPTY
        pval = pick(n, nb, t.slots).astype(np.float16)
        pval[pidx == gt.EMPTY] = 0
        pidx, pval = torch.from_numpy(pidx), torch.from_numpy(pval)
    qw = qz.QuantizedWeight(codes, d, m, 3, t.group_size, pidx, pval)
    with np.errstate(over="ignore"):
        assert_same(qw)


def test_layout_offsets():
    """Spec: code i -> qs[i % (G/4)] bits 2*(i // (G/4)), qh[i % (G/8)] bit i // (G/8)."""
    g = 64
    codes = torch.zeros(1, g, dtype=torch.uint8)
    codes[0, 17] = 5  # low 01 -> qs[1] bits 2..3; high 1 -> qh[1] bit 2
    qw = qz.QuantizedWeight(codes, torch.tensor([[1.0]]).half(), torch.tensor([[0.0]]).half(), 3, g,
                            torch.tensor([[[17, 255]]], dtype=torch.uint8), torch.tensor([[[2.5, 0.0]]]).half())
    b = gt.pack(qw)[0]
    assert b.size == 34 and gt.TYPES["Q3_G64P"].bpw == 4.25
    assert b[0:2].view("<f2")[0] == 1.0 and b[4:6].view("<f2")[0] == 2.5
    qs, qh, pi = b[8:24], b[24:32], b[32:34]
    assert qs[1] == 0b0100 and qs.sum() == qs[1]
    assert qh[1] == 0b100 and qh.sum() == qh[1]
    assert list(pi) == [17, 255]
    assert gt.dequantize(b, "Q3_G64P")[17] == 2.5 and gt.dequantize(b, "Q3_G64P").shape == (64,)


def test_sizes():
    assert {n: (t.id, t.block_bytes, t.bpw) for n, t in gt.TYPES.items()} == {
        "Q3_G128": (96, 52, 3.25), "Q3_G64": (97, 28, 3.5), "Q3_G128P": (98, 58, 3.625), "Q3_G64P": (99, 34, 4.25)}


def test_pack_errors():
    w = torch.randn(2, 128)
    qw = qz.quantize(w, 3, 64, protect=torch.zeros_like(w, dtype=torch.bool).index_fill_(1, torch.tensor([3]), True),
                     slots=2)
    with pytest.raises(ValueError, match="protected"):
        gt.pack(qw, "Q3_G64")
    with pytest.raises(ValueError, match="group size"):
        gt.pack(qw, "Q3_G128")
    with pytest.raises(ValueError, match="3-bit"):
        gt.pack(qz.quantize(w, 4, 64))
    assert gt.pack(qz.quantize(w, 3, 64), "Q3_G64P").shape == (2, 68)  # no slots -> empty P slots


def test_gguf_writer_reader_round_trip(tmp_path):
    import gguf
    gt.register()
    gt.register()  # idempotent
    Q = gguf.GGMLQuantizationType
    assert Q(99).name == "Q3_G64P" and Q["Q3_G128"] == 96 and gguf.GGML_QUANT_SIZES[Q.Q3_G128P] == (128, 58)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 256, generator=gen)
    qws = {"a.weight": qz.quantize(w, 3, 128),
           "b.weight": qz.quantize(w, 3, 64, protect=random_protect(6, 256, 64, 2, gen), slots=2)}
    path = tmp_path / "t.gguf"
    wr = gguf.GGUFWriter(str(path), "llama")
    for name, qw in qws.items():
        t = gt.type_for(qw)
        wr.add_tensor(name, gt.pack(qw), raw_dtype=Q(t.id))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    rd = gguf.GGUFReader(str(path))
    assert len(rd.tensors) == 2
    for tensor in rd.tensors:
        qw = qws[tensor.name]
        t = gt.type_for(qw)
        assert tensor.tensor_type == t.id and list(tensor.shape) == [256, 6]
        assert np.array_equal(np.asarray(tensor.data), gt.pack(qw))
        y = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        assert np.array_equal(bits(y), bits(qw.dequantize()))
