"""`quant2gguf convert`: a quantized checkpoint folder -> one GGUF file for the patched llama.cpp.

llama.cpp's own converter (the `conversion` model classes of the pinned tree, with that tree's
gguf-py) writes the metadata, the tokenizer and every tensor that is not a quantized linear. A thin
subclass of the architecture's converter class takes over the quantized linears: it learns the
converter's row transform for that tensor (e.g. llama's q/k rope permutation) by passing a tensor
of element indices through the converter's own `modify_tensors`, applies that permutation to the
codes, scales, offsets and protected slots, and writes our packed blocks. A tensor the checkpoint
holds in a stock llama.cpp type (quantize --target) is written with that ggml type and its stored
blocks verbatim (rows moved whole), so an unpatched llama.cpp and plain gguf-py read the file.
With fuse_qkv a layer's q, k and v (same type and width) are written as one attn_qkv tensor, their rows
stacked: the pinned llama.cpp loads a fused QKV for every architecture here and runs one mat-vec instead of
three, the same rows and so the same outputs. By default (fuse_qkv None) that is done where q, k and v are our
types, which need the patched llama.cpp anyway; a stock-type file keeps the layout every runtime reads. The file
is written to a temp name, read back and checked against the checkpoint, then renamed. Rules: docs/GGUF.md.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, gguf_types
from .cache import atomic_path
from .quantizer import PackedCodes, QuantizedWeight
from .stock_quant import StockWeight
from .stock_types import stock_type

# --outtype -> the converter's file type; it decides every tensor that is not ours (docs/GGUF.md)
OUTTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
# (bits, group size, protected slots) -> our ggml type name (ggml_patches/README.md)
QTYPES = {(3, 128, 0): "Q3_G128", (3, 64, 0): "Q3_G64", (3, 128, 2): "Q3_G128P", (3, 64, 2): "Q3_G64P"}
SAMPLE_ROWS = 16  # rows per quantized tensor re-dequantized from the written file
# --embd-type: type of token_embd and output (lm_head), set by llama-quantize after conversion
EMBD_TYPES = ("keep", "q8_0", "q6_k", "q5_k", "q4_k", "auto")
AUTO_REF = "IQ3_S"  # `auto` = what llama-quantize gives these tensors in a stock file of this type
EMBD_TENSORS = ("token_embd.weight", "output.weight")
META_PREFIX = "quant2gguf."
# general.file_type of a file whose weights are mostly one stock type: the all-that-type variant
STOCK_FTYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_K": "MOSTLY_Q4_K_S", "Q3_K": "MOSTLY_Q3_K_S", "Q5_K": "MOSTLY_Q5_K_S",
                "Q6_K": "MOSTLY_Q6_K"}


# ---------------------------------------------------------------- the pinned tree's gguf-py ----

def _load_package(name: str, folder: Path):
    """Import folder/__init__.py as top-level package `name` (no sys.path change)."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        _drop_modules(name)
        raise
    return mod


def _drop_modules(name: str) -> None:
    for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[k]


def _ensure_package(name: str, folder: Path):
    mod = sys.modules.get(name)
    if mod is not None and Path(mod.__file__).resolve().parent == folder.resolve():
        return mod
    _drop_modules(name)
    return _load_package(name, folder)


def vendored_gguf():
    """The pinned tree's gguf-py, imported as `gguf` for the whole process, with our types registered.

    The PyPI `gguf` release differs from the tree's (constants, tensor name maps), and the
    converter must run against its own; the tree's is a superset, so it replaces any PyPI one
    already imported. Everything here that reads or writes GGUF goes through this."""
    from . import llama
    mod = _ensure_package("gguf", llama.source_dir() / "gguf-py" / "gguf")
    gguf_types.register()
    return mod


def converter():
    """(gguf, conversion): the pinned tree's converter package and its gguf-py."""
    from . import llama
    gguf = vendored_gguf()
    return gguf, _ensure_package("conversion", llama.source_dir() / "conversion")


# ------------------------------------------------------------------------------ validation ----

def read_gguf(path: str | Path):
    """GGUFReader over `path`, or a one-line ValueError for a missing, foreign or truncated file."""
    path = Path(path)
    _check_magic(path)
    gguf = vendored_gguf()
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises many kinds on a cut-off or corrupt file
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None


