"""One file per method; each exposes quantize_layer(ctx, **options) -> {linear name: QuantizedWeight}.
kd (distillation QAT) is end to end, not layer-wise: pipeline.quantize_model runs its init through
these layer methods first, then methods/kd.py on the whole model."""
from . import awq, gptq, laquant, loaq, quantlrm, rtn

METHODS = {"rtn": rtn.quantize_layer, "gptq": gptq.quantize_layer, "awq": awq.quantize_layer,
           "quantlrm": quantlrm.quantize_layer, "laquant": laquant.quantize_layer,
           "loaq": loaq.quantize_layer}
