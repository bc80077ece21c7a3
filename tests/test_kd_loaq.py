"""LoaQ's closed form and distillation QAT on tiny models (CPU), plus their bad input."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from quant2gguf import checkpoint, export
from quant2gguf.arch import get_arch
from quant2gguf.calib import QuantConfig, quantize_layers
from quant2gguf.cli import app
from quant2gguf.methods import gptq, kd, loaq
from quant2gguf.pipeline import quantize_model
from quant2gguf.quantizer import quantize

PRE = "gpt-2"  # the tiny byte-level tokenizer's pre-tokenizer (see test_export)


# ---------------------------------------------------------------- LoaQ

def test_loaq_target_is_the_least_squares_solution():
    """W~ = W + W C^T H^-1 minimises ||X_hat W~^T - X W^T|| (damp 0, float64, full-rank X_hat)."""
    g = torch.Generator().manual_seed(0)
    t, k, n = 400, 24, 10
    x = torch.randn(t, k, generator=g, dtype=torch.float64)
    xq = x + 0.1 * torch.randn(t, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    mom = loaq.Moments(k, "cpu")
    mom.h, mom.c = mom.h.double(), mom.c.double()  # float64 sums, as Moments.add does in fp32
    for a, b in zip(x.split(100), xq.split(100)):
        mom.h.addmm_(b.t(), b, alpha=2.0)
        mom.c.addmm_(b.t(), a - b, alpha=2.0)
        mom.n += a.shape[0]
    h, c = mom.value()
    got = loaq.target_weight(w, h, c, damp=0.0).double()
    want = torch.linalg.lstsq(xq, x @ w.t()).solution.t()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    # and it beats W itself on the FP-output objective
    err = lambda v: ((xq @ v.t() - x @ w.t()) ** 2).sum()  # noqa: E731
    assert err(got) < err(w)


def test_loaq_alpha_scales_the_correction():
    """--alpha: 0 leaves W as GPTQ sees it, 1 is the closed form, in between a straight line (GPTAQ's 0.25)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 16, generator=g)
    xq = x + 0.2 * torch.randn(300, 16, generator=g)
    w = torch.randn(8, 16, generator=g)
    mom = loaq.Moments(16, "cpu")
    mom.add(x, xq)
    h, c = mom.value()
    full = loaq.target_weight(w, h, c, damp=0.01)
    assert torch.equal(loaq.target_weight(w, h, c, damp=0.01, alpha=0.0), w)
    quarter = loaq.target_weight(w, h, c, damp=0.01, alpha=0.25)
    assert torch.allclose(quarter - w, 0.25 * (full - w), atol=1e-5)
    assert (full - w).norm() > 0.02 * w.norm()  # a real correction (~6 % here), so the check above is not vacuous


def test_loaq_moments_accumulate_in_fp32():
    g = torch.Generator().manual_seed(1)
    x, xq = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    mom = loaq.Moments(8, "cpu")
    mom.add(x[:32], xq[:32])
    mom.add(x[32:], xq[32:])
    h, c = mom.value()
    assert torch.allclose(h, 2 * xq.t() @ xq / 64, atol=1e-5)
    assert torch.allclose(c, 2 * xq.t() @ (x - xq) / 64, atol=1e-5)


def test_loaq_equals_gptq_when_streams_agree():
    """X_hat = X gives C = 0, so W~ is W bit for bit and LoaQ's GPTQ is GPTQ's."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 128, generator=g)
    w = torch.randn(32, 128, generator=g) * 0.05
    mom = loaq.Moments(128, "cpu")
    mom.add(x, x)
    h, c = mom.value()
    assert not c.any()
    wt = loaq.target_weight(w, h, c)
    assert torch.equal(wt, w)
    a, b = gptq.gptq_quantize(wt, h, 3, 64), gptq.gptq_quantize(w, h, 3, 64)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.offsets, b.offsets)


def test_loaq_layer_zero_qkv_matches_gptq_and_lowers_output_error(tiny_llama_dir):
    """In layer 0 the q/k/v input is the embedding in both streams (X_hat = X): identical to GPTQ.
    Over the whole model LoaQ's quantized-stream output error is lower than GPTQ's."""
    batches = torch.randint(0, 512, (8, 48), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, fn in (("gptq", gptq.quantize_layer), ("loaq", loaq.quantize_layer)):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        out[name] = quantize_layers(model, get_arch("llama"), batches, fn, QuantConfig(3, 64), batch_size=4)
    for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        a, b = out["gptq"][0][f"model.layers.0.{lin}"], out["loaq"][0][f"model.layers.0.{lin}"]
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    assert out["loaq"][1][-1]["out_rel_err"] < out["gptq"][1][-1]["out_rel_err"]
    assert out["loaq"][1][1]["loaq_max_rel_shift"] > 0


# ---------------------------------------------------------------- distillation QAT

@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from conftest import make_tiny_model
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("kd-tiny"))


@pytest.fixture(scope="module")
def gptq_ckpt(tiny_qwen, tmp_path_factory):
    return quantize_model(tiny_qwen, tmp_path_factory.mktemp("kd") / "gptq", method="gptq", group_size=64,
                          nsamples=8, seqlen=64, device="cpu")


def _kd(src, init, out, **kw):
    o = dict(method="kd", init=str(init), group_size=64, seqlen=64, device="cpu", steps=20, batch=4,
             eval_every=5, heldout=4)
    o.update(kw)
    return quantize_model(src, out, **o)


def test_fqlinear_starts_at_the_init_and_exports_what_it_computes(gptq_ckpt, tiny_qwen):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    _, quantized = checkpoint.load_quantized(gptq_ckpt)
    fp = {n: model.get_submodule(n).weight.data.clone() for n in quantized}
    mods = kd.attach(model, quantized, fp, triton=False)
    for n, m in mods.items():  # at init: exactly the checkpoint's deployed weights
        assert torch.equal(m.weight_q().detach(), quantized[n].dequantize())
    m = next(iter(mods.values()))
    with torch.no_grad():  # move latents and scales off the init: export still equals forward
        m.latent.add_(torch.randn_like(m.latent) * 0.7)  # in grid cells
        m.d.mul_(1.03)
    assert torch.equal(m.weight_q().detach(), m.export().dequantize())


def test_frozen_codes_mode_trains_only_scales_and_exports_what_it_computes(gptq_ckpt, tiny_qwen, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    _, quantized = checkpoint.load_quantized(gptq_ckpt)
    mods = kd.attach(model, quantized, {}, triton=False, train_codes=False)  # no FP weights needed
    n, m = next(iter(mods.items()))
    assert not hasattr(m, "latent") and torch.equal(m.weight_q().detach(), quantized[n].dequantize())
    with torch.no_grad():
        m.d.mul_(1.0 + 1e-3 * torch.randn_like(m.d))  # off the fp16 grid: forward rounds as export does
        m.m.add_(0.01)
    e = m.export()
    assert torch.equal(e.codes, quantized[n].codes) and torch.equal(m.weight_q().detach(), e.dequantize())
    w = m.weight_q()
    w.sum().backward()  # exact gradients: d gets sum(q), m gets the group size
    assert m.d.grad is not None and torch.allclose(
        m.m.grad, torch.full_like(m.m.grad, 64.0) * m.u, rtol=1e-6)
    ck = _kd(tiny_qwen, gptq_ckpt, tmp_path / "kd0", steps=30, lr_w=0.0, lr_q=2e-3)
    st = json.loads((ck / "manifest.json").read_text())["kd"]
    assert st["kd_heldout_kl_best"] < st["kd_heldout_kl_init"], st
    _, got = checkpoint.load_quantized(ck)
    assert all(torch.equal(got[k].codes, quantized[k].codes) for k in quantized)  # codes never moved
    assert any(not torch.equal(got[k].scales, quantized[k].scales) for k in quantized)


def test_kd_lowers_heldout_kl_and_converts_bit_exactly(gptq_ckpt, tiny_qwen, tmp_path):
    ck = _kd(tiny_qwen, gptq_ckpt, tmp_path / "kd", steps=30, lr_w=1e-3, lr_q=1e-4)  # latent weights trained too
    man = json.loads((ck / "manifest.json").read_text())
    st = man["kd"]
    assert st["kd_heldout_kl_best"] < st["kd_heldout_kl_init"] and not st["kd_kept_init"], st
    assert man["init"]["checkpoint"] == str(gptq_ckpt) and man["calibration"]["source"] == "news"
    info = export.convert(ck, tmp_path / "kd.gguf", tokenizer_pre=PRE)
    from quant2gguf import gguf_types
    _, quantized = checkpoint.load_quantized(ck)
    model, _, _, _ = checkpoint.load_model(ck)
    tensors = {t.name: t for t in export.read_gguf(info["path"]).tensors}
    name = "model.layers.1.mlp.down_proj"  # no row permutation on this one
    t = tensors["blk.1.ffn_down.weight"]
    got = gguf_types.dequantize(np.asarray(t.data), int(t.tensor_type), tuple(quantized[name].shape))
    assert np.array_equal(np.asarray(got, dtype=np.float32).view(np.uint32),
                          quantized[name].dequantize().numpy().view(np.uint32))
    assert torch.equal(model.get_submodule(name).weight.data, quantized[name].dequantize())


def test_kd_seed_replicates_and_varies(gptq_ckpt, tiny_qwen, tmp_path):
    """--seed picks kd's training windows and their order (a second draw of the same recipe, to tell the recipe
    from the draw); the same seed is the same run, bit for bit; the held-out windows stay the same."""
    runs = {n: _kd(tiny_qwen, gptq_ckpt, tmp_path / n, steps=6, lr_q=1e-4, seed=s)
            for n, s in (("a", 1), ("b", 1), ("c", 2))}
    q = {n: checkpoint.load_quantized(ck)[1] for n, ck in runs.items()}
    st = {n: json.loads((ck / "manifest.json").read_text())["kd"] for n, ck in runs.items()}
    assert all(torch.equal(q["a"][k].scales, q["b"][k].scales) for k in q["a"])
    assert any(not torch.equal(q["a"][k].scales, q["c"][k].scales) for k in q["a"])
    assert st["a"]["kd_heldout_kl_init"] == st["c"]["kd_heldout_kl_init"]  # same held-out text


def test_kd_from_an_awq_checkpoint_starts_at_that_checkpoint(tiny_qwen, tmp_path):
    """AWQ folds 1/s into the norms before its scaled weights: kd's student starts from the checkpoint's
    own norms (the FP norms with the AWQ codes are another model, and used to be saved as the result),
    so its held-out KL at step 0 is the AWQ checkpoint's, and the folded norms reach the kd checkpoint."""
    from safetensors.torch import load_file

    from quant2gguf.data import train_heldout_batches
    awq = quantize_model(tiny_qwen, tmp_path / "awq", method="awq", group_size=64, nsamples=8, seqlen=64,
                         device="cpu")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    fp, sd = teacher.state_dict(), load_file(awq / "model.safetensors")
    folded = [k for k in sd if k in fp and not torch.equal(sd[k].float(), fp[k].float())]
    assert any("norm" in k for k in folded), folded  # else this test proves nothing
    ck = _kd(tiny_qwen, awq, tmp_path / "kd", steps=10, lr_q=1e-4)
    out = load_file(ck / "model.safetensors")
    assert all(torch.equal(out[k], sd[k]) for k in folded)
    st = json.loads((ck / "manifest.json").read_text())["kd"]
    student, tok, _, _ = checkpoint.load_model(awq)
    _, held = train_heldout_batches(tok, "news", 10 * 4, 4, 64, seed=0)
    kl = kd.heldout_kl(student.eval(), teacher.eval(), held, torch.device("cpu"), 4, 1024)
    assert kl == pytest.approx(st["kd_heldout_kl_init"], rel=1e-3, abs=1e-6)