@dataclasses.dataclass
class GGUFTensor:
    name: str
    shape: tuple          # ggml order (ne0 first), as GGUFReader's
    tensor_type: object   # gguf.GGMLQuantizationType (an int where the enum lacks it)
    n_elements: int
    n_bytes: int
    path: Path
    offset: int           # absolute, in the file

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes, memory-mapped: uint8 [rows, bytes per row]."""
        rows = self.n_elements // int(self.shape[0]) if self.shape else 1
        return np.memmap(self.path, np.uint8, "r", self.offset, (rows, self.n_bytes // max(rows, 1)))


@dataclasses.dataclass
class GGUFHeader:
    fields: dict          # scalar key -> value; an array key -> its item count
    tensors: list         # GGUFTensor


# value type id -> struct format of a scalar (8 = string, 9 = array)
_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def scan_gguf(path: str | Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF without parsing its arrays (tensor bytes memory-mapped on
    access), after checking that every tensor's type is known and its bytes are in the file. GGUFReader
    builds a numpy view per vocabulary string: ~10 s of one core, holding the GIL, for Qwen's 151,936
    tokens, before every tool run and twice per conversion. Errors as read_gguf's."""
    import mmap
    path = Path(path)
    _check_magic(path)
    gguf = vendored_gguf()  # our types registered (gguf_types)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            fields, table, pos = _parse_header(buf)
        except (struct.error, KeyError, UnicodeDecodeError) as e:
            raise _corrupt(path, f"{type(e).__name__}: {e}") from None
        size = len(buf)
    align = int(fields.get("general.alignment", 32))
    start = -(-pos // align) * align
    tensors = []
    for name, dims, ttype, off in table:
        if ttype not in gguf.GGML_QUANT_SIZES:
            raise _corrupt(path, f"tensor {name} has type id {ttype}")
        block, nbytes = gguf.GGML_QUANT_SIZES[ttype]
        n_el = int(np.prod(dims, dtype=np.int64))
        t = GGUFTensor(name, dims, _qtype(gguf, ttype), n_el, n_el // block * nbytes, path, start + off)
        if t.offset + t.n_bytes > size:
            raise _corrupt(path, f"{size} bytes, tensor {name} ends at {t.offset + t.n_bytes}")
        tensors.append(t)
    return GGUFHeader(fields, tensors)


def _qtype(gguf, ttype: int):
    try:
        return gguf.GGMLQuantizationType(ttype)
    except ValueError:
        return ttype


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is truncated or corrupt, or holds tensor types this llama.cpp does not know "
                      f"({why}); re-create it (`quant2gguf convert`)")


def _parse_header(buf) -> tuple[dict, list, int]:
    """(fields, [(name, dims, type id, data offset)], end of the tensor table) of a GGUF (v2/v3, little-endian)."""
    pos = 24  # magic, version, tensor count, key count
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v if len(v) > 1 else v[0]

    def string():
        nonlocal pos
        n = take("<Q")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8")

    fields = {}
    for _ in range(n_kv):
        key, vt = string(), take("<I")
        if vt == 8:
            fields[key] = string()
        elif vt != 9:
            fields[key] = take(_GGUF_SCALAR[vt])
        else:
            it, n = take("<IQ")
            if it == 8:  # strings: walk the lengths
                for _ in range(n):
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            else:
                pos += n * struct.calcsize(_GGUF_SCALAR[it])
            fields[key] = n
    table = []
    for _ in range(n_tensors):
        name, nd = string(), take("<I")
        dims = tuple(struct.unpack_from(f"<{nd}Q", buf, pos))
        pos += 8 * nd
        table.append((name, dims, *take("<IQ")))
    return fields, table, pos


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic {magic!r}); pass a .gguf written by `quant2gguf convert`"
                         " or llama.cpp's converter")


def _type_name(t) -> str:
    return getattr(t, "name", str(int(t)))


