"""Tiny model -> checkpoint -> convert -> the patched llama.cpp (built once by llama.build(), cached).

llama.cpp must compute what PyTorch computes on the same checkpoint. llama-perplexity picks and
saves its token chunks (--kl-divergence-base FILE); the checkpoint's dequantized torch model
(checkpoint.load_model) is evaluated on exactly those tokens with the same BOS substitution, and
we compare perplexity (within 1%) and the per-position log-probs llama.cpp saved (KL divergence).

An unpatched llama.cpp refusing our files is checked without a second ~6 min build: our type ids
must be >= GGML_TYPE_COUNT of the unpatched ggml.h (read from the pristine pinned sdist), and the
unpatched gguf.cpp rejects any tensor type >= GGML_TYPE_COUNT with "invalid ggml type".
"""
from __future__ import annotations

import re
import tarfile

import numpy as np
import pytest
import torch
from test_export import PRE, make_checkpoint

from quant2gguf import checkpoint, export, llama, runner

pytestmark = pytest.mark.slow
CTX, CHUNKS = 128, 3
CASES = {"llama-g64": ("llama", 64, 0), "qwen2-g128p": ("qwen2", 128, 2)}


@pytest.fixture(scope="module")
def bin_dir():
    return llama.build()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = "the quick brown fox jumps over a lazy dog while twelve plus thirty makes forty two".split()
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(words, 3000)) + ".\n"
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(text)
    return p


@pytest.fixture(scope="module", params=list(CASES))
def model(request, tmp_path_factory, bin_dir):
    arch, g, slots = CASES[request.param]
    root = tmp_path_factory.mktemp(f"e2e-{request.param}")
    ckpt = make_checkpoint(arch, root, g, slots)
    gguf = root / "model.gguf"
    export.convert(ckpt, gguf, tokenizer_pre=PRE)
    return ckpt, gguf


