"""Evaluate saved checkpoints: our runs, our students, mdistiller teacher files."""
import glob
import os
import re
import time
from dataclasses import dataclass

import torch

from ..config import cfg_from_text, get_cfg, load_cfg
from ..data import build_test_loader
from ..engine.builder import build_configured_dataset, resolve_device
from ..engine.checkpoint import extract_state_dict, load_checkpoint, load_model_weights
from ..engine.evaluate import evaluate
from ..engine.recipe import resize_images
from ..errors import UserError
from ..models import build_model


@dataclass
class Target:
    """One checkpoint to evaluate and what it holds."""
    path: str
    model: str
    dataset: str
    cfg: object


def expand_paths(patterns, ema=False):
    """Files, run folders (their student_best) and globs -> checkpoint files.

    With ``ema`` a run folder gives its student's weight average instead
    (student_ema_best, else student_ema_latest; SOLVER.EMA).
    """
    names = ("student_ema_best", "student_ema_latest") if ema else ("student_best",
                                                                     "student_latest")
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"no checkpoint matches {pattern!r}")
        for match in matches:
            if os.path.isdir(match):
                for name in names:
                    if os.path.isfile(os.path.join(match, name)):
                        paths.append(os.path.join(match, name))
                        break
                else:
                    raise UserError(f"run folder {match} has no {' or '.join(names)}"
                                    + (" (was it trained with SOLVER.EMA.ENABLE True?)"
                                       if ema else ""))
            elif not os.path.isfile(match):
                raise UserError(f"checkpoint not found: {match}")
            else:
                paths.append(match)
    return paths


def describe(path, checkpoint, model=None, dataset=None, cfg_path=None):
    """Work out the architecture and dataset a checkpoint belongs to."""
    cfg = None
    sibling = os.path.join(os.path.dirname(path), "config.yaml")
    if cfg_path:
        cfg = load_cfg(cfg_path)
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), str):
        cfg = cfg_from_text(checkpoint["config"])
    elif os.path.isfile(sibling):
        cfg = load_cfg(sibling)
    if model is None and cfg is not None:
        model = cfg.DISTILLER.STUDENT
    if model is None:
        # mdistiller's release: download_ckpts/cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth
        found = re.match(r"(.+)_vanilla$", os.path.basename(os.path.dirname(os.path.abspath(path))))
        model = found.group(1) if found else None
    if model is None:
        raise UserError(f"cannot tell which model {path} holds; pass --model NAME")
    dataset = dataset or (cfg.DATASET.TYPE if cfg is not None else "cifar100")
    return Target(path, model, dataset, cfg)


def evaluate_checkpoints(patterns, model=None, dataset=None, cfg_path=None, data_root=None,
                         batch_size=256, device="auto", throughput=False, ema=False):
    """Evaluate every checkpoint ``patterns`` name.

    Returns:
        A list of dicts: path, model, dataset, top1, top5, loss, params and,
        with ``throughput``, images_per_sec (inference, batch ``batch_size``).
    """
    device = resolve_device(device)
    results, loaders = [], {}
    for path in expand_paths(patterns, ema):
        checkpoint = load_checkpoint(path)
        target = describe(path, checkpoint, model, dataset, cfg_path)
        cfg = target.cfg or get_cfg()
        root = data_root or cfg.DATASET.ROOT
        key = (target.dataset, root)
        if key not in loaders:
            if target.cfg is None:
                cfg = get_cfg()
                cfg.DATASET.TYPE = target.dataset
            data = build_configured_dataset(cfg, target.dataset, root)
            loaders[key] = (data, build_test_loader(
                data.test, batch_size, device, mean=data.mean, std=data.std,
                num_workers=cfg.DATASET.NUM_WORKERS))
        data, loader = loaders[key]
        # A run trained on resized images (DATASET.RESIZE) is built and evaluated at
        # that size, as it evaluated itself.
        size = cfg.DATASET.RESIZE if target.cfg is not None else 0
        network = build_model(target.model, data.num_classes, dataset=target.dataset,
                              image_size=size or data.image_size,
                              small_input=cfg.MODEL.SMALL_INPUT)
        load_model_weights(network, extract_state_dict(checkpoint, path), target.model, path)
        network.to(device).eval()
        metrics = evaluate(lambda image: network(resize_images(image, size) if size else image)[0],
                           loader, device)
        row = {"path": path, "model": target.model, "dataset": target.dataset,
               "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
               "params": sum(p.numel() for p in network.parameters())}
        if throughput:
            row["images_per_sec"] = measure_throughput(network, loader, device)
        results.append(row)
    return results


@torch.no_grad()
def measure_throughput(network, loader, device, batches=20):
    """Inference images per second over up to ``batches`` test batches (after one warm-up)."""
    images = [batch["image"] for _, batch in zip(range(batches + 1), loader)]
    network(images[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, count = time.perf_counter(), 0
    for image in images[1:] or images:
        network(image)
        count += image.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / max(time.perf_counter() - start, 1e-9)
