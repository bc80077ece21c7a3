"""Distillation QAT (Reasoning-QAT, arXiv 2601.14888): end to end, on the FP teacher's logits.

The paper's findings this follows: knowledge distillation, KL(P_teacher || P_student) over
next-token distributions, is the robust QAT objective for reasoning models; a PTQ result (GPTQ)
is the initialisation; the QAT data should be of the calibration domain of that initialisation.

Student = the model with every quantized linear replaced by an FQLinear: latent weights, group
scales d and offsets m trained through the fused fake-quant (straight-through round; protected
slots stay exactly their fp16 value), everything else frozen. Teacher = the FP model (bf16 on a
GPU). Memory: bf16 autocast, activation checkpointing per decoder layer, and the loss computed
from final hidden states in token chunks (the [tokens x vocab] logits never exist whole: each
chunk's backward runs into the detached hidden state, whose gradient then flows once through the
model). A stock-type init (quantize --target) trains what its format stores with the codes frozen
(StockFQLinear) and exports the same stock type; with lr_w > 0 also a learned rounding offset per
weight (AutoRound's V, arXiv 2309.05516) that moves each code at most one grid step. A held-out slice of the calibration data is
scored every `eval_every` steps; the best state is kept and the init is returned when training
never beats it. A non-finite loss stops the run and keeps the last good state.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..quantizer import EMPTY, QuantizedWeight, codes_for, expand
from ..stock_quant import StockWeight, from_blocks
from ..stock_types import stock_type
from .laquant import _export
from quant2gguf.kernels.fakequant import FakeQuantFn


def _fq(w, d, m, pidx, bits, g, triton):
    return FakeQuantFn.apply(w, d, m, pidx, bits, g, triton)


class FQLinear(nn.Module):
    """A linear computing exactly the deployed weight in forward.

    Two modes. train_codes (the default): fake_quant(latent, d, m), latent weights, d and m trained
    through the straight-through round. Frozen codes (EfficientQAT's E2E-QP): w = d * q + m with
    the init's integer codes q fixed, only d and m trained (exact gradients, no code flips, no fp32
    latent copy of the weights: the cheap and stable mode for a short run or a large model).
    Latent, d and m are trained in units of each group's initial step u = d_init (so a learning rate
    means "fraction of a grid cell per step", the same on a 135M model whose steps are ~0.1 and a
    1.5B one whose steps are ~0.01): latent = latent_n * u, d = d_n * u, m = m_n * u."""

    def __init__(self, lin: nn.Linear, q: QuantizedWeight, fp_weight: torch.Tensor, triton: bool | None,
                 train_codes: bool = True, span: float = 0.25):
        super().__init__()
        self.bits, self.group_size, self.triton, self.train_codes = q.bits, q.group_size, triton, train_codes
        dev = lin.weight.device
        deq = q.dequantize().to(dev)
        d, m = q.scales.to(dev).float(), q.offsets.to(dev).float()
        u = torch.where(d > 0, d, torch.ones_like(d))  # a constant group (d = 0) keeps unit 1
        self.register_buffer("u", u)
        self.d, self.m = nn.Parameter(d / u), nn.Parameter(m / u)
        self.register_buffer("pidx", None if q.pidx is None else q.pidx.to(dev))
        self.bias = lin.bias
        mask = None if q.pidx is None else _protected_mask(self.pidx, self.group_size, deq.shape)
        if not train_codes:
            self.register_buffer("codes", q.codes.to(dev))
            self.register_buffer("pmask", mask)
            self.register_buffer("pfixed", None if mask is None else torch.where(mask, deq, 0.0))
            self.pval = None if q.pval is None else q.pval.to(dev)
            return
        lat = _latent_init(deq, fp_weight.to(dev).float(), q, d, m, span)
        self.latent = nn.Parameter(self._per_group(lat, 1.0 / u))
        if mask is not None:  # protected weights are stored exactly: never train them
            self.latent.register_hook(lambda g, mask=mask: g.masked_fill(mask, 0))

    def _per_group(self, w, f):
        n, k = w.shape
        return (w.view(n, k // self.group_size, self.group_size) * f.unsqueeze(-1)).view(n, k)

    def params(self):
        """(latent, d, m) in weight units, differentiable."""
        return self._per_group(self.latent, self.u), self.d * self.u, self.m * self.u

    def weight_q(self) -> torch.Tensor:
        if not self.train_codes:
            d, m = self.d * self.u, self.m * self.u
            d = d + (d.to(torch.float16).float() - d).detach()  # stored as fp16: straight-through cast
            m = m + (m.to(torch.float16).float() - m).detach()
            n, k = self.codes.shape  # broadcast per group (repeat_interleave copies): same d * q + m as dequantize
            w = (self.codes.view(n, k // self.group_size, self.group_size).float() * d.unsqueeze(-1)
                 + m.unsqueeze(-1)).view(n, k)
            return w if self.pmask is None else torch.where(self.pmask, self.pfixed, w)
        pidx = self.pidx if self.pidx is not None and self.pidx.numel() else None
        return _fq(*self.params(), pidx, self.bits, self.group_size, self.triton)

    def qparams(self) -> list[nn.Parameter]:
        """The grid's trainable parameters (lr_q)."""
        return [self.d, self.m]

    def forward(self, x):
        w = self.weight_q()
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return F.linear(x.to(dt), w.to(dt), None if self.bias is None else self.bias.to(dt))

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        if not self.train_codes:
            d16, m16 = (self.d * self.u).to(torch.float16), (self.m * self.u).to(torch.float16)
            return QuantizedWeight(self.codes.cpu(), d16.cpu(), m16.cpu(), self.bits, self.group_size,
                                   None if self.pidx is None else self.pidx.cpu(),
                                   None if self.pval is None else self.pval.cpu())
        from ..calib import QuantConfig
        cfg = QuantConfig(self.bits, self.group_size, 0 if self.pidx is None else self.pidx.shape[-1])
        return _export(*self.params(), self.pidx, cfg)




