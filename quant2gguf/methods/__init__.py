"""One file per method; each exposes quantize_layer(ctx, **options) -> {linear name: QuantizedWeight}."""
from . import awq, gptq, laquant, quantlrm, rtn

METHODS = {"rtn": rtn.quantize_layer, "gptq": gptq.quantize_layer, "awq": awq.quantize_layer,
           "quantlrm": quantlrm.quantize_layer, "laquant": laquant.quantize_layer}
