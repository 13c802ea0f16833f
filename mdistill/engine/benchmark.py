"""Training throughput of a config: images/s, time per phase, peak memory.

It runs the real Trainer's step on an in-memory dataset of the config's
image size (the same fast data path CIFAR-100 uses), with random teacher
weights, for each AMP and channels_last setting asked for.
"""
import os
import platform
import time
from datetime import date

import torch

from ..config import load_cfg
from ..utils.dist import get_world_size
from .builder import build_experiment, resolve_device
from .trainer import Trainer, peak_memory_mb


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


def benchmark_setting(cfg_path, opts, amp, channels_last, iters, warmup, batch_size):
    """Measure one (amp, channels_last) setting.

    Returns:
        dict with images_per_sec, data_ms, forward_ms, step_ms (per iteration),
        peak_memory_mb, and the setting.
    """
    num_train = batch_size * (iters + max(5, iters // 3) + warmup)
    cfg = load_cfg(cfg_path, list(opts) + [
        "SOLVER.AMP", amp, "SOLVER.CHANNELS_LAST", str(channels_last),
        "SOLVER.BATCH_SIZE", str(batch_size), "DATASET.TYPE", "synthetic",
        "DATASET.SYNTHETIC.NUM_TRAIN", str(num_train), "DATASET.SYNTHETIC.NUM_TEST", "64"])
    device = resolve_device(cfg.DEVICE)
    experiment = build_experiment(cfg, device=device, load_teacher_weights=False)
    trainer = Trainer(experiment, run_dir=None, writer=None, log=lambda text: None)
    trainer.distiller.train()
    trainer.distiller.on_epoch_start(1)
    loader = trainer.train_loader
    loader.set_epoch(1)
    totals = {"data": 0.0, "forward": 0.0, "step": 0.0}
    marks = {}

    def hook(phase):
        _sync(device)
        marks[phase] = time.perf_counter()

    iterator = iter(loader)
    # Warm-up (allocator, oneDNN/cuDNN kernel choice, compilation) is not counted.
    for _ in range(warmup):
        trainer.run_step(next(iterator))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # End to end, as training runs: no synchronisation beyond the trainer's own.
    start = time.perf_counter()
    images = 0
    for _ in range(iters):
        batch = next(iterator)
        trainer.run_step(batch)
        images += batch["target"].numel()
    _sync(device)
    elapsed = time.perf_counter() - start
    # The split into phases needs a synchronisation at each boundary (which slows a GPU
    # that would otherwise run ahead), so it is timed separately, on fewer steps.
    trainer.phase_hook = hook
    split_iters = max(5, iters // 3)
    for _ in range(split_iters):
        before = time.perf_counter()
        batch = next(iterator)
        _sync(device)
        fetched = time.perf_counter()
        trainer.run_step(batch)
        totals["data"] += fetched - before
        totals["forward"] += marks["forward"] - fetched
        totals["step"] += marks["step"] - marks["forward"]
    return {"amp": amp, "channels_last": channels_last,
            "images_per_sec": images * get_world_size() / elapsed,
            "iter_ms": 1000 * elapsed / iters,
            "data_ms": 1000 * totals["data"] / split_iters,
            "forward_ms": 1000 * totals["forward"] / split_iters,
            "step_ms": 1000 * totals["step"] / split_iters,
            "peak_memory_mb": peak_memory_mb(device), "device": str(device)}


def bare_compute(cfg_path, opts, amp, channels_last, iters, warmup, batch_size):
    """Images/s of the models alone: teacher forward without autograd, student
    forward, KD loss, backward and an SGD step on a fixed tensor already on the
    device. No data loading, no distiller, no trainer: the floor against which
    the pipeline's overhead is measured."""
    import torch.nn.functional as F
    from ..distillers import kd_loss
    from ..models import build_model
    cfg = load_cfg(cfg_path, list(opts))
    device = resolve_device(cfg.DEVICE)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    num_classes = cfg.DATASET.SYNTHETIC.NUM_CLASSES
    student = build_model(cfg.DISTILLER.STUDENT, num_classes).to(device, memory_format=memory_format)
    teacher = build_model(cfg.DISTILLER.TEACHER, num_classes).to(device, memory_format=memory_format)
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    image = torch.randn(batch_size, 3, 32, 32, device=device).to(memory_format=memory_format)
    target = torch.randint(0, num_classes, (batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            with torch.no_grad():
                teacher_logits = teacher(image)[0]
            logits = student(image)[0]
            loss = F.cross_entropy(logits.float(), target) + kd_loss(logits, teacher_logits, 4.0)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return batch_size * iters / (time.perf_counter() - start)


def format_rows(rows):
    """A Markdown table of benchmark results."""
    lines = ["| AMP | channels_last | images/s | bare models images/s | overhead | ms/iter | "
             "data ms | forward ms | backward+step ms | peak memory MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        bare = row.get("bare_images_per_sec")
        overhead = f"{100 * (1 - row['images_per_sec'] / bare):+.1f}%" if bare else "-"
        lines.append(f"| {row['amp']} | {'yes' if row['channels_last'] else 'no'} | "
                     f"{row['images_per_sec']:.1f} | {f'{bare:.1f}' if bare else '-'} | "
                     f"{overhead} | {row['iter_ms']:.1f} | {row['data_ms']:.2f} | "
                     f"{row['forward_ms']:.1f} | {row['step_ms']:.1f} | "
                     f"{row['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def report(cfg_path, opts, rows, device, batch_size, iters, warmup, command):
    """The Markdown section appended to docs/benchmarks.md."""
    cfg = load_cfg(cfg_path, list(opts))
    return (f"\n### {cfg.DISTILLER.TYPE} {cfg.DISTILLER.TEACHER} -> {cfg.DISTILLER.STUDENT}, "
            f"batch {batch_size}, {date.today().isoformat()}\n\n"
            f"Machine: {machine_description(device)}  \n"
            f"Command: `{command}`  \n"
            f"{iters} timed iterations after {warmup} warm-up ones.\n\n{format_rows(rows)}\n")
