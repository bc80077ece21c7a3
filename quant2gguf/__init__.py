"""quant2gguf: 3-bit quantization of reasoning LLMs, exported to a custom GGUF type for a patched llama.cpp."""
__version__ = "0.1.0"
