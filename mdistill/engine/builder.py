"""From a config to the objects of one experiment: data, models, distiller."""
import inspect
import os
from dataclasses import dataclass, replace

import torch

from ..data import (DATASETS, apply_split_options, build_dataset, build_test_loader,
                    build_train_loader)
from ..distillers import DISTILLERS, build_distiller
from ..distillers.teachers import CachedTeacher
from ..errors import UserError
from ..models import build_model, is_external
from ..utils.dist import barrier, get_local_rank, get_rank, get_world_size
from .checkpoint import extract_state_dict, load_checkpoint, load_model_weights
from .combinations import CONFIG_KEY, check_combination, check_model_outputs, check_switches
from .teacher_cache import build_teacher_cache
from .update_rules import UPDATE_RULES

# mdistiller's layout of its released CIFAR teachers.
MDISTILLER_TEACHER = "download_ckpts/cifar_teachers/{arch}_vanilla/ckpt_epoch_240.pth"


def resolve_device(name):
    """``torch.device`` for DEVICE (auto | cpu | cuda | cuda:N), or a UserError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"DEVICE {name!r} under torchrun: every process would use that one "
                        f"GPU; each process uses the GPU of its LOCAL_RANK with DEVICE cuda or "
                        f"auto (pick the GPUs with CUDA_VISIBLE_DEVICES)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"DEVICE {name!r} requested but CUDA is not available on this "
                            f"machine; use DEVICE cpu (or auto)")
        index = int(name[5:]) if ":" in name else int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise UserError(f"DEVICE {name!r}: this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s)")
        return torch.device("cuda", index)
    return torch.device("cpu")


def dataset_options(cfg):
    """Keyword options of the dataset named by DATASET.TYPE."""
    if cfg.DATASET.TYPE == "synthetic":
        synthetic = cfg.DATASET.SYNTHETIC
        return {"num_train": synthetic.NUM_TRAIN, "num_test": synthetic.NUM_TEST,
                "num_classes": synthetic.NUM_CLASSES, "image_size": synthetic.IMAGE_SIZE}
    dataset = cfg.DATASET
    for key in ("MEAN", "STD"):
        values = dataset[key]
        if values and (len(values) != 3 or (key == "STD" and min(values) <= 0)):
            raise UserError(f"DATASET.{key} needs 3 values (one per channel), positive for "
                            f"STD, got {list(values)}")
    taken = inspect.signature(DATASETS.get(dataset.TYPE)).parameters
    if dataset.IMAGE_SIZE and "image_size" not in taken:
        raise UserError(f"DATASET.IMAGE_SIZE is not an option of dataset {dataset.TYPE!r} "
                        f"(its images have a fixed size); set it to 0")
    # Given statistics spare the datasets that measure their own a pass over the images.
    options = {"image_size": dataset.IMAGE_SIZE, "mean": tuple(dataset.MEAN) or None,
               "std": tuple(dataset.STD) or None, "num_workers": dataset.NUM_WORKERS}
    return {name: value for name, value in options.items()
            if name in taken and value not in (None, 0)}


def build_configured_dataset(cfg, name=None, root=None):
    """The dataset of ``cfg`` (or ``name`` under ``root``) with DATASET.MEAN and
    DATASET.STD in place of its own statistics when they are given."""
    data = build_dataset(name or cfg.DATASET.TYPE, root or cfg.DATASET.ROOT,
                         cfg.DATASET.DOWNLOAD, **dataset_options(cfg))
    if cfg.DATASET.MEAN:
        data = replace(data, mean=tuple(cfg.DATASET.MEAN))
    if cfg.DATASET.STD:
        data = replace(data, std=tuple(cfg.DATASET.STD))
    return data


def load_dataset_once_per_node(cfg):
    """Build the dataset; in a distributed run the global rank 0 goes first (it
    downloads into DATASET.ROOT), then each other node's local rank 0 (which finds
    those files on a shared filesystem, or downloads into its own disk), then the
    remaining processes, which read what their node's first process wrote. So no
    two processes ever write the same files at once."""
    def build():
        dataset = cfg.DATASET
        return apply_split_options(build_configured_dataset(cfg), dataset.TRAIN_PER_CLASS,
                                   dataset.TRAIN_FRACTION, dataset.VAL_FRACTION,
                                   dataset.SUBSET_SEED)
    if get_world_size() == 1:
        return build()
    data = build() if get_rank() == 0 else None
    barrier()
    if data is None and get_local_rank() == 0:
        data = build()
    barrier()
    return data if data is not None else build()


def per_process_batch(global_batch, world_size, key="SOLVER.BATCH_SIZE"):
    """Split a global batch over processes, or raise a UserError."""
    if global_batch < world_size or global_batch % world_size:
        raise UserError(f"{key} {global_batch} must be a multiple of the number of processes "
                        f"({world_size}), e.g. {max(world_size, global_batch // world_size * world_size) or world_size}")
    return global_batch // world_size


def teacher_weights_path(cfg):
    """The teacher checkpoint path to load, or None for torchvision weights."""
    if cfg.DISTILLER.TEACHER_WEIGHTS:
        return cfg.DISTILLER.TEACHER_WEIGHTS
    if cfg.DATASET.TYPE == "imagenet":
        return None
    return MDISTILLER_TEACHER.format(arch=cfg.DISTILLER.TEACHER)


def model_options(cfg, data, role):
    """What :func:`build_model` needs beyond the name for the teacher or the
    student (``role``); torchvision and timm models read it, the zoo not."""
    pretrained = cfg.DISTILLER[f"{role.upper()}_PRETRAINED"]
    name = cfg.DISTILLER[role.upper()]
    if pretrained and not is_external(name):
        raise UserError(f"DISTILLER.{role.upper()}_PRETRAINED is for torchvision:<name> and "
                        f"timm:<name> models, not {name!r}; set DISTILLER.TEACHER_WEIGHTS instead")
    return {"image_size": data.image_size, "small_input": cfg.MODEL.SMALL_INPUT,
            "pretrained": pretrained}


def load_teacher(model, cfg):
    """Load the teacher's weights as DISTILLER.TEACHER_WEIGHTS says."""
    arch = cfg.DISTILLER.TEACHER
    if is_external(arch) and not cfg.DISTILLER.TEACHER_WEIGHTS:
        if cfg.DISTILLER.TEACHER_PRETRAINED:
            return f"{arch.split(':')[0]}'s pretrained weights"
        raise UserError(f"teacher {arch} has no weights: set DISTILLER.TEACHER_WEIGHTS to a "
                        f"checkpoint (e.g. the student_best of a DISTILLER.TYPE NONE run of it) "
                        f"or DISTILLER.TEACHER_PRETRAINED True")
    path = teacher_weights_path(cfg)
    if path is None:
        from ..models import torchvision_weights
        weights = torchvision_weights(arch)
        if weights is None:
            raise UserError(f"no torchvision weights for ImageNet teacher {arch}; set "
                            f"DISTILLER.TEACHER_WEIGHTS to a checkpoint")
        try:
            state = weights.get_state_dict(progress=get_rank() == 0)
        except OSError as error:        # offline (URLError), or the cache is not writable
            folder = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise UserError(f"teacher {arch}: torchvision's {weights} weights are not in "
                            f"{folder} and could not be downloaded ({error}); put "
                            f"{weights.url} there, or set DISTILLER.TEACHER_WEIGHTS to a "
                            f"checkpoint") from None
        model.load_state_dict(state)
        return f"torchvision {weights}"
    if not os.path.isfile(path):
        raise UserError(
            f"teacher checkpoint {path} not found: train the teacher with "
            f"`python tools/train.py --cfg configs/cifar100/vanilla/{arch}.yaml` and set "
            f"DISTILLER.TEACHER_WEIGHTS to its student_best, or unpack mdistiller's released "
            f"cifar_teachers.tar into download_ckpts/")
    state = extract_state_dict(load_checkpoint(path), path)
    load_model_weights(model, state, arch, path)
    return path