def test_kd_guard_returns_the_init_when_training_only_hurts(gptq_ckpt, tiny_qwen, tmp_path):
    ck = _kd(tiny_qwen, gptq_ckpt, tmp_path / "kd", steps=10, lr_w=0.5, lr_q=0.5)
    st = json.loads((ck / "manifest.json").read_text())["kd"]
    assert st["kd_kept_init"] and st["kd_heldout_kl_best"] == st["kd_heldout_kl_init"]
    _, a = checkpoint.load_quantized(ck)
    _, b = checkpoint.load_quantized(gptq_ckpt)
    for n in b:
        assert torch.equal(a[n].codes, b[n].codes) and torch.equal(a[n].scales, b[n].scales)


def test_kd_nan_loss_stops_and_keeps_last_good_state(gptq_ckpt, tiny_qwen, tmp_path, monkeypatch):
    real = kd._chunk_kl
    calls = {"n": 0}

    def poisoned(*a, **k):
        v = real(*a, **k)
        if k.get("backward"):
            calls["n"] += 1
            if calls["n"] >= 3:
                return float("nan")
        return v
    monkeypatch.setattr(kd, "_chunk_kl", poisoned)
    ck = _kd(tiny_qwen, gptq_ckpt, tmp_path / "kd", steps=10, eval_every=2)
    st = json.loads((ck / "manifest.json").read_text())["kd"]
    assert "loss turned nan at step 3" in st["kd_stopped"] and st["kd_steps_run"] == 2
    assert checkpoint.load_quantized(ck)[1]  # a complete checkpoint was written


