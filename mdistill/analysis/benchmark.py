"""Training speed of a config against its bare models.

Three measurements, each for any registered method and any dataset type:

* :func:`benchmark_setting`: images/s of the real Trainer's step (loader,
  forward, update, bookkeeping), its phases and peak memory, for one AMP,
  memory-format and teacher-cache setting (``off``; ``cold``: an empty cache
  that each step fills, the cost of a run's first epoch; ``warm``: every view
  already stored).
* :func:`bare_speed`, measured in the same process on the same
  objects: the method's own ``forward_train`` (live teacher), its update rule,
  extra phases and state commits, on one fixed batch already on the device.
  That is the method's loss on the method's own models with nothing else: no
  loader, no trainer bookkeeping. It is the floor the pipeline is compared to,
  and what a warm teacher cache can beat.
* :func:`whole_run`: the wall time of a whole ``tools/train.py`` process
  (start-up, data, evaluation, checkpoints) against the bare models' time for
  the same number of training images.

Data are a synthetic stand-in (DATASET.SYNTHETIC's image size and classes,
with the config's model family and the in-memory loader CIFAR uses) or, with
``data="real"``, the config's own dataset. Teachers have random weights.

Each measurement is given in wall time and in the process's CPU time. On a
machine shared with other work, wall time measures the share of the processor
the process got; CPU time (with one thread, which has no threads spinning at
barriers) still measures the work.
"""
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date

import torch

from ..config import load_cfg
from ..data import build_dataset
from ..engine.builder import build_experiment, resolve_device
from ..engine.checkpoint import save_checkpoint
from ..engine.trainer import Trainer, peak_memory_mb
from ..engine.update_rules import commit_step
from ..utils.dist import get_world_size

CACHE_MODES = ("off", "cold", "warm")
DATA_MODES = ("synthetic", "real")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_description(device):
    """One line naming the processor (and GPU) and the library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{cpu}, {len(os.sched_getaffinity(0))} cores available to PyTorch "
             f"({torch.get_num_threads()} threads)"]
    if device.type == "cuda":
        parts.insert(0, torch.cuda.get_device_name(device))
    parts.append(f"torch {torch.__version__}")
    return "; ".join(parts)


def stand_in_data(cfg, num_train, num_test=64):
    """Synthetic data of DATASET.SYNTHETIC's image size and number of classes."""
    synthetic = cfg.DATASET.SYNTHETIC
    return build_dataset("synthetic", None, num_train=num_train, num_test=num_test,
                         num_classes=synthetic.NUM_CLASSES, image_size=synthetic.IMAGE_SIZE)


def build_trainer(cfg_path, opts, amp, channels_last, batch_size, num_train, data="synthetic",
                  cache_folder=""):
    """A Trainer (writing nothing) for one setting, at the start of epoch 1."""
    cfg = load_cfg(cfg_path, list(opts) + [
        "SOLVER.AMP", amp, "SOLVER.CHANNELS_LAST", str(channels_last),
        "SOLVER.BATCH_SIZE", str(batch_size), "DISTILLER.TEACHER_CACHE", cache_folder])
    device = resolve_device(cfg.DEVICE)
    stand_in = stand_in_data(cfg, num_train) if data == "synthetic" else None
    experiment = build_experiment(cfg, device=device, load_teacher_weights=False, data=stand_in)
    trainer = Trainer(experiment, run_dir=None, writer=None, log=lambda text: None)
    trainer.start_epoch(1)
    trainer.train_loader.set_epoch(1)
    return trainer, experiment


def fill_teacher_cache(trainer):
    """Store the teacher's logits of every view of epoch 1 (a warm cache)."""
    cache = trainer.distiller.teacher_cache
    cache.prefill(trainer.distiller.teacher, trainer.train_loader, trainer.autocast)
    cache.reset_counts()


