"""RUN_DIR files: atomic checkpoint swaps, weights_only training state, metrics and plot."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from train import run_state


def _write(content):
    def write(tmp):
        (tmp / run_state.TRAIN_STATE).write_bytes(content)
        (tmp / "model.json").write_text("{}")
    return write


def test_atomic_write_dir_replaces_and_cleans(tmp_path):
    run_state.atomic_write_dir(tmp_path / "last", _write(b"one"))
    run_state.atomic_write_dir(tmp_path / "last", _write(b"two"))
    assert (tmp_path / "last" / run_state.TRAIN_STATE).read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_failed_write_keeps_previous(tmp_path):
    run_state.atomic_write_dir(tmp_path / "last", _write(b"one"))

    def broken(tmp):
        (tmp / run_state.TRAIN_STATE).write_bytes(b"partial")
        raise KeyboardInterrupt  # a kill in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        run_state.atomic_write_dir(tmp_path / "last", broken)
    assert (run_state.checkpoint_dir(tmp_path) / run_state.TRAIN_STATE).read_bytes() == b"one"


def test_checkpoint_dir_falls_back_to_old(tmp_path):
    # state after a crash between the two renames: last moved to last.old, new one not yet in place
    run_state.atomic_write_dir(tmp_path / "last", _write(b"one"))
    (tmp_path / "last").rename(tmp_path / "last.old")
    assert run_state.checkpoint_dir(tmp_path) == tmp_path / "last.old"
    with pytest.raises(FileNotFoundError):
        run_state.checkpoint_dir(tmp_path, "best")


def test_rng_state_round_trip_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = {"rng": run_state.rng_state(), "epoch": 4, "best": float("-inf"), "sums": {"loss": 1.5}}
    torch.save(state, tmp_path / run_state.TRAIN_STATE)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = run_state.load_train_state(tmp_path)  # weights_only=True: no pickled code
    run_state.set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert loaded["epoch"] == 4 and loaded["sums"] == {"loss": 1.5}


def test_metrics_and_plot(tmp_path):
    metrics = [{"epoch": 1, "loss": 2.0, "loss_classifier": 1.0, "AP": 0.1, "AP50": 0.3},
               {"epoch": 2, "loss": 1.0, "loss_classifier": 0.5, "AP": 0.2, "AP50": 0.5}]
    run_state.write_metrics(tmp_path, metrics)
    assert run_state.read_metrics(tmp_path) == metrics
    run_state.plot_metrics(tmp_path, metrics)
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_state.write_config(tmp_path, {"a": (1, 2)})
    assert (tmp_path / "config.json").read_text().startswith("{")


def test_recorded_spec_round_trips_and_reads_the_old_init_key(tmp_path):
    from train.data import DataSpec
    from train.run import make_spec, recorded_spec

    spec = make_spec(data=DataSpec(source="synthetic-shapes"), out="elsewhere", preset="tiny", seed=3,
                     overrides=["train.epochs=5", "rpn.nms_thresh=0.6"], checkpoint="ckpts/a")
    record = spec.to_dict()
    run_state.write_config(tmp_path, {"run": record})
    again = recorded_spec(tmp_path, ["max_iters=9"], device="cpu")
    assert again == dataclasses.replace(spec, out=str(tmp_path), device="cpu",
                                        train=dataclasses.replace(spec.train, max_iters=9))
    assert (again.train.epochs, again.model_overrides[-1], again.seed) == (5, "rpn.nms_thresh=0.6", 3)
    record["init"] = record.pop("checkpoint")  # config.json of a run recorded before --checkpoint
    run_state.write_config(tmp_path, {"run": record})
    assert recorded_spec(tmp_path).checkpoint == "ckpts/a"
