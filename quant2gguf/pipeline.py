"""Whole jobs as plain functions: load -> calibrate -> quantize -> checkpoint, and the quickstart."""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import checkpoint, stock_quant
from .arch import get_arch
from .calib import QuantConfig, quantize_layers
from .evaluate import pick_device
from .methods import METHODS
from .methods.quantlrm import importances, pseudo_finetune
from .validate import check_quantize_options


DTYPES = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_hf(model: str | Path, dtype=torch.float32):
    """(model, tokenizer, folder) for a fixture name or HF folder; unsupported architectures
    fail before any weight is read. dtype "auto": as the checkpoint stores it (no rounding)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .fixtures import resolve_model
    folder = resolve_model(str(model))
    config = AutoConfig.from_pretrained(folder)
    get_arch(config.model_type)
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(folder)
    return m.eval(), tok, folder


def load_streamed(model: str | Path, dtype="auto"):
    """(model, tokenizer, folder, stream): the model with empty decoder layers, read one at a time by
    `stream` (stream.py) from the folder's shards."""
    from transformers import AutoTokenizer

    from .fixtures import resolve_model
    from .stream import empty_model
    folder = resolve_model(str(model))
    m, stream = empty_model(folder, dtype)
    return m, AutoTokenizer.from_pretrained(folder), folder, stream


def _params(fn) -> set[str]:
    """A method's keyword options (its signature, not its local variables)."""
    import inspect
    return set(inspect.signature(fn).parameters) - {"ctx"}


