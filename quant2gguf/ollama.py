"""`quant2gguf ollama FILE.gguf -o DIR`: an Ollama Modelfile for a GGUF, from the chat template
in the file's own metadata (tokenizer.chat_template, the eos token), without loading the model.

Chat templates are Jinja; Ollama's are Go text/template, and arbitrary Jinja cannot be translated.
So we recognise families: the GGUF's template is rendered with transformers' sandboxed Jinja (what
apply_chat_template runs) on probe conversations, and a family is taken only if every render is
exactly that family's turns. Each family has one fixed Ollama template; the probes measure the rest:
  - `prefix`: text the template puts before every system message (Llama 3.1's date lines),
  - `default`: the system turn rendered when the conversation has none (SmolLM2, Qwen2.5),
  - whether the template writes BOS itself (dropped when the runtime adds BOS anyway).
The emitted template uses only: text, {{ .Role }}, {{ .Content }}, {{ range .Messages }},
{{ if not .System }}, {{ if eq .Role "system" }} and {{ end }}. In Ollama's `.Messages` mode
`.System` is every system message joined, so `if not .System` means "the chat has no system
message". Every turn is closed and the generation prompt always follows (no assistant prefill).
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from .cache import atomic_path


@dataclass(frozen=True)
class Family:
    name: str
    head: str  # before a turn's content, "{role}" stands for the role
    tail: str  # after a turn's content
    stops: tuple[str, ...]  # end-of-turn marker, then the next turn's opener (stops run-on turns)

    def turn(self, role: str, content: str) -> str:
        return self.head.replace("{role}", role) + content + self.tail


FAMILIES = (
    Family("chatml", "<|im_start|>{role}\n", "<|im_end|>\n", ("<|im_end|>", "<|im_start|>")),
    Family("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
           ("<|eot_id|>", "<|start_header_id|>")),
)
S, U, A, U2 = "SYS-PROBE-1", "USER-PROBE-2", "ASSISTANT-PROBE-3", "USER-PROBE-4"


@dataclass(frozen=True)
class Chat:
    """What the probes found: the family and the measured parts (see the module docstring)."""
    family: Family
    prefix: str
    default: str | None  # None: no system turn without a system message
    bos: str  # BOS text to write in the template ("" when the runtime adds it or there is none)


def render(template: str, messages: list[dict], bos: str = "", eos: str = "") -> str:
    """The Jinja chat template rendered as apply_chat_template(add_generation_prompt=True) renders it."""
    from transformers.utils.chat_template_utils import render_jinja_template
    out, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                   bos_token=bos, eos_token=eos)
    return out[0]


def _msgs(*pairs) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


BOS_MARK = "\x00BOS\x00"  # rendered in place of bos_token: shows where the template writes BOS


def detect(template: str, bos: str, eos: str, runtime_bos: bool) -> Chat | None:
    """The family whose turns reproduce every probe render exactly, or None."""
    try:
        full = render(template, _msgs(("system", S), ("user", U), ("assistant", A), ("user", U2)), BOS_MARK, eos)
        nosys = render(template, _msgs(("user", U)), BOS_MARK, eos)
    except Exception:  # a template that cannot render a plain chat is no family of ours
        return None
    lead = BOS_MARK if full.startswith(BOS_MARK) else ""
    full, nosys = full.removeprefix(lead), nosys.removeprefix(lead)
    for f in FAMILIES:
        h_sys = f.head.replace("{role}", "system")
        if not full.startswith(h_sys) or S not in full:
            continue
        prefix = full[len(h_sys):full.index(S)]
        rest = f.turn("user", U) + f.turn("assistant", A) + f.turn("user", U2) + f.head.replace("{role}", "assistant")
        if full != f.turn("system", prefix + S) + rest:
            continue
        after = f.turn("user", U) + f.head.replace("{role}", "assistant")
        if nosys == after:
            default = None
        elif nosys.startswith(h_sys + prefix) and nosys.endswith(f.tail + after):
            default = nosys[len(h_sys + prefix):-len(f.tail + after)]
            if f.turn("system", prefix + default) + after != nosys:
                continue
        else:
            continue
        if BOS_MARK in prefix + (default or ""):
            continue
        return Chat(f, prefix, default, bos if lead and not runtime_bos else "")
    return None


def go_template(chat: Chat) -> str:
    """The family's fixed Ollama template, with the measured parts filled in."""
    f = chat.family
    for text in (chat.prefix, chat.default or ""):
        if "{{" in text or '"""' in text:
            raise ValueError(f"the chat template's system text {text!r} holds '{{{{' or '\"\"\"', which a Modelfile "
                             "TEMPLATE cannot hold literally; write the TEMPLATE by hand")
    t = chat.bos
    if chat.default is not None:
        t += "{{ if not .System }}" + f.turn("system", chat.prefix + chat.default) + "{{ end }}"
    t += "{{ range .Messages }}" + f.head.replace("{role}", "{{ .Role }}")
    if chat.prefix:
        t += '{{ if eq .Role "system" }}' + chat.prefix + "{{ end }}"
    return t + "{{ .Content }}" + f.tail + "{{ end }}" + f.head.replace("{role}", "assistant")


