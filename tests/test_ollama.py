"""`quant2gguf ollama`: the Modelfile's TEMPLATE, rendered as Ollama would render it, must give the
same prompt as the tokenizer's own apply_chat_template for the same messages.

Ollama cannot be installed here, so `go_render` below is a Go text/template subset covering what
ollama.go_template emits, and `ollama_prompt` does what Ollama's template.Execute does in its
`.Messages` mode: `.System` is every system message joined by a blank line, `.Messages` the
messages, and the runtime adds BOS when the GGUF says add_bos_token.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer
from typer.testing import CliRunner

from quant2gguf import ollama
from quant2gguf.cli import app

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
           "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen2.5-Instruct's template as shipped in the qwen15 fixture's GGUF (tools branch included)
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Meta-Llama-3-8B-Instruct's template
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama-3.1-Instruct's template without its tools branches: a dated preamble in a system turn that is always there
LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
GEMMA = ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + "
         "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

CHATML_VOCAB = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b"]
LLAMA_VOCAB = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "a"]
# name: template, vocab, bos id, eos id, add_bos_token, expected family
CASES = {
    "chatml": (CHATML, CHATML_VOCAB, 0, 2, False, "chatml"),
    "smollm2": (SMOLLM2, CHATML_VOCAB, 1, 2, False, "chatml"),  # SmolLM2's bos is <|im_start|>
    "qwen25": (QWEN25, CHATML_VOCAB, 0, 2, False, "chatml"),
    "llama3": (LLAMA3, LLAMA_VOCAB, 0, 4, True, "llama3"),
    "llama3-no-runtime-bos": (LLAMA3, LLAMA_VOCAB, 0, 4, False, "llama3"),
    "llama31": (LLAMA31, LLAMA_VOCAB, 0, 4, True, "llama3"),
}
CONVERSATIONS = [
    [("system", "You answer in French.\nBriefly."), ("user", "What is 2+2?")],
    [("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello! {not a go action}")],
    [("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Name a prime.")],
    [("user", "No system message here.")],
    [("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")],
]


# ----------------------------------------------------------------- Ollama, emulated in Python ----

ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _parse(src: str):
    """Go template source -> nested nodes: str | ("field", name) | ("if", cond, body, else) | ("range", expr, body)."""
    root, stack, pos, trim_next = [], [], 0, False
    cur = root
    for m in ACTION.finditer(src):
        text = src[pos:m.start()]
        text = text.lstrip() if trim_next else text
        cur.append(text.rstrip() if m.group(1) else text)
        trim_next, pos = bool(m.group(3)), m.end()
        words = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', m.group(2))
        if words[0] == "range":
            node = ("range", words[1], [])
            cur.append(node)
            stack.append(cur)
            cur = node[2]
        elif words[0] == "if":
            node = ("if", words[1:], [], [])
            cur.append(node)
            stack.append(cur)
            cur = node[2]
        elif words[0] == "else":
            parent = stack[-1][-1]
            assert parent[0] == "if" and len(words) == 1, "only plain else is emulated"
            cur = parent[3]
        elif words[0] == "end":
            cur = stack.pop()
        else:
            assert len(words) == 1 and words[0].startswith("."), f"unsupported action {m.group(0)!r}"
            cur.append(("field", words[0]))
    tail = src[pos:]
    cur.append(tail.lstrip() if trim_next else tail)
    assert not stack, "unclosed block"
    return root


def _value(word: str, dot: dict):
    if word.startswith('"'):
        return json.loads(word)  # Go's interpreted string literals: JSON escapes are a subset
    assert word.startswith(".") and "." not in word[1:], f"unsupported operand {word!r}"
    return dot[word[1:]]


def _cond(words: list[str], dot: dict) -> bool:
    if words[0] == "not":
        return not _cond(words[1:], dot)
    if words[0] in ("eq", "ne"):
        same = _value(words[1], dot) == _value(words[2], dot)
        return same if words[0] == "eq" else not same
    assert len(words) == 1, f"unsupported condition {words}"
    return bool(_value(words[0], dot))


def _exec(nodes, dot: dict) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif n[0] == "field":
            out.append(str(_value(n[1], dot)))
        elif n[0] == "if":
            out.append(_exec(n[2] if _cond(n[1], dot) else n[3], dot))
        else:
            out.extend(_exec(n[2], item) for item in _value(n[1], dot))
    return "".join(out)


def go_render(src: str, data: dict) -> str:
    return _exec(_parse(src), data)


def parse_modelfile(text: str) -> dict:
    tpl = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    return {"from": re.search(r"^FROM (.+)$", text, re.M).group(1), "template": tpl.group(1),
            "stops": [json.loads(s) for s in re.findall(r"^PARAMETER stop (.+)$", text, re.M)]}


def ollama_prompt(template: str, messages: list[dict], runtime_bos: str) -> str:
    """The prompt text Ollama's runner tokenizes, BOS included when the runtime adds it."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return runtime_bos + go_render(template, {"System": system, "Messages": msgs})


