"""Decoder layers streamed from the safetensors shards (`quantize --stream`).

The model is built with empty (meta) parameters; the embeddings, final norm and lm_head are read
from the shards at once, and each decoder layer's tensors only when the calibration driver reaches
it (and the layer after it, for LAQuant's lookahead). Once a layer is quantized its linear weights
are dropped (the checkpoint keeps their codes), so memory holds the small modules, at most two
layers and the activations: never the whole model. Layer-wise methods give the checkpoint of a
whole-model run bit for bit (tests/test_stream.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .arch import Arch, decoder_layers, get_module

STREAM_METHODS = ("rtn", "gptq", "awq", "loaq", "laquant")  # layer-wise, and never the whole model at once


class Shards:
    """Tensor name -> shard file of an HF folder's safetensors (one file or an index), read lazily."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open
            with safe_open(folder / "model.safetensors", "pt") as f:
                self.where = {k: folder / "model.safetensors" for k in f.keys()}
        else:
            raise ValueError(f"--stream: {folder} has no model.safetensors(.index.json); drop --stream")
        self._open: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        f = self.where[name]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        return self._open[f].get_tensor(name)


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    from accelerate.utils import set_module_tensor_to_device
    set_module_tensor_to_device(module, name, "cpu", value=value, dtype=value.dtype)  # not the meta's fp32


def empty_model(folder: str | Path, dtype):
    """The model of `folder` with every decoder layer's parameters on the meta device and the rest
    read from its shards (in `dtype`; "auto": as stored). Buffers (rotary tables) are computed as usual."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .arch import get_arch
    config = AutoConfig.from_pretrained(folder)
    arch = get_arch(config.model_type)
    with init_empty_weights():  # parameters on meta; buffers real
        model = AutoModelForCausalLM.from_config(config)
    shards = Shards(folder)
    prefix = arch.layers + "."
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if name.startswith(prefix):
            continue
        if name not in shards.where:
            if getattr(config, "tie_word_embeddings", False) and name.endswith("lm_head.weight"):
                continue  # tied: set by tie_weights below
            raise ValueError(f"--stream: {name} is not in {folder}'s shards under that name; drop --stream")
        t = shards.get(name)
        _set(model, name, t if dtype == "auto" else t.to(dtype))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model, LayerStream(model, arch, shards, dtype)


class LayerStream:
    """Loads decoder layer i from the shards when asked and drops its quantized linears' weights after."""

    def __init__(self, model, arch: Arch, shards: Shards, dtype):
        self.layers, self.arch, self.shards, self.dtype = decoder_layers(model, arch), arch, shards, dtype
        self.loaded: set[int] = set()
        self.max_resident = 0  # most layers holding weights at once (the manifest reports it)

    def load(self, i: int) -> nn.Module:
        layer = self.layers[i]
        if i not in self.loaded:
            for name, p in layer.named_parameters():
                if p.device.type != "meta":
                    continue
                full = f"{self.arch.layers}.{i}.{name}"
                if full not in self.shards.where:
                    raise ValueError(f"--stream: {full} is not in the model's shards under that name; drop --stream")
                t = self.shards.get(full)
                _set(layer, name, t if self.dtype == "auto" else t.to(self.dtype))
            self.loaded.add(i)
            self.max_resident = max(self.max_resident, len(self.loaded))
        return layer

    def drop(self, i: int, names) -> None:
        """Layer i is done: its quantized linears' weights go back to meta (the rest, norms and
        biases, stays: small, and saved in the checkpoint)."""
        for n in names:
            lin = get_module(self.layers[i], n)
            lin.weight = nn.Parameter(torch.empty_like(lin.weight, device="meta"), requires_grad=False)
        self.loaded.discard(i)