def build_teacher(cfg, data, load_weights=True):
    """The teacher DISTILLER.TEACHER names: ``(model, where its weights came from)``."""
    teacher = build_model(cfg.DISTILLER.TEACHER, data.num_classes, dataset=cfg.DATASET.TYPE,
                          **model_options(cfg, data, "teacher"))
    return teacher, load_teacher(teacher, cfg) if load_weights else ""


def single_teacher_cfgs(cfg):
    """One config per entry of DISTILLER.TEACHERS, each naming that teacher in
    DISTILLER.TEACHER and its checkpoint in DISTILLER.TEACHER_WEIGHTS.

    Raises:
        UserError: the lists or DISTILLER.FEATURE_TEACHER do not fit together.
    """
    names, paths = list(cfg.DISTILLER.TEACHERS), list(cfg.DISTILLER.TEACHERS_WEIGHTS)
    if not names:
        if paths:
            raise UserError("DISTILLER.TEACHERS_WEIGHTS is set but DISTILLER.TEACHERS is empty; "
                            "a single teacher's checkpoint goes in DISTILLER.TEACHER_WEIGHTS")
        return [cfg]
    if not all(isinstance(item, str) and item for item in names):
        raise UserError(f"DISTILLER.TEACHERS must list model names, got {names!r}")
    paths = paths or [""] * len(names)
    if len(paths) != len(names) or not all(isinstance(path, str) for path in paths):
        raise UserError(f"DISTILLER.TEACHERS_WEIGHTS must give one path per teacher of "
                        f"DISTILLER.TEACHERS ({len(names)}; \"\" for a teacher's default "
                        f"checkpoint), got {paths!r}")
    if cfg.DISTILLER.TEACHER_WEIGHTS:
        raise UserError("DISTILLER.TEACHER_WEIGHTS is the single teacher's checkpoint; with "
                        "DISTILLER.TEACHERS give one path per teacher in "
                        "DISTILLER.TEACHERS_WEIGHTS")
    if not 0 <= cfg.DISTILLER.FEATURE_TEACHER < len(names):
        raise UserError(f"DISTILLER.FEATURE_TEACHER {cfg.DISTILLER.FEATURE_TEACHER} is not an "
                        f"index into DISTILLER.TEACHERS (valid 0..{len(names) - 1})")
    singles = []
    for name, path in zip(names, paths):
        single = cfg.clone()
        single.defrost()
        single.DISTILLER.TEACHER, single.DISTILLER.TEACHER_WEIGHTS = name, path
        single.DISTILLER.TEACHERS, single.DISTILLER.TEACHERS_WEIGHTS = [], []
        single.freeze()
        singles.append(single)
    return singles