def benchmark_setting(cfg_path, opts, amp="none", channels_last=False, iters=30, warmup=5,
                      batch_size=64, teacher_cache="off", data="synthetic", bare=True):
    """Measure one setting.

    Returns:
        dict with images_per_sec, iter_ms, data_ms, forward_ms, step_ms (per
        iteration), peak_memory_mb, the teacher cache's hit rate, the bare
        models' images/s (unless ``bare`` is False), and the setting; or
        ``{"skipped": reason}`` when the teacher cache cannot serve the config.
    """
    split_iters = max(min(5, iters), iters // 3)
    batches = warmup + iters + split_iters
    folder = tempfile.mkdtemp(prefix="mdistill-cache-") if teacher_cache != "off" else ""
    try:
        # At least 256 samples: CRD draws its negatives from the other samples.
        trainer, experiment = build_trainer(cfg_path, opts, amp, channels_last, batch_size,
                                            max(256, batch_size * (batches + 1)), data, folder)
        cache = trainer.distiller.teacher_cache
        if teacher_cache != "off" and cache is None:
            return {"skipped": experiment.teacher_cache_note}
        if len(trainer.train_loader) < batches:
            raise ValueError(f"the training data have {len(trainer.train_loader)} batches of "
                             f"{batch_size}; the benchmark needs {batches}")
        if teacher_cache == "warm":
            fill_teacher_cache(trainer)
        row, last_batch = _time_pipeline(trainer, iters, warmup, split_iters)
        row.update(amp=amp, channels_last=channels_last, teacher_cache=teacher_cache,
                   method=experiment.cfg.DISTILLER.TYPE, data=data)
        if cache is not None:       # cold: every step misses and computes its batch whole
            row["hit_rate"] = 1 - cache.step_misses / max(cache.step_views, 1)
        if bare:
            row["bare_images_per_sec"], row["bare_cpu_ms"] = bare_speed(trainer, last_batch,
                                                                        iters, warmup)
        return row
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def _time_pipeline(trainer, iters, warmup, split_iters):
    device = trainer.device
    totals = {"data": 0.0, "forward": 0.0, "step": 0.0}
    marks = {}

    def hook(phase):
        _sync(device)
        marks[phase] = time.perf_counter()

    iterator = iter(trainer.train_loader)
    # Warm-up (allocator, oneDNN/cuDNN kernel choice, compilation) is not counted.
    for _ in range(warmup):
        trainer.run_step(next(iterator))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # End to end, as training runs: no synchronisation beyond the trainer's own.
    start, cpu_start, images = time.perf_counter(), time.process_time(), 0
    for _ in range(iters):
        batch = next(iterator)
        trainer.run_step(batch)
        images += batch["target"].numel()
    _sync(device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # The split into phases needs a synchronisation at each boundary (which slows a GPU
    # that would otherwise run ahead), so it is timed separately, on fewer steps.
    trainer.phase_hook = hook
    for _ in range(split_iters):
        before = time.perf_counter()
        batch = next(iterator)
        _sync(device)
        fetched = time.perf_counter()
        trainer.run_step(batch)
        totals["data"] += fetched - before
        totals["forward"] += marks["forward"] - fetched
        totals["step"] += marks["step"] - marks["forward"]
    trainer.phase_hook = None
    return {"images_per_sec": images * get_world_size() / elapsed,
            "iter_ms": 1000 * elapsed / iters, "cpu_ms": 1000 * cpu / iters,
            "data_ms": 1000 * totals["data"] / split_iters,
            "forward_ms": 1000 * totals["forward"] / split_iters,
            "step_ms": 1000 * totals["step"] / split_iters,
            "peak_memory_mb": peak_memory_mb(device), "device": str(device)}, batch


def bare_speed(trainer, batch, iters, warmup):
    """The method's own step on one fixed ``batch`` (see the module docstring):
    ``forward_train`` with the live teacher, the update rule, extra phases and
    state commits.

    Returns:
        ``(images per second of wall time, CPU milliseconds per step)``.
    """
    distiller, device = trainer.distiller, trainer.device
    batch = dict(batch)
    image, target = batch.pop("image"), batch.pop("target")

    def step():
        with trainer.update_rule.forward_context(trainer.model), trainer.autocast():
            _, losses = distiller.forward_train(image, target, **batch)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.update_rule.backward_and_step(losses, trainer.optimizer, trainer.scaler)
        commit_step(distiller)

    for _ in range(warmup):
        step()
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    _sync(device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return target.numel() * iters * get_world_size() / elapsed, 1000 * cpu / iters


def whole_run(cfg_path, opts, epochs=1, iters=20, warmup=3):
    """Time ``tools/train.py`` for ``epochs`` epochs, start to exit, against the bare models.

    The run uses the config and ``opts`` as given (its data, teacher cache, ...), a
    random teacher saved to a temporary file unless DISTILLER.TEACHER_WEIGHTS names
    one, and writes its folder under a temporary LOG.PREFIX.

    Returns:
        dict: wall_s and cpu_s (the whole process), loop_s (its training epochs'
        wall time), images, bare_images_per_sec, bare_s and bare_cpu_s (those
        images at the bare models' speed), overhead (wall_s / bare_s - 1) and
        cpu_overhead (cpu_s / bare_cpu_s - 1).
    """
    cfg = load_cfg(cfg_path, list(opts))
    folder = tempfile.mkdtemp(prefix="mdistill-whole-run-")
    try:
        extra = ["SOLVER.EPOCHS", str(epochs), "LOG.PREFIX", folder, "EXPERIMENT.NAME", "run"]
        experiment = build_experiment(cfg, load_teacher_weights=False)
        if experiment.distiller.teacher is not None and not cfg.DISTILLER.TEACHER_WEIGHTS:
            path = os.path.join(folder, "teacher.pth")
            save_checkpoint({"model": experiment.distiller.teacher.state_dict()}, path)
            extra += ["DISTILLER.TEACHER_WEIGHTS", path]
        del experiment
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        command = [sys.executable, os.path.join(root, "tools", "train.py"), "--cfg", cfg_path,
                   *opts, *extra]
        start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
        if result.returncode != 0:
            raise RuntimeError(f"tools/train.py failed: {result.stderr.strip()[-2000:]}")
        run_dir = os.path.join(folder, cfg.EXPERIMENT.PROJECT, "run")
        with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
            records = [json.loads(line) for line in handle]
        with open(os.path.join(run_dir, "log.txt")) as handle:
            log = handle.read()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # The bare models at the run's own setting, on a batch of its data, live teacher.
    trainer, _ = build_trainer(cfg_path, opts, cfg.SOLVER.AMP, cfg.SOLVER.CHANNELS_LAST,
                               cfg.SOLVER.BATCH_SIZE, 0, "real")
    batch = next(iter(trainer.train_loader))
    bare, bare_cpu_ms = bare_speed(trainer, batch, iters, warmup)
    images = round(sum(record["images_per_sec"] * record["epoch_time"] for record in records))
    bare_s = images / bare
    bare_cpu_s = bare_cpu_ms / 1000 * images / batch["target"].numel()
    return {"wall_s": wall, "cpu_s": cpu, "loop_s": sum(r["epoch_time"] for r in records),
            "images": images, "bare_images_per_sec": bare, "bare_s": bare_s,
            "bare_cpu_s": bare_cpu_s, "overhead": wall / bare_s - 1,
            "cpu_overhead": cpu / bare_cpu_s - 1, "epochs": epochs, "log": log}


def format_rows(rows):
    """A Markdown table of :func:`benchmark_setting` results."""
    lines = ["| method | AMP | channels_last | teacher cache | images/s | CPU ms/iter | "
             "bare models images/s | bare CPU ms/iter | speed vs bare | data ms | forward ms | "
             "backward+step ms | peak memory MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        speed, bare = row["images_per_sec"], row.get("bare_images_per_sec")
        cache = row["teacher_cache"]
        if "hit_rate" in row:
            cache += f" ({100 * row['hit_rate']:.0f}% hits)"
        bare_columns = (f"{bare:.1f} | {row['bare_cpu_ms']:.0f} | {speed / bare:.2f}x"
                        if bare else "- | - | -")
        lines.append(f"| {row['method']} | {row['amp']} | "
                     f"{'yes' if row['channels_last'] else 'no'} | {cache} | {speed:.1f} | "
                     f"{row['cpu_ms']:.0f} | {bare_columns} | {row['data_ms']:.2f} | "
                     f"{row['forward_ms']:.1f} | {row['step_ms']:.1f} | "
                     f"{row['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def report(cfg_path, opts, rows, device, batch_size, iters, warmup, command, data="synthetic"):
    """The Markdown section appended to docs/benchmarks.md."""
    cfg = load_cfg(cfg_path, list(opts))
    return (f"\n### {cfg.DISTILLER.TYPE} {cfg.DISTILLER.TEACHER} -> {cfg.DISTILLER.STUDENT}, "
            f"batch {batch_size}, {data} data, {date.today().isoformat()}\n\n"
            f"Machine: {machine_description(device)}  \n"
            f"Command: `{command}`  \n"
            f"{iters} timed iterations after {warmup} warm-up ones.\n\n{format_rows(rows)}\n")
