"""The one layer-by-layer calibration driver, for every architecture in arch.py.

It captures decoder-layer-0 inputs with a forward pre-hook, then walks the layers keeping two
streams side by side: X (inputs from the full-precision model) and X_hat (inputs when the layers
before are already quantized). For each layer it computes the FP target Y = F(X), hands a
LayerContext to the method, writes the method's dequantized weights into the layer and advances
X_hat through the quantized layer. Activations stay on the compute device unless `offload`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .arch import Arch, decoder_layers, get_module
from .quantizer import PackedCodes, QuantizedWeight, check_weight


COMPUTE = torch.float32  # layer-wise calibration computes in fp32 whatever dtype the model is held in


@dataclass
class QuantConfig:
    bits: int = 3
    group_size: int = 128
    slots: int = 0  # protected fp16 slots per group (0 = base type)
    target: str | None = None  # a stock llama.cpp type (stock_quant.TARGETS) instead of our Q3_G types
    types: dict[str, str] | None = None  # with a target: each decoder linear's stock type (stock_quant.check_model)


@dataclass
class LayerContext:
    index: int
    layer: nn.Module
    next_layer: nn.Module | None  # frozen FP layer l+1 (lookahead), on the store device
    arch: Arch
    cfg: QuantConfig
    fp_in: list[torch.Tensor]  # X per batch
    q_in: list[torch.Tensor]  # X_hat per batch
    fp_out: list[torch.Tensor]  # Y = F(X), computed before any weight changed
    kwargs: dict  # other decoder-layer arguments (rotary embeddings, mask)
    device: torch.device
    next_kwargs: dict | None = None  # next_layer's arguments (its mask/rotary may differ: gemma3)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # method-specific numbers for the manifest
    prequant: dict[str, torch.Tensor] = field(default_factory=dict)  # weights right before quantization

    def linear(self, name: str) -> nn.Linear:
        return get_module(self.layer, name)

    def forward(self, inputs: list[torch.Tensor], layer: nn.Module | None = None,
                hooks: dict[str, Callable[[torch.Tensor], None]] | None = None, keep: bool = True):
        """Run `layer` (default: this one) on each batch; hooks[name](x) sees each named linear's input."""
        kw = self.next_kwargs if layer is not None and layer is self.next_layer else self.kwargs
        return run_layer(layer or self.layer, inputs, kw, self.device, hooks, keep)

    def set_quantized(self, name: str, q: QuantizedWeight, prequant: torch.Tensor | None = None) -> None:
        """Record the result and make the layer compute with exactly the deployed weights.
        `prequant`: the weights that were rounded (default: the layer's current weights)."""
        lin = self.linear(name)
        self.prequant[name] = lin.weight.data.clone() if prequant is None else prequant
        lin.weight.data.copy_(q.dequantize().to(lin.weight.device, lin.weight.dtype))
        self.quantized[name] = q


def _unwrap(out):
    return out[0] if isinstance(out, tuple) else out


def param_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype a module computes in: its first floating parameter's (None: it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device: torch.device,
              hooks: dict[str, Callable[[torch.Tensor], None]] | None = None, keep: bool = True):
    """`layer` on each batch (outputs kept on the batch's device, in its dtype). A layer held in
    another dtype than the stream (a bf16 layer on the fp32 streams) sees its inputs and floating
    arguments in its own dtype: it runs, at its own precision. quantize_layers computes every layer
    it quantizes in COMPUTE; a method that runs another layer (laquant's lookahead) casts it too."""
    dt = param_dtype(layer)
    handles = []
    for name, fn in (hooks or {}).items():
        handles.append(get_module(layer, name).register_forward_hook(
            lambda _m, args, _out, fn=fn: fn(args[0].reshape(-1, args[0].shape[-1]))))
    try:
        outs, kw_dt = [], None
        for x in inputs:
            kw, xin = kwargs, x.to(device)
            if dt is not None and x.is_floating_point() and x.dtype != dt:
                kw_dt = _to_compute(kwargs, dt) if kw_dt is None else kw_dt
                kw, xin = kw_dt, xin.to(dt)
            y = _unwrap(layer(xin, **kw))
            if keep:
                outs.append(y.to(x.device, x.dtype))
        return outs if keep else None
    finally:
        for h in handles:
            h.remove()


class _Probe(nn.Module):
    """Stands in for decoder layer i during capture: records its keyword arguments (and layer 0's
    input) and returns the hidden state unchanged, so no layer computes."""

    def __init__(self, i: int, real: nn.Module, sink: list, inputs: list, store):
        super().__init__()
        self.i, self.sink, self.inputs, self.store = i, sink, inputs, store
        for k in ("attention_type", "layer_idx", "is_sliding", "sliding_window"):  # what model loops read
            if hasattr(real, k):
                setattr(self, k, getattr(real, k))

    def forward(self, hidden_states, *args, **kw):
        if self.i == 0:
            self.inputs.append(hidden_states.to(self.store, COMPUTE))
        self.sink[self.i] = kw
        return hidden_states


