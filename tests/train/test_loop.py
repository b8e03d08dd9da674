"""The training loop end to end on tiny settings: metrics and checkpoints, exact resume,
fine-tuning with another class count, freezing in the alternating scheme."""

import dataclasses
import json

import pytest
import torch

from train import run_state
from train.data import DataSpec
from train.loop import resume, start
from train.run import make_spec
from train.schemes import name_matches, set_trainable, stages

# Small and fast: 8 synthetic images of 128-192 px resized to 96, few proposals, tiny preset.
SMALL = ["transform.min_size=96", "transform.max_size=128", "rpn.pre_nms_top_n_train=100",
         "rpn.post_nms_top_n_train=50", "rpn.pre_nms_top_n_test=50", "rpn.post_nms_top_n_test=20",
         "roi_heads.batch_size_per_image=32"]


def _spec(out, *extra, data=None, preset="tiny", checkpoint=None):
    data = data or DataSpec(source="synthetic-shapes", synthetic_train_size=8, synthetic_val_size=4)
    return make_spec(data=data, out=str(out), preset=preset, seed=0, checkpoint=checkpoint,
                     overrides=SMALL + ["train.batch_size=2", "train.epochs=2", "train.warmup_iters=2",
                                        "train.eval_batch_size=4", "train.deterministic=true", "train.threads=1",
                                        "train.num_workers=0", *extra])


def test_run_writes_metrics_checkpoints_and_plot(tmp_path):
    result = start(_spec(tmp_path / "run"))
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["iteration"] == 8
    for key in ("loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "AP", "AP50", "lr"):
        assert key in metrics[-1]
    assert (run / "metrics.png").exists()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["transform"]["min_size"] == 96 and cfg["run"]["train"]["batch_size"] == 2
    from model.checkpoint import load_checkpoint

    net, meta = load_checkpoint(run / "best")
    assert meta.class_names == ["__background__", "circle", "square", "triangle", "cross"]
    state = run_state.load_train_state(run / "last")
    assert (state["stage"], state["epoch"], state["batch"], state["iteration"]) == (1, 0, 0, 8)
    assert result.metrics == metrics


def test_resume_repeats_the_uninterrupted_losses(tmp_path):
    full = start(_spec(tmp_path / "full", "train.max_iters=7"))
    # interrupted after 3 iterations (mid epoch 1), then resumed to 7
    start(_spec(tmp_path / "cut", "train.max_iters=3"))
    state = run_state.load_train_state(tmp_path / "cut" / "last")
    assert (state["epoch"], state["batch"], state["iteration"]) == (0, 3, 3)
    resumed = resume(tmp_path / "cut", ["max_iters=7"])
    assert [d["loss"] for d in resumed.iteration_losses] == [d["loss"] for d in full.iteration_losses[3:]]
    assert resumed.iteration_losses == full.iteration_losses[3:]  # every term, bit for bit
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text())[0] for r in ("full", "cut"))
    assert a["loss"] == b["loss"] and a["AP"] == b["AP"]  # epoch means include the steps before the cut


def test_fine_tune_with_another_class_count_reinitialises_only_the_predictor(tmp_path):
    start(_spec(tmp_path / "src", "train.max_iters=1"))
    from model.checkpoint import load_checkpoint
    from train.run import init_from_checkpoint

    src, meta = load_checkpoint(tmp_path / "src" / "last")
    from model import build_model

    net = build_model(dataclasses.replace(meta.config, num_classes=3))
    fresh = init_from_checkpoint(net, str(tmp_path / "src" / "last"))
    assert sorted(fresh) == ["roi_heads.box_predictor.bbox_pred.bias", "roi_heads.box_predictor.bbox_pred.weight",
                             "roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.cls_score.weight"]
    s, d = src.state_dict(), net.state_dict()
    assert all(torch.equal(s[k], d[k]) for k in d if k not in fresh)


def test_name_patterns():
    assert name_matches("backbone.body.layer1.0.conv1.weight", "backbone.body.layer1")
    assert not name_matches("backbone.body.layer10.weight", "backbone.body.layer1")
    assert name_matches("rpn.head.conv.0.0.weight", "rpn")
    assert name_matches("backbone.fpn.inner_blocks.0.weight", "backbone.*.inner_blocks")


def test_set_trainable_rejects_unknown_pattern():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="matches no parameter"):
        set_trainable(net, ("backbone",))


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.named_parameters()}


