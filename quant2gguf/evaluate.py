"""Evaluate a model folder, fixture or quantized checkpoint in PyTorch.

    ppl    perplexity over contiguous chunks of a text source's EVAL split (data.eval_tokens)
    kld    mean over predicted tokens of KL(P_ref || P_model) of next-token distributions
    top1   fraction of predicted tokens where argmax P_model == argmax P_ref
    gsm    greedy generation on the held-out GSM problems (data.gsm_problems("eval")), answer
           parsed with data.parse_answer and compared numerically

The reference (FP) model runs on the same chunk right after the evaluated model, so no logits are
kept beyond one chunk: memory stays bounded by one batch of (seqlen x vocab) logits per model, and
softmaxes run over slices of 128 positions.
A checkpoint's weights are its deployed dequantized values (checkpoint.load_model), or, with
packed=True on CUDA, its packed 3-bit codes run through the Triton kernels.
"""
from __future__ import annotations

import math
import os
import re
import time

import torch

from . import checkpoint
from .data import describe_split, eval_tokens, gsm_problems, parse_answer
from .fixtures import resolve_model

GSM_INSTRUCTION = ("Solve the math problem step by step. End with the final answer as a number "
                   "on its own line after '####', for example: #### 42")
GSM_SHOTS = 2          # worked examples taken from the GSM *calibration* split
GSM_MAX_NEW = 256


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch sees no CUDA GPU; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; choose cpu, cuda or auto")
    return device