def _progress_bar(total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    task = prog.add_task(label, total=total, info="")

    def update(i, st):
        prog.update(task, advance=1, info=f"layer {i} out err {st['out_rel_err']:.2e}")
    return prog, update


def _traces_source(calib: str, model, tok, folder, dev) -> tuple[str, str]:
    """(source, split) to draw calibration windows from: `traces` (alone or as a part of a mix) replaced
    by the file of the model's own GSM answers, generated once per model and cached (traces.traces_file).
    Traces alone are used whole; in a mix every part gives its calib split."""
    from .data import TRACES, parts
    if TRACES not in parts(calib):
        return calib, "calib"
    from .traces import traces_file
    return _generated_source(parts(calib), {TRACES: str(traces_file(model, tok, folder, device=dev))})


def quantize_model(model: str | Path, out: str | Path, method: str = "gptq", bits: int = 3,
                   group_size: int = 128, calib: str = "news", nsamples: int = 32, seqlen: int = 512,
                   device: str = "auto", seed: int = 0, batch_size: int = 4, offload: bool = False,
                   slots: int | None = None, base: str | None = None, ft_steps: int = 16,
                   ft_calib: str = "gsm", resume: bool = False, target: str | None = None, dtype: str = "auto",
                   stream: bool = False, **options) -> Path:
    """Quantize a model's decoder linears with `method` and save a checkpoint at `out`.
    Options go to the method (rtn: clip; gptq: act_order, clip, damp, static_groups; awq: clip).
    `slots` protected fp16 weights per group (default 2 for quantlrm, else 0). QuantLRM takes its
    weight updates from `base` (the pre-fine-tuning model) or a `ft_steps` pseudo-fine-tune on
    `ft_calib` reasoning text. Each finished layer is kept in a state folder beside `out` until the
    checkpoint is written; `resume` continues an interrupted run from it (same settings only).
    `target` (rtn, gptq, loaq, laquant): a stock llama.cpp type (stock_quant.TARGETS: q3_k, q4_k, ... or a llama-quantize
    mix, q3_k_m, q4_k_m, ...) instead of our Q3_G types;
    resumable like the others. `dtype`: how the model is held in memory (auto: as stored,
    e.g. bf16 for most HF models, half of fp32's RAM); every layer computes in fp32 either way. `stream`:
    decoder layers read from the safetensors shards one at a time and dropped once quantized (stream.py),
    so neither RAM nor VRAM ever holds the whole model; the same checkpoint bit for bit."""
    from .data import TRACES, describe_split, parts, token_batches

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another -o")
    given = {"slots": slots, "target": target, "resume": resume or None}
    check_quantize_options(method, bits, group_size, {k: v for k, v in given.items() if v is not None})
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: use one of {' | '.join(DTYPES)}")
    if method == "kd" and dtype != "auto":
        raise ValueError(f"--dtype {dtype}: kd holds its student in fp32 and its teacher in bf16 on a GPU; drop --dtype")
    if SELF in calib.split("+") and method != "kd":
        raise ValueError(f"--calib {calib}: {SELF} (samples of the teacher) is distillation data: use it with --method kd")
    check_straces(calib, method, stream)
    check_self_mix(calib)
    if stream:
        from .stream import STREAM_METHODS
        if method not in STREAM_METHODS:
            raise ValueError(f"--stream: --method {method} needs the whole model at once; use --method "
                             f"{' | '.join(STREAM_METHODS)} or drop --stream")
        if TRACES in parts(calib):
            raise ValueError(f"--stream: --calib {calib} generates traces with the whole model first; drop --stream")
    if resume and method == "kd":
        raise ValueError("--resume: kd runs are not resumable (its layer-wise init is); drop --resume")
    settings = {"model": str(model), "method": method, "bits": bits, "group_size": group_size, "calib": calib,
                "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "slots": slots, "base": base,
                "ft_steps": ft_steps, "ft_calib": ft_calib,
                "options": {k: v for k, v in sorted(options.items())  # only what the method reads
                            if v is not None and method != "kd" and k in _params(METHODS[method])}}
    if method != "kd" and not target:  # (a stock target falls back per tensor as llama-quantize does)
        from .validate import check_dims
        check_dims(model, group_size)
    state = None if method == "kd" else open_state(out, {**settings, "target": target}, resume)
    if method == "kd":
        return distill_model(model, out, bits=bits, group_size=group_size, calib=calib, nsamples=nsamples,
                             seqlen=seqlen, device=device, seed=seed, batch_size=batch_size, offload=offload,
                             slots=slots, **options)
    with _state_guard(state):  # a run that fails before its first layer leaves no state behind
        dev = torch.device(pick_device(device))
        t0 = time.time()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        torch.manual_seed(seed)
        streamer = None
        if stream:
            mdl, tok, folder, streamer = load_streamed(model, DTYPES[dtype])
        else:
            mdl, tok, folder = load_hf(model, DTYPES[dtype])
        if TRACES in parts(calib) or (method == "quantlrm" and not base):
            mdl.float()  # these generate with, or fine-tune, the whole model first: in fp32
        arch = get_arch(mdl.config.model_type)
        source, split = _traces_source(calib, mdl, tok, folder, dev)  # the model's own reasoning on GSM calib problems
        if source != calib:
            mdl.to("cpu")
        batches = token_batches(tok, source, split, nsamples, seqlen, seed=seed)
        fn = METHODS[method]
        opts = {k: v for k, v in options.items() if k in _params(fn) and v is not None}
        slots = (2 if method == "quantlrm" else 0) if slots is None else slots
        cfg = QuantConfig(bits=bits, group_size=group_size, slots=slots)
        extra, label = {}, f"W{bits}G{group_size}"
        if target:  # the stock type fixes bits and blocks (manifest: the target's)
            cfg, bits, group_size = stock_quant.quant_config(target, mdl, arch)
            label = extra["target"] = cfg.target
            fb = stock_quant.fallbacks(mdl, arch, cfg.target)  # `types` (checkpoint.save) has every tensor's
            if fb:
                extra["fallbacks"] = fb
        if method == "quantlrm":
            deltas = weight_updates(mdl, tok, base, ft_calib, ft_steps, seqlen, seed, dev)
            opts["importance"] = importances(deltas)
            extra["importance_source"] = f"base {base}" if base else f"pseudo-finetune {ft_steps} steps on {ft_calib} calib split"
        prog, update = _progress_bar(len(mdl.get_decoder().layers), f"{method} {label}")
        with prog:
            quantized, stats = quantize_layers(mdl, arch, batches, functools.partial(fn, **opts), cfg, dev,
                                               batch_size=batch_size, offload=offload, progress=update, state=state,
                                               stream=streamer)
        resumed = sum(bool(st.get("resumed")) for st in stats)
        if resumed:
            extra["resumed_layers"] = resumed
        if streamer is not None:
            extra["stream"] = {"max_layers_resident": streamer.max_resident}
        if dev.type == "cuda":  # what the method needed on the GPU (issue 8's table reports it beside the wall time)
            extra["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        manifest = {
            "method": method, "bits": bits, "group_size": group_size, "slots": cfg.slots, **extra,
            "options": {k: v for k, v in opts.items() if k != "importance"},
            "arch": arch.name, "source_model": str(model),
            "calibration": {"source": calib, "nsamples": int(batches.shape[0]),
                            "split": describe_split(calib, "calib"), **({"files": source} if source != calib else {}),
                            "seqlen": int(batches.shape[1]), "seed": seed},
            "layers": stats, "device": str(dev), "seconds": round(time.time() - t0, 1),
        }
        if streamer is None:  # (a streamed model is back on the CPU, its dropped weights on meta)
            mdl.to("cpu")
        path = checkpoint.save(out, mdl, tok, quantized, manifest, source=folder)
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)
        return path


