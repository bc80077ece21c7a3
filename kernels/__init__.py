"""Triton kernels of the quantization loop (shipped as quant2gguf.kernels).

fakequant: learnable fake-quant for QAT (fused forward/backward, bit-exact with the reference).
qmatmul:   3-bit packing for GPU and dequant-matmul (GEMV for decode, GEMM / dequant+cuBLAS for prefill).
qlinear:   QuantLinear and swap_linears, so evaluation runs on the packed weights.
gptq:      GPTQ's column loop, one launch per block (methods/gptq.py uses it on CUDA).
Every kernel runs on CUDA or on CPU under TRITON_INTERPRET=1; without either, torch fallbacks run.
"""
from .fakequant import fake_quant
from .qlinear import QuantLinear, swap_linears
from .qmatmul import PackedWeight, dequantize_dense, dequantize_packed, pack, unpack

# the matmul itself is quant2gguf.kernels.qmatmul.qmatmul (re-exporting it would hide the module)
__all__ = ["fake_quant", "QuantLinear", "swap_linears", "PackedWeight", "pack", "unpack",
           "dequantize_dense", "dequantize_packed"]
