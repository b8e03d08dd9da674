"""A training run: its specification (what config.json records) and how its parts are built.

train.loop runs it (`start`, `resume`); this module never imports train.loop, so the two form no circle.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from train import distributed
from train.config import TrainConfig, apply_train_overrides, from_dict, to_dict
from train.data import SYNTHETIC, DataSpec

log = logging.getLogger("train")

# The synthetic-shapes demo: smaller images than the tiny preset's 320/512 and a schedule tuned to
# reach AP50 >= 0.8 within 15 minutes on 2 CPU cores. User --set values come after and win.
SYNTHETIC_DEFAULTS = {
    "model": [
        "transform.min_size=160", "transform.max_size=240",  # images are 128-192 px
        "rpn.pre_nms_top_n_train=200", "rpn.post_nms_top_n_train=128",
        "rpn.pre_nms_top_n_test=150", "rpn.post_nms_top_n_test=64",
        "roi_heads.batch_size_per_image=64",
    ],
    "train": [
        "batch_size=4", "lr=0.08", "epochs=16", "warmup_iters=100", "schedule=cosine",
        "clip_grad_norm=10.0", "num_workers=0", "eval_batch_size=8",
        # One thread: the tiny net's small ops gain nothing from a second OpenMP thread and lose
        # much waiting for it (measured 28-31 img/s with 1 thread, 1-2 img/s with 2).
        "threads=1",
    ],
}


@dataclass(frozen=True)
class RunSpec:
    data: DataSpec
    out: str
    preset: str = "resnet50_fpn"
    seed: int = 0
    model_overrides: tuple[str, ...] = ()
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: str | None = None  # what training starts from (the predictor is re-initialised if C differs)
    device: str = "auto"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = to_dict(self.train)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        return cls(data=DataSpec(**d["data"]), out=d["out"], preset=d["preset"], seed=d["seed"],
                   model_overrides=tuple(d["model_overrides"]), train=from_dict(d["train"]),
                   checkpoint=d.get("checkpoint", d.get("init")),  # "init": runs recorded before the rename
                   device=d.get("device", "auto"))


def make_spec(*, data: DataSpec, out: str, preset: str, seed: int, overrides: list[str],
              checkpoint: str | None = None, device: str = "auto", train_kwargs: dict | None = None) -> RunSpec:
    """Resolve defaults: synthetic-shapes defaults, then CLI shortcuts, then `--set` overrides."""
    from train.config import split_overrides

    train_over, model_over = split_overrides(list(overrides))
    tcfg = TrainConfig()
    if data.source == SYNTHETIC:
        model_over = SYNTHETIC_DEFAULTS["model"] + model_over
        tcfg = apply_train_overrides(tcfg, SYNTHETIC_DEFAULTS["train"])
    tcfg = apply_train_overrides(dataclasses.replace(tcfg, **(train_kwargs or {})), train_over)
    return RunSpec(data=data, out=out, preset=preset, seed=seed, model_overrides=tuple(model_over),
                   train=tcfg, checkpoint=checkpoint, device=device)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(run_dir: Path | None, rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_frcnn", False):
            root.removeHandler(h)
            h.close()
    for h in handlers:
        h.setFormatter(fmt)
        h._frcnn = True
        root.addHandler(h)
    root.setLevel(level)


def build_model_config(spec: RunSpec, num_classes: int):
    """The architecture: from --checkpoint's config when given (with this dataset's class count),
    else from the preset; then the model overrides."""
    from model.config import apply_overrides, preset

    if spec.checkpoint:
        from model.checkpoint import load_checkpoint

        _, meta = load_checkpoint(spec.checkpoint)
        cfg = dataclasses.replace(meta.config, num_classes=num_classes)
    else:
        cfg = preset(spec.preset, num_classes=num_classes)
    return apply_overrides(cfg, list(spec.model_overrides))


def init_from_checkpoint(net: torch.nn.Module, path: str) -> list[str]:
    """Copy every tensor of the checkpoint whose name and shape match; the rest (the predictor
    when the class count differs) keeps its fresh initialisation. Returns the names not copied."""
    from model.checkpoint import load_checkpoint

    src, _ = load_checkpoint(path)
    src_state = src.state_dict()
    own = net.state_dict()
    fresh = [k for k, v in own.items() if k not in src_state or src_state[k].shape != v.shape]
    net.load_state_dict({k: v for k, v in src_state.items() if k in own and own[k].shape == v.shape},
                        strict=False)
    return fresh


def default_weight_decay(cfg, tcfg: TrainConfig) -> float:
    """1e-4, or 5e-4 for the VGG16 backbone as in the paper; train.weight_decay overrides both."""
    if tcfg.weight_decay is not None:
        return tcfg.weight_decay
    return 5e-4 if cfg.backbone.name == "vgg16" else 1e-4


def recorded_spec(run_dir: str | Path, train_overrides: list[str] | None = None,
                  device: str | None = None) -> RunSpec:
    """The spec run_dir/config.json records, in run_dir, with train overrides and device on top."""
    import json

    recorded = json.loads((Path(run_dir) / "config.json").read_text())
    spec = dataclasses.replace(RunSpec.from_dict(recorded["run"]), out=str(run_dir))
    if train_overrides:
        spec = dataclasses.replace(spec, train=apply_train_overrides(spec.train, train_overrides))
    if device:
        spec = dataclasses.replace(spec, device=device)
    return spec