def load_any(path: str | os.PathLike, device: str = "cpu", dtype=torch.float32):
    """(model, tokenizer, manifest or None, quantized or None) for a checkpoint, an HF model folder
    or a fixture name (smollm2, qwen05)."""
    if checkpoint.is_checkpoint(path):
        return checkpoint.load_model(path, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = resolve_model(path)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(p)
    return model, tok, None, None


def _progress(it, desc: str, total: int | None = None):
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits for positions 0..T-2 (model dtype)."""
    return model(input_ids=ids, use_cache=False).logits[:, :-1]


@torch.no_grad()
def text_metrics(model, tokens: torch.Tensor, ref=None, batch: int = 1, device: str = "cpu",
                 span: int = 128) -> dict:
    """ppl of `model` (and of `ref`), kld and top1 vs `ref`, over (n, seqlen) token chunks.
    Softmaxes run over `span` positions at a time, so at most two chunks of raw logits plus a
    few (batch, span, vocab) fp32 tensors are alive at once."""
    nll = ref_nll = kl = agree = 0.0
    count = 0
    for i in _progress(range(0, len(tokens), batch), "eval chunks", math.ceil(len(tokens) / batch)):
        ids = tokens[i:i + batch].to(device)
        tgt = ids[:, 1:].unsqueeze(-1)
        logits = _logits(model, ids)
        ref_logits = _logits(ref, ids) if ref is not None else None
        if ref_logits is not None and ref_logits.shape[-1] != logits.shape[-1]:
            raise ValueError(f"model and reference have different vocabularies ({logits.shape[-1]} vs "
                             f"{ref_logits.shape[-1]} logits); KLD needs the same tokenizer")
        for s in range(0, logits.shape[1], span):
            t = tgt[:, s:s + span]
            lp = torch.log_softmax(logits[:, s:s + span].float(), dim=-1)
            nll += -lp.gather(-1, t).sum().item()
            if ref_logits is not None:
                rlp = torch.log_softmax(ref_logits[:, s:s + span].float(), dim=-1)
                ref_nll += -rlp.gather(-1, t).sum().item()
                kl += (rlp.exp() * (rlp - lp)).sum().item()
                agree += (rlp.argmax(-1) == lp.argmax(-1)).sum().item()
        count += tgt.numel()
        del logits, ref_logits
    has_ref = ref is not None
    return {"ppl": math.exp(nll / count), "predictions": count,
            "ref_ppl": math.exp(ref_nll / count) if has_ref else None,
            "kld": kl / count if has_ref else None, "top1": agree / count if has_ref else None}


def _strip_calc(s: str) -> str:
    return re.sub(r"<<[^>]*>>", "", s)


def gsm_prompts(tokenizer, problems: list[dict]) -> list[str]:
    """Few-shot prompts (worked examples from the calibration split), chat-formatted if the
    tokenizer has a chat template."""
    shots = gsm_problems("calib", GSM_SHOTS, seed=0)
    prompts = []
    for p in problems:
        if getattr(tokenizer, "chat_template", None):
            msgs = []
            for s in shots:
                msgs += [{"role": "user", "content": f"{GSM_INSTRUCTION}\n\n{s['question']}"},
                         {"role": "assistant", "content": _strip_calc(s["solution"])}]
            msgs.append({"role": "user", "content": f"{GSM_INSTRUCTION}\n\n{p['question']}"})
            prompts.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        else:
            ex = "".join(f"Question: {s['question']}\nAnswer: {_strip_calc(s['solution'])}\n\n" for s in shots)
            prompts.append(f"{GSM_INSTRUCTION}\n\n{ex}Question: {p['question']}\nAnswer:")
    return prompts


@torch.no_grad()
def gsm_accuracy(model, tokenizer, n: int, device: str = "cpu", batch: int = 8,
                 max_new_tokens: int = GSM_MAX_NEW) -> dict:
    """Greedy generation on the first n held-out GSM problems; numeric comparison of answers."""
    problems = gsm_problems("eval", n)
    prompts = gsm_prompts(tokenizer, problems)
    pad_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    correct, samples = 0, []
    try:
        for i in _progress(range(0, len(prompts), batch), "gsm batches", math.ceil(len(prompts) / batch)):
            enc = tokenizer(prompts[i:i + batch], return_tensors="pt", padding=True,
                            add_special_tokens=not getattr(tokenizer, "chat_template", None)).to(device)
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for j, seq in enumerate(out[:, enc["input_ids"].shape[1]:]):
                text = tokenizer.decode(seq, skip_special_tokens=True).split("\nQuestion:")[0]
                p = problems[i + j]
                got, want = parse_answer(text), float(p["answer"])
                ok = got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))
                correct += ok
                samples.append({"id": p["id"], "answer": want, "parsed": got, "correct": bool(ok),
                                "output": text[-300:]})
    finally:
        tokenizer.padding_side = pad_side
    return {"gsm_acc": correct / len(problems) if problems else None, "gsm_n": len(problems),
            "gsm_samples": samples}


def evaluate(path, ref=None, text: str = "news", ntokens: int = 8192, seqlen: int = 512, gsm: int = 0,
             device: str = "auto", packed: bool = False, dtype=torch.float32) -> dict:
    """Evaluate PATH (checkpoint, HF folder or fixture name). ref defaults to a checkpoint's
    manifest["source_model"]; without a reference there is no kld/top1. Returns a JSON-able dict."""
    t0 = time.time()
    device = pick_device(device)
    if packed and not device.startswith("cuda"):
        raise RuntimeError("--packed runs the Triton 3-bit kernels and needs a CUDA GPU; "
                           "drop --packed to evaluate the dequantized weights on CPU")
    model, tok, man, quantized = load_any(path, device=device, dtype=dtype)
    if packed:
        if not quantized:
            raise ValueError(f"--packed needs a quantized checkpoint; {path} is a plain model")
        from .kernels.qlinear import swap_linears
        swap_linears(model, quantized)
    if ref is None and man is not None:
        ref = man.get("source_model")
    res = {"model": str(path), "ref": str(ref) if ref is not None else None, "device": device,
           "dtype": str(dtype).replace("torch.", ""), "packed": packed, "text": text,
           "text_split": describe_split(text, "eval"), "seqlen": seqlen}
    if man is not None:
        res["checkpoint"] = {k: man.get(k) for k in ("method", "bits", "group_size", "calibration")}

    tokens = eval_tokens(tok, text, ntokens, seqlen)
    ref_model = None
    if ref is not None:
        ref_model, ref_tok, _, _ = load_any(ref, device=device, dtype=dtype)
        if len(ref_tok) != len(tok):
            raise ValueError(f"{ref} and {path} have different tokenizers ({len(ref_tok)} vs {len(tok)} tokens)")
    t1 = time.time()
    batch = 1 if device == "cpu" else 4
    res.update(text_metrics(model, tokens, ref_model, batch=batch, device=device))
    res["tokens"] = tokens.numel()
    res["text_seconds"] = round(time.time() - t1, 2)
    del ref_model

    res.update(gsm_acc=None, gsm_n=0, gsm_split=None)
    if gsm:
        t2 = time.time()
        g = gsm_accuracy(model, tok, gsm, device=device, batch=8 if device == "cpu" else 32)
        res.update(g, gsm_split=describe_split("gsm", "eval"), gsm_seconds=round(time.time() - t2, 2))
    res["seconds"] = round(time.time() - t0, 2)
    return res