@contextmanager
def _state_guard(state: Path | None):
    try:
        yield
    except BaseException:
        if state is not None and not any(state.glob("layer-*.pt")):
            shutil.rmtree(state, ignore_errors=True)
        raise


def open_state(out: Path, settings: dict, resume: bool) -> Path:
    """The per-layer state folder of a run writing `out` (beside it, hidden): created fresh, or with
    `resume` the one an interrupted run with the same settings left. Checked before any model loads."""
    state = out.parent / f".{out.name}.state"
    want = json.dumps(settings, sort_keys=True, default=str)
    if state.exists() and any(state.glob("layer-*.pt")):
        if not resume:
            raise FileExistsError(f"{state} holds an interrupted run: add --resume to continue it, or remove it to start over")
        try:
            had = json.loads((state / "settings.json").read_text())
        except (OSError, ValueError):
            raise ValueError(f"--resume: {state} has no readable settings.json; remove it to start over") from None
        diff = sorted(k for k in set(had) | set(settings) if json.dumps(had.get(k), sort_keys=True, default=str)
                      != json.dumps(settings.get(k), sort_keys=True, default=str))
        if diff:
            raise ValueError(f"--resume: {state} was started with other {', '.join(diff)}; rerun with those settings "
                             f"or remove it to start over")
        return state
    state.mkdir(parents=True, exist_ok=True)  # nothing finished yet (or --resume with nothing to resume): fresh
    (state / "settings.json").write_text(want)
    return state


SELF = "self"  # kd's data sampled from the teacher itself (traces.self_samples)


def check_self_mix(calib: str) -> None:
    """`self` in a mix (kd: teacher samples beside text windows) goes with text sources only."""
    from .data import GENERATED
    names = calib.split("+")
    if SELF not in names or len(names) == 1:
        return
    gen = [p for p in names if p in GENERATED]
    if gen:
        raise ValueError(f"--calib {calib}: {SELF} mixes with text sources only, not with {', '.join(gen)}; "
                         f"pass e.g. --calib news+code+{SELF}")


def split_self(calib: str) -> tuple[str, bool]:
    """(the text part of a kd calibration, whether teacher samples are mixed in): news+code+self -> (news+code, True).
    `self` alone stays `self` (samples only)."""
    names = calib.split("+")
    if SELF not in names or len(names) == 1:
        return calib, False
    return "+".join(p for p in names if p != SELF), True


def check_straces(calib: str, method: str, stream: bool = False) -> None:
    """`straces` (the kd init student's own GSM answers) is distillation data made from the init: one-line
    errors, before any model loads, for every use that cannot have it."""
    from .data import STRACES
    names = calib.split("+")  # not data.parts: self+straces gets its own message, not the mixture's
    if STRACES not in names:
        return
    if method != "kd":
        raise ValueError(f"{STRACES}: the student's own answers exist only in distillation (--method kd); "
                         f"use traces for other methods")
    if SELF in names:
        raise ValueError(f"--calib {calib}: {SELF} (the teacher's samples) is used alone and does not mix with "
                         f"{STRACES}; pass --calib {SELF} or a mix of text sources with {STRACES}")
    if stream:
        raise ValueError(f"--stream: --calib {calib} generates the student's answers with the whole init model "
                         f"(and kd holds the whole model); drop --stream")

# lr_w 0 (codes frozen, scales/offsets trained) by default: on qwen15 it beat latent-weight training on
# news and CHAMP at a third of the memory (docs/BENCHMARKS.md, 2026-11-28)
KD_DEFAULTS = {"init": "gptq", "steps": 200, "batch": 4, "lr_w": 0.0, "lr_q": 2e-3, "eval_every": 25,
               "heldout": 8, "max_minutes": None}


