"""Architectures as data: where the decoder layers live and how their linears are grouped.

A group is a set of linears that read the same input, in the order they must be quantized (later
groups see the already-quantized earlier ones). `prev` is the module whose output is that input:
a norm or a linear, into which an input-channel scale can be folded at no runtime cost (AWQ).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    prev: str  # module (relative to the layer) producing the shared input
    linears: tuple[str, ...]  # linears (relative to the layer) reading it
    # (i, n): the input is chunk i of n equal row chunks of `prev`'s output (a fused producer:
    # phi3's gate_up_proj -> down_proj reads the up half, (1, 2)); (0, 1): all of it
    prev_part: tuple[int, int] = (0, 1)


@dataclass(frozen=True)
class Arch:
    name: str
    layers: str  # attribute path of the decoder layer list, from the CausalLM model
    groups: tuple[Group, ...]
    kv: tuple[str, ...] = ("self_attn.k_proj", "self_attn.v_proj")  # what fills the KV cache
    norm_offset: float = 0.0  # a norm computes x_hat * (norm_offset + weight) (gemma: 1)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.linears)


_ATTN_MLP = (
    Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Group("self_attn.v_proj", ("self_attn.o_proj",)),
    Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Group("mlp.up_proj", ("mlp.down_proj",)),
)

# gemma3: the attention output goes through post_attention_layernorm before the residual add, and
# the MLP reads pre_feedforward_layernorm's output; its RMSNorms scale by (1 + weight).
_GEMMA3 = (
    _ATTN_MLP[0],
    _ATTN_MLP[1],
    Group("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    _ATTN_MLP[3],
)

# phi3: q/k/v fused in qkv_proj (rows q, k, v) and gate/up in gate_up_proj (rows gate, up), kept
# fused by llama.cpp too. o_proj's input is the v rows: the last third of qkv_proj's output only
# with as many K/V heads as query heads (AWQ folds only then); down_proj's input is the up half.
_PHI3 = (
    Group("input_layernorm", ("self_attn.qkv_proj",)),
    Group("self_attn.qkv_proj", ("self_attn.o_proj",), prev_part=(2, 3)),
    Group("post_attention_layernorm", ("mlp.gate_up_proj",)),
    Group("mlp.gate_up_proj", ("mlp.down_proj",), prev_part=(1, 2)),
)

# qwen2 differs by q/k/v biases, qwen3 by q/k RMSNorm after the projections, mistral by nothing
# (a sliding window in some configs): none changes where inputs come from, so they share one
# description. gemma3_text is the text-only Gemma3ForCausalLM (Gemma3ForConditionalGeneration,
# model_type gemma3, nests its layers elsewhere and is not supported).
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "model.layers", _ATTN_MLP),
    "qwen2": Arch("qwen2", "model.layers", _ATTN_MLP),
    "qwen3": Arch("qwen3", "model.layers", _ATTN_MLP),
    "mistral": Arch("mistral", "model.layers", _ATTN_MLP),
    "gemma3_text": Arch("gemma3_text", "model.layers", _GEMMA3, norm_offset=1.0),
    # K and V are slices of qkv_proj's output: its whole output stands in for them (with Q)
    "phi3": Arch("phi3", "model.layers", _PHI3, kv=("self_attn.qkv_proj",)),
}


def get_arch(model_type: str) -> Arch:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise ValueError(f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHS))}") from None


def get_module(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def decoder_layers(model, arch: Arch):
    return get_module(model, arch.layers)
