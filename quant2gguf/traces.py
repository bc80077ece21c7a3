"""Reasoning-domain calibration (LAQuant ingredient 1): the model's own chains of thought.

The model answers the GSM *calibration* problems (greedy, the same prompt format as the GSM
evaluation); prompt + generated reasoning become calibration text, so the Hessian subspace seen in
calibration is the one seen when the model reasons at deployment. Traces are cached per model
folder and settings as JSONL ({"text": ...}) and then read like any user data file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .cache import atomic_path, cache_dir


def traces_file(model, tokenizer, folder: str | Path, n: int = 50, max_new_tokens: int = 256,
                device="cpu", batch: int = 8) -> Path:
    """Path of a JSONL of n prompt+trace texts, generated once per (model folder, n, length)."""
    from .data import gsm_problems
    from .evaluate import gsm_prompts
    key = hashlib.sha256(f"{Path(folder).resolve()}|{n}|{max_new_tokens}".encode()).hexdigest()[:16]
    dest = cache_dir("traces") / f"{Path(folder).name}-{key}.jsonl"
    if dest.is_file():
        return dest
    problems = gsm_problems("calib", n)
    prompts = gsm_prompts(tokenizer, problems)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    rows = []
    try:
        from rich.progress import track
        for i in track(range(0, len(prompts), batch), description="reasoning traces"):
            enc = tokenizer(prompts[i:i + batch], return_tensors="pt", padding=True,
                            add_special_tokens=not getattr(tokenizer, "chat_template", None)).to(device)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            for p, seq in zip(prompts[i:i + batch], out[:, enc["input_ids"].shape[1]:]):
                rows.append({"text": p + tokenizer.decode(seq, skip_special_tokens=True)})
    finally:
        tokenizer.padding_side = side
    with atomic_path(dest) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest
