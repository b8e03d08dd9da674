"""RUN_DIR layout and crash-safe writes.

    RUN_DIR/
      config.json     resolved model + training + data configuration
      metrics.json    list, one dict per epoch (losses, AP metrics, lr, seconds, ...)
      metrics.png     losses and AP per epoch
      train.log       log lines of rank 0
      last/           checkpoint after the latest epoch (or every N iterations)
      best/           checkpoint with the best validation metric so far
      stage-<name>/   (alternating scheme) the network at the end of each step
        model.safetensors, model.json   model.checkpoint.save_checkpoint (never pickled)
        train_state.pt                  optimizer, scheduler, scaler, epoch, iteration, RNG,
                                        Dynamic R-CNN state; loaded with weights_only=True

A checkpoint directory is written in full beside its final name, fsynced, then swapped in by
renames, so a kill -9 at any moment leaves either the old or the new checkpoint, never a mix.
If the process dies between the two renames, `<name>.old` holds the previous one and
`checkpoint_dir` finds it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

TRAIN_STATE = "train_state.pt"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so readers see the old or the new content, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def atomic_write_dir(target: str | Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh directory with `write(tmp_dir)` and swap it in as `target`."""
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{target.name}.tmp-{os.getpid()}"
    old = parent / f"{target.name}.old"
    for stale in parent.glob(f".{target.name}.tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    for f in tmp.iterdir():
        _fsync_path(f)
    _fsync_path(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_path(parent)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(run_dir: str | Path, name: str = "last") -> Path:
    """The directory of checkpoint `name`, falling back to `<name>.old` after an interrupted swap."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / name, run_dir / f"{name}.old"):
        if (candidate / TRAIN_STATE).exists():
            return candidate
    raise FileNotFoundError(f"{run_dir}: no complete '{name}' checkpoint")


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "python": [py_version, torch.tensor(py_internal, dtype=torch.int64), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal.tolist()), py_gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(target: str | Path, *, net, cfg, class_names: list[str], train_state: dict,
                             provenance: dict | None = None) -> None:
    """Model (safetensors + json) and training state, swapped in atomically as `target`."""
    from model.checkpoint import save_checkpoint

    def write(tmp: Path) -> None:
        save_checkpoint(tmp, net, cfg, class_names, provenance=provenance or {})
        torch.save(train_state, tmp / TRAIN_STATE)

    atomic_write_dir(target, write)


def load_train_state(ckpt_dir: str | Path) -> dict:
    return torch.load(Path(ckpt_dir) / TRAIN_STATE, map_location="cpu", weights_only=True)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else []


def write_metrics(run_dir: str | Path, metrics: list[dict]) -> None:
    atomic_write_text(Path(run_dir) / "metrics.json", json.dumps(metrics, indent=1) + "\n")


def write_config(run_dir: str | Path, config: dict) -> None:
    atomic_write_text(Path(run_dir) / "config.json", json.dumps(config, indent=2, default=str) + "\n")


def plot_metrics(run_dir: str | Path, metrics: list[dict]) -> None:
    """metrics.png: training losses (left) and validation AP/AP50 (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return
    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 4))
    loss_keys = sorted({k for m in metrics for k in m if k.startswith("loss")})
    for key in loss_keys:
        ax_loss.plot(epochs, [m.get(key, float("nan")) for m in metrics], marker=".", label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training loss (epoch mean)")
    ax_loss.legend(fontsize=8)
    for key in ("AP", "AP50", "AP75"):
        if any(key in m for m in metrics):
            ax_ap.plot(epochs, [m.get(key, float("nan")) for m in metrics], marker=".", label=key)
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylim(0, 1)
    ax_ap.set_title("validation")
    ax_ap.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(run_dir) / ".metrics.png.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, Path(run_dir) / "metrics.png")
