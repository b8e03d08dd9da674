"""SGD with momentum, per-iteration learning-rate schedule (linear warmup, then multistep or cosine)."""

from __future__ import annotations

import math

import torch

from train.config import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, lr: float, weight_decay: float
                    ) -> torch.optim.SGD:
    """Norm and bias parameters get no weight decay (they are few and decay only shrinks them)."""
    decay, no_decay = [], []
    for p in params:
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=cfg.momentum)


def lr_factor(it: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at iteration `it` (0-based) of `total`."""
    if cfg.schedule == "multistep":
        factor = cfg.gamma ** sum(it >= int(m * total) for m in cfg.milestones)
    elif cfg.schedule == "cosine":
        progress = min(it / max(total, 1), 1.0)
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r} (multistep | cosine)")
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_iters: int, cfg: TrainConfig
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration; its state_dict (last_epoch) resumes the schedule exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total_iters, cfg))
