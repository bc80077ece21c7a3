"""Rewrite a GGUF with each layer's attn_q, attn_k, attn_v as one attn_qkv tensor (rows stacked q, k, v; the bytes
of the three tensors in order), every other tensor and key unchanged: what `convert --fuse-qkv` writes, for files
made elsewhere (llama-quantize's stock files, synthetic shapes from ../shared/tools/synth_gguf.py: fuse the F16 file,
then llama-quantize it to each type). A layer whose three differ in type or width is left as it is. The pinned
llama.cpp loads a fused QKV for every architecture quant2gguf exports (docs/GGUF.md).
usage: python scripts/fuse_qkv_gguf.py IN.gguf OUT.gguf"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np

QKV = re.compile(r"blk\.(\d+)\.attn_([qkv])\.weight")


def fuse(src: Path, dst: Path) -> int:
    """Write dst from src with q/k/v fused; returns the number of layers fused."""
    try:
        from quant2gguf.export import vendored_gguf  # the pinned tree's gguf-py: it knows our tensor types
        gguf = vendored_gguf()
    except ImportError:  # a machine with gguf-py alone (F16 and stock files only)
        import gguf
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    parts: dict[str, dict[str, object]] = {}
    for t in r.tensors:
        m = QKV.fullmatch(t.name)
        if m:
            parts.setdefault(m[1], {})[m[2]] = t
    fusable = {b for b, p in parts.items() if len(p) == 3
               and len({(int(t.tensor_type), int(t.shape[0])) for t in p.values()}) == 1}
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp")  # renamed once complete: never a half-written OUT
    try:
        w = gguf.GGUFWriter(tmp, arch)
        for name, f in r.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            vt = f.types[0]
            w.add_key_value(name, f.contents(), vt, f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
        for t in r.tensors:
            m = QKV.fullmatch(t.name)
            if m and m[1] in fusable:
                if m[2] != "q":
                    continue
                p = parts[m[1]]
                rows = [np.asarray(p[x].data).reshape(int(p[x].shape[1]), -1) for x in "qkv"]
                data = np.concatenate([x.view(np.uint8) for x in rows])
                w.add_tensor(f"blk.{m[1]}.attn_qkv.weight", data, raw_dtype=t.tensor_type)
            else:
                w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return len(fusable)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[-1])
    print(f"{sys.argv[2]}: {fuse(Path(sys.argv[1]), Path(sys.argv[2]))} layers fused")