def _check_quantized(reader, expected: dict[str, tuple[QuantizedWeight, int]], path: Path) -> None:
    """Every quantized tensor present with our type and shape, and a sample of its rows dequantizing
    bit-exactly to the checkpoint's own dequantization (rows already in GGUF order)."""
    tensors = {t.name: t for t in reader.tensors}
    for name, (q, qtype) in expected.items():
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{path}: quantized tensor {name} missing after writing; report this as a bug")
        n, k = q.shape
        if int(t.tensor_type) != qtype or [int(s) for s in t.shape] != [k, n]:
            raise ValueError(f"{path}: {name} reads back as {_type_name(t.tensor_type)} {list(t.shape)}, "
                             f"expected type {qtype} [{k}, {n}]; report this as a bug")
        rows = sample_rows(n)
        data = np.asarray(t.data).reshape(n, -1)[rows]
        sub = q.sample if isinstance(q, LazyBlocks) else _take_rows(q, torch.from_numpy(rows))
        if sub is None:
            raise ValueError(f"{path}: {name} was never written; report this as a bug")
        if isinstance(sub, StockWeight):
            if not np.array_equal(data.view(np.uint8), sub.blocks.numpy()):
                raise ValueError(f"{path}: {name} blocks differ from the checkpoint's; report this as a bug")
            got = stock_type(sub.qtype).dequantize(data).reshape(len(rows), k)
        else:
            got = np.asarray(gguf_types.dequantize(data, qtype, (len(rows), k)), dtype=np.float32)
        want = sub.dequantize().numpy()
        if got.shape != want.shape or not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            bad = int((got != want).sum()) if got.shape == want.shape else got.size
            raise ValueError(f"{path}: {name} dequantizes differently from the checkpoint ({bad} values); "
                             "report this as a bug")


# ------------------------------------------------------------------- quantized linears -------

def qtype_for(q: QuantizedWeight) -> int:
    """The ggml type id for a quantized weight: a StockWeight's stock type, else ours (fewer
    protected slots than the type holds are padded with empty ones by gguf_types.pack)."""
    if isinstance(q, StockWeight):
        return int(stock_type(q.qtype).qtype)
    slots = 0 if q.slots == 0 else 2 if q.slots <= 2 else q.slots
    name = QTYPES.get((q.bits, q.group_size, slots))
    if name is None:
        have = ", ".join(f"W{b}G{g}" + (f" with {s} protected slots" if s else "") for b, g, s in QTYPES)
        raise ValueError(f"no GGUF type for W{q.bits}G{q.group_size} with {q.slots} protected slots per group "
                         f"(types: {have}); re-quantize with one of those settings")
    return gguf_types.TYPES[name].id


ROW_FIELDS = ("codes", "scales", "offsets", "pidx", "pval", "blocks")  # per-row tensors (blocks: StockWeight)


def _take_rows(q: QuantizedWeight, rows: torch.Tensor) -> QuantizedWeight:
    if isinstance(q, StockWeight):  # its blocks hold everything: their rows, lean (nothing unpacked)
        return q.rows(rows)
    c = q.stored_codes  # packed codes: whole rows move without unpacking
    return dataclasses.replace(q, codes=c.rows(rows) if isinstance(c, PackedCodes) else c[rows].contiguous(),
                               **{f: getattr(q, f)[rows].contiguous() for f in ROW_FIELDS
                                  if f != "codes" and getattr(q, f, None) is not None})


def sample_rows(n: int) -> np.ndarray:
    """The rows of an n-row tensor that _check_quantized re-dequantizes from the written file."""
    return np.unique(np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).astype(np.int64))


def _blocks(q: QuantizedWeight, qtype: int) -> np.ndarray:
    packed = q.blocks.numpy() if isinstance(q, StockWeight) else gguf_types.pack(q, qtype)
    return np.ascontiguousarray(packed, dtype=np.uint8)


def _loaded(load, shape: tuple[int, int], qtype: int) -> QuantizedWeight:
    """load(), refused if it no longer has the shape and type the writer was told."""
    q = load()
    if tuple(q.shape) != tuple(shape) or qtype_for(q) != qtype:
        raise ValueError(f"quantized tensor changed while converting: {q.shape} type {qtype_for(q)}, "
                         f"expected {tuple(shape)} type {qtype}")
    return q


class LazyBlocks:
    """A quantized tensor's GGUF blocks uint8 (N, row_bytes) for GGUFWriter.add_tensor, made only when
    the writer writes them (tofile: `load` reads the weight from the checkpoint, rows in GGUF order)
    and dropped after, so convert holds one quantized tensor at a time. `shape` (the weight's (N, K)),
    `sample` (sample_rows of the weight, once written) are for _check_quantized."""

    dtype = np.dtype(np.uint8)

    def __init__(self, load, shape: tuple[int, int], qtype: int, row_bytes: int):
        self.load, self.shape, self.qtype = load, tuple(shape), qtype
        self.nbytes = self.shape[0] * row_bytes
        self.blocks = _BlocksView(self, (self.shape[0], row_bytes))
        self.sample = None

    def tofile(self, f) -> None:
        q = _loaded(self.load, self.shape, self.qtype)
        packed = _blocks(q, self.qtype)
        if packed.nbytes != self.nbytes:
            raise ValueError(f"packed {packed.nbytes} bytes, expected {self.nbytes}; report this as a bug")
        self.sample = _take_rows(q, torch.from_numpy(sample_rows(self.shape[0])))
        packed.tofile(f)


