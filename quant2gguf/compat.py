"""Compatibility export (docs/GGUF.md): the calibration set turned into a llama.cpp importance
matrix, and stock K-quants made with it by the pinned llama-quantize -- a file any unpatched
llama.cpp or Ollama runs.

Importance matrix = what `llama-imatrix` would collect on the same tokens: for every linear of the
decoder (and an untied lm_head) the sum over calibration tokens of each input channel's squared
activation, and the token count; here taken from the FP model in PyTorch with pre-hooks, on the
batches our quantizers calibrate on (`data.token_batches`). Written in llama.cpp's GGUF imatrix
format (tensors `<gguf name>.in_sum2` (n_in, 1) and `<gguf name>.counts` (1, 1), F32; keys
general.type = "imatrix", imatrix.datasets / chunk_count / chunk_size), which llama-quantize
reads as sums / count per channel.

MODEL may also be an AWQ (or QuantLRM) checkpoint: then AWQ's per-channel scales s are folded into
its source FP model before the F16 file is written (consumers' input columns times s, the producer
norm or linear divided by s: the same function, weights on the grid AWQ chose), and the importance
matrix is taken from that folded model (its inputs are x / s). The checkpoint stores s only inside
the weights it changed, so `awq_scales` recovers it: exactly from a norm producer (FP weight /
checkpoint weight), from the bounds the stored codes put on it for a linear producer (up_proj ->
down_proj, and v_proj -> o_proj without GQA; close to AWQ's s, not bit-exact). Storing s in the
checkpoint would make that exact. The learned codes do not reach the stock file: llama-quantize
re-rounds the folded F16 weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .cache import atomic_path

AWQ_METHODS = ("awq", "quantlrm")  # checkpoints whose producers carry AWQ's folded channel scales


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
    from .pipeline import load_hf
    m, tok, folder = load_hf(model)
    path, info = imatrix_of(m, tok, path, calib, nsamples, seqlen, device)
    return path, Path(folder), info


def imatrix_of(m, tok, path: str | Path, calib: str = "news", nsamples: int = 32, seqlen: int = 512,
               device: str = "cpu") -> tuple[Path, dict]:
    """(imatrix file, calibration info) for a loaded model."""
    from .data import describe_split, token_batches
    batches = token_batches(tok, calib, "calib", nsamples, seqlen)
    sums, ntok = activation_sums(m, batches, device)
    cfg = m.config
    entries = imatrix_entries(cfg.model_type, cfg.num_hidden_layers, sums, bool(cfg.tie_word_embeddings))
    info = {"source": calib, "split": describe_split(calib, "calib"), "nsamples": nsamples, "seqlen": seqlen,
            "tokens": ntok, "tensors": len(entries)}
    return write_imatrix(path, entries, ntok, seqlen, info["split"]), info


def _fit_scale(deq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per column k, the least-squares c with deq[:, k] ~= c * w[:, k] (1 for an all-zero column)."""
    deq, w = deq.double(), w.double()
    den = (w * w).sum(0)
    return torch.where(den > 0, (deq * w).sum(0) / den.clamp(min=1e-300), 1.0)