def torch_logprobs(ckpt, tokens: np.ndarray, add_bos: bool, bos: int) -> torch.Tensor:
    """log-softmax at the positions llama-perplexity scores: n_ctx//2 .. n_ctx-2 of each chunk."""
    m, *_ = checkpoint.load_model(ckpt)
    x = torch.from_numpy(tokens.astype(np.int64))
    if add_bos:  # llama-perplexity puts BOS at each chunk's first position
        x[:, 0] = bos
    with torch.no_grad():
        logits = m(x).logits.float()
    n = tokens.shape[1]
    return torch.log_softmax(logits[:, n // 2:n - 1], -1)


def llama_vs_torch(gguf, ckpt, text, ctx: int, chunks: int, tmp_path) -> dict:
    """llama-perplexity on `text` against PyTorch on the very tokens it scored: both perplexities,
    the mean per-position KLD (llama.cpp's saved log-probs: 16-bit, clamped 16 below the max) and
    both log-prob tables."""
    base = tmp_path / "logits.bin"
    res = runner.perplexity(gguf, text, ctx=ctx, chunks=chunks, save_logits=base)
    saved = runner.read_logits_file(base, logprobs=True)
    toks = saved["tokens"]
    bos = int(export.read_gguf(gguf).fields["tokenizer.ggml.bos_token_id"].contents())
    add_bos = bool(toks[0, 0] == bos)  # the text starts with a word, so a BOS here was added by llama.cpp
    lp = torch_logprobs(ckpt, toks, add_bos, bos)
    target = torch.from_numpy(toks[:, ctx // 2 + 1:].astype(np.int64))
    ll = torch.from_numpy(saved["logprobs"])
    return {"ppl": res["ppl"], "ppl_torch": float(torch.exp(-lp.gather(-1, target[..., None]).mean())),
            "kld": float((lp.exp() * (lp - ll)).sum(-1).mean()), "lp": lp, "ll": ll, "n_chunk": saved["n_chunk"]}


def greedy_agreement(gguf, ckpt, prompts, tie: float = 1e-2) -> int:
    """llama-server's greedy tokens == PyTorch's on the checkpoint, each continuation compared up to
    its first near tie (top-2 logits closer than `tie`); returns how many tokens were compared."""
    from quant2gguf import server
    m, tok, _, _ = checkpoint.load_model(ckpt)
    compared = 0
    with server.serve(gguf, parallel=1, ctx=256, extra_args=["-ctk", "f32", "-ctv", "f32"]) as s:  # torch keeps K/V in fp32
        for prompt in prompts:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            res = server._post(f"{s.url}/completion", {"prompt": ids, "n_predict": 12, "temperature": 0, "top_k": 1,
                                                       "return_tokens": True, "cache_prompt": False}, timeout=120)
            got, x, want = res["tokens"], torch.tensor([ids]), []
            with torch.no_grad():
                for _ in range(len(got)):
                    top = m(x).logits[0, -1].float().topk(2)
                    if float(top.values[0] - top.values[1]) < tie:
                        break
                    want.append(int(top.indices[0]))
                    x = torch.cat([x, top.indices[:1].view(1, 1)], 1)
            assert got[:len(want)] == want, (prompt, got, want)
            compared += len(want)
    return compared


def test_llama_matches_torch(model, text_file, tmp_path):
    ckpt, gguf = model
    r = llama_vs_torch(gguf, ckpt, text_file, CTX, CHUNKS, tmp_path)
    assert r["n_chunk"] == CHUNKS
    assert r["ppl"] == pytest.approx(r["ppl_torch"], rel=0.01), (r["ppl"], r["ppl_torch"])
    assert r["kld"] < 1e-3, r["kld"]
    assert float((r["lp"].argmax(-1) == r["ll"].argmax(-1)).float().mean()) > 0.9


def test_greedy_tokens_are_torch_greedy_tokens_and_tools_load_it(model):
    """llama-server's greedy tokens (/completion with return_tokens) are PyTorch's greedy decoding of
    the same checkpoint, compared up to the first step where torch's two best logits are within 0.01
    (ggml's dot products round activations to 8 bits: a near tie either side may break; measured
    1.5e-3 ties flipping); llama-completion and llama-bench load the file."""
    ckpt, gguf = model
    compared = greedy_agreement(gguf, ckpt, ("the quick brown fox", "twelve plus thirty makes", "a lazy dog jumps over"))
    assert compared >= 8, compared
    assert isinstance(runner.run_prompt(gguf, "the quick brown", n=8), str)
    b = runner.bench(gguf, n_gen=16, reps=1)
    assert b["tg_tok_s"] > 0 and b["model_size"] == pytest.approx(gguf.stat().st_size, rel=0.2)


def test_foreign_and_truncated_gguf_refused_before_launch(model, tmp_path):
    _, gguf = model
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        runner.run_prompt(cut, "hi", n=1)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        runner.perplexity(tmp_path / "x.gguf", None)


def _pristine(member: str) -> str:
    pin = llama.pin()
    from quant2gguf.cache import pip_download
    sdist = pip_download(pin["package"], pin["version"], pin["sha256"], sdist=True)
    prefix = f"{pin['package'].replace('-', '_')}-{pin['version']}/{pin['subdir']}/"
    with tarfile.open(sdist) as tf:
        return tf.extractfile(prefix + member).read().decode()


def test_unpatched_llama_cpp_would_refuse_our_types(model):
    count = int(re.search(r"GGML_TYPE_COUNT\s*=\s*(\d+)", _pristine("ggml/include/ggml.h")).group(1))
    assert re.search(r"type\s*>=\s*GGML_TYPE_COUNT", _pristine("ggml/src/gguf.cpp"))
    _, gguf = model
    ours = {int(t.tensor_type) for t in export.read_gguf(gguf).tensors if int(t.tensor_type) >= 96}
    assert ours and min(ours) >= count


def test_smollm2_matches_torch(bin_dir, tmp_path):
    """The real fixture (llama arch, 576 wide, tied embeddings, SmolLM2's own BPE tokenizer):
    every decoder linear RTN W3G64 (no calibration: this checks export and runtime, not quality),
    then llama-perplexity vs torch on llama.cpp's tokens of held-out news, within 1%."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quant2gguf.data import news_articles
    from quant2gguf.fixtures import fetch
    from quant2gguf.quantizer import quantize
    src = fetch("smollm2")
    model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    quantized = {n: quantize(m.weight.data, 3, 64) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    ckpt = checkpoint.save(tmp_path / "ckpt", model, tok, quantized, {"method": "rtn", "bits": 3, "group_size": 64})
    del model
    info = export.convert(ckpt, tmp_path / "smol.gguf")
    assert info["tensors"]["Q3_G64"] == 5 * 30 and info["bpw_quantized"] == 3.5  # q/k/v as one attn_qkv a layer
    text = tmp_path / "news.txt"
    text.write_text("\n\n".join(news_articles("eval")))
    base = tmp_path / "logits.bin"
    res = runner.perplexity(tmp_path / "smol.gguf", text, ctx=256, chunks=4, save_logits=base)
    toks = runner.read_logits_file(base)["tokens"]
    bos = int(export.read_gguf(tmp_path / "smol.gguf").fields["tokenizer.ggml.bos_token_id"].contents())
    lp = torch_logprobs(ckpt, toks, bool(toks[0, 0] == bos), bos)
    target = torch.from_numpy(toks[:, toks.shape[1] // 2 + 1:].astype(np.int64))
    ppl_torch = float(torch.exp(-lp.gather(-1, target[..., None]).mean()))
    assert res["ppl"] == pytest.approx(ppl_torch, rel=0.01), (res["ppl"], ppl_torch)
