"""RTN baseline: asymmetric min-max per group, with an optional per-group clip search (weight MSE);
with a stock target (cfg.target), round-to-nearest on the stock type's grid fitted to the weight
(stock_quant; `clip` turns its parameter search on)."""
from __future__ import annotations

import torch

from .. import stock_quant
from ..calib import LayerContext
from ..quantizer import QuantizedWeight, quantize, search_clip


@torch.no_grad()
def quantize_weight(w: torch.Tensor, bits: int, group_size: int, clip: bool = True) -> QuantizedWeight:
    ratio = search_clip(w, bits, group_size) if clip else 1.0
    return quantize(w, bits, group_size, clip=ratio)


def quantize_layer(ctx: LayerContext, clip: bool = True) -> dict[str, QuantizedWeight]:
    c = ctx.cfg
    if c.target:
        return {name: stock_quant.quantize_rtn(ctx.linear(name).weight.data, stock_quant.linear_type(ctx, name),
                                               search=clip)
                for name in ctx.arch.linears}
    return {name: quantize_weight(ctx.linear(name).weight.data, c.bits, c.group_size, clip)
            for name in ctx.arch.linears}