class _BlocksView:
    """What GGUFWriter sees of a LazyBlocks: shape, dtype and nbytes of the blocks, and tofile."""

    def __init__(self, owner: LazyBlocks, shape: tuple[int, int]):
        self.owner, self.shape, self.dtype, self.nbytes = owner, shape, owner.dtype, owner.nbytes

    def tofile(self, f) -> None:
        self.owner.tofile(f)


def _cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """The rows of `parts` stacked in order, as one weight (packed codes and stock blocks stay packed)."""
    a = parts[0]
    if isinstance(a, StockWeight):
        return a._lean(torch.cat([p.blocks for p in parts]))
    codes = [p.stored_codes for p in parts]
    if all(isinstance(c, PackedCodes) for c in codes):
        cat = PackedCodes(torch.cat([c.data for c in codes]), codes[0].bits, codes[0].k)
    else:
        cat = torch.cat([p.codes for p in parts])
    return dataclasses.replace(a, codes=cat, **{f: torch.cat([getattr(p, f) for p in parts]) for f in ROW_FIELDS
                                                if f != "codes" and getattr(a, f, None) is not None})


class FusedBlocks(LazyBlocks):
    """Several weights of one type and width written as one tensor, rows stacked in order (fuse_qkv);
    `loads` as LazyBlocks' `load`, one per part, each read and packed when the writer writes."""

    def __init__(self, loads, shapes: list[tuple[int, int]], qtype: int, row_bytes: int):
        super().__init__(None, (sum(n for n, _ in shapes), shapes[0][1]), qtype, row_bytes)
        self.loads, self.shapes = loads, [tuple(s) for s in shapes]

    def tofile(self, f) -> None:
        parts = [_loaded(load, shape, self.qtype) for load, shape in zip(self.loads, self.shapes)]
        packed = np.concatenate([_blocks(q, self.qtype) for q in parts])
        if packed.nbytes != self.nbytes:
            raise ValueError(f"packed {packed.nbytes} bytes, expected {self.nbytes}; report this as a bug")
        rows, start, picks = torch.from_numpy(sample_rows(self.shape[0])), 0, []
        for q, (n, _) in zip(parts, self.shapes):  # the sampled rows of the stack, from the part holding each
            mine = rows[(rows >= start) & (rows < start + n)] - start
            if len(mine):
                picks.append(_take_rows(q, mine))
            start += n
        self.sample = _cat_rows(picks)
        packed.tofile(f)


def _row_bytes(q: QuantizedWeight, qtype: int) -> int:
    return int(q.blocks.shape[1]) if isinstance(q, StockWeight) else gguf_types.qtype(qtype).row_bytes(q.shape[1])