def check_kd_options(model: str | Path, init: str, bits: int, group_size: int, calib: str, steps: int,
                     batch: int, lr_w: float, lr_q: float, eval_every: int, heldout: int,
                     max_minutes: float | None = None) -> dict | None:
    """Every distillation option checked before a model loads. Returns the --init checkpoint's
    manifest (None when the init is a method to run first)."""
    from transformers import AutoConfig, AutoTokenizer

    from .data import STRACES, parts
    from .fixtures import resolve_model
    check_straces(calib, "kd")
    if max_minutes is not None and max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0 (got {max_minutes})")
    if steps < 1 or batch < 1 or eval_every < 1 or heldout < 1:
        raise ValueError(f"--steps, --batch, --eval-every and --heldout must be >= 1 "
                         f"(got {steps}, {batch}, {eval_every}, {heldout})")
    if not (lr_q > 0 and lr_w >= 0):
        raise ValueError(f"--lr-q must be > 0 and --lr-w >= 0 (got {lr_q}, {lr_w}); --lr-w 0 trains scales/offsets only")
    if init == "quantlrm":
        raise ValueError("--init quantlrm needs its importance pass: make a quantlrm checkpoint first and pass it as --init CKPT")
    if init in METHODS:
        if calib == STRACES:
            raise ValueError(f"--calib {STRACES} alone: --init {init} runs first and needs calibration text made "
                             f"without a student; mix it (e.g. news+{STRACES}) or pass --init CKPT")
        return None
    if not Path(init).exists():
        raise FileNotFoundError(f"--init {init}: neither a method ({', '.join(METHODS)}) nor an existing checkpoint")
    man = checkpoint.read_manifest(init)
    if man.get("target"):  # a stock llama.cpp type (quantize --target): its bits and blocks are the target's
        import inspect  # lr_w > 0: its codes move at most one step (kd.StockFQLinear's learned rounding)
        dflt = inspect.signature(quantize_model).parameters
        for flag, asked, key in (("--bits", bits, "bits"), ("--group-size", group_size, "group_size")):
            if asked not in (man[key], dflt[key].default):  # only an explicit contradiction
                raise ValueError(f"{flag} {asked}: --init {init} is in the stock type {man['target']}, which fixes "
                                 f"its {key.replace('_', ' ')} ({man[key]}); drop {flag}")
    elif (man["bits"], man["group_size"]) != (bits, group_size):
        raise ValueError(f"--init {init} is W{man['bits']}G{man['group_size']} but W{bits}G{group_size} was asked; "
                         f"pass --bits {man['bits']} -g {man['group_size']}")
    folder = resolve_model(str(model))
    cfg, icfg = AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(init)
    if cfg.model_type != man.get("arch", icfg.model_type):
        raise ValueError(f"--init {init} is a {man.get('arch')} checkpoint, {model} is {cfg.model_type}")
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    diff = [k for k in keys if getattr(cfg, k, None) != getattr(icfg, k, None)]
    if diff:
        raise ValueError(f"--init {init} was made from another model ({', '.join(diff)} differ from {model}'s); "
                         f"quantize {model} first or pass its checkpoint")
    if AutoTokenizer.from_pretrained(folder).get_vocab() != AutoTokenizer.from_pretrained(init).get_vocab():
        raise ValueError(f"teacher {model} and student {init} tokenizers differ; distillation compares "
                         f"next-token distributions token by token, so they must be the same")
    src = man.get("calibration", {}).get("source")
    # the teacher's own samples are every domain's; the student's own answers (straces) may be added to the
    # init's source, or used alone (they are the init's own trajectories)
    base = "+".join(p for p in parts(calib) if p != STRACES)
    if src and calib != SELF and base and src not in (calib, base):
        hint = f"{src}+{STRACES}" if base != calib else src
        raise ValueError(f"--calib {calib} differs from the init's calibration ({src}); distillation trains on "
                         f"the init's domain (Reasoning-QAT): pass --calib {hint}")
    return man