def build_teachers(cfg, data, load_weights=True):
    """The teacher, or with DISTILLER.TEACHERS the list of teachers, each built
    and loaded as a single teacher is (its mistakes name it, by index and name).

    Returns:
        ``(model or list of models, where the weights came from)``.
    """
    if not cfg.DISTILLER.TEACHERS:
        single_teacher_cfgs(cfg)
        return build_teacher(cfg, data, load_weights)
    teachers, sources = [], []
    for index, single in enumerate(single_teacher_cfgs(cfg)):
        name = single.DISTILLER.TEACHER
        try:
            teacher, source = build_teacher(single, data, load_weights)
        except UserError as error:
            message = str(error).replace("DISTILLER.TEACHER_WEIGHTS",
                                         f"DISTILLER.TEACHERS_WEIGHTS[{index}]")
            raise UserError(f"teacher {index} ({name}) of DISTILLER.TEACHERS: {message}") from None
        teachers.append(teacher)
        sources.append(f"{index} {name}: {source}")
    return teachers, "; ".join(sources)


@dataclass
class Experiment:
    """Everything :class:`~mdistill.engine.trainer.Trainer` needs."""
    cfg: object
    device: torch.device
    data: object
    distiller: object
    train_loader: object
    test_loader: object
    teacher_source: str = ""
    #: Whether the teacher cache is on (and its file), or why not; empty if not asked for.
    teacher_cache_note: str = ""
    #: Loader of the validation split (DATASET.VAL_FRACTION), or None.
    val_loader: object = None