def row_permutation(name: str, idx: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """From a converter output of the element-index tensor arange(N*K).view(N, K), the source row of
    each output row. Groups run along the input dim, so only whole-row moves can be applied to
    packed blocks; anything touching columns is refused."""
    n, k = shape
    idx = torch.as_tensor(np.asarray(idx)) if not isinstance(idx, torch.Tensor) else idx
    if tuple(idx.shape) != (n, k):
        raise ValueError(f"{name}: llama.cpp's converter reshapes this tensor {shape} -> {tuple(idx.shape)}, which "
                         "cannot be done on packed groups; leave it unquantized")
    idx = idx.long()
    rows = idx[:, 0] // k
    ok = torch.equal(idx, rows.view(-1, 1) * k + torch.arange(k).view(1, -1))
    if not ok or not torch.equal(rows.sort().values, torch.arange(n)):
        raise ValueError(f"{name}: llama.cpp's converter moves columns of this tensor, which cannot be done on "
                         "packed groups along the input dim; leave it unquantized")
    return rows


def _byte_level_bpe(folder: Path) -> bool:
    """tokenizer.json holds a byte-level BPE (GPT-2 style) tokenizer."""
    import json
    try:
        tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (tj.get("model") or {}).get("type") == "BPE" and "ByteLevel" in json.dumps(tj.get("pre_tokenizer"))


QKV = re.compile(r"blk\.(\d+)\.attn_([qkv])\.weight")  # what fuse_qkv stacks, as blk.N.attn_qkv.weight


def _exporter_class(base, gguf, quantized: dict[str, QuantizedWeight], tokenizer_pre: str | None,
                    extra_kv: dict[str, object], fuse_qkv: bool | None = None):
    """A subclass of the architecture's converter class that writes quantized linears as our types.
    `quantized`: a dict, or checkpoint.QuantizedTensors (read one weight at a time, shapes from header)."""

    class Exporter(base):
        model_arch = base.model_arch

        def index_tensors(self, remote_hf_model_id=None):
            tensors = super().index_tensors(remote_hf_model_id)
            self.q_by_name, self.written, self.qkv = {}, {}, {}
            for hf in quantized:
                # the real weight is never read: modify_tensors writes packed blocks instead
                item = self.filter_tensors((f"{hf}.weight", lambda: torch.zeros(0)))
                if item is None:
                    raise ValueError(f"{hf}: llama.cpp's converter drops this tensor; it cannot be exported")
                tensors[item[0]] = item[1]
                self.q_by_name[item[0]] = hf
            return tensors

        def modify_tensors(self, data_torch, name, bid):
            hf = self.q_by_name.get(name)
            if hf is None:
                return super().modify_tensors(data_torch, name, bid)
            self._write_quantized(hf, name, bid)
            return []

        def _write_quantized(self, hf: str, name: str, bid):
            # shapes only here (a lazy checkpoint's header); the data is read, rows moved and packed when
            # the writer writes the tensor (LazyBlocks), one tensor at a time
            head = quantized.header(hf) if hasattr(quantized, "header") else quantized[hf]
            n, k = head.shape
            probe = torch.arange(n * k, dtype=torch.int64).view(n, k)
            outs = list(super().modify_tensors(probe, name, bid))
            if len(outs) != 1:
                raise ValueError(f"{hf}: llama.cpp's converter merges or splits this tensor; leave it unquantized")
            new_name, idx = outs[0]
            rows = row_permutation(hf, idx, (n, k))
            moved = not torch.equal(rows, torch.arange(n))
            qtype = qtype_for(head)
            load = lambda: _take_rows(quantized[hf], rows) if moved else quantized[hf]  # noqa: E731
            part = (load, (n, k), qtype, _row_bytes(head, qtype))
            fuse = qtype in gguf_types.BY_ID if fuse_qkv is None else fuse_qkv  # None: where ours
            m = QKV.fullmatch(new_name) if fuse else None
            if m is None:
                return self._add(new_name, LazyBlocks(*part))
            self.qkv.setdefault(m[1], {})[m[2]] = (new_name, part)
            self._fuse(m[1])

        def _add(self, name: str, lazy: LazyBlocks) -> None:
            self.gguf_writer.add_tensor(name, lazy.blocks, raw_dtype=gguf.GGMLQuantizationType(lazy.qtype))
            self.written[name] = (lazy, lazy.qtype)

        def _fuse(self, bid: str, final: bool = False) -> None:
            """Layer bid's q, k, v as one attn_qkv once all three are here, if one type and width hold them;
            otherwise (or a layer left incomplete at the end) each on its own."""
            got = self.qkv.get(bid, {})
            if len(got) < 3 and not final:
                return
            parts = [got[x][1] for x in "qkv" if x in got]
            if len(parts) == 3 and len({(p[2], p[1][1]) for p in parts}) == 1:  # one type, one width
                _, _, qtype, row_bytes = parts[0]
                self._add(f"blk.{bid}.attn_qkv.weight",
                          FusedBlocks([p[0] for p in parts], [p[1] for p in parts], qtype, row_bytes))
            else:  # e.g. Q3_K_M's attn_v of a higher type than q and k
                for x in "qkv":
                    if x in got:
                        self._add(got[x][0], LazyBlocks(*got[x][1]))
            self.qkv.pop(bid, None)

        def get_vocab_base_pre(self, tokenizer):
            return tokenizer_pre or super().get_vocab_base_pre(tokenizer)

        def set_vocab(self):
            # phi3's converter takes tokenizer.json only under tokenizer_class GPT2Tokenizer (Phi-4)
            # and otherwise wants a sentencepiece tokenizer.model; transformers re-saves such a
            # tokenizer as another class (TokenizersBackend), so a checkpoint of a byte-level BPE
            # phi3 without tokenizer.model takes the converter's GPT-2 path here, as Phi-4's does.
            if base.model_arch == gguf.MODEL_ARCH.PHI3 and not (self.dir_model / "tokenizer.model").is_file() \
                    and _byte_level_bpe(self.dir_model):
                return self._set_vocab_gpt2()
            return super().set_vocab()

        def prepare_metadata(self, vocab_only):
            for bid in list(self.qkv):  # tensors are done: a layer without all of q, k, v writes them apart
                self._fuse(bid, final=True)
            if self.written:  # general.file_type names the type holding most weights (tensors are done)
                sizes: dict[int, int] = {}
                for q, qtype in self.written.values():
                    sizes[qtype] = sizes.get(qtype, 0) + q.shape[0] * q.shape[1]
                top = max(sizes, key=sizes.get)
                stock = STOCK_FTYPES.get(gguf.GGMLQuantizationType(top).name)
                recipe = f"MOSTLY_{extra_kv.get('target')}"  # a mixed recipe target (Q3_K_M) names its own
                if recipe in gguf.LlamaFileType.__members__:
                    stock = recipe
                self.ftype = gguf.LlamaFileType[stock] if stock else gguf.LlamaFileType(top)
            super().prepare_metadata(vocab_only)
            for key, val in extra_kv.items():
                if isinstance(val, int):
                    self.gguf_writer.add_uint32(META_PREFIX + key, val)
                else:
                    self.gguf_writer.add_string(META_PREFIX + key, str(val))

    Exporter.__name__ = f"Quant2gguf{base.__name__}"
    return Exporter


# ------------------------------------------------------------------------- checkpoint ---------

def _expected_tensors(ckpt: Path, quantized: dict[str, QuantizedWeight]) -> None:
    """Raise ValueError if the checkpoint lacks a tensor the model needs or a shape disagrees."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    try:
        with safe_open(ckpt / "model.safetensors", "pt") as f:
            plain = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise ValueError(f"{ckpt}: model.safetensors is missing; re-run `quant2gguf quantize`") from None
    have = dict(plain, **{f"{n}.weight": q.shape for n, q in quantized.items()})
    missing = sorted(set(shapes) - set(have))
    if missing:
        raise ValueError(f"{ckpt}: checkpoint is missing {len(missing)} tensor(s) ({', '.join(missing[:3])}); "
                         "re-run `quant2gguf quantize`")
    for n, q in quantized.items():
        want = shapes.get(f"{n}.weight")
        g = q.group_size
        if want != q.shape or tuple(q.scales.shape) != (q.shape[0], q.shape[1] // g) \
                or tuple(q.offsets.shape) != tuple(q.scales.shape):
            raise ValueError(f"{ckpt}: {n} codes {q.shape} / scales {tuple(q.scales.shape)} do not fit the model's "
                             f"{want}; the checkpoint is corrupt, re-run `quant2gguf quantize`")


def _model_class(conversion, ckpt: Path):
    hparams = conversion.ModelBase.load_hparams(ckpt, False)
    arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    try:
        return conversion.get_model_class(arch)
    except NotImplementedError:
        raise ValueError(f"{ckpt}: architecture {arch} is not supported by llama.cpp's converter (pinned tree); "
                         "use a model llama.cpp can run") from None


# ------------------------------------------------------------------------------ convert -------

def convert(ckpt: str | Path, out: str | Path, outtype: str = "f16", tokenizer_pre: str | None = None,
            embd_type: str = "keep", threads: int = 2, fuse_qkv: bool | None = None) -> dict:
    """Write checkpoint `ckpt` as GGUF `out`; returns size, tensor counts per type, the type of each
    class of tensors that are not ours, bits per weight and every tensor's type.

    outtype: type of the tensors not quantized by design (docs/GGUF.md). embd_type: type of
    token_embd and output (lm_head) instead: "keep" (outtype's), a ggml type (q8_0, q6_k, q5_k,
    q4_k), "auto" (what llama-quantize gives them in a stock IQ3_S file) or "auto:TYPE" (... in a
    stock TYPE file); set by the patched llama-quantize, which copies every other tensor unchanged.
    tokenizer_pre forces llama.cpp's BPE pre-tokenizer name (e.g. "gpt-2") for tokenizers its
    converter does not know. fuse_qkv: each layer's q, k, v as one attn_qkv tensor; None (default): where
    they are our types (module docstring)."""
    ckpt = Path(ckpt)
    _embd_ref(embd_type)  # refuse a bad value before any work
    man, quantized = checkpoint.load_quantized(ckpt, lazy=True)  # each weight read when written
    heads = {n: quantized.header(n) for n in quantized}  # shapes only
    _expected_tensors(ckpt, heads)
    for q in heads.values():
        qtype_for(q)  # refuse unsupported settings before any writing
    kv = {"method": man.get("method", "?"), "bits": int(man["bits"]), "group_size": int(man["group_size"]),
          "format_version": int(man["version"])}
    if man.get("target"):
        kv["target"] = man["target"]
    return _write_gguf(ckpt, Path(out), outtype, quantized, tokenizer_pre, kv, embd_type, threads, fuse_qkv)


def convert_hf(folder: str | Path, out: str | Path, outtype: str = "f16", tokenizer_pre: str | None = None) -> dict:
    """A plain HF model folder -> GGUF with llama.cpp's converter alone (FP16/F32/Q8_0 baselines)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return _write_gguf(folder, Path(out), outtype, {}, tokenizer_pre, {})


def _write_gguf(folder: Path, out: Path, outtype: str, quantized: dict[str, QuantizedWeight],
                tokenizer_pre: str | None, kv: dict, embd_type: str = "keep", threads: int = 2,
                fuse_qkv: bool | None = None) -> dict:
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the .gguf file to write")
    gguf, conversion = converter()
    cls = _exporter_class(_model_class(conversion, folder), gguf, quantized, tokenizer_pre, kv, fuse_qkv)
    with atomic_path(out) as tmp, torch.inference_mode():
        model = cls(folder, getattr(gguf.LlamaFileType, OUTTYPES[outtype]), tmp)
        try:
            model.write()
        except NotImplementedError as e:
            if "pre-tokenizer" in str(e):
                raise ValueError(f"{folder}: llama.cpp's converter does not recognise this BPE pre-tokenizer; pass "
                                 "tokenizer_pre (e.g. 'gpt-2' for a GPT-2 style byte-level BPE) if you know which it is") from None
            raise ValueError(f"{folder}: llama.cpp's converter cannot convert this model: {e}") from None
        reader = scan_gguf(tmp)
        if embd_type == "keep":
            _check_quantized(reader, model.written, out)
        else:  # set_embd_types checks ours in the file that replaces this one
            with atomic_path(tmp) as requant:  # the converter's file stays only if llama-quantize fails
                _, reader = set_embd_types(tmp, requant, embd_type, model.written, out, threads, before=reader)
        info = _summary(reader, model.written)
        info["size"] = tmp.stat().st_size
        info["size_mib"] = round(info["size"] / 2**20, 2)
    info["path"] = str(out)
    return info


# ------------------------------------------------------- token_embd / output by llama-quantize ----

def _embd_ref(embd_type: str) -> str | None:
    """The stock llama-quantize type whose choice `auto[:TYPE]` copies (None for a fixed type)."""
    if embd_type in EMBD_TYPES:
        return AUTO_REF if embd_type == "auto" else None
    if embd_type.startswith("auto:") and len(embd_type) > 5:
        return embd_type[5:].upper()
    raise ValueError(f"embd_type {embd_type!r} is not one of {', '.join(EMBD_TYPES)} or auto:TYPE (a llama-quantize type)")


_DRY_LINE = re.compile(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =\s*[0-9.]+ MiB(?: ->\s*[0-9.]+ MiB \((\w+)\))?")


def parse_dry_run(text: str) -> dict[str, str]:
    """tensor name -> ggml type name that `llama-quantize --dry-run` chose (its current type if kept)."""
    return {m.group(1): (m.group(3) or m.group(2)).upper() for m in _DRY_LINE.finditer(text)}


def embd_targets(reader, embd_type: str, src: Path, threads: int = 2) -> dict[str, str]:
    """token_embd / output tensor name -> the ggml type name it gets: a fixed type, or for auto what
    `llama-quantize --dry-run` chooses at the reference stock type (so the rule stays llama.cpp's)."""
    gguf = vendored_gguf()
    present = {t.name: t for t in reader.tensors if t.name in EMBD_TENSORS}
    ref = _embd_ref(embd_type)
    if ref is None:
        want = {n: embd_type.upper() for n in present}
    else:
        from . import runner
        r = runner._run([runner._tool("llama-quantize"), "--dry-run", src, ref, threads], need=r"quant size")
        chosen = parse_dry_run(r.stderr + r.stdout)
        missing = [n for n in present if n not in chosen]
        if missing:
            raise RuntimeError(f"llama-quantize --dry-run {ref} printed no type for {', '.join(missing)}:\n"
                               f"{(r.stderr + r.stdout)[-2000:]}")
        want = {n: chosen[n] for n in present}
    for name, tname in want.items():
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tname]][0]
        width = int(present[name].shape[0])
        if width % block:
            raise ValueError(f"{name} rows have {width} values, not a multiple of {tname}'s block of {block}; "
                             "use embd_type auto (llama-quantize's fallback) or q8_0")
    return want


