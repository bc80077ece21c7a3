"""Reasoning-domain calibration (LAQuant ingredient 1): the model's own chains of thought.

The model answers the GSM *calibration* problems (templates 0-49 and variants; `bench` asks 50-99)
greedily, in the prompt format `bench` uses at deployment; prompt + generated reasoning become
calibration text, so the Hessian subspace (or the distillation data) seen in calibration is the one
seen when the model reasons in chat at deployment. Traces are cached per model
folder and settings as JSONL ({"text": ...}) and then read like any user data file.
`straces` (student_traces_file, distillation only): the same prompts answered by the quantized kd init
instead, so distillation also trains on the student's own trajectories (on-policy, GKD), cached per init.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .cache import atomic_path, cache_dir


TRACES_N = 200  # GSM calib problems answered: the 50 originals of templates 0-49, then variants of them


def trace_prompts(tokenizer, problems: list[dict]) -> list[str]:
    """The prompts the traces answer. With a chat template: one user message exactly as `bench` asks
    its GSM questions at deployment (llama-server wraps it in the same template), so the calibration
    covers the chat regime the deployed file reasons in; without one, the few-shot GSM prompt."""
    from .data import GSM_DEPLOY_PROMPT
    from .evaluate import gsm_prompts
    if not getattr(tokenizer, "chat_template", None):
        return gsm_prompts(tokenizer, problems)
    return [tokenizer.apply_chat_template([{"role": "user", "content": GSM_DEPLOY_PROMPT.format(q=p["question"])}],
                                          tokenize=False, add_generation_prompt=True) for p in problems]


def traces_file(model, tokenizer, folder: str | Path, n: int | None = None, max_new_tokens: int = 512,
                device="cpu", batch: int | None = None) -> Path:
    """Path of a JSONL of n prompt+trace texts, generated once per (model folder, n, length).
    max_new_tokens is bench's GSM answer budget: F16 qwen15's answers average 311 tokens, so the 256 used
    before cut most traces before their final answer. A trace keeps its end-of-turn token (the model
    learns where an answer stops as well)."""
    n = n or TRACES_N
    key = hashlib.sha256(f"{Path(folder).resolve()}|{n}|{max_new_tokens}|deploy-chat-eot".encode()).hexdigest()[:16]
    dest = cache_dir("traces") / f"{Path(folder).name}-{key}.jsonl"
    if not dest.is_file():
        _write_traces(model, tokenizer, dest, n, max_new_tokens, device, batch, "reasoning traces")
    return dest


def student_traces_file(student, tokenizer, init_id: str, n: int | None = None, max_new_tokens: int = 512,
                        device="cpu", batch: int | None = None) -> Path:
    """`straces`: traces_file's GSM calib prompts answered by the quantized init student (a model, or a
    function making it, called only when the file is not cached: the model kd trains from carrying the
    init's dequantized weights, as it will be exported, before training), for on-policy
    distillation (GKD): the teacher then scores the student's own trajectories. Same prompts, greedy
    decoding, answer budget and end-of-turn handling as traces_file. Cached per `init_id` (init_fingerprint:
    the init's path and weights, so a re-made init never reuses stale traces), n and max_new_tokens."""
    n = n or TRACES_N
    key = hashlib.sha256(f"{init_id}|{n}|{max_new_tokens}|student-deploy-chat-eot".encode()).hexdigest()[:16]
    dest = cache_dir("traces") / f"student-{key}.jsonl"
    if not dest.is_file():
        model = student() if callable(student) and not isinstance(student, torch.nn.Module) else student
        _write_traces(model, tokenizer, dest, n, max_new_tokens, device, batch, "student traces (quantized init)")
        del model  # the caller's copy is freed before training
    return dest


def init_fingerprint(source: str, quantized) -> str:
    """Identity of a kd init for student_traces_file's cache: its source (a checkpoint's resolved path
    with its manifest's bytes, or the teacher folder and the init method run on it) and a sha256 over
    every quantized tensor it holds (codes, grids, protected values or stock blocks, in name order)."""
    h = hashlib.sha256(source.encode())
    man = Path(source) / "manifest.json"
    if man.is_file():
        h.update(man.read_bytes())
    for name in sorted(quantized):
        q = quantized[name]
        h.update(name.encode())
        if getattr(q, "blocks", None) is not None:  # a stock type: the blocks hold everything
            parts = [q.blocks]
        else:
            q = q.packed()  # the same bytes whether the init held its codes packed or not
            parts = [q.stored_codes.data, q.scales, q.offsets, q.pidx, q.pval]
        for t in parts:
            if t is not None:
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_traces(model, tokenizer, dest: Path, n: int, max_new_tokens: int, device, batch: int | None,
                  label: str) -> None:
    from .data import gsm_problems
    prompts = trace_prompts(tokenizer, gsm_problems("calib", n))
    batch = batch or (32 if torch.device(device).type == "cuda" else 8)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    stops = _stop_ids(model, tokenizer)
    rows = []
    try:
        from rich.progress import track
        for i in track(range(0, len(prompts), batch), description=label):
            enc = tokenizer(prompts[i:i + batch], return_tensors="pt", padding=True,
                            add_special_tokens=not getattr(tokenizer, "chat_template", None)).to(device)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            for p, seq in zip(prompts[i:i + batch], out[:, enc["input_ids"].shape[1]:]):
                rows.append({"text": p + _answer(tokenizer, seq.tolist(), stops)})
    finally:
        tokenizer.padding_side = side
    with atomic_path(dest) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stop_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


def _answer(tokenizer, ids: list[int], stops: set[int]) -> str:
    """The generated text up to and including its first stop token: generate() pads only sequences
    that stopped, so the cut drops all padding; an unfinished answer has none."""
    cut = next((k for k, t in enumerate(ids) if t in stops), None)
    return tokenizer.decode(ids if cut is None else ids[:cut + 1], skip_special_tokens=False)


def self_samples(model, tokenizer, folder: str | Path, n: int, seqlen: int, device="cpu", seed: int = 0,
                 batch: int | None = None) -> torch.Tensor:
    """(n, seqlen) token ids sampled from the model itself (LLM-QAT's data-free distillation data):
    a first token drawn uniformly from the vocabulary, then temperature-1 sampling, end-of-text
    suppressed. The teacher's own distribution covers every domain it knows, so a student trained on
    it is not fitted to one calibration text (KD on 60K news tokens won news and lost CHAMP on qwen15).
    Ids, not text, are cached: no detokenize/retokenize drift. Cached per model folder, n, seqlen, seed."""
    key = hashlib.sha256(f"{Path(folder).resolve()}|self|{n}|{seqlen}|{seed}".encode()).hexdigest()[:16]
    dest = cache_dir("traces") / f"{Path(folder).name}-self-{key}.pt"
    if dest.is_file():
        ids = torch.load(dest)
        if tuple(ids.shape) == (n, seqlen):
            return ids
    dev = torch.device(device)
    batch = batch or (256 if dev.type == "cuda" else 8)
    g = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(min(tokenizer.vocab_size, model.config.vocab_size)) if i not in special])
    first = pool[torch.randint(len(pool), (n,), generator=g)]
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos = sorted(set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    model.to(dev).eval()
    torch.manual_seed(seed)  # generate() samples from torch's global generator
    rows = []
    from rich.progress import track
    for i in track(range(0, n, batch), description="self-generated distillation data"):
        inp = first[i:i + batch, None].to(dev)
        with torch.no_grad():
            out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, min_new_tokens=seqlen - 1, max_new_tokens=seqlen - 1,
                                 suppress_tokens=eos or None, pad_token_id=eos[0] if eos else 0)
        rows.append(out[:, :seqlen].cpu())
    ids = torch.cat(rows)
    with atomic_path(dest) as tmp:
        torch.save(ids, tmp)
    return ids