def test_kd_from_a_method_name_runs_the_init_first(tiny_qwen, tmp_path):
    ck = _kd(tiny_qwen, "rtn", tmp_path / "kd", steps=4, eval_every=2)
    man = json.loads((ck / "manifest.json").read_text())
    assert man["init"]["method"] == "rtn" and len(man["init"]["layers"]) == 2


def test_kd_on_the_teachers_own_samples(gptq_ckpt, tiny_qwen, tmp_path, monkeypatch):
    """--calib self: the init was calibrated on news, the student learns from sequences sampled from the
    teacher (cached ids, exactly nsamples + heldout of them), and still beats its init on held-out samples."""
    from quant2gguf import traces
    monkeypatch.setenv("QUANT2GGUF_CACHE", str(tmp_path / "cache"))
    calls = []
    real = traces.self_samples
    monkeypatch.setattr(traces, "self_samples", lambda *a, **k: calls.append(a[3:5]) or real(*a, **k))
    ck = _kd(tiny_qwen, gptq_ckpt, tmp_path / "kd", calib="self", nsamples=12, steps=30, lr_w=0.0, lr_q=2e-3)
    man = json.loads((ck / "manifest.json").read_text())
    assert calls == [(12 + 4, 64)] and man["calibration"]["source"] == "self"
    assert man["init"]["calibration"]["source"] == "news"
    assert man["kd"]["kd_heldout_kl_best"] < man["kd"]["kd_heldout_kl_init"], man["kd"]
    files = list((tmp_path / "cache" / "traces").glob("*-self-*.pt"))
    ids = torch.load(files[0])
    assert len(files) == 1 and ids.shape == (16, 64) and ids.dtype == torch.long
    assert len({tuple(r.tolist()) for r in ids}) == 16  # sampled, not one greedy sequence repeated


def test_kd_mixes_teacher_samples_into_text_windows(gptq_ckpt, tiny_qwen, tmp_path, monkeypatch):
    """--calib news+self: every second training window is one of nsamples teacher samples, the others are news
    windows, and the held-out windows are news's own (comparable with a news-only run); the init's domain check
    sees news."""
    from quant2gguf import traces
    from quant2gguf.data import train_heldout_batches
    monkeypatch.setenv("QUANT2GGUF_CACHE", str(tmp_path / "cache"))
    calls, seen = [], {}
    real_samples, real_distill = traces.self_samples, kd.distill

    def samples(*a, **k):
        ids = real_samples(*a, **k)
        calls.append((a[3:5], ids))
        return ids

    def distill(student, teacher, quantized, fp, train, held, *a, **k):
        seen.update(train=train, held=held)
        return real_distill(student, teacher, quantized, fp, train, held, *a, **k)
    monkeypatch.setattr(traces, "self_samples", samples)
    monkeypatch.setattr(kd, "distill", distill)
    ck = _kd(tiny_qwen, gptq_ckpt, tmp_path / "kd", calib="news+self", nsamples=6, steps=6, batch=4)
    man = json.loads((ck / "manifest.json").read_text())
    assert [c[0] for c in calls] == [(6, 64)]
    rows = {tuple(r.tolist()) for r in calls[0][1]}
    train = seen["train"]
    assert len(train) == 6 * 4 and all(tuple(r.tolist()) in rows for r in train[1::2])
    assert not any(tuple(r.tolist()) in rows for r in train[0::2])
    _, held = train_heldout_batches(AutoTokenizer.from_pretrained(tiny_qwen), "news", 24, 4, 64)
    assert torch.equal(seen["held"], held)
    assert man["calibration"]["source"] == "news+self" and "teacher" in man["calibration"]["self_samples"]