def _field(r, key: str, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def _token(r, key: str) -> str:
    """The text of the token whose id is stored under `key` ("" if none)."""
    i, tokens = _field(r, key), r.fields.get("tokenizer.ggml.tokens")
    return "" if i is None or tokens is None else tokens.contents(int(i))


def read_chat(gguf_path: str | Path) -> tuple[Chat, list[str]]:
    """(the chat layout, stop strings) from FILE's metadata; ValueError in one line if unusable."""
    from .export import read_gguf
    from .gguf_types import BY_ID
    path = Path(gguf_path)
    r = read_gguf(path)
    if "general.architecture" not in r.fields or not r.tensors:
        raise ValueError(f"{path} is a GGUF but not a model (no general.architecture); pass a model .gguf")
    ours = sorted({BY_ID[int(t.tensor_type)].name for t in r.tensors if int(t.tensor_type) in BY_ID})
    if ours:
        raise ValueError(f"{path} holds quant2gguf's own types ({', '.join(ours)}), which Ollama's llama.cpp cannot "
                         "load; make a stock file with `quant2gguf compat` and pass that")
    template = _field(r, "tokenizer.chat_template")
    if not template:
        raise ValueError(f"{path} has no tokenizer.chat_template; write the Modelfile TEMPLATE by hand "
                         "(Ollama's Modelfile docs) or convert the model with its tokenizer_config.json")
    bos, eos = _token(r, "tokenizer.ggml.bos_token_id"), _token(r, "tokenizer.ggml.eos_token_id")
    chat = detect(template, bos, eos, bool(_field(r, "tokenizer.ggml.add_bos_token", False)))
    if chat is None:
        raise ValueError(f"{path}: its chat template is none of the families we translate "
                         f"({', '.join(f.name for f in FAMILIES)}); write the Modelfile TEMPLATE by hand "
                         "in Ollama's Go-template syntax")
    stops = [*chat.family.stops, eos, _token(r, "tokenizer.ggml.eot_token_id")]
    return chat, [s for i, s in enumerate(stops) if s and s not in stops[:i]]


def _quote(s: str) -> str:
    if '"' in s or "\n" in s:
        raise ValueError(f"{s!r} cannot be a Modelfile value (quote or newline)")
    return f'"{s}"'


def modelfile_text(gguf_ref: str, chat: Chat, stops: list[str]) -> str:
    ref = _quote(gguf_ref) if re.search(r"\s", gguf_ref) else gguf_ref
    lines = [f"# quant2gguf ollama: chat template family {chat.family.name}", f"FROM {ref}",
             f'TEMPLATE """{go_template(chat)}"""']
    return "\n".join(lines + [f"PARAMETER stop {_quote(s)}" for s in stops]) + "\n"


def model_name(gguf_path: str | Path) -> str:
    """An Ollama model name from the file name (lowercase letters, digits, '.', '_', '-')."""
    return re.sub(r"[^a-z0-9._-]+", "-", Path(gguf_path).stem.lower()).strip("-._") or "model"


def write_modelfile(gguf_path: str | Path, out_dir: str | Path, force: bool = False,
                    name: str | None = None) -> dict:
    """DIR/Modelfile for FILE (atomically); refuses an existing Modelfile unless force."""
    # absolute but not resolved: a link inside DIR stays a relative FROM
    gguf_path, out_dir = Path(os.path.abspath(gguf_path)), Path(os.path.abspath(out_dir))
    mf = out_dir / "Modelfile"
    if mf.exists() and not force:
        raise FileExistsError(f"{mf} exists; pass --force to overwrite it")
    chat, stops = read_chat(gguf_path)
    # Ollama resolves a relative FROM against the Modelfile's folder
    inside = gguf_path.is_relative_to(out_dir)
    ref = "./" + gguf_path.relative_to(out_dir).as_posix() if inside else str(gguf_path)
    text = modelfile_text(ref, chat, stops)
    with atomic_path(mf) as tmp:
        tmp.write_text(text)
    create = f"ollama create {shlex.quote(name or model_name(gguf_path))} -f {shlex.quote(os.fspath(mf))}"
    return {"modelfile": str(mf), "family": chat.family.name, "from": ref, "stops": stops,
            "default_system": chat.default, "create": create}
