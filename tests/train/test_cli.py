"""`python -m train` through train.__main__: the default command trains and reports what it
recorded, the written checkpoint loads and predicts, subcommands and option spellings parse alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.__main__ import main, new_run_spec, parse

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "checkpoints" / "demo-tiny-shapes"
DATA = ["--data", "synthetic-shapes", "--synthetic-sizes", "8,4", "--out"]


def test_python_m_train_alone_fine_tunes_and_the_checkpoint_reproduces_its_metrics(tmp_path, capsys):
    """No subcommand: trains. --checkpoint starts from the demo model, so the numbers mean something."""
    from model.checkpoint import load_checkpoint
    from runtime import Pipeline
    from train.evaluate import evaluate_model
    from train.shapes import SyntheticShapes

    if not (DEMO / "model.safetensors").exists():
        pytest.skip(f"{DEMO} missing (make demo-model)")
    run = tmp_path / "ft"
    code = main([*DATA, str(run), "--checkpoint", str(DEMO), "--epochs", "1", "--batch-size", "2",
                 "--lr", "0.0005", "--threads", "1", "--workers", "0", "--score-threshold", "0.3",
                 "--deterministic", "--set", "train.warmup_iters=1", "train.eval_batch_size=4"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert code == 0 and len(metrics) == 1
    last = metrics[-1]
    assert printed == {k: last[k] for k in ("epoch", "iteration", "loss", "AP", "AP50")}
    assert (last["epoch"], last["iteration"], last["stage"]) == (1, 4, "end2end")  # 8 images, batch 2
    assert last["loss"] == pytest.approx(sum(last[k] for k in ("loss_objectness", "loss_rpn_box_reg",
                                                               "loss_classifier", "loss_box_reg")), rel=1e-6)
    assert last["AP50"] > 0.5, last  # the demo model, barely moved (lr 0.0005, 4 steps)
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["run"]["checkpoint"] == str(DEMO) and recorded["run"]["train"]["threads"] == 1
    assert recorded["model"]["roi_heads"]["score_thresh"] == 0.3

    net, meta = load_checkpoint(run / "best")
    assert meta.config.roi_heads.score_thresh == 0.3 and meta.class_names[1:] == ["circle", "square", "triangle",
                                                                                  "cross"]
    val = SyntheticShapes(split="val", size=4)
    again = evaluate_model(net.eval(), meta.config, val, batch_size=4)
    assert (again["AP"], again["AP50"]) == (last["AP"], last["AP50"])
    image = val[0][0].permute(1, 2, 0).numpy()  # HWC uint8, as served
    (dets,) = Pipeline.load(run / "best").predict([np.ascontiguousarray(image)])
    assert len(dets.scores) > 0 and float(dets.scores.min()) >= 0.3  # --score-threshold reaches serving
    h, w = image.shape[:2]
    assert float(dets.boxes[:, [0, 2]].max()) <= w and float(dets.boxes[:, [1, 3]].max()) <= h


def _spec(argv):
    a, p = parse(argv)
    return a.command, new_run_spec(a, p)


def test_fit_and_train_subcommands_parse_as_the_bare_command():
    args = [*DATA, "runs/x", "--preset", "tiny", "--epochs", "3", "--threads", "2"]
    bare, fit, alias = _spec(args), _spec(["fit", *args]), _spec(["train", *args])
    assert bare == fit == ("fit", fit[1]) and alias == ("train", fit[1])
    spec = fit[1]
    assert (spec.preset, spec.out, spec.train.epochs, spec.train.threads) == ("tiny", "runs/x", 3, 2)


def test_threads_option_and_set_train_threads_agree():
    _, by_option = _spec([*DATA, "runs/x", "--threads", "2"])
    _, by_set = _spec([*DATA, "runs/x", "--set", "train.threads=2"])
    assert by_option.train.threads == by_set.train.threads == 2
    assert by_option == by_set


def test_init_is_a_deprecated_alias_of_checkpoint(capsys):
    _, old = _spec([*DATA, "runs/x", "--init", "ckpts/a"])
    err = capsys.readouterr().err
    assert "--init is deprecated" in err and "use --checkpoint" in err
    _, new = _spec([*DATA, "runs/x", "--checkpoint", "ckpts/a"])
    assert capsys.readouterr().err == ""
    assert old.checkpoint == new.checkpoint == "ckpts/a" and old == new


def test_score_threshold_is_the_model_config_key():
    _, spec = _spec([*DATA, "runs/x", "--score-threshold", "0.25"])
    assert spec.model_overrides[-1] == "roi_heads.score_thresh=0.25"


@pytest.mark.parametrize("extra, message", [
    (["--set", "rpn.nms_thresh=0.6"], "only train.* overrides"),
    (["--score-threshold", "0.2"], "only train.* overrides"),
    (["--checkpoint", "ckpts/a"], "--checkpoint starts a new run"),
])
def test_resume_refuses_what_would_change_the_model(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--resume", str(tmp_path), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bare_command_without_data_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "train"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--data and --out are required" in proc.stderr
    assert proc.stderr.startswith("usage: python -m train fit")