def _carry_init_tensors(mdl, init: str | Path, quantized: dict) -> None:
    """The student starts from the init checkpoint's own non-quantized tensors where they differ from
    the FP model's: AWQ and QuantLRM fold 1/s into the norms (or producing linears) before the scaled
    weights, so the FP norms with the init's codes would be another model (and would be saved as one)."""
    from safetensors.torch import load_file
    own = mdl.state_dict()
    sd = load_file(Path(init) / "model.safetensors")
    skip = {f"{n}.weight" for n in quantized}
    moved = {k: v for k, v in sd.items() if k in own and k not in skip and not torch.equal(own[k].to(v.dtype), v)}
    if moved:
        mdl.load_state_dict(moved, strict=False)


def _folded(mdl, teacher, quantized: dict) -> bool:
    """Whether the student's non-quantized tensors differ from the teacher's (a scale fold happened)."""
    t = teacher.state_dict()
    skip = {f"{n}.weight" for n in quantized}
    return any(k not in skip and k in t and not torch.equal(v.to(t[k].device, t[k].dtype), t[k])
               for k, v in mdl.state_dict().items())


def _generated_source(names: list[str], files: dict[str, str]) -> tuple[str, str]:
    """(source, split) of calibration parts with each generated one (traces, straces) replaced by its
    file: a generated file alone is used whole, in a mix every part gives its calib split."""
    names = [files.get(p, p) for p in names]
    if len(names) == 1 and names[0] in files.values():
        return names[0], "all"
    return "+".join(names), "calib"


def _student_traces(mdl, quantized: dict, tok, ident: str, dev, dtype) -> Path:
    """traces.student_traces_file from a copy of `mdl` (the model kd trains from) carrying the init's
    dequantized weights (QuantizedWeight / StockWeight.dequantize, as the checkpoint exports them), in
    `dtype` on `dev`; the copy is freed before training."""
    from .traces import student_traces_file

    def make():  # called only when the traces are not cached yet
        mdl.to("cpu")
        student = copy.deepcopy(mdl).to(dtype)
        for name, q in quantized.items():
            student.get_submodule(name).weight.data = q.dequantize().to(dtype)
        return student
    try:
        return student_traces_file(make, tok, ident, device=dev)
    finally:
        if torch.device(dev).type == "cuda":
            torch.cuda.empty_cache()


