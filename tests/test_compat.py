"""Compatibility export (quant2gguf/compat.py) on the real SmolLM2 fixture through the pinned,
patched llama.cpp (built once, cached): our importance matrix must be read by llama-quantize and
must make the stock 3-bit file better on held-out text than the same type without it."""
from __future__ import annotations

import pytest

from quant2gguf import compat, export, llama, runner
from quant2gguf.data import eval_text_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    llama.build()
    wd = tmp_path_factory.mktemp("compat")
    info = compat.compat_export("smollm2", wd / "smollm2-Q3_K_S-imat.gguf", "Q3_K_S", nsamples=8, seqlen=256)
    return wd, info


def test_imatrix_file_layout(exported):
    """Every decoder linear (7 a layer, 30 layers; the lm_head is tied) has sums and a count, F32,
    under its GGUF tensor name, and the token count is what was run."""
    _, info = exported
    r = export.read_gguf(info["imatrix"])
    names = {t.name: t for t in r.tensors}
    sums = [n for n in names if n.endswith(".in_sum2")]
    assert len(sums) == 7 * 30 and "blk.0.attn_q.weight.in_sum2" in names and "blk.29.ffn_down.weight.in_sum2" in names
    assert names["blk.0.ffn_down.weight.in_sum2"].data.size == 1536  # SmolLM2 intermediate size
    assert float(names["blk.3.attn_k.weight.counts"].data.ravel()[0]) == 8 * 256
    assert all((names[n].data > 0).all() for n in sums)
    fields = {f.name for f in r.fields.values()}
    assert {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= fields


def test_imatrix_improves_stock_quant(exported):
    wd, info = exported
    plain = runner.quantize_stock(info["f16"], wd / "smollm2-Q3_K_S.gguf", "Q3_K_S")
    text = eval_text_file("news")
    with_imat = runner.perplexity(info["gguf"], text, ctx=256, chunks=6)["ppl"]
    without = runner.perplexity(plain, text, ctx=256, chunks=6)["ppl"]
    assert with_imat < without, (with_imat, without)


def test_existing_output_refused(exported):
    wd, info = exported
    with pytest.raises(FileExistsError, match="exists"):
        compat.compat_export("smollm2", info["gguf"], "Q3_K_S")
