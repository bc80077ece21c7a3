"""QuantLRM ("Quantization of Large Reasoning Models via Fine-Tuning Signals", arXiv 2602.02581).

Channel importance from fine-tuning weight updates, "protecting both ends": the smallest and the
largest |dW| carry the most information.
  1. dW = |W_ft - W_base| per linear (a real base checkpoint, or `pseudo_finetune`: a short SFT
     on reasoning text, dW against the weights before it).
  2. Restricted quadratic map with x_min, x_max, x_mid (exact median) over all dW > 0 of the
     model, R = 10: y = 1 at dW = 0, else 1 + (R-1) * ratio^2, the ratio (x_mid - x)/(x_mid - x_min)
     below the median and (x - x_mid)/(x_max - x_mid) above it, clamped to [0, 1].
  3. I_j = mean_i y_ij * (1 + #rows with dW_ij = 0). q_proj drives q/k/v, o_proj o, gate_proj
     gate/up, down_proj down (the first linear of each arch group).
  4. s = I^alpha in AWQ's search (awq.py) in place of mean|x|; same output-MSE criterion and clip.
  5. This project's addition: in each group of G input channels the `slots` most important
     channels keep their exact fp16 weights (the ggml P types), and the range ignores them.
"""
from __future__ import annotations

import torch

from ..calib import LayerContext
from ..quantizer import QuantizedWeight
from . import awq

R = 10.0


def global_thresholds(deltas: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """x_min, x_mid (exact median), x_max over every strictly positive dW of the model."""
    pos = torch.cat([d[d > 0].flatten().float().cpu() for d in deltas.values()])
    if pos.numel() == 0:
        raise ValueError("QuantLRM: every weight update is zero; fine-tune longer or pass a different --base")
    # torch.median returns the lower middle element: exact for odd counts, a data point otherwise
    return pos.min().item(), pos.median().item(), pos.max().item()


def channel_importance(delta: torch.Tensor, x_min: float, x_mid: float, x_max: float) -> torch.Tensor:
    """I_j for one linear's dW (N, K) -> (K,)."""
    x = delta.float()
    lo = ((x_mid - x) / max(x_mid - x_min, 1e-30)).clamp(0, 1)
    hi = ((x - x_mid) / max(x_max - x_mid, 1e-30)).clamp(0, 1)
    y = 1 + (R - 1) * torch.where(x <= x_mid, lo, hi) ** 2
    zero = x == 0
    y = torch.where(zero, torch.ones_like(y), y)
    return y.mean(0) * (1 + zero.sum(0).float())


def importances(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full linear name -> I (K,), for every linear whose dW is given."""
    t = global_thresholds(deltas)
    return {name: channel_importance(d, *t) for name, d in deltas.items()}


def protected_mask(importance: torch.Tensor, n_rows: int, group_size: int, slots: int) -> torch.Tensor:
    """The `slots` most important input channels of every group, for every row: bool (N, K)."""
    k = importance.numel()
    top = importance.view(k // group_size, group_size).topk(slots, dim=-1).indices
    cols = torch.zeros(k // group_size, group_size, dtype=torch.bool, device=importance.device)
    cols.scatter_(1, top, True)
    return cols.view(1, k).expand(n_rows, k)


def pseudo_finetune(model, batches: torch.Tensor, steps: int = 16, lr: float = 1e-5, batch_size: int = 4,
                    device="cpu", progress=None) -> dict[str, torch.Tensor]:
    """A short SFT (next-token loss, AdamW) on reasoning text; returns |dW| per decoder linear.
    The model's weights are restored afterwards: the signal is all we keep."""
    from ..arch import decoder_layers, get_arch
    arch = get_arch(model.config.model_type)
    names = [f"{arch.layers}.{i}.{n}" for i in range(len(decoder_layers(model, arch))) for n in arch.linears]
    params = [model.get_submodule(n).weight for n in names]
    before = [p.detach().to("cpu", copy=True) for p in params]
    trainable = {id(p) for p in params}
    saved_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    model.to(device).train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    try:
        for step in range(steps):
            i = (step * batch_size) % batches.shape[0]
            ids = batches[i:i + batch_size].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if progress:
                progress(step, loss.item())
        deltas = {n: (p.detach().cpu() - b).abs() for n, p, b in zip(names, params, before)}
    finally:
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b.to(p.device))
        for n, p in model.named_parameters():
            p.requires_grad_(saved_grad[n])
        model.eval()
    return deltas


def quantize_layer(ctx: LayerContext, importance: dict[str, torch.Tensor], clip: bool = True
                   ) -> dict[str, QuantizedWeight]:
    """AWQ with I in place of mean|x|; protected channels when the config has slots."""
    prefix = f"{ctx.arch.layers}.{ctx.index}."
    driver = {n: g.linears[0] for g in ctx.arch.groups for n in g.linears}

    def imp(_ctx, first_linear, _stats):
        return importance[prefix + first_linear].to(ctx.device)

    def protect(_ctx, name, w):
        if not ctx.cfg.slots:
            return None
        return protected_mask(importance[prefix + driver[name]].to(w.device), w.shape[0],
                              ctx.cfg.group_size, ctx.cfg.slots)

    return awq.quantize_layer(ctx, clip=clip, importance=imp, protect=protect)
