"""The F16 file's own GSM conversations from a `bench` run, as a JSONL text for KLD in the deployed regime.

Teacher-forced KLD on documents (news, CHAMP, code) did not see the sixth qwen15 run's GSM loss: our GPTQ
Q3_K file matched Q3_K_S + imatrix on CHAMP KLD and solved 15 points fewer problems. These records are the
conversations the deployed model actually has: the held-out GSM question asked as `bench` asks it, in the
model's chat template, followed by F16's greedy answer. KLD over them (`quant2gguf eval --text OUT.jsonl`,
`scripts/compare_gguf.py --texts OUT.jsonl`: the file's last 20 % of records are its eval split) measures how
far a quantized file drifts from F16 exactly where it reasons, with far less noise than pass@1 on 250 problems.
llama-perplexity tokenizes its text without parsing special tokens, so there the chat markers (<|im_start|> ...)
are read as plain text, a few tokens per conversation; PyTorch `eval` reads them as the special tokens they are.

usage: python scripts/gsm_transcripts.py BENCH_DIR --model MODEL -o OUT.jsonl [--label F16] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def conversations(rows: list[dict], tokenizer, seed: int = 0) -> list[str]:
    """rows: a bench GSM phase's answers ({key, text}); the questions are re-rendered by key from
    bench's problem set, which is deterministic in (n, seed)."""
    from quant2gguf.bench import gsm_set
    from quant2gguf.data import GSM_DEPLOY_PROMPT
    question = {p["key"]: p["question"] for p in gsm_set(len(rows), seed)}
    missing = [r["key"] for r in rows if r["key"] not in question]
    if missing:
        raise SystemExit(f"{len(missing)} of the answers' problems are not in bench's GSM set for n={len(rows)}, "
                         f"seed={seed}: pass --seed as the bench run had it")
    out = []
    for r in rows:
        msgs = [{"role": "user", "content": GSM_DEPLOY_PROMPT.format(q=question[r["key"]])},
                {"role": "assistant", "content": r["text"]}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return out


def answers(path: Path, label: str) -> Path:
    """The GSM phase result of `label`'s file in a bench folder's cache (the newest, if several)."""
    if path.is_file():
        return path
    found = sorted((path / "cache").glob(f"*{label}.gsm.*.json"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise SystemExit(f"{path}: no GSM answers of {label!r} in its cache/: run bench with --gsm N first "
                         f"(or pass the phase's .gsm.*.json itself)")
    return found[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", help="a bench -o folder (its cache holds the answers) or a cached *.gsm.*.json")
    ap.add_argument("--model", required=True, help="the bench's --ref (model folder or fixture name): its chat template")
    ap.add_argument("--label", default="F16", help="whose answers: the end of the file's cache name (F16 by default)")
    ap.add_argument("--seed", type=int, default=0, help="the bench run's --seed")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    from transformers import AutoTokenizer
    from quant2gguf.cache import atomic_path
    from quant2gguf.fixtures import resolve_model
    src = answers(Path(a.bench), a.label)
    tok = AutoTokenizer.from_pretrained(resolve_model(a.model))
    if not getattr(tok, "chat_template", None):
        sys.exit(f"{a.model}: the tokenizer has no chat template; bench asked it without one, so there is no chat regime")
    rows = conversations(json.loads(src.read_text())["rows"], tok, a.seed)
    with atomic_path(Path(a.out)) as tmp:
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    from quant2gguf.data import _cut  # the split data files get, so the count printed is the one evaluated
    print(f"{a.out}: {len(rows)} conversations from {src.name} ({len(_cut(rows, 'eval'))} in the eval split)")


if __name__ == "__main__":
    main()