def test_self_mix_is_for_kd_with_text_sources(tiny_qwen, gptq_ckpt, tmp_path):
    _fails(["quantize", tiny_qwen, "-o", tmp_path / "out", "--method", "gptq", "--calib", "news+self"],
           tmp_path, "--calib news+self")
    _fails(["quantize", tiny_qwen, "-o", tmp_path / "out", "--method", "kd", "--init", gptq_ckpt, "-g", "64",
            "--calib", "news+traces+self"], tmp_path, "mixes with text sources only")


def test_self_samples_are_seeded_and_cached(tiny_qwen, tmp_path, monkeypatch):
    from quant2gguf import traces
    monkeypatch.setenv("QUANT2GGUF_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    a = traces.self_samples(model, tok, tiny_qwen, 3, 16, seed=1)
    b = traces.self_samples(model, tok, tiny_qwen, 3, 16, seed=1)  # from the cache
    c = traces.self_samples(model, tok, tiny_qwen, 3, 16, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not set(a.flatten().tolist()) & set(tok.all_special_ids)  # end-of-text suppressed


def test_self_data_is_for_kd_only(tiny_qwen, tmp_path):
    _fails(["quantize", tiny_qwen, "-o", tmp_path / "out", "--method", "gptq", "--calib", "self"],
           tmp_path, "--calib self")


# ---------------------------------------------------------------- bad input: one line, before training

def _fails(args, tmp_path, pattern):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


def test_kd_refuses_an_init_of_another_group_size(gptq_ckpt, tiny_qwen, tmp_path):
    _fails(["quantize", tiny_qwen, "-o", tmp_path / "out", "--method", "kd", "--init", gptq_ckpt, "-g", "128"],
           tmp_path, "is W3G64 but W3G128 was asked")


def test_kd_refuses_an_init_of_another_model(gptq_ckpt, tmp_path):
    from conftest import make_tiny_model
    other = make_tiny_model("qwen2", tmp_path / "other", hidden=192)
    _fails(["quantize", other, "-o", tmp_path / "out", "--method", "kd", "--init", gptq_ckpt, "-g", "64"],
           tmp_path, "was made from another model")


def test_kd_refuses_an_init_of_another_architecture(gptq_ckpt, tiny_llama_dir, tmp_path):
    _fails(["quantize", tiny_llama_dir, "-o", tmp_path / "out", "--method", "kd", "--init", gptq_ckpt, "-g", "64"],
           tmp_path, "is a qwen2 checkpoint")


def test_kd_refuses_different_tokenizers(gptq_ckpt, tiny_qwen, tmp_path):
    import shutil

    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    other = tmp_path / "other"
    shutil.copytree(tiny_qwen, other)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["completely different text 987"] * 10, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(other)
    _fails(["quantize", other, "-o", tmp_path / "out", "--method", "kd", "--init", gptq_ckpt, "-g", "64"],
           tmp_path, "tokenizers differ")


def test_kd_refuses_bad_numbers_and_a_missing_init(tiny_qwen, tmp_path):
    _fails(["quantize", tiny_qwen, "-o", tmp_path / "out", "--method", "kd", "--steps", "0"], tmp_path, "--steps")
    _fails(["quantize", tiny_qwen, "-o", tmp_path / "out", "--method", "kd", "--max-minutes", "0"], tmp_path,
           "--max-minutes")
    _fails(["quantize", tiny_qwen, "-o", tmp_path / "out", "--method", "kd", "--heldout", "100000"], tmp_path,
           "too few for 100000 held-out")
    _fails(["quantize", tiny_qwen, "-o", tmp_path / "out", "--method", "kd", "--init", tmp_path / "nope"],
           tmp_path, "neither a method")


# ---------------------------------------------------------------- distillation QAT in a stock grid (issue 10)

def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy().view(np.uint32)


@pytest.mark.parametrize("qtype", ["Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0"])
def test_stock_fqlinear_forward_is_the_exported_blocks(qtype):
    """Frozen codes on a stock grid: at init the forward is the StockWeight's ggml dequantization bit for
    bit; after moving every latent (fp16 super scales off the fp16 grid, integer sub-scales across
    rounding edges and out of range) the repacked blocks still dequantize to the forward's weights bit
    for bit, codes unchanged; gradients reach every stored parameter."""
    from quant2gguf import stock_quant
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 512, generator=g) * 0.05
    q = stock_quant.quantize_rtn(w, qtype)
    lin = torch.nn.Linear(512, 24, bias=False)
    m = kd.StockFQLinear(lin, q)
    assert np.array_equal(_bits(m.weight_q()), _bits(q.dequantize()))
    k4 = {"d", "dmin", "sc", "m"}
    assert set(m.p) == {"Q3_K": {"d", "sc"}, "Q4_K": k4, "Q5_K": k4, "Q6_K": {"d", "sc"}, "Q4_0": {"d"}}[qtype]
    with torch.no_grad():
        for k, p in m.p.items():
            p.add_(torch.randn(p.shape, generator=g) * (0.7 if k in m.ints else 1e-3))
    e = m.export()
    assert isinstance(e, stock_quant.StockWeight) and e.qtype == qtype and torch.equal(e.codes, q.codes)
    assert not torch.equal(e.blocks, q.blocks)
    assert np.array_equal(_bits(m.weight_q()), _bits(e.dequantize()))
    for k, (lo, hi) in m.ints.items():  # integer parts rounded and clamped to the format's range
        v = m.parts()[k]
        assert v.min() >= lo and v.max() <= hi and torch.equal(v, v.round())
    m.weight_q().square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.p.values())


