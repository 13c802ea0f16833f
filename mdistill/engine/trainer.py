"""The one training loop shared by every method."""
import contextlib
import json
import math
import os
import signal
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError
from ..utils.dist import (all_reduce_sum, broadcast_from_main, convert_sync_batchnorm,
                          get_world_size, is_distributed, is_main_process)
from .checkpoint import save_checkpoint
from ..utils.hparams import run_hparams
from ..utils.meters import EpochMeter
from ..utils.rng import rng_state, set_rng_state
from .evaluate import evaluate, topk_correct
from .hooks import PeriodicCheckpointHook, ProgressHook, TeacherSourceHook
from .recipe import BatchRecipe, build_ema
from .schedule import (lr_factor, resumed_segments, saved_schedule, schedule_state,  # noqa: F401
                       stage_at, stage_lr_factor)
from .update_rules import UPDATE_RULES, commit_step

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingStopped(UserError):
    """The run cannot go on (a non-finite loss); the last good checkpoint is kept."""


def set_base_lr(optimizer, lr=None):
    """Record each group's base learning rate (``lr``, or the group's own)."""
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"] if lr is None else lr
        group["lr"] = group["base_lr"]


class Trainer:
    """Trains ``experiment.distiller`` for SOLVER.EPOCHS epochs.

    One loop for every method: the distiller's declarations (learnable
    parameters, auxiliary optimizers, DDP-ignored state, extra batch fields)
    are all it reads. Only the main process prints, logs and writes.

    Args:
        experiment: an :class:`~mdistill.engine.builder.Experiment`.
        run_dir: the run's output folder (exists already); None writes nothing.
        writer: a TensorBoard SummaryWriter (main process) or None.
        log: ``log(text)`` prints and appends to the run's log (main process).
    """

    def __init__(self, experiment, run_dir, writer=None, log=print):
        self.cfg = cfg = experiment.cfg
        self.device = experiment.device
        self.distiller = experiment.distiller
        self.train_loader = experiment.train_loader
        self.test_loader = experiment.test_loader
        # With a validation split (DATASET.VAL_FRACTION) "best" is chosen on it;
        # the test set is still evaluated every epoch, but only reported.
        self.val_loader = getattr(experiment, "val_loader", None)
        self.run_dir = run_dir
        self.writer = writer
        self.log = log
        self.main = is_main_process()
        self.method = cfg.DISTILLER.TYPE.lower()

        if is_distributed() and cfg.SOLVER.SYNC_BN:
            if self.device.type != "cuda":
                raise UserError("SOLVER.SYNC_BN needs CUDA devices (SyncBatchNorm does not run "
                                "on the CPU); set it to False")
            # Every BatchNorm the method trains: the student's and its own modules'.
            convert_sync_batchnorm(self.distiller)
        self.update_rule = UPDATE_RULES.get(cfg.SOLVER.TRAINER)(cfg.SOLVER)
        # The method's stages (one "distill" stage for most): each has its own epochs,
        # parameters and optimizer; epochs are counted over all stages.
        self.stages = self.distiller.stages(cfg.SOLVER.EPOCHS)
        self.total_epochs = sum(stage.epochs for stage in self.stages)
        self.stage_index = None
        self.enter_stage(0)
        self.aux_optimizers = self.distiller.auxiliary_optimizers()
        for optimizer in self.aux_optimizers.values():
            set_base_lr(optimizer)
        self.amp_dtype = AMP_DTYPES[cfg.SOLVER.AMP]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.SOLVER.AMP == "fp16")
        # The modern recipe (engine/recipe.py): the batch's transforms on the device,
        # and the student's weight average (None when SOLVER.EMA is off), copied
        # before compile so it holds a plain module.
        self.recipe = BatchRecipe.from_config(cfg, experiment.data.num_classes)
        self.ema = build_ema(cfg.SOLVER, self.distiller.student)
        self.best_ema_acc = -1.0
        # Batches of the epoch seen so far (the per-step warm-up's position).
        self.epoch_batches = 0
        self.lr_epoch = 1
        if cfg.SOLVER.COMPILE:
            self.distiller.student.compile()
            for teacher in self.distiller.teacher_models():
                teacher.compile()
        self.model = self.distiller
        if is_distributed():
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.distiller, self.distiller.ddp_ignored_names())
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.distiller, device_ids=device_ids,
                                                 find_unused_parameters=self.leaves_unused())

        self.epoch = 1              # the epoch in progress (1-based)
        # Segments of the schedule that resumes with another length added (schedule.py).
        self.lr_segments = []
        self.global_step = 0        # optimizer steps taken
        self.best_acc = -1.0
        self.history = []           # per-epoch metrics
        self.meter = EpochMeter()
        self.mid_epoch = False      # resumed inside an epoch
        self.skipped_steps = 0
        self.stop_signal = None
        self.stop_seen = False      # DDP: a stop asked on any process, as of the last step
        # Running statistics the forward may move (BatchNorm's), restored when a step
        # is skipped; the teacher's never move (eval mode).
        self.forward_buffers = [buffer for name, module in self.distiller.named_modules()
                                if isinstance(module, torch.nn.modules.batchnorm._NormBase)
                                and not name.startswith("teacher")
                                for buffer in module.buffers()]
        # Called with "forward" and "step" as a step passes them (the benchmark times phases).
        self.phase_hook = None
        # Wall seconds of this session in the loop's parts (the run's timing.json).
        self.seconds = {"training": 0.0, "evaluation": 0.0, "checkpoints": 0.0}
        # Around the loop (engine/hooks.py): progress, the teacher source's work ahead
        # and report, periodic checkpoints.
        self.hooks = [ProgressHook(cfg.LOG.PRINT_FREQ), TeacherSourceHook(),
                      PeriodicCheckpointHook(cfg.LOG.SAVE_EVERY_N_ITERS)]

    def leaves_unused(self):
        """Whether some stage leaves a parameter DDP synchronises without a gradient.

        DDP waits for a gradient of every parameter it holds unless told to look
        for unused ones (a graph traversal per step). A stage that trains only
        some of them (FT's distillation no longer trains the paraphraser) leaves
        the others without one, and so does a stage without the task loss (the
        classifier while RepDistiller's init matches features).
        """
        ignored = set(self.distiller.ddp_ignored_names())
        synced = {param for name, param in self.distiller.named_parameters()
                  if param.requires_grad and name not in ignored}
        for stage in self.stages:
            trained = (stage.parameters() if stage.parameters is not None
                       else self.distiller.get_learnable_parameters())
            if stage.epochs > 0 and (not stage.task_loss or not synced <= set(trained)):
                return True
        return False

    # ----------------------------------------------------------------- state
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def state_dict(self, epoch_complete):
        """Everything needed to continue the run exactly."""
        return {
            "epoch": self.epoch,
            "epoch_complete": epoch_complete,
            "global_step": self.global_step,
            "model": self.distiller.state_dict_to_save(),
            "stage": self.stage_index,
            "optimizer": self.optimizer.state_dict(),
            "aux_optimizers": {name: opt.state_dict() for name, opt in self.aux_optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "best_acc": self.best_acc,
            "history": list(self.history),
            "meter": self.meter.state_dict(),
            "loader": self.train_loader.state_dict(),
            "skipped_steps": self.skipped_steps,
            "epoch_batches": self.epoch_batches,
            **({"ema": self.ema.module.state_dict(), "best_ema_acc": self.best_ema_acc}
               if self.ema is not None else {}),
            "rng": rng_state(),
            "config": self.cfg.dump(),
            # The stages' lengths and the segments resumes added (engine/schedule.py).
            "schedule": schedule_state(self.stages, self.lr_segments),
        }

    def load_state_dict(self, state):
        """Restore a checkpoint written by :meth:`state_dict`."""
        self.distiller.load_saved_state(state["model"])
        # The optimizer saved belongs to the stage the run was in.
        self.enter_stage(state.get("stage", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        for name, optimizer in self.aux_optimizers.items():
            optimizer.load_state_dict(state["aux_optimizers"][name])
        self.scaler.load_state_dict(state["scaler"])
        self.best_acc = state["best_acc"]
        self.history = list(state["history"])
        self.global_step = state["global_step"]
        self.skipped_steps = state["skipped_steps"]
        self.epoch_batches = state.get("epoch_batches", 0)
        if self.ema is not None:
            # A run that turns EMA on at a resume starts the average from the student.
            self.ema.module.load_state_dict(state.get("ema", self.distiller.student.state_dict()))
            self.best_ema_acc = state.get("best_ema_acc", -1.0)
        set_rng_state(state["rng"])
        # A resume that changed the last stage's length anneals on from the rate reached.
        self.lr_segments = resumed_segments(self.cfg.SOLVER, self.stages, saved_schedule(
            state, self.distiller), state["epoch"], state["epoch_complete"])
        if state["epoch_complete"]:
            self.epoch = state["epoch"] + 1
            self.meter = EpochMeter()
            self.mid_epoch = False
        else:
            self.epoch = state["epoch"]
            self.meter = EpochMeter(state["meter"])
            self.train_loader.load_state_dict(state["loader"])
            self.mid_epoch = True

    def save(self, epoch_complete, test=None, val=None, ema=None):
        """Write ``latest`` (and student_latest, best, epoch_N) atomically; "best"
        is chosen on ``val`` when there is a validation split, else on ``test``.
        With SOLVER.EMA, ``ema`` (its evaluation) writes student_ema_latest and
        student_ema_best (chosen the same way among its own evaluations)."""
        if not self.main or self.run_dir is None:
            return
        state = self.state_dict(epoch_complete)
        path = os.path.join(self.run_dir, "latest")
        save_checkpoint(state, path)
        if not epoch_complete:
            return
        student = {"model": self.distiller.student.state_dict(), "epoch": self.epoch,
                   "test_acc": test["top1"] if test else None}
        if val is not None:
            student["val_acc"] = val["top1"]
        save_checkpoint(student, os.path.join(self.run_dir, "student_latest"))
        final_stage = self.stage_index == len(self.stages) - 1
        selected = val or test
        if selected is not None and final_stage and selected["top1"] >= self.best_acc:
            save_checkpoint(state, os.path.join(self.run_dir, "best"))
            save_checkpoint(student, os.path.join(self.run_dir, "student_best"))
        if self.epoch % self.cfg.LOG.SAVE_CHECKPOINT_FREQ == 0:
            save_checkpoint(state, os.path.join(self.run_dir, f"epoch_{self.epoch}"))
        if ema is not None:
            average = {"model": self.ema.module.state_dict(), "epoch": self.epoch,
                       "test_acc": ema["test"]["top1"]}
            if ema.get("val") is not None:
                average["val_acc"] = ema["val"]["top1"]
            save_checkpoint(average, os.path.join(self.run_dir, "student_ema_latest"))
            if final_stage and (ema.get("val") or ema["test"])["top1"] >= self.best_ema_acc:
                save_checkpoint(average, os.path.join(self.run_dir, "student_ema_best"))

    # --------------------------------------------------------------- signals
    @contextlib.contextmanager
    def stop_on_signals(self):
        """First SIGINT/SIGTERM: finish the step, checkpoint, exit. Second: exit now."""
        def handler(signum, frame):
            if self.stop_signal is not None:
                os._exit(128 + signum)
            self.stop_signal = signum
        previous = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, handler)
        except ValueError:          # not the main thread: no handlers
            pass
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    # ------------------------------------------------------------------ loop
    def train(self):
        """Run the remaining epochs; returns the per-epoch history."""
        if self.writer is not None:
            self.write_hparams(finished=False)
        with self.stop_on_signals():
            while self.epoch <= self.total_epochs:
                if not self.train_epoch():
                    return None
                self.epoch += 1
        if self.val_loader is not None and self.history:
            self.log(selection_summary(self.history))
        if self.writer is not None:
            self.write_hparams()
        return self.history

    # ---------------------------------------------------------------- stages
    def stage_at(self, epoch):
        """``(stage index, epoch within the stage)`` of a global 1-based epoch."""
        return stage_at(self.stages, epoch)

    def enter_stage(self, index):
        """Make stage ``index`` current: a fresh optimizer over its parameters."""
        if index == self.stage_index:
            return
        stage = self.stages[index]
        params = (stage.parameters() if stage.parameters is not None
                  else self.distiller.get_learnable_parameters())
        self.optimizer = self.update_rule.build_optimizer(params)
        set_base_lr(self.optimizer, stage.lr)
        # Gradients a parameter outside the last stage's optimizer gathered go too.
        self.distiller.zero_grad(set_to_none=True)
        self.stage_index = index
        self.distiller.on_stage_start(stage.name)

    def start_epoch(self, epoch):
        """Stage, modes and learning rates for ``epoch``; returns the stage."""
        index, local_epoch = self.stage_at(epoch)
        self.enter_stage(index)
        stage = self.stages[index]
        self.distiller.train()
        for name in stage.eval_modules:
            getattr(self.distiller, name).eval()
        self.distiller.on_epoch_start(local_epoch)
        self.lr_epoch = epoch
        self.set_lr()
        return stage

    def set_lr(self, progress=1.0):
        """Every optimizer's rate for the epoch :meth:`start_epoch` began, ``progress``
        of its steps reached (SOLVER.WARMUP_PER_ITER warms up per step)."""
        factor = stage_lr_factor(self.cfg.SOLVER, self.stages, self.lr_epoch,
                                 self.lr_segments, progress)
        for optimizer in [self.optimizer, *self.aux_optimizers.values()]:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor

    def train_epoch(self):
        """Train one epoch, evaluate and checkpoint. False when stopped by a signal."""
        epoch = self.epoch
        stage = self.start_epoch(epoch)
        if not self.mid_epoch:
            self.train_loader.set_epoch(epoch)
            self.meter = EpochMeter()
            self.epoch_batches = 0
        self.mid_epoch = False
        lr = self.optimizer.param_groups[0]["lr"]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        hooks_start = time.perf_counter()
        for hook in self.hooks:
            hook.before_epoch(self)
        start, images = time.perf_counter(), 0
        try:
            for batch in self.train_loader:
                values = self.run_step(batch)
                images += batch["target"].numel()
                for hook in self.hooks:
                    hook.after_step(self, batch, values)
                if self.stop_requested():
                    self.save(epoch_complete=False)
                    self.log(f"stopped by signal {self.stop_signal} at epoch {epoch}, step "
                             f"{self.global_step}; the checkpoint is saved: continue with "
                             f"--resume")
                    return False
        finally:
            for hook in self.hooks:
                hook.leave_epoch(self)
        elapsed = time.perf_counter() - start
        # The hooks' work ahead (the teacher cache's prefill) counts as training here.
        self.seconds["training"] += time.perf_counter() - hooks_start
        train = self.meter.means()
        if self.meter.scaler_skips:
            train["scaler_skipped_steps"] = self.meter.scaler_skips
        start = time.perf_counter()
        test, val = self.evaluate_epoch()
        ema = self.evaluate_ema()
        self.seconds["evaluation"] += time.perf_counter() - start
        record = {"epoch": epoch, "stage": stage.name, "lr": lr, "train": train, "test": test,
                  **({"val": val} if val is not None else {}),
                  **({"test_ema": ema["test"]} if ema is not None else {}),
                  **({"val_ema": ema["val"]} if ema is not None and ema["val"] else {}),
                  "best_top1": self.best_acc, "epoch_time": elapsed,
                  "images_per_sec": images * max(1, get_world_size()) / max(elapsed, 1e-9),
                  "peak_memory_mb": peak_memory_mb(self.device)}
        lines = [line for hook in self.hooks for line in hook.after_epoch(self, record) or ()]
        self.history.append(record)
        self.log_epoch(record)
        for line in lines:
            self.log(line)
        start = time.perf_counter()
        self.save(epoch_complete=True, test=test, val=val, ema=ema)
        self.seconds["checkpoints"] += time.perf_counter() - start
        return True

    def evaluate_epoch(self):
        """Evaluate the student on the test set (and the validation split) and update
        "best"; returns ``(test, val or None)``.

        Every process evaluates the model rank 0 saves: its BatchNorm statistics (each
        process's last forward moved its own). In fp32 whatever SOLVER.AMP, as
        tools/eval.py evaluates a checkpoint, so the two report the same accuracy.
        """
        self.distiller.eval()
        broadcast_from_main(self.forward_buffers)
        forward = self.recipe.test_transform(self.distiller.forward_test)
        test = evaluate(forward, self.test_loader, self.device)
        val = None
        if self.val_loader is not None:
            val = evaluate(forward, self.val_loader, self.device)
        if self.stage_index == len(self.stages) - 1:    # "best" among the final stage's epochs
            self.best_acc = max(self.best_acc, (val or test)["top1"])
        return test, val

    def evaluate_ema(self):
        """Evaluate the student's weight average as the student (SOLVER.EMA);
        returns ``{"test", "val"}`` (val None without a validation split), or None
        when it is off. Every process evaluates the average rank 0 saves: the
        weights agree (the student's are synchronised), but each process's average
        of BatchNorm statistics follows its own batches."""
        if self.ema is None:
            return None
        broadcast_from_main(list(self.ema.module.buffers()))
        forward = self.recipe.test_transform(lambda image: self.ema.module(image)[0])
        test = evaluate(forward, self.test_loader, self.device)
        val = (evaluate(forward, self.val_loader, self.device)
               if self.val_loader is not None else None)
        if self.stage_index == len(self.stages) - 1:
            self.best_ema_acc = max(self.best_ema_acc, (val or test)["top1"])
        return {"test": test, "val": val}

    def stop_requested(self):
        """Whether a signal asked any process to stop (under DDP: as of the last
        step's all-reduce, so every process stops after the same step)."""
        if not is_distributed():
            return self.stop_signal is not None
        return self.stop_seen

    def discard_step(self, saved_buffers):
        """Leave everything as before a step that is not taken: no state commit, no
        diagnostics, the BatchNorm statistics the forward moved put back."""
        self.distiller.clear_stash()
        self.distiller.pop_diagnostics()
        if saved_buffers is not None:
            torch._foreach_copy_(self.forward_buffers, saved_buffers)

    def run_step(self, batch):
        """One training step on ``batch``; returns the loss values, or None if skipped.

        The forward only computes; the update rule (SOLVER.TRAINER) back-propagates
        and steps the optimizer; then the method's extra phases and state commits
        run (:func:`~mdistill.engine.update_rules.commit_step`). A step whose loss
        is not finite is skipped whole: nothing is updated and the BatchNorm
        statistics the forward moved are put back.
        """
        hard_target = batch["target"]
        self.epoch_batches += 1
        if self.recipe.active:
            # The teacher sees the images the student sees; methods get soft targets.
            batch = self.recipe(batch)
        if self.cfg.SOLVER.WARMUP_PER_ITER:
            self.set_lr(self.epoch_batches / max(len(self.train_loader), 1))
        # fp16's scaler may skip a step too (an overflowing gradient).
        saved = ([buffer.clone() for buffer in self.forward_buffers]
                 if self.cfg.SOLVER.SKIP_NONFINITE_STEPS > 0 or self.scaler.is_enabled()
                 else None)
        with self.update_rule.forward_context(self.model), self.autocast():
            logits, losses = self.model(**batch)
        if self.phase_hook is not None:
            self.phase_hook("forward")
        loss = sum(losses.values())
        # Everything the host needs from this step in one transfer (one device sync):
        # whether every process's loss is finite and whether any process was asked
        # to stop (one all-reduce for both), the loss values, the correct count.
        flags = torch.stack([torch.isfinite(loss.detach()).float(),
                             loss.new_full((), float(self.stop_signal is not None),
                                           dtype=torch.float32)])
        if is_distributed():
            flags = all_reduce_sum(flags) / get_world_size()
        # Training top-1 against the batch's own labels (mixed images have none).
        correct = topk_correct(logits.detach(), hard_target, ks=(1,))[0]
        stats = torch.cat([flags, loss.detach().float().reshape(1),
                           torch.stack([value.detach().float() for value in losses.values()]),
                           correct.float().reshape(1)]).tolist()
        self.stop_seen = stats.pop(1) > 0
        self.optimizer.zero_grad(set_to_none=True)
        if stats[0] < 1:
            self.discard_step(saved)
            self.skipped_steps += 1
            bad = [name for name, value in zip(losses, stats[2:-1]) if not math.isfinite(value)]
            where = f"loss {', '.join(bad) or 'on another process'} is not finite at epoch " \
                    f"{self.epoch}, step {self.global_step + 1}"
            if self.skipped_steps > self.cfg.SOLVER.SKIP_NONFINITE_STEPS:
                raise TrainingStopped(f"{where}; stopping (the last checkpoint is kept; lower "
                                      f"SOLVER.LR or allow skips with SOLVER.SKIP_NONFINITE_STEPS)")
            self.log(f"{where}; step skipped ({self.skipped_steps}/"
                     f"{self.cfg.SOLVER.SKIP_NONFINITE_STEPS})")
            return None
        if not self.update_rule.backward_and_step(losses, self.optimizer, self.scaler):
            # fp16's scaler skipped it: the student did not move, so nothing else may.
            self.discard_step(saved)
            self.meter.scaler_skips += 1
            return None
        commit_step(self.distiller)
        if self.phase_hook is not None:
            self.phase_hook("step")
        self.global_step += 1
        if self.ema is not None:
            # After the accepted step only; timm's step count drives its warm-up.
            self.ema.update(self.distiller.student, step=self.global_step)
        values = dict(zip(losses, stats[2:-1]))
        values["loss"] = stats[1]
        self.meter.update(values, stats[-1], hard_target.numel())
        if self.writer is not None and self.global_step % self.cfg.LOG.TENSORBOARD_FREQ == 0:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, self.global_step)
            self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"],
                                   self.global_step)
            # Diagnostics stay on the device until they are written (no sync per step).
            for name, value in self.distiller.pop_diagnostics().items():
                self.writer.add_scalar(f"{self.method}/{name}", value, self.global_step)
        return values

    # --------------------------------------------------------------- logging
    def log_epoch(self, record):
        train, test = record["train"], record["test"]
        stage = f" ({record['stage']})" if len(self.stages) > 1 else ""
        self.log(f"epoch {record['epoch']}/{self.total_epochs}{stage} | lr {record['lr']:.4g} | "
                 f"train loss {train.get('loss', float('nan')):.4f} top1 {train['top1']:.2f} | "
                 f"test top1 {test['top1']:.2f} top5 {test['top5']:.2f} loss {test['loss']:.4f} | "
                 + (f"val top1 {record['val']['top1']:.2f} | " if "val" in record else "")
                 + (f"ema test top1 {record['test_ema']['top1']:.2f} | "
                    if "test_ema" in record else "")
                 + f"best {record['best_top1']:.2f} | {record['epoch_time']:.1f}s "
                 f"{record['images_per_sec']:.0f} img/s")
        if not self.main or self.run_dir is None:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is None:
            return
        step = self.global_step
        for name, value in train.items():
            self.writer.add_scalar(f"train/epoch_{name}", value, step)
        for name in ("top1", "top5", "loss"):
            self.writer.add_scalar(f"test/{name}", test[name], step)
            if "test_ema" in record:
                self.writer.add_scalar(f"test_ema/{name}", record["test_ema"][name], step)
            if "val" in record:
                self.writer.add_scalar(f"val/{name}", record["val"][name], step)
        # "best" is chosen on the validation split when there is one.
        self.writer.add_scalar("val/best_top1" if "val" in record else "test/best_top1",
                               record["best_top1"], step)
        self.writer.add_scalar("train/epoch", record["epoch"], step)
        self.writer.add_scalar("train/stage", self.stage_index, step)
        self.writer.add_scalar("perf/images_per_sec", record["images_per_sec"], step)
        self.writer.add_scalar("perf/epoch_time", record["epoch_time"], step)
        self.writer.add_scalar("perf/peak_memory_mb", record["peak_memory_mb"], step)
        for name, value in self.hparam_metrics().items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def hparam_metrics(self):
        """The HPARAMS tab's metrics after the epochs so far."""
        last = self.history[-1]
        return {"hparam/best_top1": self.best_acc, "hparam/last_top1": last["test"]["top1"],
                "hparam/last_top5": last["test"]["top5"],
                "hparam/best_top5": max(r["test"]["top5"] for r in self.history)}

    def write_hparams(self, finished=True):
        """Write the TensorBoard HPARAMS entry: the run's settings and its metrics.

        Written when the run starts (``finished`` False: the session's start
        only), so running and stopped runs are listed too, with the metrics of
        their epochs so far; written again with the session's end when it
        finishes. The metrics are scalars (``hparam/...``) written after every
        epoch (:meth:`log_epoch`).
        """
        from torch.utils.tensorboard.summary import hparams
        names = dict.fromkeys(("hparam/best_top1", "hparam/last_top1", "hparam/last_top5",
                               "hparam/best_top5"), 0.0)
        experiment, start, end = hparams(run_hparams(self.cfg), names)
        for summary in (experiment, start, end) if finished else (experiment, start):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()


def selection_summary(history):
    """One line: the test top-1 of the final epoch and of the epoch chosen on the
    validation split (the "best" checkpoint; the last of ties, as saved)."""
    final = [record for record in history if record.get("stage") == history[-1].get("stage")]
    best = max(reversed(final), key=lambda record: record["val"]["top1"])
    last = history[-1]
    return (f"test top1 of the final checkpoint (epoch {last['epoch']}): "
            f"{last['test']['top1']:.2f}; of the best on validation (epoch {best['epoch']}, "
            f"val top1 {best['val']['top1']:.2f}): {best['test']['top1']:.2f}")


def peak_memory_mb(device):
    """Peak memory of this process: CUDA allocations, or the CPU resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
