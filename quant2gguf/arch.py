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


@dataclass(frozen=True)
class Arch:
    name: str
    layers: str  # attribute path of the decoder layer list, from the CausalLM model
    groups: tuple[Group, ...]
    kv: tuple[str, str] = ("self_attn.k_proj", "self_attn.v_proj")  # what fills the KV cache

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.linears)


_ATTN_MLP = (
    Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Group("self_attn.v_proj", ("self_attn.o_proj",)),
    Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Group("mlp.up_proj", ("mlp.down_proj",)),
)

# qwen2 differs by q/k/v biases, qwen3 by q/k RMSNorm after the projections: neither changes
# where inputs come from, so all three share one description.
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "model.layers", _ATTN_MLP),
    "qwen2": Arch("qwen2", "model.layers", _ATTN_MLP),
    "qwen3": Arch("qwen3", "model.layers", _ATTN_MLP),
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
