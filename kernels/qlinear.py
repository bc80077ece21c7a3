"""QuantLinear: an nn.Linear replacement running on packed 3-bit weights, and swap_linears.

On CUDA (or under TRITON_INTERPRET=1) forward runs qmatmul (GEMV kernel for <= 8 tokens, GEMM
kernel above); on CPU without the interpreter it dequantizes bit-exactly and calls F.linear.
"""
from __future__ import annotations

import torch
from torch import nn

from quant2gguf.quantizer import QuantizedWeight

from .qmatmul import PackedWeight, dequantize_packed, pack, qmatmul, qmatmul_torch, use_triton

_FIELDS = ("qweight", "scales", "offsets", "prot_rows", "prot_cols", "prot_delta", "prot_val", "prot_rowptr")
# floating buffers are kept as integer bit views so model.to(dtype) / .half() cannot round them
_VIEW = {"scales": torch.int16, "offsets": torch.int16, "prot_delta": torch.int32, "prot_val": torch.int16}
_BACK = {"scales": torch.float16, "offsets": torch.float16, "prot_delta": torch.float32, "prot_val": torch.float16}


class QuantLinear(nn.Module):
    def __init__(self, pw: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = pw.shape[1], pw.shape[0]
        self.bits, self.group_size, self.slots = pw.bits, pw.group_size, pw.slots
        for f in _FIELDS:
            t = getattr(pw, f)
            if t is not None and f in _VIEW:
                t = t.contiguous().view(_VIEW[f])
            self.register_buffer("_" + f, t, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       device: torch.device | str | None = None) -> "QuantLinear":
        if device is not None:
            qw = qw.to(device)
        return cls(pack(qw), None if bias is None else bias.to(qw.codes.device))

    def _get(self, f: str) -> torch.Tensor | None:
        t = getattr(self, "_" + f)
        return t.view(_BACK[f]) if t is not None and f in _BACK else t

    def _apply(self, *args, **kwargs):  # .to() / .cuda() / .half(): the cached views go stale
        self.__dict__["_pw_cache"] = None
        return super()._apply(*args, **kwargs)

    @property
    def packed(self) -> PackedWeight:
        """The buffers as a PackedWeight (built once and cached: decode calls forward per token)."""
        pw = self.__dict__.get("_pw_cache")
        if pw is None or pw.qweight is not self._qweight:
            pw = PackedWeight(*(self._get(f) for f in _FIELDS[:3]), self.bits, self.group_size,
                              (self.out_features, self.in_features), self.slots,
                              *(self._get(f) for f in _FIELDS[3:]))
            self.__dict__["_pw_cache"] = pw
        return pw

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (fp32), for code that inspects .weight (dtype/device probes)."""
        return dequantize_packed(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if use_triton(x):
            return qmatmul(x, self.packed, bias)
        return qmatmul_torch(x, self.packed, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, slots={self.slots}, bias={self.bias is not None}")


def swap_linears(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> nn.Module:
    """Replace each named nn.Linear (HF module names, e.g. model.layers.0.mlp.up_proj) by a
    QuantLinear on that linear's device; returns the model (modified in place)."""
    for name, qw in quantized.items():
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(mod).__name__}")
        if tuple(qw.shape) != (mod.out_features, mod.in_features):
            raise ValueError(f"{name}: quantized shape {tuple(qw.shape)} != linear "
                             f"{(mod.out_features, mod.in_features)}")
        new = QuantLinear.from_quantized(qw, mod.bias, device=mod.weight.device)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model
