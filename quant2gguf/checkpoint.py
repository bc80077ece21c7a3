"""The quantized checkpoint: a self-describing folder, all that eval and convert need.

    CKPT/
      config.json, generation_config.json, tokenizer*   the HF model's own files
      model.safetensors     every tensor that is not a quantized linear weight (embeddings, norms
                            with any folded AWQ scales, biases, lm_head), HF names, original dtype
      quant.safetensors     per quantized linear NAME (HF module name, e.g. model.layers.0.mlp.up_proj):
                              NAME.codes   uint8 (N, ceil(K/8)*bits) codes packed to `bits` bits a code
                                           (quantizer.pack_codes: a little-endian bit stream per row,
                                           padded to whole chunks of 8 codes); the file's header metadata
                                           holds NAME.codes -> {"bits": b, "shape": [N, K]}. Version 1
                                           checkpoints (still read) held them unpacked, uint8 (N, K).
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
Written to a temp folder and renamed, so a failed run leaves nothing behind. Read lazily
(safetensors safe_open, one tensor at a time): QuantizedTensors.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .cache import atomic_path
from .quantizer import PackedCodes, QuantizedWeight, packed_row_bytes
from .stock_quant import StockWeight, from_blocks
from .stock_types import stock_type

FORMAT = "quant2gguf-ckpt"
VERSION = 2  # 2: codes packed to `bits` bits (1: one uint8 a code, still read)
READS = (1, 2)
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


def _carry_added_tokens(source: Path, dest: Path) -> None:
    """Entries of the source's tokenizer_config added_tokens_decoder that save_pretrained dropped: pieces
    that are plain vocabulary in tokenizer.json but user-defined for sentencepiece (gemma3's 165
    newline / space runs and tags). llama.cpp's converter reads their type only from there; without
    them it tokenizes runs of spaces differently from the original model."""
    src, dst = source / "tokenizer_config.json", dest / "tokenizer_config.json"
    if not (src.is_file() and dst.is_file()):
        return
    want = json.loads(src.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
    cfg = json.loads(dst.read_text(encoding="utf-8"))
    have = cfg.get("added_tokens_decoder") or {}
    missing = {k: v for k, v in want.items() if k not in have}
    if missing:
        cfg["added_tokens_decoder"] = dict(sorted({**have, **missing}.items(), key=lambda kv: int(kv[0])))
        dst.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save(path: str | os.PathLike, model, tokenizer, quantized: dict[str, QuantizedWeight], manifest: dict,
         source: str | os.PathLike | None = None, replace: bool = False) -> Path:
    """Save `model` (its quantized linears' weights are ignored) and `quantized` atomically; the
    SOURCE_FILES the HF folder `source` has are copied too. replace: an existing `path` goes only once
    the new checkpoint is complete."""
    path = Path(path)
    if path.exists() and not replace:
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
        if tokenizer is not None and source is not None:
            _carry_added_tokens(Path(source), tmp)
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
        qt, types, meta = {}, {}, {"format": FORMAT, "version": str(VERSION)}
        for name, q in quantized.items():
            if isinstance(q, StockWeight):  # the blocks hold everything: codes and grid unpack from them
                qt[f"{name}.blocks"] = q.blocks.cpu().contiguous()
                types[name] = q.qtype
                continue
            pc = q.packed().stored_codes  # packs one weight at a time if the caller held them unpacked
            qt[f"{name}.codes"] = pc.data.cpu().contiguous()
            meta[f"{name}.codes"] = json.dumps({"bits": pc.bits, "shape": list(pc.shape)})
            qt[f"{name}.scales"] = q.scales.cpu().contiguous()
            qt[f"{name}.offsets"] = q.offsets.cpu().contiguous()
            if q.pidx is not None:
                qt[f"{name}.pidx"] = q.pidx.cpu().contiguous()
                qt[f"{name}.pval"] = q.pval.cpu().contiguous()
        save_file(qt, tmp / "quant.safetensors", metadata=meta)
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
    if man.get("format") != FORMAT or man.get("version") not in READS:
        raise ValueError(f"{path}: unknown checkpoint format {man.get('format')} v{man.get('version')}")
    return man


class QuantizedTensors(Mapping):
    """A checkpoint's quantized linears, NAME -> QuantizedWeight (codes as stored: packed from version 2
    on, unpacked in version 1) or StockWeight, read from quant.safetensors (safe_open) each time one is
    looked up: nothing is cached, so a caller that handles one weight at a time never holds them all.
    Checks every name's tensors are present when made (ValueError naming a missing one); header(NAME)
    gives the weight's shapes alone."""

    def __init__(self, path: str | os.PathLike, man: dict):
        self.path, self.man = Path(path), man
        self.names = list(man["quantized"])
        self.types = man.get("types", {})
        try:
            self._f = safe_open(self.path / "quant.safetensors", "pt")
        except FileNotFoundError:
            raise ValueError(f"{self.path}: quant.safetensors is missing; re-run `quant2gguf quantize`") from None
        self._keys = set(self._f.keys())
        self._meta = self._f.metadata() or {}
        for name in self.names:
            want = ("blocks",) if name in self.types else ("codes", "scales", "offsets")
            missing = [f"{name}.{s}" for s in want if f"{name}.{s}" not in self._keys]
            if missing:
                raise ValueError(f"{self.path}: checkpoint is missing {', '.join(missing)}; re-run `quant2gguf quantize`")

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name) -> bool:
        return name in self.names

    def _codes_info(self, name: str) -> tuple[int, tuple[int, int]] | None:
        """(bits, (N, K)) of NAME's packed codes; None for a version 1 checkpoint (codes unpacked)."""
        if self.man["version"] == 1:
            return None
        info = self._meta.get(f"{name}.codes")
        if info is None:
            raise ValueError(f"{self.path}: quant.safetensors has no bits/shape for {name}.codes; the checkpoint is "
                             "corrupt, re-run `quant2gguf quantize`")
        info = json.loads(info)
        return int(info["bits"]), tuple(int(x) for x in info["shape"])

    def _shape(self, key: str) -> tuple:
        return tuple(self._f.get_slice(key).get_shape())

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name not in self.names:
            raise KeyError(name)
        get = self._f.get_tensor
        if name in self.types:
            return from_blocks(self.types[name], get(f"{name}.blocks"))
        codes, info = get(f"{name}.codes"), self._codes_info(name)
        if info is not None:
            bits, (n, k) = info
            if tuple(codes.shape) != (n, packed_row_bytes(k, bits)) or codes.dtype != torch.uint8:
                raise ValueError(f"{self.path}: {name}.codes {tuple(codes.shape)} is not {n} rows of {k} packed "
                                 f"{bits}-bit codes; the checkpoint is corrupt, re-run `quant2gguf quantize`")
            codes = PackedCodes(codes, bits, k)
        p = f"{name}.pidx" in self._keys
        return QuantizedWeight(codes, get(f"{name}.scales"), get(f"{name}.offsets"), self.man["bits"],
                               self.man["group_size"], get(f"{name}.pidx") if p else None,
                               get(f"{name}.pval") if p else None)

    def header(self, name: str) -> QuantizedWeight:
        """NAME's weight with every tensor on the meta device: shapes, bits, group size, slots, type;
        reads no data."""
        e = lambda shape, dt: torch.empty(shape, dtype=dt, device="meta")  # noqa: E731
        if name in self.types:
            cls = stock_type(self.types[name])
            n, row = self._shape(f"{name}.blocks")
            k = row // cls.type_size * cls.block_size
            return StockWeight(e((n, k), torch.uint8), e((n, k // cls.sub), torch.float32),
                               e((n, k // cls.sub), torch.float32), cls.bits, cls.sub, qtype=cls.qtype.name,
                               blocks=e((n, row), torch.uint8))
        info = self._codes_info(name)
        shape = self._shape(f"{name}.codes") if info is None else info[1]
        pidx = f"{name}.pidx" in self._keys
        return QuantizedWeight(e(shape, torch.uint8), e(self._shape(f"{name}.scales"), torch.float16),
                               e(self._shape(f"{name}.offsets"), torch.float16), self.man["bits"],
                               self.man["group_size"], e(self._shape(f"{name}.pidx"), torch.uint8) if pidx else None,
                               e(self._shape(f"{name}.pval"), torch.float16) if pidx else None)


def load_quantized(path: str | os.PathLike, lazy: bool = False) -> tuple[dict, dict[str, QuantizedWeight]]:
    """The manifest and every quantized linear (codes held packed), read one tensor at a time.
    lazy: a QuantizedTensors instead of a dict (each weight read when looked up). Raises ValueError
    naming a missing tensor."""
    path = Path(path)
    man = read_manifest(path)
    tensors = QuantizedTensors(path, man)
    if lazy:
        return man, tensors
    return man, {name: q.packed() for name, q in tensors.items()}


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