def test_go_render_subset():
    src = ('{{ if not .System }}none{{ else }}[{{ .System }}]{{ end }}{{ range .Messages }}'
           '{{ if eq .Role "user" }}U:{{ end }}{{ .Content }}|  {{- end }}')
    data = {"System": "", "Messages": [{"Role": "user", "Content": "a "}, {"Role": "bot", "Content": "b"}]}
    assert go_render(src, data) == "noneU:a |b|"
    assert go_render(src, {**data, "System": "s"}).startswith("[s]U:")
    with pytest.raises(AssertionError, match="unsupported"):
        go_render('{{ printf "%s" .System }}', data)  # what we do not emit is not emulated


# ---------------------------------------------------------------------------- the command ----

def write_gguf(path, template: str | None, vocab: list[str], bos: int, eos: int, add_bos: bool, ours: bool = False):
    """A model GGUF with just the metadata `ollama` reads (and one tensor, as a model has; with
    `ours`, a second one in our Q3_G64 type)."""
    from quant2gguf.export import vendored_gguf
    gguf = vendored_gguf()
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((len(vocab), 4), np.float32))
    if ours:
        from quant2gguf.gguf_types import TYPES, pack
        from quant2gguf.quantizer import quantize
        packed = pack(quantize(torch.randn(2, 64), 3, 64))
        w.add_tensor("blk.0.attn_q.weight", packed, raw_dtype=gguf.GGMLQuantizationType(TYPES["Q3_G64"].id))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference_tokenizer(template: str, vocab: list[str], bos: int, eos: int):
    tok = tiny_tokenizer()
    tok.chat_template = template
    tok.bos_token, tok.eos_token = vocab[bos], vocab[eos]
    return tok


@pytest.mark.parametrize("case", list(CASES))
def test_template_renders_like_the_tokenizer(case, tmp_path):
    template, vocab, bos, eos, add_bos, family = CASES[case]
    g = write_gguf(tmp_path / "m.gguf", template, vocab, bos, eos, add_bos)
    info = ollama.write_modelfile(g, tmp_path / "out")
    assert info["family"] == family
    mf = parse_modelfile((tmp_path / "out" / "Modelfile").read_text())
    tok = reference_tokenizer(template, vocab, bos, eos)
    for conv in CONVERSATIONS:
        msgs = [{"role": r, "content": c} for r, c in conv]
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(mf["template"], msgs, vocab[bos] if add_bos else "") == want, (case, conv)
    end = "<|im_end|>" if family == "chatml" else "<|eot_id|>"
    assert mf["stops"][0] == end and vocab[eos] in mf["stops"] and len(set(mf["stops"])) == len(mf["stops"])


