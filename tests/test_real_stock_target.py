"""The real SmolLM2-135M fixture into the block-32 stock type Q4_0 (issue 10; 576 wide, so the K
types do not fit): our `quantize --target q4_0` files against llama-quantize's Q4_0 with an
importance matrix from the same calibration tokens, by llama-perplexity KLD against the F16 file.

Calibration: NS x 512 tokens of the news+code calib split, for GPTQ and the imatrix alike. Our
files are converted with --embd-type auto:Q4_0 (token_embd Q8_0, as in the stock file): type for
type llama-quantize --pure's Q4_0; the stock Q4_0+imatrix mix has 3 ffn_down at Q4_1 besides. Evaluation: the first CHUNKS x 512-token chunks of the held-out news and code eval splits.
The full measurement (10 chunks; GPTQ without --act-order, with --damp 0.1):
scripts/compare_stock_target.py, docs/results/stock-target-smollm2-cpu.json. The issue's claim
(ours beats Q4_0+imatrix on held-out KLD) holds for GPTQ --act-order on both texts (news 0.116 vs
0.182, code 0.074 vs 0.130); without --act-order it holds on code only (news 0.190 vs 0.182): the
comparison can fail. CI uses 16 calibration sequences (a third of the 32-sequence run's 14 minutes).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import compare_stock_target as cst  # noqa: E402

pytestmark = pytest.mark.slow
TEXTS = ("news", "code")
CHUNKS = 8
NS = 16  # calibration sequences for GPTQ and the imatrix alike


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from quant2gguf import llama
    llama.build()
    wd = tmp_path_factory.mktemp("stock-target")
    files = cst.build_files(wd, "smollm2", "q4_0", "news+code", NS, variants=("gptq-ao", "rtn"), plain=True)
    by = {f["file"]: f for f in files}
    pure = cst.tensor_types(by["Q4_0+imat --pure (llama-quantize)"]["path"])
    keep = ["F16", "Q4_0+imat (llama-quantize)", "ours gptq-ao --target q4_0", "Q4_0+imat --pure (llama-quantize)",
            "Q4_0 (llama-quantize, no imatrix)", "ours rtn --target q4_0"]
    out = {r["file"]: r for r in cst.measure([by[k] for k in keep], TEXTS, chunks=CHUNKS, wd=wd)}
    print(cst.table(list(out.values()), TEXTS))
    return {"f16": out[keep[0]], "imat": out[keep[1]], "gptq": out[keep[2]], "pure": out[keep[3]],
            "plain": out[keep[4]], "rtn": out[keep[5]], "pure_types": pure}


def test_tensor_types_and_size_as_stock_q4_0(rows):
    """Every tensor has the type llama-quantize gives it in a Q4_0 file (token_embd: its Q8_0), except
    that with an imatrix llama-quantize stores the first n_layer/8 ffn_down as Q4_1 (its guard for
    Q4_0), which our q4_0 target does not: ours is that much smaller, and type for type --pure."""
    for k in ("gptq",):
        r = rows[k]
        assert r["types"] == rows["pure_types"]
        assert r["types_unlike_stock_imat"] == {f"blk.{i}.ffn_down.weight": ["Q4_1", "Q4_0"] for i in range(3)}
        assert r["types"]["token_embd.weight"] == rows["imat"]["types"]["token_embd.weight"] == "Q8_0"
        # the 3 Q4_1 tensors: 1536 x 576 weights at 20 instead of 18 bytes per 32 = 165888 bytes more
        assert rows["imat"]["bytes"] - r["bytes"] == pytest.approx(3 * 1536 * 576 // 32 * 2, abs=4096)
    assert rows["imat"]["bytes"] < 0.4 * rows["f16"]["bytes"]


@pytest.mark.parametrize("text", TEXTS)
def test_gptq_beats_llama_quantize_imatrix(rows, text):
    """Issue 10: GPTQ --act-order (the same NS x 512 calibration tokens) beats llama-quantize Q4_0 with
    their importance matrix on held-out KLD, with a file 0.16 MiB smaller (measured over 10 chunks:
    news 0.116 vs 0.182, code 0.074 vs 0.130)."""
    g, s = rows["gptq"][text], rows["imat"][text]
    assert g["kld"] < 0.85 * s["kld"], (text, g, s)
    assert g["same_top_p_pct"] > s["same_top_p_pct"], (text, g, s)


@pytest.mark.parametrize("text", TEXTS)
def test_rtn_fit_weighted_like_an_importance_matrix(rows, text):
    """Our RTN into Q4_0 fits each block with every input column weighted by its calibration E[x^2]
    (llama-quantize's importance-matrix rule): as good as llama-quantize's own Q4_0 + imatrix of the
    same tensor types, and far from its Q4_0 without one, where the unweighted fit was (measured over
    10 chunks, 32 calibration sequences: news 0.179 vs 0.189 --pure + imatrix, 0.311 without; the
    unweighted fit 0.304)."""
    r, pure, plain = rows["rtn"][text], rows["pure"][text], rows["plain"][text]
    assert r["kld"] < 1.1 * pure["kld"], (text, r, pure)
    assert r["kld"] < 0.8 * plain["kld"], (text, r, plain)