def _check_unchanged(before, after, skip: set[str], path: Path) -> None:
    """Every tensor but `skip` present in `after` with the same type and bytes as in `before`."""
    got = {t.name: t for t in after.tensors}
    if set(got) != {t.name for t in before.tensors}:
        raise ValueError(f"{path}: llama-quantize added or dropped tensors; report this as a bug")
    for t in before.tensors:
        if t.name in skip:
            continue
        u = got[t.name]
        same = int(u.tensor_type) == int(t.tensor_type) and \
            np.array_equal(np.asarray(u.data).reshape(-1).view(np.uint8), np.asarray(t.data).reshape(-1).view(np.uint8))
        if not same:
            raise ValueError(f"{path}: llama-quantize changed {t.name} ({_type_name(t.tensor_type)} -> "
                             f"{_type_name(u.tensor_type)}); report this as a bug")


def set_embd_types(src: Path, dst: Path, embd_type: str, written: dict, path: Path, threads: int = 2,
                   before=None) -> tuple[dict[str, str], object]:
    """Copy GGUF `src` to `dst` with token_embd/output re-quantized by the patched llama-quantize;
    returns (tensor -> type set, a reader of `dst`). `before`: a reader of `src` already open.

    Its ftype is our type (the file's general.file_type), every other matrix is pinned to its
    current type with --tensor-type, and llama-quantize copies a tensor whose chosen type equals its
    type byte for byte (src/llama-quant.cpp: `quantize = cur_type != new_type`); the result is
    checked: every other tensor byte-identical, ours also re-dequantized, embd types as asked."""
    from . import runner
    gguf = vendored_gguf()
    before = scan_gguf(src) if before is None else before
    want = embd_targets(before, embd_type, src, threads)
    ftype = gguf.LlamaFileType(int(before.fields["general.file_type"])).name.removeprefix("MOSTLY_")
    with tempfile.TemporaryDirectory() as d:
        pins = Path(d) / "tensor-types.txt"  # a file: hundreds of tensors would overflow a command line
        pins.write_text("".join(f"^{re.escape(t.name)}$={_type_name(t.tensor_type)}\n" for t in before.tensors
                                if t.name not in EMBD_TENSORS and len(t.shape) >= 2))
        cmd = [runner._tool("llama-quantize"), "--allow-requantize", "--tensor-type-file", pins]
        if "token_embd.weight" in want:
            cmd += ["--token-embedding-type", want["token_embd.weight"]]
        # a tied model has no output.weight: llama-quantize then gives token_embd the output's rule
        cmd += ["--output-tensor-type", want.get("output.weight", want.get("token_embd.weight", "q8_0"))]
        runner._run([*cmd, src, dst, ftype, threads])
    after = scan_gguf(dst)
    _check_unchanged(before, after, set(want), path)
    _check_quantized(after, written, path)
    types = {t.name: _type_name(t.tensor_type) for t in after.tensors if t.name in want}
    if types != want:
        raise ValueError(f"{path}: llama-quantize wrote {types}, asked for {want}; report this as a bug")
    return want, after