@pytest.mark.parametrize("qtype", ["Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0"])
def test_stock_fqlinear_learned_rounding_moves_codes_one_step_and_exports_what_it_computes(qtype):
    """train_codes (AutoRound's V): a zero offset v per weight starts at the init bit for bit; after moving v
    (many entries past +-0.5, some past +-1) and the parts, the repacked blocks dequantize to the forward's
    weights bit for bit, codes move by exactly one step where |v| > 0.5 (unless at the range's edge) and not
    at all where |v| < 0.5; v gets gradients and project_ keeps it in [-1, 1]. Without train_codes: no v."""
    from quant2gguf import stock_quant
    g = torch.Generator().manual_seed(5)
    q = stock_quant.quantize_rtn(torch.randn(24, 512, generator=g) * 0.05, qtype)
    frozen = kd.StockFQLinear(torch.nn.Linear(512, 24, bias=False), q)
    assert not hasattr(frozen, "v") and {n for n, _ in frozen.named_parameters()} == {f"p.{k}" for k in frozen.p}
    m = kd.StockFQLinear(torch.nn.Linear(512, 24, bias=False), q, train_codes=True)
    assert m.v.dtype == torch.float32 and not m.v.any() and torch.equal(m.export().blocks, q.blocks)
    assert np.array_equal(_bits(m.weight_q()), _bits(q.dequantize()))
    with torch.no_grad():
        m.v.copy_(torch.randn(m.v.shape, generator=g) * 0.8)
        for k, p in m.p.items():
            p.add_(torch.randn(p.shape, generator=g) * (0.7 if k in m.ints else 1e-3))
    e = m.export()
    assert isinstance(e, stock_quant.StockWeight) and e.qtype == qtype
    assert np.array_equal(_bits(m.weight_q()), _bits(e.dequantize()))
    v, c0, c1 = m.v.detach(), q.codes.long(), e.codes.long()
    qmax = 2 ** m.cls.bits - 1
    assert torch.equal(c1[v.abs() < 0.5], c0[v.abs() < 0.5])
    assert (c1 - c0).abs().max() == 1
    up, down = (v > 0.5) & (c0 < qmax), (v < -0.5) & (c0 > 0)  # one step, in v's direction
    assert up.any() and down.any() and torch.equal(c1[up], c0[up] + 1) and torch.equal(c1[down], c0[down] - 1)
    assert (v.abs() > 1).any()
    m.weight_q().square().sum().backward()
    assert m.v.grad is not None and m.v.grad[v.abs() <= 1].abs().sum() > 0
    m.project_()
    assert m.v.abs().max() <= 1 and torch.equal(m.export().codes, e.codes)  # projecting moves no code


