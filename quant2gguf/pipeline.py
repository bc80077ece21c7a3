"""Whole jobs as plain functions: load -> calibrate -> quantize -> checkpoint, and the quickstart."""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch

from . import checkpoint
from .arch import get_arch
from .calib import QuantConfig, quantize_layers
from .evaluate import pick_device
from .methods import METHODS
from .methods.quantlrm import importances, pseudo_finetune


def load_hf(model: str | Path, dtype=torch.float32):
    """(model, tokenizer, folder) for a fixture name or HF folder; unsupported architectures
    fail before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .fixtures import resolve_model
    folder = resolve_model(str(model))
    config = AutoConfig.from_pretrained(folder)
    get_arch(config.model_type)
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(folder)
    return m.eval(), tok, folder


def _progress_bar(total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    task = prog.add_task(label, total=total, info="")

    def update(i, st):
        prog.update(task, advance=1, info=f"layer {i} out err {st['out_rel_err']:.2e}")
    return prog, update


def quantize_model(model: str | Path, out: str | Path, method: str = "gptq", bits: int = 3,
                   group_size: int = 128, calib: str = "news", nsamples: int = 32, seqlen: int = 512,
                   device: str = "auto", seed: int = 0, batch_size: int = 4, offload: bool = False,
                   slots: int | None = None, base: str | None = None, ft_steps: int = 16,
                   ft_calib: str = "gsm", **options) -> Path:
    """Quantize a model's decoder linears with `method` and save a checkpoint at `out`.
    Options go to the method (rtn: clip; gptq: act_order, clip, damp, static_groups; awq: clip).
    `slots` protected fp16 weights per group (default 2 for quantlrm, else 0). QuantLRM takes its
    weight updates from `base` (the pre-fine-tuning model) or a `ft_steps` pseudo-fine-tune on
    `ft_calib` reasoning text."""
    from .data import token_batches

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another -o")
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; available: {', '.join(METHODS)}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group size {group_size} not supported; use 32, 64 or 128")
    dev = torch.device(pick_device(device))
    t0 = time.time()
    torch.manual_seed(seed)
    mdl, tok, folder = load_hf(model)
    arch = get_arch(mdl.config.model_type)
    if calib == "traces":  # the model's own reasoning on GSM calibration problems
        from .traces import traces_file
        batches = token_batches(tok, str(traces_file(mdl, tok, folder, device=dev)), "all", nsamples, seqlen, seed=seed)
        mdl.to("cpu")
    else:
        batches = token_batches(tok, calib, "calib", nsamples, seqlen, seed=seed)
    fn = METHODS[method]
    opts = {k: v for k, v in options.items() if k in fn.__code__.co_varnames}
    slots = (2 if method == "quantlrm" else 0) if slots is None else slots
    if slots not in (0, 2):
        raise ValueError(f"--slots {slots}: the GGUF types hold 0 or 2 protected weights per group")
    cfg = QuantConfig(bits=bits, group_size=group_size, slots=slots)
    extra = {}
    if method == "quantlrm":
        deltas = weight_updates(mdl, tok, base, ft_calib, ft_steps, seqlen, seed, dev)
        opts["importance"] = importances(deltas)
        extra["importance_source"] = f"base {base}" if base else f"pseudo-finetune {ft_steps} steps on {ft_calib} calib split"
    prog, update = _progress_bar(len(mdl.get_decoder().layers), f"{method} W{bits}G{group_size}")
    with prog:
        quantized, stats = quantize_layers(mdl, arch, batches, functools.partial(fn, **opts), cfg, dev,
                                           batch_size=batch_size, offload=offload, progress=update)
    manifest = {
        "method": method, "bits": bits, "group_size": group_size, "slots": cfg.slots, **extra,
        "options": {k: v for k, v in opts.items() if k != "importance"},
        "arch": arch.name, "source_model": str(model),
        "calibration": {"source": calib, "nsamples": int(batches.shape[0]),
                        "split": "model's greedy traces on the gsm calib split" if calib == "traces" else "calib",
                        "seqlen": int(batches.shape[1]), "seed": seed},
        "layers": stats, "device": str(dev), "seconds": round(time.time() - t0, 1),
    }
    mdl.to("cpu")
    return checkpoint.save(out, mdl, tok, quantized, manifest)


def weight_updates(model, tok, base, ft_calib, steps, seqlen, seed, device) -> dict:
    """|W - W_base| per decoder linear: from a base checkpoint, or a short pseudo-fine-tune."""
    from .data import token_batches
    if base:
        ref, _, _ = load_hf(base)
        names = [n for n, m in model.named_modules() if n in dict(ref.named_modules()) and hasattr(m, "in_features")]
        return {n: (model.get_submodule(n).weight.detach() - ref.get_submodule(n).weight.detach()).abs()
                for n in names if ".layers." in n}
    batches = token_batches(tok, ft_calib, "calib", max(4 * steps, 4), seqlen, seed=seed + 1)
    return pseudo_finetune(model, batches, steps=steps, device=device)


def quickstart(model: str = "smollm2", workdir: str | Path = "out/quickstart", method: str = "gptq",
               group_size: int = 64, nsamples: int = 32, seqlen: int = 512) -> dict:
    """Fetch, quantize, convert, build patched llama.cpp, run a prompt, and measure size,
    decode speed and perplexity against the FP16 GGUF of the same model."""
    from . import llama, runner
    from .data import eval_text_file
    from .export import convert
    from .fixtures import resolve_model

    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    tag = f"{Path(str(model)).name}-{method}-w3g{group_size}"
    ckpt = wd / tag
    if not ckpt.exists():
        quantize_model(model, ckpt, method=method, group_size=group_size, nsamples=nsamples, seqlen=seqlen)
    gguf = wd / f"{tag}.gguf"
    if not gguf.exists():  # embeddings at q8_0: a file size comparable with stock llama-quantize
        convert(ckpt, gguf, outtype="q8_0")
    llama.build()
    f16 = wd / f"{Path(str(model)).name}-f16.gguf"
    if not f16.exists():
        runner.fp16_gguf(resolve_model(str(model)), f16)
    text = eval_text_file("news")
    res = {"model": str(model), "method": method, "checkpoint": str(ckpt), "gguf": str(gguf),
           "sample": runner.run_prompt(gguf, "The capital of France is", n=32)}
    for name, path in (("quantized", gguf), ("f16", f16)):
        b = runner.bench(path, n_gen=64, reps=2)
        p = runner.perplexity(path, text, ctx=512, chunks=8)
        res[name] = {"size_mib": round(path.stat().st_size / 2**20, 1), "tg_tok_s": b.get("tg_tok_s"),
                     "ppl": p.get("ppl")}
    (wd / f"{tag}.json").write_text(json.dumps(res, indent=1))
    return res
