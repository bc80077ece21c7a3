"""Every `quantize` option checked before a model loads: each problem is one ValueError naming the fix.
What is valid comes from the GGUF type table (bits, group sizes, slots), stock_quant.TARGETS (--target)
and the methods' signatures (the options the pipeline routes to them), never from a second list."""
from __future__ import annotations

from .gguf_types import TYPES
from .methods import METHODS

BITS = 3  # every type in TYPES is a Q3_*: 3-bit codes
GROUP_SIZES = sorted({t.group_size for t in TYPES.values()})
SLOTS = sorted({t.slots for t in TYPES.values()})
FILLS_SLOTS = ("quantlrm",)  # the only method choosing protected weights; awq would write the slots empty
PIPELINE_OPTIONS = {"quantlrm": {"base", "ft_steps"}}  # read by the pipeline, not the method's signature
LAQUANT_INITS = [m for m in METHODS if m not in ("laquant", "quantlrm")]  # quantlrm needs its importance pass
TARGET_METHODS = ("rtn", "gptq", "loaq", "laquant")  # the methods that round onto a fitted stock grid (stock_quant)


def method_options(method: str, init: str | None) -> set[str]:
    """The options `method` reads: its signature's (as pipeline.quantize_model routes them); kd's
    own plus, when its init is a method run first, that method's."""
    from .pipeline import KD_DEFAULTS, _params
    if method == "kd":
        return set(KD_DEFAULTS) | (_params(METHODS[init]) if init in METHODS else set())
    if method == "laquant":  # --damp / --act-order are its init's, when the init reads them (laquant passes them)
        from .methods.laquant import INIT_OPTIONS
        init = init or "gptq"
        init_opts = set(INIT_OPTIONS) & (_params(METHODS[init]) if init in METHODS else set())
        return (_params(METHODS[method]) - set(INIT_OPTIONS)) | init_opts | PIPELINE_OPTIONS.get(method, set())
    return _params(METHODS[method]) | PIPELINE_OPTIONS.get(method, set())


def _flag(name: str, value) -> str:
    return f"--{'no-' if value is False else ''}{name.replace('_', '-')}"


def check_target(method: str, bits: int, group_size: int, given: dict) -> None:
    """--target: a known stock type, a method that rounds onto it, and none of the options the type
    fixes (bits, group size, slots) set to anything but their defaults."""
    import inspect

    from .pipeline import quantize_model
    from .stock_quant import target_type
    target = given["target"]
    target_type(target)  # unknown: lists the valid ones
    if method not in TARGET_METHODS:
        raise ValueError(f"--target {target}: --method {method} has no stock-type path; use --method "
                         f"{' | '.join(TARGET_METHODS)} or drop --target")
    g = inspect.signature(quantize_model).parameters["group_size"].default
    for flag, value, ok in (("--bits", bits, (BITS,)), ("--group-size", group_size, (g,)),
                            ("--slots", given.get("slots"), (None, 0))):
        if value not in ok:
            raise ValueError(f"{flag} {value}: not applicable with --target {target} (the stock type fixes its "
                             f"bits and blocks); drop {flag}")
    if method == "laquant":  # in a stock grid it trains the stored scales of a rtn/gptq init, codes frozen
        lr_w = given.get("lr_w")  # unless --lr-w: then each code may move one step too (learned rounding)
        if lr_w is not None and not lr_w >= 0:
            raise ValueError(f"--lr-w {lr_w}: must be >= 0 (laquant --target {target}: the rate of the learned "
                             f"rounding offsets, in grid steps; leave it out to keep the init's codes)")
        if given.get("init") not in (None, "rtn", "gptq", "loaq"):
            raise ValueError(f"--init {given['init']}: laquant --target {target} starts from rtn | gptq | loaq on that grid")


def check_quantize_options(method: str, bits: int, group_size: int, given: dict | None = None) -> None:
    """Raise ValueError for the first option the run cannot honour. `given`: the method options set
    explicitly (name -> value, e.g. {"slots": 2, "act_order": True}); each must be one the method reads."""
    from .pipeline import KD_DEFAULTS
    given = given or {}
    if method not in METHODS and method != "kd":
        raise ValueError(f"unknown method '{method}'; use --method {' | '.join([*METHODS, 'kd'])}")
    if given.get("target") is not None:
        check_target(method, bits, group_size, given)
    if bits != BITS:
        raise ValueError(f"--bits {bits}: the GGUF types hold {BITS}-bit codes; use --bits {BITS}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--group-size {group_size}: the GGUF types have groups of "
                         f"{' or '.join(map(str, GROUP_SIZES))}; use one of them")
    slots = given.get("slots")
    if slots is not None and slots not in SLOTS:
        raise ValueError(f"--slots {slots}: the GGUF types hold {' or '.join(map(str, SLOTS))} protected "
                         f"weights per group; use one of them")
    if slots and method not in FILLS_SLOTS:
        raise ValueError(f"--slots {slots}: {method} does not choose protected weights (they would stay "
                         f"empty); drop --slots or use --method {' | '.join(FILLS_SLOTS)}")
    alpha = given.get("alpha")
    if alpha is not None and not 0 <= alpha <= 1:
        raise ValueError(f"--alpha {alpha}: LoaQ's correction share lies in 0..1 (1: the paper's closed form, "
                         f"0: plain GPTQ); pass one in that range")
    init = given.get("init", KD_DEFAULTS["init"] if method == "kd" else None)
    if method == "laquant" and init is not None and init not in LAQUANT_INITS:
        raise ValueError(f"--init {init}: laquant starts from {' | '.join(LAQUANT_INITS)}; pass one of them")
    known = set(KD_DEFAULTS).union(*(method_options(m, None) for m in METHODS))
    reads = method_options(method, init)
    ignored = [_flag(k, v) for k, v in given.items() if k in known and k not in reads]
    if ignored:
        what = "them" if len(ignored) > 1 else "it"
        raise ValueError(f"{' '.join(ignored)}: --method {method} ignores {what}; drop {what}")


def check_dims(model, group_size: int) -> None:
    """Every decoder linear's input dim against group_size, from MODEL's config alone (the model is built on
    the meta device: no weight is read), so a group size the model cannot take fails before it loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .arch import decoder_layers, get_arch, get_module
    from .fixtures import resolve_model
    from .quantizer import check_group
    config = AutoConfig.from_pretrained(resolve_model(str(model)))
    arch = get_arch(config.model_type)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    for i, layer in enumerate(decoder_layers(skeleton, arch)):
        for name in arch.linears:
            check_group(f"{arch.layers}.{i}.{name}", get_module(layer, name).in_features, group_size)