def build_experiment(cfg, device=None, load_teacher_weights=True, data=None):
    """Build data, models and the distiller from ``cfg``; writes nothing but
    what is computed once from the teacher and kept for later runs: the teacher
    cache's file (DISTILLER.TEACHER_CACHE) and WKD's class-cost matrix beside
    the teacher's checkpoint.
    ``data`` (:class:`~mdistill.data.DatasetSplits`) replaces DATASET.TYPE's
    data, e.g. a synthetic stand-in of its shape (the benchmark's).

    Every user mistake (names, paths, sizes) surfaces here as a UserError,
    before a run folder exists.
    """
    device = device or resolve_device(cfg.DEVICE)
    world_size, rank = get_world_size(), get_rank()
    if cfg.SOLVER.AMP == "fp16" and device.type != "cuda":
        raise UserError("SOLVER.AMP fp16 needs a CUDA device; on CPU use bf16 or none")
    train_batch = per_process_batch(cfg.SOLVER.BATCH_SIZE, world_size)
    method = DISTILLERS.get(cfg.DISTILLER.TYPE)
    UPDATE_RULES.get(cfg.SOLVER.TRAINER)(cfg.SOLVER)     # a wrong rule or solver fails here
    if data is None:
        data = load_dataset_once_per_node(cfg)

    torch.manual_seed(cfg.EXPERIMENT.SEED)
    # The models are built, and the methods shape their modules, for the images they
    # are fed: DATASET.RESIZE's side when the batches are resized on the device.
    fed = replace(data, image_size=cfg.DATASET.RESIZE) if cfg.DATASET.RESIZE else data
    student = build_model(cfg.DISTILLER.STUDENT, data.num_classes, dataset=cfg.DATASET.TYPE,
                          **model_options(cfg, fed, "student"))
    teacher, source = None, ""
    if not method.requires_teacher and cfg.DISTILLER.TEACHERS:
        raise UserError(f"DISTILLER.TEACHERS is set but DISTILLER.TYPE {cfg.DISTILLER.TYPE} "
                        f"trains the student without a teacher; leave DISTILLER.TEACHERS empty")
    if method.requires_teacher:
        teacher, source = build_teachers(cfg, fed, load_teacher_weights)
    memory_format = torch.channels_last if cfg.SOLVER.CHANNELS_LAST else torch.contiguous_format
    student.to(device, memory_format=memory_format)
    if teacher is not None:
        for model in teacher if isinstance(teacher, list) else [teacher]:
            model.to(device, memory_format=memory_format)
    check_switches(cfg, method)
    teachers = teacher if isinstance(teacher, list) else [teacher] if teacher is not None else []
    check_model_outputs(cfg, method.student_reads, method.teacher_reads if teachers else (),
                        student, teachers, cfg.DISTILLER.FEATURE_TEACHER if len(teachers) > 1 else 0)
    try:
        distiller = build_distiller(cfg, student, teacher, fed, batch_rows=train_batch)
    except UserError as error:
        # What a method finds wrong with its models (shapes, widths) names the models.
        if CONFIG_KEY.search(str(error)):
            raise
        pair = f"DISTILLER.STUDENT {cfg.DISTILLER.STUDENT}" + (
            f", DISTILLER.TEACHER {cfg.DISTILLER.TEACHER}" if teachers else "")
        raise UserError(f"DISTILLER.TYPE {cfg.DISTILLER.TYPE} with {pair}: {error}") from None
    distiller.to(device)
    check_combination(cfg, distiller)

    options = dict(mean=data.mean, std=data.std, rank=rank, world_size=world_size,
                   channels_last=cfg.SOLVER.CHANNELS_LAST, num_workers=cfg.DATASET.NUM_WORKERS)
    train_loader = build_train_loader(data.train, train_batch, device, augment=True,
                                      hflip=data.hflip,
                                      seed=cfg.EXPERIMENT.SEED,
                                      extra_fields=distiller.extra_batch_fields(), **options)
    test_batch = max(1, cfg.DATASET.TEST.BATCH_SIZE // world_size)
    test_loader = build_test_loader(data.test, test_batch, device, **options)
    val_loader = (build_test_loader(data.val, test_batch, device, **options)
                  if data.val is not None else None)
    # Last: the cache's key needs the loaded teacher and the loader's augmentation.
    cache, cache_note = build_teacher_cache(cfg, distiller, data, train_loader, device)
    if cache is not None:
        distiller.set_teacher_source(CachedTeacher(distiller.teacher, cache, train_batch))
    return Experiment(cfg, device, data, distiller, train_loader, test_loader, source,
                      cache_note, val_loader=val_loader)
