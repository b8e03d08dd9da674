"""The training loop: stages of a scheme, epochs, iterations; validation, checkpoints, metrics.

`start(spec)` begins a run in spec.out; `resume(run_dir)` rebuilds the same run from
run_dir/config.json and its last checkpoint, then continues where it stopped. (train.run describes
a run and builds its parts; it never imports this module.)

Position of a run: (stage, epoch within the stage, batches done in that epoch) plus the global
iteration count. Everything random is a function of the seed and that position (batch order,
flips, scale jitter) or lives in the saved RNG state (the model's target sampling), so a run
resumed from a checkpoint repeats an uninterrupted run step for step (bit for bit in deterministic
mode on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from train import distributed, run_state, schemes
from train.augment import batch_generator, pick_min_size, random_hflip
from train.data import build_datasets, build_loader, resize_targets
from train.dynamic import DynamicRCNN
from train.optim import build_optimizer, build_scheduler
from train.run import (
    RunSpec,
    build_model_config,
    default_weight_decay,
    init_from_checkpoint,
    pick_device,
    recorded_spec,
    seed_everything,
    setup_logging,
)

log = logging.getLogger("train")


class LossModule(nn.Module):
    """forward = the stage's losses, so DDP sees a forward call and syncs the gradients of backward.

    With a `proposer` (the previous step's network, frozen), the RoI head trains on its proposals.
    """

    def __init__(self, net: nn.Module, stage: schemes.Stage, proposer: nn.Module | None = None):
        super().__init__()
        self.net = net
        self.stage = stage
        self.proposer = [proposer]  # a list: not a submodule, so DDP neither syncs nor broadcasts it

    def forward(self, images, image_sizes, targets, fg_iou_thresh, box_beta):
        return schemes.stage_losses(self.stage, self.net, images, image_sizes, targets, proposer=self.proposer[0],
                                    roi_fg_iou_thresh=fg_iou_thresh, roi_box_beta=box_beta)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict]
    iteration_losses: list[dict] = field(default_factory=list)  # this process's steps, in order


class Trainer:
    def __init__(self, spec: RunSpec, *, resume: bool):
        from model import build_model
        from model.checkpoint import load_checkpoint

        self.spec, self.tcfg = spec, spec.train
        self.device = pick_device(spec.device)
        self.rank, self.world = distributed.init_from_env(self.device)
        self.run_dir = Path(spec.out)
        setup_logging(self.run_dir, self.rank)
        if self.tcfg.threads:
            torch.set_num_threads(self.tcfg.threads)
        if self.tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(spec.seed)
        self.train_ds, self.val_ds = build_datasets(spec.data)
        self.class_names = self.train_ds.class_names
        self.state: dict = {"stage": 0, "epoch": 0, "batch": 0, "iteration": 0, "elapsed": 0.0,
                            "best": -math.inf, "epoch_sums": {}, "epoch_count": 0, "epoch_images": 0,
                            "epoch_seconds": 0.0, "epoch_cpu_seconds": 0.0}
        self.saved: dict | None = None
        if resume:
            ckpt = run_state.checkpoint_dir(self.run_dir, "last")
            self.net, meta = load_checkpoint(ckpt)
            self.cfg = meta.config
            self.saved = run_state.load_train_state(ckpt)
            self.state.update({k: self.saved.get(k, v) for k, v in self.state.items()})
            log.info("resuming %s from %s: stage %d epoch %d batch %d (iteration %d)", self.run_dir, ckpt,
                     self.state["stage"], self.state["epoch"], self.state["batch"], self.state["iteration"])
        else:
            self.cfg = build_model_config(spec, len(self.class_names))
            self.net = build_model(self.cfg)
            if spec.checkpoint:
                fresh = init_from_checkpoint(self.net, spec.checkpoint)
                log.info("initialised from %s; freshly initialised: %s", spec.checkpoint,
                         ", ".join(fresh) or "nothing")
            if self.rank == 0:
                run_state.write_config(self.run_dir, {"run": spec.to_dict(), "model": self.cfg.to_dict(),
                                                      "class_names": self.class_names, "world_size": self.world,
                                                      "command": sys.argv})
        self.net.to(self.device).train()
        self.metrics = run_state.read_metrics(self.run_dir) if resume else []
        self.stages = schemes.stages(self.tcfg.scheme)
        self.user_freeze = schemes.parse_patterns(self.tcfg.freeze)
        self.loader, self.sampler = build_loader(
            self.train_ds, batch_size=self.tcfg.batch_size, seed=spec.seed, shuffle=True,
            num_workers=self.tcfg.num_workers, rank=self.rank, world_size=self.world)
        self.dynamic = (DynamicRCNN(k_iou=self.tcfg.dynamic_k_iou, k_beta=self.tcfg.dynamic_k_beta,
                                    interval=self.tcfg.dynamic_interval) if self.tcfg.dynamic else None)
        if self.dynamic and self.saved and self.saved.get("dynamic"):
            self.dynamic.load_state_dict(self.saved["dynamic"])
        amp = self.tcfg.amp
        if amp == "fp16" and self.device.type != "cuda":
            raise ValueError("train.amp=fp16 needs CUDA; use bf16 on CPU")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.iteration_losses: list[dict] = []

    # ------------------------------------------------------------------ one stage
    def _prepare_stage(self, stage_idx: int):
        stage = self.stages[stage_idx]
        frozen = schemes.set_trainable(self.net, stage.freeze + self.user_freeze)
        params = [p for p in self.net.parameters() if p.requires_grad]
        log.info("stage %s: %d trainable tensors, %d frozen", stage.name, len(params), len(frozen))
        lr = self.tcfg.effective_lr(self.world)
        optimizer = build_optimizer(params, self.tcfg, lr, default_weight_decay(self.cfg, self.tcfg))
        total = self.tcfg.epochs * self.sampler.batches_per_epoch()
        scheduler = build_scheduler(optimizer, total, self.tcfg)
        in_progress = self.state["epoch"] > 0 or self.state["batch"] > 0
        if self.saved is not None and self.saved.get("optimizer") and in_progress:
            optimizer.load_state_dict(self.saved["optimizer"])
            scheduler.load_state_dict(self.saved["scheduler"])
            if self.saved.get("scaler"):
                self.scaler.load_state_dict(self.saved["scaler"])
        proposer = None
        if stage.proposals_from_previous_step:
            # The previous step's network, as saved when that step ended (so a resumed run
            # proposes with the same weights); a copy of the current one when there is none.
            prev = self.run_dir / f"stage-{self.stages[stage_idx - 1].name}" if stage_idx > 0 else None
            if prev is not None and (prev / "model.safetensors").exists():
                from model.checkpoint import load_checkpoint

                proposer = load_checkpoint(prev)[0].to(self.device)
            else:
                proposer = copy.deepcopy(self.net)
            proposer.requires_grad_(False).eval()
        step_module: nn.Module = LossModule(self.net, stage, proposer)
        if self.world > 1:
            step_module = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return stage, params, optimizer, scheduler, step_module

    def _step(self, stage, params, optimizer, scheduler, step_module, images, targets, gen) -> dict:
        images, targets = random_hflip(images, targets, gen, self.tcfg.hflip)
        min_size = pick_min_size(self.tcfg.scale_jitter, gen) if self.tcfg.scale_jitter else None
        from model.transform import preprocess

        batch = preprocess(images, self.cfg.transform, min_size)
        tgts = [{k: v.to(self.device) for k, v in t.items()}
                for t in resize_targets(targets, batch.image_sizes, batch.original_sizes)]
        fg, beta = (self.dynamic.iou_thresh, self.dynamic.beta) if self.dynamic else (None, None)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with autocast:
            losses, stats = step_module(batch.images.to(self.device), batch.image_sizes.to(self.device),
                                        tgts, fg, beta)
        loss = sum(losses.values())  # only the terms this stage trains
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at iteration {self.state['iteration']}: "
                                     + ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items()))
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tcfg.clip_grad_norm > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.tcfg.clip_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        scheduler.step()
        if self.dynamic and "proposal_max_ious" in stats:  # RoI-head statistics (not in RPN-only steps)
            self.dynamic.observe(stats["proposal_max_ious"], stats.get("pos_reg_targets", []))
            if self.dynamic.iteration % self.dynamic.interval == 0:
                self.dynamic.iou_thresh, self.dynamic.beta = distributed.mean_across_ranks(
                    [self.dynamic.iou_thresh, self.dynamic.beta])
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["loss"] = float(loss.detach())
        return out

    # ------------------------------------------------------------------ checkpoints
    def _train_state(self, optimizer, scheduler) -> dict:
        return {**self.state, "optimizer": optimizer.state_dict() if optimizer else {},
                "scheduler": scheduler.state_dict() if scheduler else {},
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "dynamic": self.dynamic.state_dict() if self.dynamic else {},
                "rng": run_state.rng_state()}

    def _save(self, name: str, optimizer, scheduler) -> None:
        if self.rank != 0:
            return
        run_state.save_training_checkpoint(
            self.run_dir / name, net=self.net, cfg=self.cfg, class_names=self.class_names,
            train_state=self._train_state(optimizer, scheduler),
            provenance={"run_dir": str(self.run_dir), "iteration": self.state["iteration"],
                        "stage": self.stages[min(self.state["stage"], len(self.stages) - 1)].name,
                        "data": self.spec.data.source})

    # ------------------------------------------------------------------ epoch end
    def _end_epoch(self, stage, stage_idx, optimizer, scheduler) -> None:
        st = self.state
        epoch_seconds = st["epoch_seconds"]
        count = max(st["epoch_count"], 1)
        means = {k: v / count for k, v in sorted(st["epoch_sums"].items())}
        keys = list(means)
        means = dict(zip(keys, distributed.mean_across_ranks([means[k] for k in keys]), strict=True))
        last_epoch = stage_idx == len(self.stages) - 1 and st["epoch"] + 1 == self.tcfg.epochs
        entry = {"epoch": stage_idx * self.tcfg.epochs + st["epoch"] + 1, "stage": stage.name,
                 "iteration": st["iteration"], "lr": optimizer.param_groups[0]["lr"], **means,
                 "epoch_seconds": round(epoch_seconds, 2), "epoch_cpu_seconds": round(st["epoch_cpu_seconds"], 2),
                 "images_per_second": round(st["epoch_images"] * self.world / max(epoch_seconds, 1e-9), 3)}
        if self.dynamic:
            entry.update(dynamic_iou_thresh=self.dynamic.iou_thresh, dynamic_beta=self.dynamic.beta)
        evaluate_now = (st["epoch"] + 1) % max(self.tcfg.eval_every, 1) == 0 or last_epoch
        improved = False
        if evaluate_now and self.rank == 0:
            from train.evaluate import evaluate_model

            t0 = time.perf_counter()
            entry.update(evaluate_model(self.net, self.cfg, self.val_ds, batch_size=self.tcfg.eval_batch_size))
            entry["eval_seconds"] = round(time.perf_counter() - t0, 2)
            metric = entry.get(self.tcfg.best_metric, -math.inf)
            improved = metric > st["best"]
            if improved:
                st["best"] = metric
        st["elapsed"] += entry.get("eval_seconds", 0.0)
        entry["elapsed_seconds"] = round(st["elapsed"], 2)
        # The next position: the following epoch, or the first epoch of the next stage.
        st["epoch"], st["batch"] = st["epoch"] + 1, 0
        st["epoch_sums"], st["epoch_count"], st["epoch_images"] = {}, 0, 0
        st["epoch_seconds"], st["epoch_cpu_seconds"] = 0.0, 0.0
        if st["epoch"] == self.tcfg.epochs:
            st["stage"], st["epoch"] = stage_idx + 1, 0
        if self.rank == 0:
            self.metrics.append(entry)
            run_state.write_metrics(self.run_dir, self.metrics)
            run_state.plot_metrics(self.run_dir, self.metrics)
            stage_done = st["stage"] != stage_idx
            self._save("last", None if stage_done else optimizer, None if stage_done else scheduler)
            if stage_done and len(self.stages) > 1:
                self._save(f"stage-{stage.name}", None, None)
            if improved:
                self._save("best", None, None)
            log.info("epoch %d (%s): %s", entry["epoch"], stage.name,
                     ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
                               if k not in ("epoch", "stage")))
        distributed.barrier()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        from tqdm import tqdm

        st, tcfg = self.state, self.tcfg
        if self.saved is not None:
            run_state.set_rng_state(self.saved["rng"])
        stopped = False
        try:
            for stage_idx in range(st["stage"], len(self.stages)):
                stage, params, optimizer, scheduler, step_module = self._prepare_stage(stage_idx)
                self.saved = None  # only the stage in progress resumes the optimizer
                while st["stage"] == stage_idx and not stopped:
                    global_epoch = stage_idx * tcfg.epochs + st["epoch"]
                    self.sampler.set_epoch(global_epoch, st["batch"])
                    n_batches = self.sampler.batches_per_epoch()
                    bar = tqdm(total=n_batches, initial=st["batch"], desc=f"epoch {global_epoch + 1}",
                               disable=self.rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True, leave=False)
                    mark, cpu_mark = time.perf_counter(), time.process_time()
                    for images, targets in self.loader:
                        gen = batch_generator(self.spec.seed, global_epoch, st["batch"] * self.world + self.rank)
                        losses = self._step(stage, params, optimizer, scheduler, step_module, images, targets, gen)
                        self.iteration_losses.append(losses)
                        now, cpu_now = time.perf_counter(), time.process_time()
                        st["epoch_seconds"] += now - mark
                        st["elapsed"] += now - mark
                        # CPU time tells the work apart from waiting when the machine is shared
                        st["epoch_cpu_seconds"] += cpu_now - cpu_mark
                        mark, cpu_mark = now, cpu_now
                        st["iteration"] += 1
                        st["batch"] += 1
                        st["epoch_count"] += 1
                        st["epoch_images"] += len(images)
                        for k, v in losses.items():
                            st["epoch_sums"][k] = st["epoch_sums"].get(k, 0.0) + v
                        bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
                        bar.update(1)
                        if self.rank == 0 and bar.disable and st["iteration"] % 50 == 0:
                            log.info("iter %d epoch %d batch %d/%d loss %.4f (%.2f img/s)", st["iteration"],
                                     global_epoch + 1, st["batch"], n_batches, losses["loss"],
                                     st["epoch_images"] * self.world / max(st["epoch_seconds"], 1e-9))
                        stopped = bool(tcfg.max_iters) and st["iteration"] >= tcfg.max_iters
                        mid_epoch = st["batch"] < n_batches
                        periodic = tcfg.checkpoint_every and st["iteration"] % tcfg.checkpoint_every == 0
                        if mid_epoch and (periodic or stopped):
                            self._save("last", optimizer, scheduler)
                            mark, cpu_mark = time.perf_counter(), time.process_time()
                        if stopped and mid_epoch:
                            break
                    bar.close()
                    if st["batch"] >= n_batches:
                        self._end_epoch(stage, stage_idx, optimizer, scheduler)
                if stopped:
                    break
        finally:
            distributed.cleanup()
        return TrainResult(self.run_dir, self.metrics, self.iteration_losses)


def start(spec: RunSpec) -> TrainResult:
    """Begin the run `spec` describes, in spec.out."""
    return Trainer(spec, resume=False).fit()


def resume(run_dir: str | Path, train_overrides: list[str] | None = None, device: str | None = None) -> TrainResult:
    """Continue a run from run_dir/last with the configuration recorded in run_dir/config.json.

    train_overrides may change what does not alter the maths (max_iters, checkpoint_every,
    num_workers, eval_every, threads ...); they are applied on top of the recorded train config.
    """
    return Trainer(recorded_spec(run_dir, train_overrides, device), resume=True).fit()
