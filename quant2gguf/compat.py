"""Compatibility export (DESIGN decision 6): the calibration set turned into a llama.cpp importance
matrix, and stock K-quants made with it by the pinned llama-quantize -- a file any unpatched
llama.cpp or Ollama runs.

Importance matrix = what `llama-imatrix` would collect on the same tokens: for every linear of the
decoder (and an untied lm_head) the sum over calibration tokens of each input channel's squared
activation, and the token count; here taken from the FP model in PyTorch with pre-hooks, on the
batches our quantizers calibrate on (`data.token_batches`). Written in llama.cpp's GGUF imatrix
format (tensors `<gguf name>.in_sum2` (n_in, 1) and `<gguf name>.counts` (1, 1), F32; keys
general.type = "imatrix", imatrix.datasets / chunk_count / chunk_size), which llama-quantize
reads as sums / count per channel.

Left out (say so, not pretend): AWQ-style scales are not folded into the stock file; the FP
weights are quantized with the importance matrix alone.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .cache import atomic_path

@torch.no_grad()
def activation_sums(model, batches: torch.Tensor, device: str = "cpu", progress: bool = True
                    ) -> tuple[dict[str, torch.Tensor], int]:
    """{HF linear name: float64 (n_in,) sum of x^2 over tokens}, number of tokens, for every
    nn.Linear of the model, from one forward pass per calibration row."""
    from rich.progress import track
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def pre(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = (x * x).sum(0).cpu()
            sums[name] = sums[name] + s if name in sums else s
        return pre

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    model.to(device).eval()
    try:
        rows = range(batches.shape[0])
        for i in track(rows, description="imatrix", disable=not progress):
            model(batches[i:i + 1].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return sums, int(batches.numel())


def imatrix_entries(model_type: str, n_layers: int, sums: dict[str, torch.Tensor], tied: bool
                    ) -> dict[str, torch.Tensor]:
    """HF linear names -> GGUF tensor names (the pinned gguf-py's own name map), float32 sums."""
    from .arch import get_arch
    from .export import vendored_gguf
    get_arch(model_type)  # unsupported architectures fail here, with the supported ones named
    gguf = vendored_gguf()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[model_type.upper()], n_layers)  # llama -> LLAMA, ...
    out = {}
    for hf, s in sums.items():
        if hf == "lm_head" and tied:
            continue  # no output tensor in the file: the embedding serves
        name = tmap.get_name(hf + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"no GGUF name for {hf!r} in the {model_type} tensor map")
        out[name] = s.float()
    return out


def write_imatrix(path: str | Path, entries: dict[str, torch.Tensor], ntokens: int, chunk_size: int,
                  dataset: str) -> Path:
    """llama.cpp GGUF imatrix file (the layout tools/imatrix writes), atomically."""
    from .export import vendored_gguf
    gguf = vendored_gguf()
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [dataset])
        w.add_uint32("imatrix.chunk_count", max(1, ntokens // chunk_size))
        w.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(entries):
            s = entries[name].reshape(1, -1).numpy()  # ggml ne = (n_in, 1)
            w.add_tensor(f"{name}.in_sum2", s)
            w.add_tensor(f"{name}.counts", torch.tensor([[float(ntokens)]]).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def make_imatrix(model: str, path: str | Path, calib: str = "news", nsamples: int = 32, seqlen: int = 512,
                 device: str = "cpu") -> tuple[Path, Path, dict]:
    """(imatrix file, model folder, calibration info) for MODEL on the calibration split."""
    from .data import describe_split, token_batches
    from .pipeline import load_hf
    m, tok, folder = load_hf(model)
    batches = token_batches(tok, calib, "calib", nsamples, seqlen)
    sums, ntok = activation_sums(m, batches, device)
    cfg = m.config
    entries = imatrix_entries(cfg.model_type, cfg.num_hidden_layers, sums, bool(cfg.tie_word_embeddings))
    info = {"source": calib, "split": describe_split(calib, "calib"), "nsamples": nsamples, "seqlen": seqlen,
            "tokens": ntok, "tensors": len(entries)}
    return write_imatrix(path, entries, ntok, seqlen, info["split"]), Path(folder), info


def compat_export(model: str, out: str | Path, qtype: str = "Q3_K_M", calib: str = "news", nsamples: int = 32,
                  seqlen: int = 512, device: str = "cpu", workdir: str | Path | None = None,
                  threads: int = 2) -> dict:
    """MODEL (fixture name or HF folder) -> OUT, a stock `qtype` GGUF quantized by llama-quantize with
    an importance matrix from the calibration set. Also leaves OUT's imatrix (.imatrix.gguf) and
    FP16 GGUF (.f16.gguf) next to it (or in workdir)."""
    from . import llama, runner
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another output path")
    wd = Path(workdir) if workdir else out.parent
    wd.mkdir(parents=True, exist_ok=True)
    llama.build()
    imat, folder, info = make_imatrix(model, wd / f"{out.stem}.imatrix.gguf", calib, nsamples, seqlen, device)
    f16 = wd / f"{out.stem}.f16.gguf"
    if not f16.exists():
        runner.fp16_gguf(folder, f16)
    runner.quantize_stock(f16, out, qtype, imatrix=imat, threads=threads)
    return {"gguf": str(out), "type": qtype, "imatrix": str(imat), "f16": str(f16), "tensors": info["tensors"],
            "calibration": {k: v for k, v in info.items() if k != "tensors"}}
