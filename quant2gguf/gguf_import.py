"""`quant2gguf import`: a llama-quantize GGUF in stock types -> a quant2gguf checkpoint.

The file must have been made from MODEL (our F16 conversion of it, then llama-quantize, with or
without an importance matrix). Every decoder linear of MODEL is looked up in the file under the
name `quant2gguf convert` writes it (llama.cpp's converter: `filter_tensors` + `modify_tensors`
on an element-index probe, as export.py does); a row permutation the converter applied (llama's
q/k rope permutation) is undone, so the blocks are stored in HF row order and convert moves them
back to the file's order byte for byte. Each must be in a type stock_types.REGISTRY holds (Q3_K,
Q4_K, Q5_K, Q6_K, Q4_0, Q5_0, Q5_1, Q8_0): its raw blocks become a StockWeight (codes, scales as
llama-quantize stored them). Everything else (embeddings, norms, lm_head) is MODEL's own.

The manifest mirrors `quantize --method rtn --target T`'s (so `quantize --method kd --init CKPT`
and `convert CKPT` take it unchanged): method "import", target T the --target name the file's
general.file_type corresponds to (MOSTLY_Q3_K_S -> Q3_K_S; a file type with no such target: the
type holding most linear weights), bits / group_size T's base type's, fallbacks as llama-quantize's,
plus `import` (file, file type, sha256, imatrix metadata). checkpoint.save records every tensor's
type (`types`). Every input is checked before MODEL's weights load; the checkpoint is written to a
temp folder and renamed.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, stock_quant
from .stock_types import REGISTRY, stock_type

FIX = "re-quantize with llama-quantize --pure/--tensor-type or pick another type"


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # a field the reader cannot decode: treat as absent
        return default


def file_type_name(reader) -> str | None:
    """general.file_type as llama.cpp names it without MOSTLY_ (Q3_K_S, Q4_0 ...), None if absent."""
    from .export import vendored_gguf
    ft = _field(reader, "general.file_type")
    if ft is None:
        return None
    gguf = vendored_gguf()
    try:
        return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(int(ft))


def target_for(ftype: str | None, types: dict[str, str], sizes: dict[str, int]) -> str:
    """The --target name (stock_quant.TARGETS' value) `rtn --target` would have recorded for a file of
    llama-quantize type `ftype` whose linears have `types` (name -> type; sizes: name -> weights):
    the file type itself when it is a target (Q3_K_S, Q4_K_M, Q4_0 ...), a K type's _S variant its
    base type (Q5_K_S -> Q5_K), else the type holding most linear weights."""
    if ftype:
        name = stock_quant.TARGETS.get(ftype.lower())
        if name:
            return name
        if ftype.endswith("_S") and ftype[:-2] in REGISTRY:
            return ftype[:-2]
    weight: dict[str, int] = {}
    for n, t in types.items():
        weight[t] = weight.get(t, 0) + sizes[n]
    return max(weight, key=weight.get)


def check_import_args(path: str | os.PathLike, model: str, out: str | os.PathLike, force: bool = False):
    """(GGUF reader, model folder): FILE a readable GGUF, MODEL resolvable, OUT absent unless force.
    No model weights are read."""
    from .export import read_gguf
    from .fixtures import resolve_model
    path, out = Path(path), Path(out)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such GGUF file; pass the .gguf llama-quantize wrote")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass the .gguf file llama-quantize wrote")
    reader = read_gguf(path)  # a one-line ValueError for a foreign, truncated or corrupt file
    folder = resolve_model(str(model))
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it, or choose another -o")
    if out.resolve() == path.resolve():
        raise ValueError(f"-o {out} is the GGUF being imported; choose another -o")
    return reader, Path(folder)


def _meta_model(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .arch import get_arch
    config = AutoConfig.from_pretrained(folder)
    arch = get_arch(config.model_type)  # unsupported architectures fail here, the supported named
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return meta, arch


def gguf_names(folder: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[str, torch.Tensor]]:
    """HF linear name -> (its GGUF tensor name, rows) as `convert` writes it: GGUF row j holds HF row
    rows[j] (export.row_permutation of llama.cpp's converter on an element-index probe)."""
    from .export import _model_class, converter, row_permutation
    gguf, conversion = converter()
    cls = _model_class(conversion, folder)
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        conv = cls(folder, gguf.LlamaFileType.MOSTLY_F16, Path(d) / "unused.gguf")
        out = {}
        for hf, (n, k) in shapes.items():
            item = conv.filter_tensors((f"{hf}.weight", lambda: torch.zeros(0)))
            if item is None:
                raise ValueError(f"{hf}: llama.cpp's converter drops this tensor; it cannot be imported")
            name = item[0]
            bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
            probe = torch.arange(n * k, dtype=torch.int64).view(n, k)
            outs = list(conv.modify_tensors(probe, name, bid))
            if len(outs) != 1:
                raise ValueError(f"{hf}: llama.cpp's converter merges or splits this tensor; it cannot be imported")
            new_name, idx = outs[0]
            out[hf] = (new_name, row_permutation(hf, idx, (n, k)))
    return out


def _check_model_matches(reader, folder: Path, conv_arch: str | None, n_layers: int) -> None:
    arch = _field(reader, "general.architecture")
    if conv_arch and arch and arch != conv_arch:
        raise ValueError(f"the GGUF is a {arch} model, {folder} converts to {conv_arch}; import the file made from "
                         f"this model (`quant2gguf convert` / llama.cpp's converter, then llama-quantize)")
    blocks = _field(reader, f"{arch}.block_count") if arch else None
    if blocks is not None and int(blocks) != n_layers:
        raise ValueError(f"the GGUF has {int(blocks)} layers, {folder} has {n_layers}; import the file made from "
                         f"this model")


def plan(reader, folder: Path, path: Path) -> dict:
    """Every check on the file against MODEL's config (no weights read): HF linear -> (GGUF tensor,
    rows, type); raises one line naming the first tensor that is missing, misshapen or not importable."""
    from .arch import decoder_layers
    from .export import _model_class, converter
    meta, arch = _meta_model(folder)
    layers = decoder_layers(meta, arch)
    names = [f"{arch.layers}.{i}.{n}" for i in range(len(layers)) for n in arch.linears]
    shapes = {n: tuple(meta.get_submodule(n).weight.shape) for n in names}
    gguf, conversion = converter()
    conv_arch = gguf.MODEL_ARCH_NAMES.get(_model_class(conversion, folder).model_arch)
    _check_model_matches(reader, folder, conv_arch, len(layers))
    mapping = gguf_names(folder, shapes)
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for hf in names:
        name, rows = mapping[hf]
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{path}: no tensor {name} (MODEL's {hf}); import the file made from this model")
        tname = getattr(t.tensor_type, "name", str(int(t.tensor_type)))
        if tname not in REGISTRY:
            raise ValueError(f"{name} ({hf}) is {tname}; import takes {', '.join(REGISTRY)}; {FIX}")
        n, k = shapes[hf]
        if [int(s) for s in t.shape] != [k, n]:
            raise ValueError(f"{name} ({hf}) is {[int(s) for s in t.shape]} in the GGUF, MODEL's is [{k}, {n}] "
                             f"(ggml order); import the file made from this model")
        out[hf] = (name, rows, tname)
    return {"linears": out, "shapes": shapes, "meta": meta, "arch": arch}


def _blocks(t, rows: torch.Tensor, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """The tensor's blocks uint8 (N, row_bytes) in HF row order (copied out of the mapped file)."""
    n, k = shape
    cls = stock_type(qtype)
    data = np.asarray(t.data).view(np.uint8).reshape(n, -1)
    if data.shape[1] != k // cls.block_size * cls.type_size:
        raise ValueError(f"{t.name}: {data.shape[1]} bytes a row, {qtype} needs {k // cls.block_size * cls.type_size}; "
                         "the file is corrupt, re-create it")
    hf = np.empty_like(data)
    hf[rows.numpy()] = data  # GGUF row j is HF row rows[j]
    return torch.from_numpy(hf)


def _fallbacks(types: dict[str, str], target: str, meta, arch) -> tuple[dict, dict]:
    """(fallbacks, others): linears whose type is not the recipe's, "WANT -> GOT": where GOT is
    llama-quantize's fallback for WANT (as rtn --target records them), and any other difference
    (--tensor-type overrides, a file type with no recipe here)."""
    from .arch import decoder_layers
    n_layers, big = len(decoder_layers(meta, arch)), stock_quant.is_70b(meta, arch)
    fb, other = {}, {}
    for name, got in types.items():
        i = int(name[len(arch.layers) + 1:].split(".", 1)[0])
        want = stock_quant.recipe_type(name, target, i, n_layers, big)
        if got != want:
            (fb if stock_quant.LLAMA_FALLBACK.get(want) == got else other)[name] = f"{want} -> {got}"
    return fb, other


def import_gguf(path: str | os.PathLike, model: str, out: str | os.PathLike, force: bool = False) -> dict:
    """Write checkpoint `out` holding GGUF `path`'s decoder linears (stock types, blocks as stored) and
    MODEL's other tensors; returns a summary (target, file type, tensor types)."""
    from .cache import sha256
    from .pipeline import load_hf
    t0 = time.time()
    path, out = Path(path), Path(out)
    reader, folder = check_import_args(path, model, out, force)
    p = plan(reader, folder, path)
    tensors = {t.name: t for t in reader.tensors}
    types = {hf: qt for hf, (_, _, qt) in p["linears"].items()}
    sizes = {hf: n * k for hf, (n, k) in p["shapes"].items()}
    ftype = file_type_name(reader)
    target = target_for(ftype, types, sizes)
    base = stock_type(stock_quant.base_type(target))
    fallbacks, others = _fallbacks(types, target, p["meta"], p["arch"])
    imatrix = {k.removeprefix("quantize.imatrix."): v for k in reader.fields if k.startswith("quantize.imatrix.")
               if (v := _field(reader, k)) is not None}
    quantized = {}
    for hf, (name, rows, qt) in p["linears"].items():
        quantized[hf] = stock_quant.StockWeight(None, None, None, stock_type(qt).bits, stock_type(qt).sub, qtype=qt,
                                                blocks=_blocks(tensors[name], rows, qt, p["shapes"][hf]))
    del reader, tensors  # the file's map is not needed past the copies
    mdl, tok, folder = load_hf(model, dtype="auto")  # non-linear tensors: MODEL's own, as stored
    manifest = {
        "method": "import", "bits": base.bits, "group_size": base.block_size, "slots": 0, "target": target,
        **({"fallbacks": fallbacks} if fallbacks else {}),
        "options": {}, "arch": p["arch"].name, "source_model": str(model),
        # no calibration source of ours: kd --init takes any --calib
        "calibration": {"source": None, "imatrix": imatrix or None},
        "import": {"file": path.name, "path": str(path.resolve()), "file_type": ftype, "sha256": sha256(path),
                   "tensors": {hf: name for hf, (name, _, _) in p["linears"].items()},
                   **({"not_recipe": others} if others else {})},
        "device": "cpu", "seconds": round(time.time() - t0, 1),
    }
    checkpoint.save(out, mdl, tok, quantized, manifest, source=folder, replace=force)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {"checkpoint": str(out), "file": str(path), "file_type": ftype, "target": target,
            "linears": len(types), "types": dict(sorted(counts.items())),
            **({"fallbacks": len(fallbacks)} if fallbacks else {}), **({"not_recipe": others} if others else {})}