@pytest.mark.parametrize("qtype", ["Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0"])
def test_stock_latent_unit_moves_weights_the_same_grid_steps_in_every_type(qtype):
    """A unit change of any latent (every element of one part at once) moves each weight at most REACH
    (4, Q3_K's) steps of its sub-block's grid, and the scale parts reach it: one learning rate is the
    same fraction of a grid step in every type, the finer Q4_K/Q5_K/Q6_K grids included (in plain
    relative units they moved 15/4, 31/4, 32/4 times as many of their steps as Q3_K: the Q3_K_M
    mix's held-out KL rose where pure Q3_K's fell)."""
    from quant2gguf import stock_quant
    g = torch.Generator().manual_seed(4)
    q = stock_quant.quantize_rtn(torch.randn(8, 512, generator=g) * 0.05, qtype)
    m = kd.StockFQLinear(torch.nn.Linear(512, 8, bias=False), q)
    cls, codes = m.cls, m.codes.view(-1, m.cls.block_size).float()
    step = q.scales.abs().repeat_interleave(cls.sub, dim=1).reshape(-1, cls.block_size)  # |a| per weight
    by_hand = {"Q3_K": 4, "Q6_K": 32, "Q4_K": 15, "Q5_K": 31, "Q4_0": 8, "Q5_0": 16, "Q8_0": 128}
    assert m.REACH == 4 and cls.reach() == by_hand[qtype]  # the most steps a weight sits from its fixed point
    for k in m.p:
        def weight(x, k=k):
            parts = {j: (x if j == k else p.detach()) * getattr(m, f"u_{j}") for j, p in m.p.items()}
            return cls.dequantize_parts_torch(**parts, q=codes)
        _, dw = torch.func.jvp(weight, (m.p[k].detach(),), (torch.ones_like(m.p[k]),))
        moved = (dw.abs() / step)[step > 0].max().item()
        assert moved <= m.REACH * 1.05, (k, moved)
        if k in ("d", "sc"):
            assert moved >= m.REACH * 0.8, (k, moved)


@pytest.fixture(scope="module")
def tiny_qwen256(tmp_path_factory):
    from conftest import make_tiny_model
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("kd-tiny256"), hidden=256)


@pytest.fixture(scope="module", params=["q3_k", "q4_0", "q3_k_m"])
def stock_ckpt(request, tiny_qwen256, tmp_path_factory):
    return request.param, quantize_model(tiny_qwen256, tmp_path_factory.mktemp("kd-stock") / request.param,
                                         method="gptq", target=request.param, nsamples=8, seqlen=64, device="cpu")


def test_kd_in_the_stock_grid(stock_ckpt, tiny_qwen256, tmp_path, monkeypatch):
    """--init a --target checkpoint: scales trained with the codes frozen beat the init's held-out KL;
    every export during training dequantizes to the student's forward weights bit for bit; the
    checkpoint keeps target/types and converts to a GGUF whose linears are the stock type (q3_k_m: the
    mix of Q3_K, Q4_K and Q5_K llama-quantize's recipe gives them)."""
    target, init = stock_ckpt
    name = target.upper()
    checked = []
    real = kd.StockFQLinear.export

    def export_checked(self):
        e = real(self)
        checked.append(np.array_equal(_bits(self.weight_q()), _bits(e.dequantize())))
        return e
    monkeypatch.setattr(kd.StockFQLinear, "export", export_checked)
    # the default rate in every target: before the latents' units took each type's reach, the mix's
    # held-out KL rose 0.0065 -> 0.0080 by step 10 (its Q4_K/Q5_K parts moving 15/4 and 31/4 times as
    # many of their grid steps as Q3_K's) and was only back at the init by step 30; now 0.0065 -> 0.0062
    ck = quantize_model(tiny_qwen256, tmp_path / "kd", method="kd", init=str(init), seqlen=64, device="cpu",
                        steps=30, batch=4, eval_every=5, heldout=4)
    man = json.loads((ck / "manifest.json").read_text())
    ini = json.loads((init / "manifest.json").read_text())
    st = man["kd"]
    init_kl = st["kd_heldout_kl_init"]
    assert st["kd_heldout_kl_best"] < 0.97 * init_kl and not st["kd_kept_init"], st
    assert max(h["heldout_kl"] for h in st["kd_history"]) < 1.02 * init_kl, st  # no rise on the way
    assert checked and all(checked)
    types = ini["types"]
    assert man["target"] == name and man["types"] == types
    assert set(types.values()) == ({"Q3_K", "Q4_K", "Q5_K"} if name == "Q3_K_M" else {name})
    assert (man["bits"], man["group_size"]) == (ini["bits"], ini["group_size"])
    _, got = checkpoint.load_quantized(ck)
    _, ref = checkpoint.load_quantized(init)
    from quant2gguf.stock_quant import StockWeight
    assert all(isinstance(got[k], StockWeight) and got[k].qtype == types[k] for k in ref)
    assert all(torch.equal(got[k].codes, ref[k].codes) for k in ref)  # codes never moved
    assert any(not torch.equal(got[k].blocks, ref[k].blocks) for k in ref)  # the stored scales did
    model, _, _, _ = checkpoint.load_model(ck)
    for k in ref:
        assert np.array_equal(_bits(model.get_submodule(k).weight.data), _bits(got[k].dequantize())), k
    info = export.convert(ck, tmp_path / "kd.gguf", tokenizer_pre=PRE)
    tensors = {t.name: t for t in export.read_gguf(info["path"]).tensors}  # gguf-py's GGUFReader
    lin = {n: t.tensor_type.name for n, t in tensors.items() if n.startswith("blk.") and t.data.ndim >= 2
           and not n.endswith("norm.weight")}
    assert len(lin) == len(ref) and set(lin.values()) == set(types.values()), lin
    t = tensors["blk.1.ffn_down.weight"]  # no row permutation on this one: the stored bytes verbatim
    want = got["model.layers.1.mlp.down_proj"].blocks.numpy()
    assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(want.shape), want)