def test_measured_parts(tmp_path):
    """SmolLM2's default system prompt, Llama 3.1's dated preamble, Llama 3's BOS (runtime or text)."""
    def chat(case):
        t, v, b, e, add, _ = CASES[case]
        return ollama.detect(t, v[b], v[e], add)
    assert chat("smollm2").default.startswith("You are a helpful AI assistant named SmolLM")
    assert chat("chatml").default is None and chat("chatml").prefix == ""
    assert chat("llama31").prefix.startswith("Cutting Knowledge Date") and chat("llama31").default == ""
    assert chat("llama3").bos == "" and chat("llama3-no-runtime-bos").bos == "<|begin_of_text|>"


def test_from_relative_inside_dir_absolute_outside(tmp_path):
    out = tmp_path / "out"
    inside = write_gguf(out / "sub" / "m.gguf", CHATML, CHATML_VOCAB, 0, 2, False)
    assert ollama.write_modelfile(inside, out)["from"] == "./sub/m.gguf"
    outside = write_gguf(tmp_path / "m.gguf", CHATML, CHATML_VOCAB, 0, 2, False)
    info = ollama.write_modelfile(outside, out, force=True)
    assert info["from"] == str(outside) and os.path.isabs(parse_modelfile(
        (out / "Modelfile").read_text())["from"])


def test_existing_modelfile_needs_force(tmp_path):
    g = write_gguf(tmp_path / "m.gguf", CHATML, CHATML_VOCAB, 0, 2, False)
    (tmp_path / "Modelfile").write_text("mine\n")
    with pytest.raises(FileExistsError, match="--force"):
        ollama.write_modelfile(g, tmp_path)
    assert (tmp_path / "Modelfile").read_text() == "mine\n"
    ollama.write_modelfile(g, tmp_path, force=True)
    assert (tmp_path / "Modelfile").read_text().startswith("# quant2gguf ollama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]  # no temp file left


def test_cli_prints_the_create_line(tmp_path):
    g = write_gguf(tmp_path / "My Model.gguf", SMOLLM2, CHATML_VOCAB, 1, 2, False)
    r = CliRunner().invoke(app, ["ollama", str(g), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == f"ollama create my-model -f {tmp_path / 'o' / 'Modelfile'}"
    assert parse_modelfile((tmp_path / "o" / "Modelfile").read_text())["from"] == f'"{g}"'


@pytest.mark.parametrize("template, msg", [
    (GEMMA, "none of the families we translate (chatml, llama3); write the Modelfile TEMPLATE by hand"),
    (None, "has no tokenizer.chat_template"),
    ("{{ raise_exception('no') }}", "none of the families"),
])
def test_unknown_template_refused_in_one_line(tmp_path, template, msg):
    g = write_gguf(tmp_path / "m.gguf", template, CHATML_VOCAB, 0, 2, False)
    r = CliRunner().invoke(app, ["ollama", str(g), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o" / "Modelfile").exists()


def test_our_own_types_refused(tmp_path):
    g = write_gguf(tmp_path / "m.gguf", CHATML, CHATML_VOCAB, 0, 2, False, ours=True)
    with pytest.raises(ValueError, match=r"quant2gguf's own types \(Q3_G64\).*quant2gguf compat"):
        ollama.write_modelfile(g, tmp_path)


def test_not_a_model_gguf_refused(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        ollama.write_modelfile(tmp_path / "x.gguf", tmp_path)


@pytest.mark.slow
def test_real_smollm2_gguf(tmp_path):
    """The fixture's own GGUF and the tokenizer transformers built from it."""
    from transformers import AutoTokenizer

    from quant2gguf.fixtures import fetch, gguf_file
    tok = AutoTokenizer.from_pretrained(fetch("smollm2"))
    info = ollama.write_modelfile(gguf_file("smollm2"), tmp_path)
    mf = parse_modelfile((tmp_path / "Modelfile").read_text())
    assert info["family"] == "chatml" and mf["stops"] == ["<|im_end|>", "<|im_start|>"]
    for conv in CONVERSATIONS:
        msgs = [{"role": r, "content": c} for r, c in conv]
        assert ollama_prompt(mf["template"], msgs, "") == tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True)
