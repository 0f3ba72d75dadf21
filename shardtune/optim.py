"""AdamW and learning-rate schedules (warmup, then constant | cosine | linear | wsd, down to a min-lr ratio)."""

from __future__ import annotations

import math

import torch

from shardtune.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    # The fused kernel (one pass per tensor, CPU and CUDA) is ~4x faster than foreach on CPU (bench notes in
    # docs/performance.md); foreach is the fallback for devices or dtypes it does not cover.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **({"fused": True} if fused else {"foreach": True}))


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.lr_warmup_steps if cfg.lr_warmup_steps >= 0 else int(cfg.lr_warmup_steps_ratio * total_steps)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of `optim.lr` for the optimizer step with 0-based index `step` (counted from 1 instead when
    optim.zero_indexed_step is false, as verl's option of that name does)."""
    if not cfg.zero_indexed_step:
        step += 1
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return (step + 1) / (warm + 1)  # never 0: the first step already learns
    floor = cfg.min_lr_ratio
    kind = cfg.lr_scheduler_type
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    if kind == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 2 * cfg.num_cycles * progress))
    if kind == "linear":
        return floor + (1 - floor) * (1 - progress)
    if kind == "wsd":  # warmup, stable, then a linear decay over the last wsd_decay_ratio of the run
        decay_start = total_steps - max(1, int(cfg.wsd_decay_ratio * total_steps))
        if step < decay_start:
            return 1.0
        return floor + (1 - floor) * (1 - (step - decay_start) / max(1, total_steps - decay_start))
    raise ValueError(kind)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
