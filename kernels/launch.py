"""Direct launch of compiled Triton kernels: the JIT path (argument binding, specialization key,
cache lookup) costs tens of microseconds of host time a call, more than a decode GEMV or a
per-layer fake-quant takes on the GPU. After the first JIT launch of a call signature, the compiled
kernel's own launcher is called with the argument list JITFunction.run would pass (args + constexprs).
Q2G_FAST_LAUNCH=0 turns this off; any launcher API mismatch turns it off for good (JIT path)."""
from __future__ import annotations

import os

import torch

_CACHE: dict = {}
ENABLED = os.environ.get("Q2G_FAST_LAUNCH", "1") != "0"


def _hooks_free() -> bool:
    """No launch hooks registered (None, or an empty HookChain as triton >= 3.4 keeps them): the
    direct launch passes None for both, as the JIT would pass hooks that do nothing."""
    try:
        from triton import knobs
        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
        return all(h is None or not getattr(h, "calls", [None]) for h in hooks)
    except Exception:  # noqa: BLE001
        return False


def clear() -> None:
    _CACHE.clear()


def spec_key(args: tuple) -> tuple:
    """What Triton specializes a compiled kernel on, per runtime argument: a tensor's dtype and
    16-byte alignment; an int's width, == 1 and divisibility by 16."""
    out = []
    for a in args:
        t = type(a)
        if t is int:
            out.append((a == 1, a % 16 == 0, -2**31 <= a < 2**31))
        elif t is bool:
            out.append(a)
        elif isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() & 15 == 0))
        else:
            out.append(t)
    return tuple(out)


def launch(kernel, key, grid: tuple, args: tuple, const_names: tuple, consts: tuple, num_warps: int,
           num_stages: int = 1, device_index: int | None = None) -> None:
    """kernel[grid](*args, **consts, num_warps, num_stages), through the cached launcher when this
    call signature (`key` + spec_key(args) + constexprs + warps/stages) was seen before."""
    global ENABLED
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if ENABLED and not interp:
        key = (key, spec_key(args), consts, num_warps, num_stages, device_index)
        kern = _CACHE.get(key)
    else:
        kern = None
    g = tuple(grid) + (1,) * (3 - len(grid))
    if kern is not None:
        try:
            stream = torch._C._cuda_getCurrentRawStream(device_index)
            kern.run(g[0], g[1], g[2], stream, kern.function, kern.packed_metadata, None, None, None,
                     *args, *consts)
            return
        except Exception:  # noqa: BLE001 - an API mismatch: the JIT path from now on
            ENABLED = False
    k = kernel[grid](*args, **dict(zip(const_names, consts)), num_warps=num_warps, num_stages=num_stages)
    if ENABLED and not interp and _hooks_free() and hasattr(k, "run") and hasattr(k, "packed_metadata"):
        _CACHE[key] = k
