"""The quantized checkpoint: a self-describing folder, all that eval and convert need.

    CKPT/
      config.json, generation_config.json, tokenizer*   the HF model's own files
      model.safetensors     every tensor that is not a quantized linear weight (embeddings, norms
                            with any folded AWQ scales, biases, lm_head), HF names, original dtype
      quant.safetensors     per quantized linear NAME (HF module name, e.g. model.layers.0.mlp.up_proj):
                              NAME.codes   uint8 (N, K)      unpacked codes
                              NAME.scales  fp16  (N, K//G)   d
                              NAME.offsets fp16  (N, K//G)   m
                              NAME.pidx    uint8 (N, K//G, P) protected in-group index, 255 = empty (optional)
                              NAME.pval    fp16  (N, K//G, P) protected exact value (optional)
                            or, for a tensor in a stock llama.cpp type (quantize --target):
                              NAME.blocks  uint8 (N, row_bytes) its ggml blocks, verbatim in the GGUF
      manifest.json         format, method, bits, group_size, slots, calibration, versions,
                            quantized (list of NAME), per-layer errors, source model; with --target
                            also target (the type or recipe name, Q3_K / Q3_K_M) and types (NAME ->
                            stock type of each NAME.blocks: the recipe's choice or its fallback),
                            fallbacks (NAME -> "WANT -> GOT", as llama-quantize's, if any), bits and
                            group_size the target's (a recipe's base type's)
Written to a temp folder and renamed, so a failed run leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .cache import atomic_path
from .quantizer import QuantizedWeight
from .stock_quant import StockWeight, from_blocks

FORMAT = "quant2gguf-ckpt"
VERSION = 1
MANIFEST = "manifest.json"


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def versions() -> dict:
    import transformers

    from . import __version__
    return {"quant2gguf": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


# tokenizer files save_pretrained of a fast tokenizer does not write, which llama.cpp's converter reads
# (phi3 and other sentencepiece models: _set_vocab_sentencepiece needs tokenizer.model)
SOURCE_FILES = ("tokenizer.model",)


def save(path: str | os.PathLike, model, tokenizer, quantized: dict[str, QuantizedWeight], manifest: dict,
         source: str | os.PathLike | None = None) -> Path:
    """Save `model` (its quantized linears' weights are ignored) and `quantized` atomically; the
    SOURCE_FILES the HF folder `source` has are copied too."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it or choose another -o")
    with atomic_path(path, is_dir=True) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in SOURCE_FILES if source is not None else ():
            if (Path(source) / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(Path(source) / name, tmp / name)
        skip = {f"{n}.weight" for n in quantized}
        # tied weights share storage and safetensors refuses aliases: keep the first name
        plain, seen = {}, set()
        for k, v in model.state_dict().items():
            if k in skip:  # (a streamed run left these on the meta device)
                continue
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if key in seen:
                continue
            seen.add(key)
            plain[k] = v.detach().cpu().contiguous().clone()
        save_file(plain, tmp / "model.safetensors")
        qt, types = {}, {}
        for name, q in quantized.items():
            if isinstance(q, StockWeight):  # the blocks hold everything: codes and grid unpack from them
                qt[f"{name}.blocks"] = q.blocks.cpu().contiguous()
                types[name] = q.qtype
                continue
            qt[f"{name}.codes"] = q.codes.cpu().contiguous()
            qt[f"{name}.scales"] = q.scales.cpu().contiguous()
            qt[f"{name}.offsets"] = q.offsets.cpu().contiguous()
            if q.pidx is not None:
                qt[f"{name}.pidx"] = q.pidx.cpu().contiguous()
                qt[f"{name}.pval"] = q.pval.cpu().contiguous()
        save_file(qt, tmp / "quant.safetensors")
        man = {"format": FORMAT, "version": VERSION, **manifest, "quantized": sorted(quantized),
               **({"types": dict(sorted(types.items()))} if types else {}), "versions": versions()}
        (tmp / MANIFEST).write_text(json.dumps(man, indent=1))
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        man = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a quant2gguf checkpoint (no {MANIFEST}); run `quant2gguf quantize` first")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / MANIFEST} is corrupt ({e}); re-run `quant2gguf quantize`")
    if man.get("format") != FORMAT or man.get("version") != VERSION:
        raise ValueError(f"{path}: unknown checkpoint format {man.get('format')} v{man.get('version')}")
    return man


def load_quantized(path: str | os.PathLike) -> tuple[dict, dict[str, QuantizedWeight]]:
    """The manifest and every quantized linear. Raises ValueError naming a missing tensor."""
    path = Path(path)
    man = read_manifest(path)
    t = load_file(path / "quant.safetensors")
    out, types = {}, man.get("types", {})
    for name in man["quantized"]:
        if name in types:
            if f"{name}.blocks" not in t:
                raise ValueError(f"{path}: checkpoint is missing {name}.blocks; re-run `quant2gguf quantize`")
            out[name] = from_blocks(types[name], t[f"{name}.blocks"])
            continue
        missing = [f"{name}.{s}" for s in ("codes", "scales", "offsets") if f"{name}.{s}" not in t]
        if missing:
            raise ValueError(f"{path}: checkpoint is missing {', '.join(missing)}; re-run `quant2gguf quantize`")
        out[name] = QuantizedWeight(t[f"{name}.codes"], t[f"{name}.scales"], t[f"{name}.offsets"],
                                    man["bits"], man["group_size"], t.get(f"{name}.pidx"), t.get(f"{name}.pval"))
    return man, out


def load_model(path: str | os.PathLike, dtype=torch.float32, device="cpu"):
    """(model, tokenizer, manifest, quantized) with every quantized linear set to its deployed
    dequantized weight, so plain PyTorch evaluates exactly what llama.cpp will run (stock-type
    tensors through gguf-py's dequantization of their blocks, bit-exact with ggml)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    man, quantized = load_quantized(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = load_file(path / "model.safetensors")
    for name, q in quantized.items():
        sd[f"{name}.weight"] = q.dequantize().to(dtype)
    res = model.load_state_dict(sd, strict=False)
    model.tie_weights()
    tied = {k for k in res.missing_keys if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    missing = sorted(set(res.missing_keys) - tied)
    if missing:
        raise ValueError(f"{path}: checkpoint is missing tensors {missing[:5]}; re-run `quant2gguf quantize`")
    model = model.to(device=device, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok, man, quantized