@pytest.mark.parametrize("stage_idx", [2, 3])
def test_alternating_step_freezes_shared_layers(tmp_path, stage_idx):
    """Steps 3 and 4 of 4-step training: only the RPN (3) or only the RoI head (4) changes."""
    from train.loop import Trainer

    spec = _spec(tmp_path / "alt", "train.scheme=alternating", "train.epochs=1", "train.eval_every=100")
    trainer = Trainer(spec, resume=False)
    trainer.state["stage"] = stage_idx  # jump straight to the step under test
    before = _snapshot(trainer.net)
    trainer.tcfg = dataclasses.replace(trainer.tcfg, max_iters=2)
    trainer.fit()
    after = _snapshot(trainer.net)
    trained = "rpn." if stage_idx == 2 else "roi_heads."
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(trained) for k in changed), changed
    stage = stages("alternating")[stage_idx]
    assert (stage.trains_rpn, stage.trains_roi) == ((True, False) if stage_idx == 2 else (False, True))


def test_user_freeze_keeps_parameters(tmp_path):
    from train.loop import Trainer

    spec = _spec(tmp_path / "fz", "train.max_iters=2", data=None)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, freeze=("backbone.body.stem", "rpn")))
    trainer = Trainer(spec, resume=False)
    before = _snapshot(trainer.net)
    trainer.fit()
    after = _snapshot(trainer.net)
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same == (k.startswith("backbone.body.stem.") or k.startswith("rpn.")), k


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    """DDP over gloo: 2 processes, 1 thread each; each rank trains on its half of the batches."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "train", "--data", "synthetic-shapes", "--synthetic-sizes", "8,4", "--preset", "tiny",
           "--out", str(tmp_path / "ddp"), "--device", "cpu", "--set", *SMALL, "train.batch_size=2",
           "train.epochs=1", "train.warmup_iters=1", "train.threads=1", "train.num_workers=0"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    # 8 images, batch 2 per rank, 2 ranks: 2 iterations per rank make the epoch
    assert len(metrics) == 1 and metrics[0]["iteration"] == 2
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    from model.checkpoint import load_checkpoint

    _, meta = load_checkpoint(tmp_path / "ddp" / "best")
    assert meta.provenance["iteration"] == 2 and meta.class_names[1:] == ["circle", "square", "triangle", "cross"]


def test_dynamic_rcnn_and_bf16_autocast_run(tmp_path):
    result = start(_spec(tmp_path / "dyn", "train.dynamic=true", "train.dynamic_interval=2", "train.dynamic_k_iou=5",
                         "train.amp=bf16", "train.max_iters=4"))
    assert all(torch.isfinite(torch.tensor(d["loss"])) for d in result.iteration_losses)
    state = run_state.load_train_state(tmp_path / "dyn" / "last")
    dyn = state["dynamic"]
    assert dyn["iteration"] == 4 and dyn["iou_history"] == []  # updated at iterations 2 and 4
    assert dyn["iou_thresh"] >= 0.4 and 0 < dyn["beta"] <= 1.0


def test_alternating_scheme_runs_four_steps(tmp_path):
    result = start(_spec(tmp_path / "alt4", "train.scheme=alternating", "train.epochs=1"))
    assert [m["stage"] for m in result.metrics] == ["1-rpn", "2-fast-rcnn", "3-rpn-tune", "4-fast-rcnn-tune"]
    assert "loss_classifier" not in result.metrics[0] and "loss_objectness" not in result.metrics[1]
    from model.checkpoint import load_checkpoint

    # each step's saved network shows what that step froze (parameters; BN statistics still move)
    nets = [dict(load_checkpoint(tmp_path / "alt4" / f"stage-{s}")[0].named_parameters())
            for s in ("1-rpn", "2-fast-rcnn", "3-rpn-tune", "4-fast-rcnn-tune")]

    def same(a, b, prefix):
        return all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))

    assert same(nets[0], nets[1], "rpn.") and not same(nets[0], nets[1], "backbone.")  # step 2
    assert same(nets[1], nets[2], "backbone.") and same(nets[1], nets[2], "roi_heads.")  # step 3
    assert not same(nets[1], nets[2], "rpn.")
    assert same(nets[2], nets[3], "backbone.") and same(nets[2], nets[3], "rpn.")  # step 4
    assert not same(nets[2], nets[3], "roi_heads.")
