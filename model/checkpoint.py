"""Checkpoints: a directory with ``model.safetensors`` (weights) and ``model.json`` (config, class
names, provenance). The JSON is also stored in the safetensors header, which is the source of truth
when loading, so a checkpoint is one atomic file plus a readable copy. Loading never unpickles.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.detector import FasterRCNN, build_model

FORMAT = "frcnn-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"


@dataclass
class CheckpointMeta:
    config: ModelConfig
    class_names: list[str]  # index = label id; 0 = "__background__"
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "config": self.config.to_dict(),
                           "class_names": self.class_names, "provenance": self.provenance}, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str) -> CheckpointMeta:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: not an frcnn checkpoint (format {data.get('format')!r})")
        cfg = ModelConfig.from_dict(data["config"])
        names = list(data["class_names"])
        if len(names) != cfg.num_classes:
            raise ValueError(f"{source}: {len(names)} class names for {cfg.num_classes} classes")
        return cls(cfg, names, dict(data.get("provenance", {})))


def default_class_names(num_classes: int) -> list[str]:
    return ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call write(tmp_path) then move it over path: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint must be readable by a server's user
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(directory: str | Path, net: FasterRCNN, config: ModelConfig | None = None,
                    class_names: list[str] | None = None, provenance: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    config = config or net.config
    meta = CheckpointMeta(config, class_names or default_class_names(config.num_classes),
                          {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           **(provenance or {})})
    if len(meta.class_names) != config.num_classes:
        raise ValueError(f"{len(meta.class_names)} class names for {config.num_classes} classes")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    text = meta.to_json()
    atomic_write_bytes(directory / WEIGHTS, lambda p: save_file(state, p, metadata={"frcnn": text}))
    atomic_write_bytes(directory / META, lambda p: Path(p).write_text(text + "\n"))
    return directory


def weights_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a directory with {WEIGHTS})")
    return p


def read_meta(path: str | Path) -> CheckpointMeta:
    p = weights_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            text = (f.metadata() or {}).get("frcnn")
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{p}: not a readable safetensors file ({exc})") from None
    if text is None:
        raise ValueError(f"{p}: safetensors file without frcnn metadata")
    return CheckpointMeta.from_json(text, str(p))


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[FasterRCNN, CheckpointMeta]:
    """Build the model from the stored config and load its weights (strict). Returns (model in eval mode, meta)."""
    meta = read_meta(path)
    net = build_model(meta.config)
    state = load_file(str(weights_path(path)), device=str(map_location))
    net.load_state_dict(state, strict=True)
    return net.eval(), meta