@torch.no_grad()
def capture_inputs(model, arch: Arch, batches: torch.Tensor, batch_size: int, device: torch.device,
                   store: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Decoder-layer-0 inputs per batch, and every layer's other arguments, without running any
    layer. Arguments are per layer: gemma3 gives its full-attention layers another mask and
    another rotary table than its sliding-window ones."""
    layers = decoder_layers(model, arch)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    inputs, per_layer = [], [None] * len(layers)
    parent, attr = arch.layers.rsplit(".", 1)
    holder = get_module(model, parent)
    setattr(holder, attr, nn.ModuleList([_Probe(i, l, per_layer, inputs, store) for i, l in enumerate(layers)]))
    try:
        for b in batches.split(batch_size):
            base(input_ids=b.to(device), use_cache=False)
    finally:
        setattr(holder, attr, layers)
    drop = ("past_key_values", "past_key_value", "cache")
    kwargs = [{**{k: v for k, v in kw.items() if k not in drop}, "use_cache": False} for kw in per_layer]
    return inputs, kwargs


def _non_layer_modules(model, arch: Arch, layers) -> list[nn.Module]:
    """The decoder's modules other than its layer list (embeddings, rotary, final norm)."""
    return [c for c in get_module(model, arch.layers.rsplit(".", 1)[0]).children() if c is not layers]


def check_model(model, arch: Arch, group_size: int) -> None:
    """Every linear must be quantizable at this group size with finite weights (errors name it)."""
    for i, layer in enumerate(decoder_layers(model, arch)):
        for name in arch.linears:
            check_weight(f"{arch.layers}.{i}.{name}", get_module(layer, name).weight.data, group_size)


Method = Callable[[LayerContext], dict[str, QuantizedWeight]]


@torch.no_grad()
def _rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(((x.float() - y.float()) ** 2).sum().item() for x, y in zip(a, b))
    den = sum((y.float() ** 2).sum().item() for y in b)
    return num / max(den, 1e-30)


_QW_FIELDS = ("codes", "scales", "offsets", "pidx", "pval")


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_layer_state(path: Path, layer: nn.Module, result: dict[str, QuantizedWeight], stats: dict) -> None:
    """One finished layer, atomically: its parameters other than the quantized weights (norms a
    method folded scales into), its QuantizedWeights, stats and the RNG state after it."""
    from .cache import atomic_path
    skip = {f"{n}.weight" for n in result}
    rec = {"params": {k: v.detach().cpu().clone() for k, v in layer.state_dict().items() if k not in skip},
           "quantized": {n: _qw_record(q) for n, q in result.items()},
           "stats": stats, "rng": _rng_state()}
    with atomic_path(path) as tmp:
        torch.save(rec, tmp)


def _qw_record(q: QuantizedWeight) -> dict:
    """A QuantizedWeight as plain tensors, its codes packed (packed_codes uint8 (N, row bytes) and k,
    quantizer.pack_codes' layout at its bits); a stock-type one (quantize --target) as its type and
    blocks, which hold everything else."""
    if getattr(q, "blocks", None) is not None:
        return {"qtype": q.qtype, "blocks": q.blocks.cpu()}
    pc = q.to("cpu").packed().stored_codes  # packed on the CPU: the path the tests cover
    return {"bits": q.bits, "group_size": q.group_size, "packed_codes": pc.data, "k": pc.k,
            **{f: getattr(q, f).cpu() for f in _QW_FIELDS if f != "codes" and getattr(q, f) is not None}}


def _qw_from_record(d: dict) -> QuantizedWeight:
    """_qw_record's inverse (codes kept packed); also reads a record with unpacked `codes` (older state)."""
    if "blocks" in d:
        from .stock_quant import from_blocks
        return from_blocks(d["qtype"], d["blocks"])
    d = dict(d)
    if "packed_codes" in d:
        d["codes"] = PackedCodes(d.pop("packed_codes"), d["bits"], d.pop("k"))
    return QuantizedWeight(**d).packed()


def load_layer_state(path: Path, layer: nn.Module) -> tuple[dict[str, QuantizedWeight], dict]:
    """Put a saved layer back exactly as the run left it; returns (its QuantizedWeights, stats)."""
    rec = torch.load(path, map_location="cpu", weights_only=True)
    quantized = {n: _qw_from_record(d) for n, d in rec["quantized"].items()}
    layer.load_state_dict(rec["params"], strict=False)
    for n, q in quantized.items():
        w = get_module(layer, n).weight
        w.data.copy_(q.dequantize().to(w.device, w.dtype))  # what set_quantized put there
    torch.set_rng_state(rec["rng"]["cpu"])
    if rec["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rec["rng"]["cuda"])
    return quantized, rec["stats"]


def quantize_layers(model, arch: Arch, batches: torch.Tensor, method: Method, cfg: QuantConfig,
                    device: str | torch.device = "cpu", batch_size: int = 4, offload: bool = False,
                    progress: Callable | None = None, state: Path | None = None, stream=None
                    ) -> tuple[dict[str, QuantizedWeight], list[dict]]:
    """Quantize every decoder layer in turn. Returns (full-name -> QuantizedWeight, per-layer stats).

    The model is modified in place: its linears end up holding the deployed dequantized weights
    (and any folded scales the method applied to norms). `offload` keeps layers and activations
    on CPU between uses, for GPUs too small for the model. With `state` (a folder), each finished
    layer is saved there and a layer already saved is restored instead of quantized again: the
    FP stream is recomputed through the original layer, the quantized stream through the restored
    one, so a resumed run continues exactly where an uninterrupted one would be. With `stream` (a
    stream.LayerStream over a model whose layers are empty), layer i (and i + 1, the lookahead) is read
    from the shards when reached and its quantized weights dropped once done.
    """
    device = torch.device(device)
    store = torch.device("cpu") if offload else device
    model.eval()
    if stream is None:  # streamed layers are checked as they load
        check_model(model, arch, cfg.group_size)
    layers = decoder_layers(model, arch)
    # A model loaded in bf16/fp16 (--dtype) stays so in memory; each layer, the embeddings and the
    # rotary tables compute in fp32, so the result is bit for bit the fp32-loaded run's.
    outer = _non_layer_modules(model, arch, layers)
    outer_dtype = {id(m): next((p.dtype for p in m.parameters()), None) for m in outer}
    if offload or stream is not None:  # only the small non-layer modules (embeddings, rotary, norm) on the device
        for child in outer:
            child.to(device, COMPUTE)
    else:
        model.to(device)
        for child in outer:
            child.to(COMPUTE)
        layers[0].to(device, COMPUTE)
    fp, kwargs = capture_inputs(model, arch, batches, batch_size, device, store)
    kwargs = [_to_compute(kw) for kw in kwargs]
    q = fp  # embeddings are not quantized: X_hat_0 = X_0
    quantized, stats = {}, []
    n = len(layers)
    for i in range(n):
        if stream is not None:
            stream.load(i)
            for name in arch.linears:
                check_weight(f"{arch.layers}.{i}.{name}", get_module(layers[i], name).weight.data, cfg.group_size)
            if i + 1 < n:
                stream.load(i + 1).to(store)  # the lookahead layer, where a whole-model run keeps it
        orig = next(layers[i].parameters()).dtype
        t0 = _clock(device)
        layer = layers[i].to(device, COMPUTE)
        fp_out = run_layer(layer, fp, kwargs[i], device)
        t1 = _clock(device)
        saved = None if state is None else Path(state) / f"layer-{i:04d}.pt"
        if saved is not None and saved.is_file():
            done, st = load_layer_state(saved, layer)
            st = {**st, "resumed": True}
            q_out = run_layer(layer, q, kwargs[i], device)
        else:
            ctx = LayerContext(i, layer, layers[i + 1] if i + 1 < n else None, arch, cfg, fp, q, fp_out, kwargs[i],
                               device, next_kwargs=kwargs[i + 1] if i + 1 < n else None)
            result = method(ctx)
            for name, qw in result.items():
                if name not in ctx.quantized:
                    ctx.set_quantized(name, qw)
            t2 = _clock(device)
            q_out = run_layer(layer, q, kwargs[i], device)
            # where a layer's time goes (FP forward, the method, the quantized forward): the manifest shows it
            st = {"layer": i, "out_rel_err": _rel_err(q_out, fp_out), **ctx.stats,
                  "seconds": {"fp_forward": round(t1 - t0, 3), "method": round(t2 - t1, 3),
                              "q_forward": round(_clock(device) - t2, 3)}}
            done = ctx.quantized
            if saved is not None:
                save_layer_state(saved, layer, done, st)
        for name, qw in done.items():
            # held packed (bits per code, not a byte; packed on the CPU) until the checkpoint is written;
            # a stock-type weight (StockWeight) as its blocks alone (codes and grid unpack from them)
            quantized[f"{arch.layers}.{i}.{name}"] = qw.to("cpu").packed()
            # the linear's weight is never saved (its codes are): back to the load dtype, memory with it.
            # Norms and biases stay fp32, exactly what the quantized stream saw (AWQ folds into them)
            lin = get_module(layer, name)
            lin.weight.data = lin.weight.data.to(orig)
        stats.append(st)
        if offload or stream is not None:
            layers[i].to("cpu")
        if stream is not None:
            stream.drop(i, done)
        fp, q = fp_out, q_out
        if progress:
            progress(i, st)
    for child in outer:  # unchanged by any method: back to the load dtype exactly
        if outer_dtype[id(child)] is not None:
            child.to(outer_dtype[id(child)])
        if stream is not None:
            child.to("cpu")  # the model cannot move as a whole: its dropped weights are on meta
    return quantized, stats


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _to_compute(obj, dtype: torch.dtype = COMPUTE):
    """Floating tensors (rotary cos/sin, masks) of a layer's keyword arguments in `dtype` (default: COMPUTE)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_compute(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_compute(v, dtype) for k, v in obj.items()}
    return obj