def distill_model(model: str | Path, out: str | Path, bits: int = 3, group_size: int = 128, calib: str = "news",
                  nsamples: int = 32, seqlen: int = 512, device: str = "auto", seed: int = 0,
                  batch_size: int = 4, offload: bool = False, slots: int | None = None, **options) -> Path:
    """Distillation QAT (methods/kd.py) from a PTQ init: a checkpoint (--init CKPT) or a method
    run first on the same calibration source. Saves an ordinary checkpoint at `out`."""
    from .data import GENERATED, STRACES, TRACES, parts, texts, token_batches, train_heldout_batches
    from .methods import kd

    o = {**KD_DEFAULTS, **{k: v for k, v in options.items() if k in KD_DEFAULTS and v is not None}}
    # news+code+self: every second training window is a teacher sample (the calib split of qwen15's news+code is 83k
    # tokens, read ~19 times by a 4-minute run: held-out KL flat while training KL halves); all else sees the text part
    asked = calib
    calib, mix_self = split_self(calib)
    init = str(o["init"])
    init_man = check_kd_options(model, init, bits, group_size, calib, o["steps"], o["batch"], o["lr_w"],
                                o["lr_q"], o["eval_every"], o["heldout"], o["max_minutes"])
    # a stock-type init: bits and blocks are its target's, and so is the manifest (checkpoint.save writes
    # `types` from the weights themselves)
    stock = {k: init_man[k] for k in ("target", "fallbacks") if init_man and init_man.get("target") and k in init_man}
    if stock:
        bits, group_size = init_man["bits"], init_man["group_size"]
    dev = torch.device(pick_device(device))
    t0 = time.time()
    torch.manual_seed(seed)
    from transformers import AutoTokenizer

    from .fixtures import resolve_model
    # the data (and a source too short for --heldout) is checked before the model loads
    tok = AutoTokenizer.from_pretrained(resolve_model(str(model)))
    generated = calib != SELF and any(p in GENERATED for p in parts(calib))
    if calib != SELF and not generated:
        train, held = train_heldout_batches(tok, calib, o["steps"] * o["batch"], o["heldout"], seqlen, seed=seed)
    elif calib != SELF:  # traces need the model, straces the init (made once they exist); the other parts now
        for p in parts(calib):
            if p not in GENERATED:
                texts(p, "calib")
    mdl, tok, folder = load_hf(model)
    arch = get_arch(mdl.config.model_type)
    teacher = copy.deepcopy(mdl)
    teacher_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    source, split = calib, "calib"
    files = {}  # generated part (traces, straces) -> its JSONL file
    if calib != SELF and TRACES in parts(calib):  # the teacher answers the GSM calib problems (cached per model)
        from .traces import traces_file
        teacher.to(dev, dtype=teacher_dtype)
        files[TRACES] = str(traces_file(teacher, tok, folder, device=dev))
    if generated:  # the init (when a method runs first) calibrates on everything but the student's answers
        source, split = _generated_source([p for p in parts(calib) if p != STRACES], files)
    if calib == SELF:  # nsamples + heldout sequences sampled from the teacher; training draws from the first nsamples
        from .traces import self_samples
        teacher.to(dev, dtype=teacher_dtype)
        ids = self_samples(teacher, tok, folder, nsamples + o["heldout"], seqlen, device=dev, seed=seed)
        held = ids[nsamples:]
        g = torch.Generator().manual_seed(seed)
        train = ids[:nsamples][torch.randint(nsamples, (o["steps"] * o["batch"],), generator=g)]
    if mix_self:  # nsamples teacher samples; the held-out windows stay the text's, comparable with a text-only run
        from .traces import self_samples
        teacher.to(dev, dtype=teacher_dtype)
        ids = self_samples(teacher, tok, folder, nsamples, seqlen, device=dev, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        train = train.clone()
        train[1::2] = ids[torch.randint(nsamples, (train[1::2].shape[0],), generator=g)]
    if init_man is None:  # run the PTQ init on the same source
        opts = {k: v for k, v in options.items()  # KD's own options (lr_w, lr_q, ...) are not the init's
                if k in _params(METHODS[init]) and k not in KD_DEFAULTS and v is not None}
        cfg = QuantConfig(bits=bits, group_size=group_size, slots=slots or 0)
        prog, update = _progress_bar(len(mdl.get_decoder().layers), f"{init} W{bits}G{group_size} (kd init)")
        with prog:
            quantized, layer_stats = quantize_layers(
                mdl, arch, ids[:nsamples] if calib == SELF else token_batches(tok, source, split, nsamples, seqlen, seed=seed),
                functools.partial(METHODS[init], **opts), cfg, dev, batch_size=batch_size, offload=offload,
                progress=update)
        init_desc = {"method": init, "options": opts, "layers": layer_stats}
    else:
        _, quantized = checkpoint.load_quantized(init)
        init_desc = {"checkpoint": str(init), "method": init_man.get("method"),
                     "calibration": init_man.get("calibration")}
        _carry_init_tensors(mdl, init, quantized)
    straces = None
    if generated and STRACES in parts(calib):  # the init student answers the same prompts (on-policy data)
        from .traces import init_fingerprint
        ident = f"{Path(folder).resolve()}|" + init_fingerprint(
            str(Path(init).resolve()) if init_man is not None else f"{Path(folder).resolve()}|{init}|{sorted(opts.items())}",
            quantized)
        files[STRACES] = str(_student_traces(mdl, quantized, tok, ident, dev, teacher_dtype))
        straces = {"file": files[STRACES], "generated_by": "the kd init student (the init's dequantized weights, "
                   "as exported before training), greedy answers to the GSM calib prompts of traces",
                   "init": str(init), "init_id": hashlib.sha256(ident.encode()).hexdigest()[:16]}
    if generated:  # the teacher scores the generated texts as any calibration text
        source, split = _generated_source(parts(calib), files)
        train, held = train_heldout_batches(tok, source, o["steps"] * o["batch"], o["heldout"], seqlen, seed=seed,
                                            split=split)
    if _folded(mdl, teacher, quantized):  # AWQ/QuantLRM scaled these weights: the teacher's are not their FP
        fp_weights = {n: q.dequantize().float() for n, q in quantized.items()}  # latents start mid-cell
    else:
        fp_weights = {n: teacher.get_submodule(n).weight.data for n in quantized}
    mdl.to(dev)
    teacher.to(dev, dtype=teacher_dtype)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    prog = Progress(TextColumn("[bold]kd"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"))
    task = prog.add_task("kd", total=o["steps"], info="")
    last = {"kl": None}

    def update(step, loss, kl):
        last["kl"] = kl if kl is not None else last["kl"]
        held_s = "" if last["kl"] is None else f" held-out KL {last['kl']:.4f}"
        prog.update(task, advance=1, info=f"loss {loss:.4f}{held_s}")
    with prog:
        best, stats = kd.distill(mdl, teacher, quantized, fp_weights, train, held, dev, steps=o["steps"],
                                 batch=o["batch"], lr_w=o["lr_w"], lr_q=o["lr_q"], eval_every=o["eval_every"],
                                 max_minutes=o["max_minutes"], triton=None if dev.type == "cuda" else False,
                                 checkpointing=dev.type == "cuda",  # CPU: memory is plenty, time is short
                                 progress=update, seed=seed)
    if "kd_stopped" in stats:
        print(f"warning: {stats['kd_stopped']}", flush=True)
    kd.detach(mdl, best)
    del teacher
    manifest = {
        "method": "kd", "bits": bits, "group_size": group_size, "slots": next(iter(best.values())).slots, **stock,
        "init": init_desc, "options": {k: o[k] for k in ("steps", "batch", "lr_w", "lr_q", "eval_every", "heldout", "max_minutes")},
        "arch": arch.name, "source_model": str(model),
        "calibration": {"source": asked, "split": "calib", **({"files": source} if source != calib else {}),
                        **({"student_traces": straces} if straces else {}),
                        **({"self_samples": f"every second training window: one of {nsamples} sequences sampled "
                            "from the teacher (temperature 1, random first token)"} if mix_self else {}),
                        "nsamples": int(train.shape[0]), "seqlen": seqlen,
                        "seed": seed, "heldout": f"last {held.shape[0]} x {seqlen} tokens of the calib split"}
        if calib != SELF else
        {"source": SELF, "split": f"{nsamples} sequences sampled from the teacher (temperature 1, random first token)",
         "nsamples": int(train.shape[0]), "seqlen": seqlen, "seed": seed,
         "heldout": f"{held.shape[0]} more sampled sequences"},
        "kd": stats, "device": str(dev), "seconds": round(time.time() - t0, 1),
    }
    mdl.to("cpu")
    return checkpoint.save(out, mdl, tok, {n: q.to("cpu") for n, q in best.items()}, manifest, source=folder)


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
               group_size: int = 64, nsamples: int = 32, seqlen: int = 512, gsm: int = 20) -> dict:
    """Fetch, quantize, convert, build patched llama.cpp, run a prompt, and bench the file
    (quant2gguf.bench: KLD/PPL, GSM pass@1, speed, memory) against the F16 GGUF of the same model
    and stock Q4_0 with an importance matrix; the report goes to WORKDIR/report."""
    from . import bench, llama, runner
    from .export import convert

    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    tag = f"{Path(str(model)).name}-{method}-w3g{group_size}-n{nsamples}x{seqlen}"  # a rerun reuses only its own
    ckpt = wd / tag
    if not ckpt.exists():  # an interrupted earlier run of the same settings continues
        quantize_model(model, ckpt, method=method, group_size=group_size, nsamples=nsamples, seqlen=seqlen,
                       resume=True)
    gguf = wd / f"{tag}.gguf"
    if not gguf.exists():  # embeddings at q8_0: a file size comparable with stock llama-quantize
        convert(ckpt, gguf, outtype="q8_0")
    llama.build()
    sample = runner.run_prompt(gguf, "The capital of France is", n=32)
    # a CPU-sized bench: 8 perplexity chunks, GSM answers capped at 384 tokens
    report = bench.bench([gguf], ref=model, vs=["Q4_0"], out=wd / "report", calib="news", gsm=gsm,
                         chunks=8, reps=2, gsm_max_tokens=384, nsamples=nsamples, seqlen=seqlen,
                         command=f"quant2gguf quickstart --model {model} --method {method} -g {group_size}")
    return {"model": str(model), "method": method, "checkpoint": str(ckpt), "gguf": str(gguf), "sample": sample,
            "report_md": str(wd / "report" / "report.md"), "report": report}