"""Shared fixtures: tiny random models of every supported architecture, built from configs."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this when first imported, by whichever test module comes first: without a GPU,
# every Triton kernel runs in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ("llama", "qwen2", "qwen3")


def tiny_config(arch: str, hidden: int = 128, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                  max_position_embeddings=256, tie_word_embeddings=tie)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=hidden // 4, **common)
    # the architectures below are tested in test_archs.py only (not in ARCHS)
    if arch == "mistral":
        from transformers import MistralConfig
        return MistralConfig(sliding_window=None, **common)
    if arch == "gemma3_text":  # Gemma3ForCausalLM; llama.cpp scales queries by 1/sqrt(head_dim)
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig(head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4, pad_token_id=0,
                                bos_token_id=0, eos_token_id=0, **common)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        from transformers import Phi3Config
        return Phi3Config(pad_token_id=None, bos_token_id=0, eos_token_id=0, **common)
    raise ValueError(arch)


def make_tiny_model(arch: str, path, hidden: int = 128, layers: int = 2, seed: int = 0, tie: bool = False):
    """Save a tiny random model (with a byte-level tokenizer trained on nothing) to `path`;
    tie=True shares the embedding with lm_head (like SmolLM2 and Qwen2.5-1.5B)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden, layers, tie))
    with torch.no_grad():  # random init gives near-identical logits; spread the weights a bit
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_tokenizer():
    """A 512-token byte-level BPE tokenizer built offline (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog. 12 + 30 = 42."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model_dir(request, tmp_path_factory):
    """A saved tiny random model folder, one per supported architecture."""
    return make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_mha_dir(tmp_path_factory):
    """A tiny llama with multi-head attention (as many K/V heads as query heads): v_proj's outputs
    are o_proj's inputs, so AWQ's v_proj -> o_proj fold runs (the GQA configs above never take it)."""
    from transformers import AutoModelForCausalLM
    path = tmp_path_factory.mktemp("tiny-mha")
    cfg = tiny_config("llama")
    cfg.num_key_value_heads = cfg.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def seed_from_test_id(request) -> int:
    """Seed torch from the test's id, so a failure reproduces; the seed is printed (it shows in the
    failure's captured output). QUANT2GGUF_SEED=N draws other inputs."""
    import zlib
    s = int(os.environ.get("QUANT2GGUF_SEED", zlib.crc32(request.node.nodeid.encode())))
    torch.manual_seed(s)
    print(f"seed {s}")
    return s


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The tiny qwen2 model with a ChatML template (the tiny tokenizer has none): traces' chat regime."""
    from transformers import AutoTokenizer
    path = make_tiny_model("qwen2", tmp_path_factory.mktemp("chat-tiny"))
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return path
