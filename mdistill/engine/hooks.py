"""What happens around the training loop, beside the steps themselves.

The trainer's loop calls each hook at fixed points (detectron2's ``HookBase``
is the model): before an epoch, after every step, after the epoch (before its
record is logged) and when the epoch's loop is left (finished or stopped). The
loop file then holds the loop; progress display, the teacher source's work
ahead and periodic checkpoints live here.
"""
import sys
import time

from ..utils.dist import get_world_size


class HookBase:
    """A piece of the loop's surroundings; every method is optional."""

    def before_epoch(self, trainer):
        """Called after the epoch's stage, learning rates and loader are set."""

    def after_step(self, trainer, batch, values):
        """Called after every step; ``values`` are its losses, or None if skipped."""

    def after_epoch(self, trainer, record):
        """Called with the epoch's record before it is logged; may add to it.

        Returns:
            Lines to log after the epoch's line (or None).
        """

    def leave_epoch(self, trainer):
        """Called when the epoch's loop is left, finished or stopped by a signal."""


class ProgressHook(HookBase):
    """A tqdm bar on a terminal; without one (SLURM, nohup, logs) a line every
    LOG.PRINT_FREQ steps. Only the main process shows progress."""

    def __init__(self, print_freq):
        self.print_freq = print_freq
        self.bar = None

    def before_epoch(self, trainer):
        self.start, self.images = time.perf_counter(), 0
        self.bar = None
        if trainer.main and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=len(trainer.train_loader), initial=trainer.meter.steps,
                            desc=f"epoch {trainer.epoch}/{trainer.total_epochs}", leave=False,
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def after_step(self, trainer, batch, values):
        self.images += batch["target"].numel()
        steps = trainer.meter.steps
        if values is None:
            return
        if self.bar is not None:
            self.bar.update(1)
            if steps % 10 == 0:
                means = trainer.meter.means()
                self.bar.set_postfix(loss=f"{means['loss']:.3f}", top1=f"{means['top1']:.1f}")
        elif trainer.main and self.print_freq and steps % self.print_freq == 0:
            means, seconds = trainer.meter.means(), time.perf_counter() - self.start
            trainer.log(f"epoch {trainer.epoch}/{trainer.total_epochs} step {steps}/"
                        f"{len(trainer.train_loader)} | loss {means['loss']:.4f} | lr "
                        f"{trainer.optimizer.param_groups[0]['lr']:.4g} | "
                        f"{self.images * get_world_size() / max(seconds, 1e-9):.0f} img/s")

    def leave_epoch(self, trainer):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TeacherSourceHook(HookBase):
    """The teacher source's work ahead of an epoch (the teacher cache fills the
    views the epoch will ask for) and its report (hit rate and size) after it."""

    def before_epoch(self, trainer):
        source = trainer.distiller.teacher_source
        if source is not None:
            source.before_epoch(trainer.train_loader, trainer.autocast)

    def after_epoch(self, trainer, record):
        source = trainer.distiller.teacher_source
        report = source.epoch_report() if source is not None else None
        if report is None:
            return None
        text, record["teacher_cache"] = report
        return [text]


class PeriodicCheckpointHook(HookBase):
    """``latest`` every LOG.SAVE_EVERY_N_ITERS optimizer steps inside an epoch (the
    epoch's end writes it anyway)."""

    def __init__(self, every):
        self.every = every

    def after_step(self, trainer, batch, values):
        if (self.every and values is not None and trainer.global_step % self.every == 0
                and trainer.meter.steps < len(trainer.train_loader)):
            trainer.save(epoch_complete=False)