def tensor_class(name: str, shape) -> str:
    """The class of a tensor that is not ours, as docs/GGUF.md's rule names them."""
    if name in EMBD_TENSORS:
        return name.removesuffix(".weight")
    return "norms_1d" if len(shape) == 1 or name.endswith("_norm.weight") else "other_2d"


def _summary(reader, written: dict) -> dict:
    counts: dict[str, int] = {}
    classes: dict[str, set] = {}
    q_bytes = q_params = all_bytes = all_params = 0
    types = {}
    for t in reader.tensors:
        tname = types[t.name] = _type_name(t.tensor_type)
        counts[tname] = counts.get(tname, 0) + 1
        if t.name not in written:
            classes.setdefault(tensor_class(t.name, t.shape), set()).add(tname)
        all_bytes += int(t.n_bytes)
        all_params += int(t.n_elements)
        if t.name in written:
            q_bytes += int(t.n_bytes)
            q_params += int(t.n_elements)
    return {"path": None, "size": None, "tensors": dict(sorted(counts.items())), "n_quantized": len(written),
            "other_types": {c: ",".join(sorted(v)) for c, v in sorted(classes.items())},
            "params": all_params, "quantized_params": q_params,
            "bpw_quantized": round(8 * q_bytes / q_params, 4) if q_params else None,
            "bpw_overall": round(8 * all_bytes / all_params, 4) if all_params else None,
            "tensor_types": types}