def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x's fp16 value (as fp32) forward, identity backward: x + (h - x) is exactly h in fp32."""
    x = x.clamp(-65504.0, 65504.0)
    return x + (x.to(torch.float16).float() - x).detach()


def _int_ste(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """x rounded and clamped to lo..hi forward, identity backward."""
    return x + (x.round().clamp(lo, hi) - x).detach()


class StockFQLinear(nn.Module):
    """Frozen codes on a stock llama.cpp grid (a StockWeight, quantize --target): trains exactly what
    the format stores besides the codes, each a continuous latent projected in forward through a
    straight-through estimator: fp16 super scales (Q4_0 and Q3_K d; Q4_K d, dmin) through an fp16
    cast, integer sub-scales / sub-mins (Q3_K sc in -32..31; Q4_K sc, m in 0..63) rounded and clamped.
    Each latent is in units of its initial magnitude (1 where it is 0) times REACH / the type's
    reach(), so one learning rate moves every type's weights the same number of its own grid steps
    (Q3_K's: a unit moves a weight at most 4 steps) and is a relative step for every model, like
    FQLinear's u. In plain relative units a finer type moved reach() / 4 times as many of its steps
    per update (Q4_0 8 / 4, Q4_K 15 / 4, Q5_K 31 / 4, Q6_K 32 / 4) and its integer sub-scales and sub-mins
    crossed their rounding edges that much sooner: on a tiny qwen2 the Q3_K_M mix's held-out KL rose
    0.0065 -> 0.0080 in 10 steps at the default rate, pure Q4_K / Q5_K / Q6_K 1.5x-2.4x, where
    Q3_K fell. The weight is stock_types' torch formula on the projected parts, the fp32 arithmetic
    ggml does, so export()'s repacked blocks dequantize to forward's weights bit for bit.

    train_codes (kd's lr_w > 0, laquant --target --lr-w): AutoRound's learned rounding (arXiv
    2309.05516) too, a per-weight fp32 offset v in grid steps (starting where the FP weight sits in its
    code's cell when `fp` is given, else 0; either way the init's codes), forward codes
    round(clamp(codes + clamp(v, -1, 1), 0, 2**bits - 1)) through the same STE: a code moves at most
    one step from its init's, and export() packs the moved codes. Off, there is no v (codes frozen)."""

    REACH = 4  # Q3_K's reach(): its latents keep plain relative units

    V_BOUND = 1.0  # with train_codes: |v| is clamped to it, so a code moves at most one grid step

    def __init__(self, lin: nn.Linear, q: StockWeight, train_codes: bool = False, fp: torch.Tensor | None = None):
        super().__init__()
        self.qtype, self.cls = q.qtype, stock_type(q.qtype)
        self.ints = self.cls.ints
        self.train_codes = train_codes
        dev = lin.weight.device
        self.register_buffer("codes", q.codes.to(dev))
        if train_codes:  # AutoRound's learned rounding: an offset in grid steps added before the round
            self.v = nn.Parameter(torch.zeros(self.codes.shape, dtype=torch.float32, device=dev))
        self.p = nn.ParameterDict()
        f = self.REACH / self.cls.reach()
        for k, v in self.cls.unpack(q.blocks.cpu().numpy()).items():
            if k == "q":
                continue
            t = torch.from_numpy(v.astype(np.float32)).to(dev)
            u = torch.where(t != 0, t.abs(), torch.ones_like(t)) * f
            self.register_buffer(f"u_{k}", u)
            self.p[k] = nn.Parameter(t / u)
        self.bias = lin.bias
        if train_codes and fp is not None:
            self._start_at(fp.to(dev))

    @torch.no_grad()
    def _start_at(self, fp: torch.Tensor) -> None:
        """v starts where the FP weight sits in its code's cell (x - code, x the FP weight in grid units
        under the init's parts: every stock dequant is affine in q), held inside +-0.49 so the init's
        codes are kept: weights near a rounding edge flip first, as AutoRound's round(W/s + V) does. At
        v = 0 for all, Adam moved every offset alike and codes flipped en masse or not at all."""
        n, k = self.codes.shape
        z = torch.zeros(n * k // self.cls.block_size, self.cls.block_size, device=self.codes.device)
        parts = self.parts()
        b = self.cls.dequantize_parts_torch(**parts, q=z).view(n, k)
        a = self.cls.dequantize_parts_torch(**parts, q=z + 1).view(n, k) - b
        c = self.codes.float()
        x = torch.where(a != 0, (fp.float() - b) / torch.where(a != 0, a, 1.0), c)
        self.v.copy_((x - c).clamp(-0.49, 0.49))

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored parts (but q) as fp32 values, differentiable through the STEs."""
        out = {}
        for k, p in self.p.items():
            x = p * getattr(self, f"u_{k}")
            out[k] = _int_ste(x, *self.ints[k]) if k in self.ints else _fp16_ste(x)
        return out

    def qparams(self) -> list[nn.Parameter]:
        return list(self.p.values())

    def qcodes(self) -> torch.Tensor:
        """The codes forward uses (fp32, integer values): the init's, or with train_codes
        round(clamp(codes + clamp(v, -1, 1), 0, 2**bits - 1)), differentiable in v through the STE."""
        c = self.codes.float()
        if not self.train_codes:
            return c
        b = self.V_BOUND
        return _int_ste(c + self.v.clamp(-b, b), 0, 2 ** self.cls.bits - 1)

    @torch.no_grad()
    def project_(self) -> None:
        """Keep v in [-1, 1] after an optimizer step (projected gradient: past the bound the clamp in
        forward would give v no gradient and a code pushed one step could never come back)."""
        if self.train_codes:
            self.v.clamp_(-self.V_BOUND, self.V_BOUND)

    def weight_q(self) -> torch.Tensor:
        n, k = self.codes.shape
        q = self.qcodes().view(-1, self.cls.block_size)
        return self.cls.dequantize_parts_torch(**self.parts(), q=q).view(n, k)

    forward = FQLinear.forward

    @torch.no_grad()
    def export(self) -> StockWeight:
        """The StockWeight of the projected parts and codes (the init's, or the moved ones with
        train_codes): same qtype, repacked blocks (CPU)."""
        parts = {k: (v.to(torch.int16) if k in self.ints else v.to(torch.float16)).cpu().numpy()
                 for k, v in self.parts().items()}
        n = self.codes.shape[0]
        codes = self.qcodes().to(torch.uint8) if self.train_codes else self.codes
        q = codes.cpu().numpy().reshape(-1, self.cls.block_size)
        return from_blocks(self.qtype, torch.from_numpy(self.cls.pack(**parts, q=q)).reshape(n, -1))


def _protected_mask(pidx: torch.Tensor, g: int, shape) -> torch.Tensor:
    ar = torch.arange(g, device=pidx.device).view(1, 1, 1, -1)
    return (pidx.long().unsqueeze(-1) == ar).any(-2).reshape(shape)


@torch.no_grad()
def _latent_init(deq, fp, q: QuantizedWeight, d, m, span: float = 0.25) -> torch.Tensor:
    """Latent weights that fake-quantize to exactly the init's codes but sit where the FP weight
    sits inside its rounding cell, at most `span` cells from its centre: on the grid itself d and m
    would get zero gradient, and at the cell's edge (where a GPTQ init leaves many weights, its
    codes compensating error, not rounding the FP weight) gradient noise flips codes at once:
    measured on qwen15, span 0.45 lost GPTQ's gain within 50 steps."""
    qmax = 2**q.bits - 1
    de = expand(d.to(torch.float16).float(), q.group_size)
    codes = q.codes.to(deq.device).float()
    lo = torch.where(codes == 0, torch.full_like(de, -math.inf), -span * de)
    hi = torch.where(codes == qmax, torch.full_like(de, math.inf), span * de)
    lat = deq + torch.minimum(torch.maximum(fp - deq, lo), hi)
    same = codes_for(lat, de, expand(m.to(torch.float16), q.group_size), q.bits) == codes
    lat = torch.where(same, lat, deq)
    if q.pidx is not None:  # protected positions: the stored value itself
        mask = _protected_mask(q.pidx.to(deq.device), q.group_size, deq.shape)
        lat = torch.where(mask, deq, lat)
    return lat.contiguous()


def attach(model, quantized: dict[str, QuantizedWeight], fp_weights: dict[str, torch.Tensor],
           triton: bool | None = None, train_codes: bool = True) -> dict[str, FQLinear | StockFQLinear]:
    """Swap every quantized linear of `model` for an FQLinear (a StockFQLinear for a stock-type
    weight, its codes frozen or, with train_codes, moved at most one step by a learned offset v);
    freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    mods = {}
    for name, q in quantized.items():
        parent, attr = name.rsplit(".", 1)
        lin = model.get_submodule(name)
        if isinstance(q, StockWeight):
            mods[name] = StockFQLinear(lin, q, train_codes, fp_weights.get(name))
        else:
            mods[name] = FQLinear(lin, q, fp_weights.get(name), triton, train_codes)
        setattr(model.get_submodule(parent), attr, mods[name])
    return mods


def _lr_factor(i: int, warm: int, total: int) -> float:
    """Linear warmup over `warm` steps, then cosine to 0 at `total`."""
    if i < warm:
        return (i + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm) / max(1, total - warm))))


def _final_hidden(model, ids):
    return model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state


def _chunk_kl(h_s, h_t, head_s, head_t, chunk: int, backward: bool) -> float:
    """Sum over tokens of KL(P_t || P_s), logits made `chunk` tokens at a time. With backward,
    each chunk's gradient accumulates into h_s.grad (h_s must be a detached leaf)."""
    hs, ht = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
    total = 0.0
    for i in range(0, hs.shape[0], chunk):
        lt = torch.log_softmax(head_t(ht[i:i + chunk]).float(), -1)
        ls = torch.log_softmax(head_s(hs[i:i + chunk]).float(), -1)
        kl = (lt.exp() * (lt - ls)).sum()
        if backward:
            kl.backward()
        total += kl.item()
    return total


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def heldout_kl(student, teacher, batches: torch.Tensor, device, batch: int, chunk: int) -> float:
    """Mean per-token KL(teacher || student) over held-out calibration sequences."""
    total, n = 0.0, 0
    for ids in batches.split(batch):
        ids = ids.to(device)
        with _autocast(device):
            hs, ht = _final_hidden(student, ids), _final_hidden(teacher, ids)
            total += _chunk_kl(hs, ht, student.lm_head, teacher.lm_head, chunk, backward=False)
        n += ids.numel()
    return total / max(n, 1)


def distill(student, teacher, quantized: dict[str, QuantizedWeight], fp_weights: dict[str, torch.Tensor],
            train: torch.Tensor, heldout: torch.Tensor, device, steps: int = 200, batch: int = 4,
            lr_w: float = 0.0, lr_q: float = 2e-3, eval_every: int = 25, chunk: int = 1024,
            checkpointing: bool = True, triton: bool | None = None, max_minutes: float | None = None,
            progress: Callable[[int, float, float | None], None] | None = None, seed: int = 0
            ) -> tuple[dict[str, QuantizedWeight], dict]:
    """Train the student's quantized linears to match the teacher's next-token distributions.
    lr_w, lr_q are in grid cells per step (FQLinear), lr_w 0 freezing the codes (E2E-QP); in a stock
    grid lr_w > 0 trains StockFQLinear's rounding offsets v (grid steps), lr_q its parts; AdamW,
    linear warmup then cosine.
    Returns (the best quantized weights, stats). Both models must be on `device`. With
    `max_minutes`, the step count is cut after 5 timed steps to fit (cosine schedule rescaled)."""
    device = torch.device(device)
    t0 = time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mods = attach(student, quantized, fp_weights, triton, train_codes=lr_w > 0)  # lr_w 0: codes frozen
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if checkpointing:  # transformers >= 5.2x renamed it; the GPU machine has 5.17
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()  # checkpointing only acts in train mode; these models have no dropout

    def score() -> float:
        student.eval()
        v = heldout_kl(student, teacher, heldout, device, batch, chunk)
        student.train()
        return v

    init_kl = best_kl = score()
    best = dict(quantized)
    best_step, history, stopped = 0, [{"step": 0, "heldout_kl": init_kl}], None
    params_w = [m.v if isinstance(m, StockFQLinear) else m.latent for m in mods.values()] if lr_w > 0 else []
    stock = [m for m in mods.values() if isinstance(m, StockFQLinear)]
    params_q = [p for m in mods.values() for p in m.qparams()]
    groups = ([{"params": params_w, "lr": lr_w}] if params_w else []) + [{"params": params_q, "lr": lr_q}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, min(20, steps // 10))  # linear warmup: Adam's first steps move every weight at once
    sched_len = [max(steps, 1)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, warm, sched_len[0]))
    g = torch.Generator().manual_seed(seed)  # --seed also changes the windows (train_heldout_batches)
    order = torch.randperm(len(train), generator=g)
    pos = 0
    t_train, budget_note = time.time(), None
    for step in range(1, steps + 1):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(train), generator=g), 0
        ids = train[order[pos:pos + batch]].to(device)
        pos += batch
        n_tok = ids.numel()
        opt.zero_grad(set_to_none=True)
        with _autocast(device):
            hs = _final_hidden(student, ids)
            with torch.no_grad():
                ht = _final_hidden(teacher, ids)
            leaf = hs.detach().requires_grad_(True)
            loss = _chunk_kl(leaf, ht, student.lm_head, teacher.lm_head, chunk, backward=True) / n_tok
        if not math.isfinite(loss):
            stopped = f"loss turned {loss} at step {step}; kept the best state (step {best_step})"
            break
        hs.backward(leaf.grad / n_tok)
        opt.step()
        for m in stock:
            m.project_()
        sched.step()
        kl = None
        if step % eval_every == 0 or step == steps:
            kl = score()
            history.append({"step": step, "train_kl": loss, "heldout_kl": kl})
            if not math.isfinite(kl):
                stopped = f"held-out KL turned {kl} at step {step}; kept the best state (step {best_step})"
                break
            if kl < best_kl:
                best_kl, best_step = kl, step
                best = {n: m.export() for n, m in mods.items()}
        if progress:
            progress(step, loss, kl)
        if max_minutes and step == 5:
            per_step = (time.time() - t_train) / 5
            fit = int(5 + (max_minutes * 60 - (time.time() - t0)) / (per_step * (1 + 1.0 / eval_every)))  # a held-out score ~ one step
            if fit < steps:
                steps = max(fit, step + 1)
                sched_len[0] = steps
                budget_note = f"cut to {steps} steps to fit {max_minutes} min ({per_step:.2f} s a step)"
        if step >= steps:
            break
    stats = {"kd_heldout_kl_init": init_kl, "kd_heldout_kl_best": best_kl, "kd_best_step": best_step,
             "kd_kept_init": best_step == 0, "kd_steps_run": history[-1]["step"], "kd_history": history,
             "kd_seconds": round(time.time() - t0, 1)}
    if stopped:
        stats["kd_stopped"] = stopped
    if budget_note:
        stats["kd_budget"] = budget_note
    if device.type == "cuda":
        stats["kd_peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return best, stats


@torch.no_grad()
def detach(model, quantized: dict[str, QuantizedWeight]) -> None:
    """Put plain linears holding the deployed weights back in place of the FQLinears."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
    model.eval()
    for name, q in quantized.items():
        parent, attr = name.rsplit(".", 1)
        fq = model.get_submodule(name)
        n, k = q.shape
        lin = nn.Linear(k, n, bias=fq.bias is not None, device=next(fq.buffers()).device)
        lin.weight.data.copy_(q.dequantize().to(lin.weight.device))
        if fq.bias is not None:
            lin.bias = fq.bias
        setattr(model.get_submodule(parent), attr, lin)
