"""Training configuration: one frozen dataclass, overridable with `--set train.<key>=<value>`.

Keys without the `train.` prefix belong to the model config (model.config.apply_overrides).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from model.config import apply_overrides


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 2  # per process
    lr: float = 0.02  # for batch_size * world_size = 16; scaled linearly (see effective_lr)
    base_batch: int = 16
    momentum: float = 0.9
    weight_decay: float | None = None  # None: 1e-4, or 5e-4 for the vgg16 backbone (paper)
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    schedule: str = "multistep"  # multistep | cosine
    milestones: tuple[float, ...] = (0.67, 0.89)  # fractions of the total iterations (8/12, 11/12 epochs)
    gamma: float = 0.1
    clip_grad_norm: float = 0.0  # 0: no clipping
    amp: str = "none"  # none | bf16 | fp16 (fp16 on CUDA only)
    scheme: str = "end2end"  # end2end | alternating
    freeze: tuple[str, ...] = ()  # parameter-name prefixes kept frozen
    dynamic: bool = False  # Dynamic R-CNN schedules for the RoI head's IoU threshold and beta
    dynamic_k_iou: int = 75
    dynamic_k_beta: int = 10
    dynamic_interval: int = 100
    hflip: float = 0.5  # probability
    scale_jitter: tuple[int, ...] = ()  # transform.min_size choices per batch; () = no jitter
    num_workers: int = 1
    eval_every: int = 1  # epochs
    eval_batch_size: int = 4
    checkpoint_every: int = 0  # iterations between extra `last/` saves; 0: at epoch ends only
    best_metric: str = "AP50"
    max_iters: int = 0  # stop after this many iterations in total (tests, benchmarks); 0: no limit
    deterministic: bool = False
    threads: int = 0  # torch.set_num_threads; 0: leave torch's default

    def effective_lr(self, world_size: int) -> float:
        """Linear scaling rule (Goyal et al.): lr * total batch / base_batch."""
        return self.lr * self.batch_size * world_size / self.base_batch


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`train.*` overrides vs model-config overrides."""
    train = [o.removeprefix("train.") for o in overrides if o.startswith("train.")]
    model = [o for o in overrides if not o.startswith("train.")]
    return train, model


def apply_train_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Typed `key=value` overrides of TrainConfig (same parser as the model config)."""
    return apply_overrides(cfg, overrides)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> TrainConfig:
    """Inverse of to_dict (JSON turns tuples into lists); unknown keys are ignored."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})