def _scale_bounds(q, w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds [lo, hi] on c, per index along the other dim, such that rounding c * w (the
    quantizer's RTN with the stored fp16 d, m) gives every stored code. A code strictly inside the
    grid pins c * w to a cell of width d; an end code only bounds it on one side. Protected
    weights and d = 0 groups say nothing."""
    from .quantizer import EMPTY, expand
    d, m = expand(q.scales.double(), q.group_size), expand(q.offsets.double(), q.group_size)
    c, w, qmax = q.codes.double(), w.double(), 2**q.bits - 1
    lo_v = torch.where(c > 0, m + d * (c - 0.5), -torch.inf)
    hi_v = torch.where(c < qmax, m + d * (c + 0.5), torch.inf)
    ok = (d > 0) & (w != 0)
    if q.pidx is not None:  # protected weights are stored exactly, not rounded
        used = q.pidx != EMPTY
        col = (torch.arange(q.pidx.shape[1]).view(1, -1, 1) * q.group_size + q.pidx.long())[used]
        ok[torch.arange(w.shape[0]).view(-1, 1, 1).expand_as(q.pidx)[used], col] = False
    a, b = lo_v / w, hi_v / w
    lo, hi = torch.where(w > 0, a, b), torch.where(w > 0, b, a)
    return lo.masked_fill(~ok, -torch.inf).amax(dim), hi.masked_fill(~ok, torch.inf).amin(dim)


@torch.no_grad()
def awq_scales(src, ckpt: str | Path, arch) -> dict[str, torch.Tensor]:
    """{producer module path: s (float64)} for every group of every layer of the FP model `src`,
    recovered from the AWQ checkpoint made from it; s = 1 where AWQ could not fold.

    Norm producer: s = FP weight / checkpoint weight (exact to fp32 rounding). Linear producer
    (quantized too): s lies in the intersection of the bounds every stored code puts on it, the
    consumers' columns (codes of W * s) and the producer's rows (codes of W * s_in / s); its middle
    is taken (within 0.5 % of AWQ's s at SmolLM2's dims, 2 % at 128). Where the bounds do not
    meet, the least-squares fit of the same relations is taken instead."""
    from safetensors.torch import load_file

    from .arch import decoder_layers, get_module
    sd = load_file(Path(ckpt) / "model.safetensors")
    _, qw = checkpoint.load_quantized(ckpt)
    out = {}
    for i, layer in enumerate(decoder_layers(src, arch)):
        pre = f"{arch.layers}.{i}."
        s_in = {}  # linear -> the scale its own input columns got
        for g in arch.groups:
            prev, lins = get_module(layer, g.prev), [get_module(layer, n) for n in g.linears]
            k = lins[0].in_features
            if not isinstance(prev, torch.nn.Linear):
                w_ck = sd[pre + g.prev + ".weight"].double()
                s = torch.where(w_ck != 0, prev.weight.double() / w_ck, 1.0)
            elif prev.out_features != k:  # awq.can_fold is False here (v_proj under GQA)
                s = torch.ones(k, dtype=torch.float64)
            else:
                cons = [(qw[pre + n], m.weight) for n, m in zip(g.linears, lins)]
                prod, w_p = qw[pre + g.prev], prev.weight.double() * s_in[g.prev]
                bounds = [_scale_bounds(q, w, 0) for q, w in cons]
                lo = torch.stack([b[0] for b in bounds]).amax(0)
                hi = torch.stack([b[1] for b in bounds]).amin(0)
                inv_lo, inv_hi = _scale_bounds(prod, w_p, 1)  # bounds on 1 / s
                lo = torch.maximum(lo, 1 / inv_hi.clamp(min=0))
                hi = torch.minimum(hi, torch.where(inv_lo > 0, 1 / inv_lo, torch.inf))
                # fallback: geometric mean of the columns' fit (~ s) and the rows' fit (~ 1 / s)
                cols = _fit_scale(torch.cat([q.dequantize() for q, _ in cons]), torch.cat([w for _, w in cons]))
                ls = (cols / _fit_scale(prod.dequantize().t(), w_p.t())).sqrt()
                ls = torch.where(torch.isfinite(ls) & (ls > 0), ls, 1.0)
                met = (lo <= hi * (1 + 1e-6)) & torch.isfinite(lo + hi) & (lo > 0)
                s = torch.where(met, (lo + hi) / 2, ls)
            s_in.update(dict.fromkeys(g.linears, s))
            out[pre + g.prev] = s
    return out


@torch.no_grad()
def fold_awq(src, arch, scales: dict[str, torch.Tensor]) -> None:
    """AWQ's transformation on the FP model, in place: consumers' input columns * s, producer / s
    (awq.fold); the model computes the same function."""
    from types import SimpleNamespace

    from .arch import decoder_layers, get_module
    from .methods.awq import fold
    for i, layer in enumerate(decoder_layers(src, arch)):
        for g in arch.groups:
            s = scales[f"{arch.layers}.{i}.{g.prev}"]
            fold(SimpleNamespace(layer=layer), g.prev, s)
            for n in g.linears:
                w = get_module(layer, n).weight
                w.mul_(s.view(1, -1).to(w.dtype))


def awq_folded_model(ckpt: str | Path):
    """(FP source model with the checkpoint's AWQ scales folded in, tokenizer, scales, manifest)."""
    from safetensors import safe_open

    from .arch import get_arch
    from .pipeline import load_hf
    man = checkpoint.read_manifest(ckpt)
    if man.get("method") not in AWQ_METHODS:
        raise ValueError(f"{ckpt} is a {man.get('method')} checkpoint: compat can use only AWQ's channel scales "
                         f"({', '.join(AWQ_METHODS)}); pass its FP model (fixture name or HF folder) instead")
    m, tok, _ = load_hf(man["source_model"])
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    with safe_open(Path(ckpt) / "model.safetensors", "pt") as f:
        if any(shapes.get(k) != tuple(f.get_slice(k).get_shape()) for k in f.keys()):
            raise ValueError(f"{ckpt} was not made from its manifest's source model {man['source_model']} "
                             "(tensor names or shapes differ)")
    arch = get_arch(m.config.model_type)
    scales = awq_scales(m, ckpt, arch)
    fold_awq(m, arch, scales)
    return m, tok, scales, man


def model_f16(m, tok, f16: str | Path, tokenizer_pre: str | None = None) -> dict:
    """An in-memory model (the folded one) -> F16 GGUF by llama.cpp's converter, through a temp folder."""
    import shutil
    import tempfile

    from .runner import fp16_gguf
    folder = Path(tempfile.mkdtemp(prefix=".folded-", dir=Path(f16).parent))
    try:
        m.save_pretrained(folder)
        tok.save_pretrained(folder)
        return fp16_gguf(folder, f16, tokenizer_pre=tokenizer_pre)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def compat_export(model: str, out: str | Path, qtype: str = "Q3_K_M", calib: str = "news", nsamples: int = 32,
                  seqlen: int = 512, device: str = "cpu", workdir: str | Path | None = None,
                  threads: int = 2, tokenizer_pre: str | None = None) -> dict:
    """MODEL (fixture name, HF folder, or AWQ/QuantLRM checkpoint) -> OUT, a stock `qtype` GGUF
    quantized by llama-quantize with an importance matrix from the calibration set. Also leaves OUT's
    imatrix (.imatrix.gguf) and FP16 GGUF (.f16.gguf; .awq.f16.gguf for a checkpoint, folded) next
    to it (or in workdir)."""
    from . import llama, runner
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another output path")
    wd = Path(workdir) if workdir else out.parent
    wd.mkdir(parents=True, exist_ok=True)
    llama.build()
    extra = {}
    if checkpoint.is_checkpoint(model):
        m, tok, scales, man = awq_folded_model(model)
        imat, info = imatrix_of(m, tok, wd / f"{out.stem}.imatrix.gguf", calib, nsamples, seqlen, device)
        f16 = wd / f"{out.stem}.awq.f16.gguf"
        model_f16(m, tok, f16, tokenizer_pre)
        extra = {"awq_fold": {"checkpoint": str(model), "method": man["method"], "source": man["source_model"],
                              "groups": len(scales), "unfolded": sum(bool((s == 1).all()) for s in scales.values())}}
    else:
        imat, folder, info = make_imatrix(model, wd / f"{out.stem}.imatrix.gguf", calib, nsamples, seqlen, device)
        f16 = wd / f"{out.stem}.f16.gguf"
        if not f16.exists():
            runner.fp16_gguf(folder, f16, tokenizer_pre=tokenizer_pre)
    runner.quantize_stock(f16, out, qtype, imatrix=imat, threads=threads)
    return {"gguf": str(out), "type": qtype, "imatrix": str(imat), "f16": str(f16), "tensors": info["tensors"],
            "calibration": {k: v for k, v in info.items() if k != "tensors"}, **extra}