@pytest.fixture(scope="module", params=["q3_k", "q4_0", "q3_k_m"])
def rtn_stock_ckpt(request, tiny_qwen256, tmp_path_factory):
    return request.param, quantize_model(tiny_qwen256, tmp_path_factory.mktemp("kd-rtn") / request.param,
                                         method="rtn", target=request.param, nsamples=8, seqlen=64, device="cpu")


def test_kd_in_the_stock_grid_with_learned_rounding(rtn_stock_ckpt, tiny_qwen256, tmp_path, monkeypatch):
    """--lr-w > 0 from an RTN init in a stock grid (AutoRound's setting): the rounding offsets, started where
    each FP weight sits in its cell, train next to the parts; codes move, none by more than one step; the
    held-out KL ends below the same distillation with the codes frozen; every export during training is the
    student's forward bit for bit, and the checkpoint's stock blocks load to the trained weights."""
    target, init = rtn_stock_ckpt
    checked = []
    real = kd.StockFQLinear.export

    def export_checked(self):
        e = real(self)
        assert self.train_codes and self.v.abs().max() <= 1  # projected after every step
        checked.append(np.array_equal(_bits(self.weight_q()), _bits(e.dequantize())))
        return e
    kw = dict(method="kd", init=str(init), seqlen=64, device="cpu", steps=30, batch=4, eval_every=5, heldout=4)
    frozen = json.loads((quantize_model(tiny_qwen256, tmp_path / "kd0", **kw) / "manifest.json").read_text())["kd"]
    monkeypatch.setattr(kd.StockFQLinear, "export", export_checked)
    ck = quantize_model(tiny_qwen256, tmp_path / "kd", lr_w=0.01, **kw)
    man = json.loads((ck / "manifest.json").read_text())
    st = man["kd"]
    assert st["kd_heldout_kl_best"] < frozen["kd_heldout_kl_best"] < st["kd_heldout_kl_init"], (st, frozen)
    assert man["options"]["lr_w"] == 0.01 and man["target"] == target.upper()
    assert checked and all(checked)
    _, got = checkpoint.load_quantized(ck)
    _, ref = checkpoint.load_quantized(init)
    from quant2gguf.stock_quant import StockWeight
    assert all(isinstance(got[k], StockWeight) and got[k].qtype == ref[k].qtype for k in ref)
    diff = {k: (got[k].codes.long() - ref[k].codes.long()).abs() for k in ref}
    assert all(d.max() <= 1 for d in diff.values())
    assert sum(int((d > 0).sum()) for d in diff.values()) > 0, "no code moved"
    model, _, _, _ = checkpoint.load_model(ck)
    for k in ref:
        assert np.array_equal(_bits(model.get_submodule(k).weight.data), _bits(got[k].dequantize())), k


def test_kd_stock_init_refuses_a_negative_rate_and_other_groups(stock_ckpt, tiny_qwen256, tmp_path):
    _, init = stock_ckpt
    _fails(["quantize", tiny_qwen256, "-o", tmp_path / "out", "--method", "kd", "--init", init, "--lr-w", "-1e-3"],
           tmp_path, "--lr-w >= 0")
    _fails(["quantize", tiny_qwen256, "-o", tmp_path / "out", "--method", "kd", "--init", init, "-g", "64"],
           tmp_path, "drop --group-size")
