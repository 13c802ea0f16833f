"""Start or resume one training run: process group, run folder, logging, trainer."""
import gc
import glob
import json
import os
import random
import re
import signal
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..config import RESUMABLE_KEYS, config_differences, default_run_name, load_cfg
from ..errors import UserError
from ..models import is_external
from ..utils.dist import barrier, get_world_size, is_main_process
from .builder import build_experiment, single_teacher_cfgs, teacher_weights_path
from .checkpoint import load_checkpoint
from .evaluate import evaluate
from .recipe import BatchRecipe
from .teacher_cache import remembered, teacher_fingerprint, teacher_test_key
from .schedule import lr_factor, stage_at
from .trainer import Trainer


class RunStopped(Exception):
    """The run stopped on SIGINT or SIGTERM after saving a checkpoint.

    Attributes:
        signal: the signal number this process received (None when another
            process of a distributed run received it).
        exit_code: ``128 + signal`` as a shell reports a process killed by it
            (130 for SIGINT, 143 for SIGTERM; 143 when the signal came to another
            process).
    """

    def __init__(self, signum, run_dir):
        self.signal = signum
        self.run_dir = run_dir
        self.exit_code = 128 + (signum or signal.SIGTERM)
        super().__init__(f"stopped by signal {signum}; continue with --resume-from {run_dir}")


# Keys a resumed run may change as long as the epochs it has run are not affected
# (check_schedule_change); SOLVER.EPOCHS is one of RESUMABLE_KEYS.
SCHEDULE_KEYS = ("SOLVER.LR_DECAY_STAGES",)


def check_schedule_change(saved_cfg, cfg, distiller, reached):
    """Refuse a resumed schedule that would rewrite the epochs already run.

    A cosine resumed with another SOLVER.EPOCHS goes on from the rate reached
    and anneals to zero at the new end (a segment the checkpoint records, see
    :mod:`mdistill.engine.schedule`), so its rate never rises and the epochs run
    keep theirs; multistep milestones are absolute epochs, and the ones still
    ahead may move. What cannot be honoured: fewer epochs than reached, a stage
    boundary moved before it, or milestones that change the rate of an epoch
    already run.

    Args:
        saved_cfg, cfg: the run's config and the one it is resumed with.
        distiller: the built distiller (its stages).
        reached: the checkpoint's epoch (finished or in progress).

    Raises:
        UserError: one line naming the key.
    """
    old = distiller.stages(saved_cfg.SOLVER.EPOCHS)
    new = distiller.stages(cfg.SOLVER.EPOCHS)
    total = sum(stage.epochs for stage in new)
    if reached > total:
        raise UserError(f"--resume: SOLVER.EPOCHS {cfg.SOLVER.EPOCHS} gives {total} epochs but "
                        f"the run has reached epoch {reached}; give at least {reached}")
    for epoch in range(1, reached + 1):
        where_old, where_new = stage_at(old, epoch), stage_at(new, epoch)
        if where_old != where_new:
            raise UserError(f"--resume: SOLVER.EPOCHS {cfg.SOLVER.EPOCHS} moves epoch {epoch}, "
                            f"already run, to another stage; keep {saved_cfg.SOLVER.EPOCHS}")
        stage, local = new[where_new[0]], where_new[1]
        before = lr_factor(saved_cfg.SOLVER, local, stage.epochs, stage.schedule)
        after = lr_factor(cfg.SOLVER, local, stage.epochs, stage.schedule)
        if cfg.SOLVER.LR_SCHEDULER == "multistep" and before != after:
            raise UserError(f"--resume: SOLVER.LR_DECAY_STAGES {list(cfg.SOLVER.LR_DECAY_STAGES)} "
                            f"changes the learning rate of epoch {epoch}, already run; only "
                            f"milestones after epoch {reached} can change")


# The run folder's record of the teachers it started with (teacher_records).
TEACHER_RECORD = "teacher.json"


def teacher_records(cfg, distiller):
    """Each teacher's name, where its weights came from, and their fingerprint.

    Written to ``run_dir/teacher.json`` when a run starts, so that ``--resume``
    can tell the teacher a run continues with from the one it started with
    (a checkpoint file overwritten in between would silently change the
    method's targets halfway).

    Returns:
        A list of ``{"name", "weights", "fingerprint"}`` in DISTILLER.TEACHERS
        order (empty for a method without a teacher).
    """
    records = []
    for single, model in zip(single_teacher_cfgs(cfg), distiller.teacher_models()):
        arch = single.DISTILLER.TEACHER
        if is_external(arch) and not single.DISTILLER.TEACHER_WEIGHTS:
            weights = f"{arch.split(':')[0]}'s pretrained weights"
        else:
            weights = teacher_weights_path(single) or "torchvision's ImageNet weights"
        records.append({"name": arch, "weights": weights,
                        "fingerprint": teacher_fingerprint(model)})
    return records


def check_teachers_unchanged(run_dir, records):
    """Refuse to resume with teacher weights other than the run started with.

    Args:
        run_dir: the run folder; a run started before ``teacher.json`` was
            written is not checked (the file is written now).
        records: :func:`teacher_records` of the teachers just loaded.

    Raises:
        UserError: one line naming the weights that changed.
    """
    path = os.path.join(run_dir, TEACHER_RECORD)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as handle:
            started = json.load(handle)["teachers"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"--resume: cannot read {path} ({error}); it records the teachers "
                        f"the run started with") from None
    for before, now in zip(started, records):
        if before["fingerprint"] != now["fingerprint"]:
            raise UserError(f"--resume: the teacher weights {now['weights']} changed since the "
                            f"run started (fingerprint {before['fingerprint'][:12]} then, "
                            f"{now['fingerprint'][:12]} now); put back the weights the run "
                            f"started with, or start a new run")


def write_json_atomically(path, value):
    """Write ``value`` as JSON to ``path`` through a temporary file and a rename."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(value, handle, indent=1)
    os.replace(temporary, path)


def init_distributed():
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    use_cuda = torch.cuda.is_available() and os.environ.get("MDISTILL_BACKEND") != "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))


def seed_everything(seed, deterministic):
    """Seed every generator; in deterministic mode also pick deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def find_run_to_resume(cfg, resume, opts=()):
    """The run folder ``--resume`` refers to.

    Args:
        cfg: the config of the command (its overrides applied).
        resume: a run folder (or a file in one), or True for the newest run
            under ``LOG.PREFIX/EXPERIMENT.PROJECT`` whose ``config.yaml`` equals
            ``cfg`` but for the keys a resumed run may change (RESUMABLE_KEYS)
            and the folder it sits in.
        opts: the overrides, only to name the folder a new run would get.

    Raises:
        UserError: no such run; the message names the closest run and the keys
            in which its config differs.
    """
    if isinstance(resume, str) and resume:
        folder = resume if os.path.isdir(resume) else os.path.dirname(resume)
        if not os.path.isfile(os.path.join(folder, "latest")):
            raise UserError(f"--resume {resume}: no checkpoint 'latest' in {folder or '.'}")
        return folder
    project = os.path.join(cfg.LOG.PREFIX, cfg.EXPERIMENT.PROJECT)
    ignore = set(RESUMABLE_KEYS + SCHEDULE_KEYS) | {"LOG.PREFIX", "EXPERIMENT.PROJECT"}
    matches, closest, unreadable = [], None, []
    for latest in glob.glob(os.path.join(glob.escape(project), "*", "latest")):
        folder = os.path.dirname(latest)
        try:
            saved = load_cfg(os.path.join(folder, "config.yaml"), warn_ignored=False)
        except UserError as error:  # no config.yaml, or one of an incompatible version
            unreadable.append(f"{folder}: {error}")
            continue
        differences = config_differences(saved, cfg, ignore=ignore)
        if not differences:
            matches.append(folder)
        elif closest is None or len(differences) < len(closest[1]):
            closest = (folder, differences)
    if matches:
        return max(matches, key=lambda path: os.path.getmtime(os.path.join(path, "latest")))
    base = os.path.join(project, cfg.EXPERIMENT.NAME or default_run_name(cfg, opts))
    if closest is not None:
        folder, differences = closest
        shown = ", ".join(differences[:8]) + (", ..." if len(differences) > 8 else "")
        raise UserError(f"--resume: no run to resume at {base}: the config differs from the "
                        f"closest run's ({folder}) in {shown}; resume with the run's own "
                        f"config (--resume-from {folder}) or start without --resume")
    why = f"; unreadable: {unreadable[0]}" if unreadable else ""
    raise UserError(f"--resume: no run to resume at {base} (no run of this config with a "
                    f"'latest' checkpoint under {project}{why}); start it without --resume or "
                    f"give the run folder")


def new_run_dir(cfg, opts):
    """A run folder that does not exist yet: NAME, else NAME-2, NAME-3, ..."""
    base = os.path.join(cfg.LOG.PREFIX, cfg.EXPERIMENT.PROJECT,
                        cfg.EXPERIMENT.NAME or default_run_name(cfg, opts))
    path, number = base, 1
    while os.path.exists(path):
        number += 1
        path = f"{base}-{number}"
    return path


def make_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"output folder {path} is not writable")


class RunLog:
    """Prints on the main process and appends to the run's log.txt."""

    def __init__(self, path=None):
        self.path = path

    def __call__(self, text):
        if not is_main_process():
            return
        from tqdm import tqdm
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()
        if self.path:
            with open(self.path, "a") as handle:
                handle.write(text + "\n")


def train(cfg_path=None, opts=(), resume=None, started=None):
    """Train as ``tools/train.py`` does.

    Args:
        cfg_path: a YAML experiment file (optional with ``resume`` pointing at a run).
        opts: ``KEY VALUE`` overrides.
        resume: None (new run), True (the newest run of this config), or a run folder.
        started: ``time.perf_counter()`` when the process started (its imports
            count as start-up in timing.json); None: when this is called.

    Returns:
        ``(run_dir, history)``.

    Raises:
        RunStopped: SIGINT or SIGTERM stopped the run (a checkpoint is saved).
    """
    started = time.perf_counter() if started is None else started
    init_distributed()
    saved_state, run_dir = None, None
    if resume and isinstance(resume, str) and cfg_path is None:
        run_dir = find_run_to_resume(None, resume)
        cfg_path = os.path.join(run_dir, "config.yaml")
    cfg = load_cfg(cfg_path, list(opts))
    if resume:
        run_dir = run_dir or find_run_to_resume(cfg, resume, opts)
        saved_state = load_checkpoint(os.path.join(run_dir, "latest"))
        saved_cfg = load_cfg(os.path.join(run_dir, "config.yaml"), warn_ignored=False)
        changed = config_differences(saved_cfg, cfg, ignore=RESUMABLE_KEYS + SCHEDULE_KEYS)
        if changed:
            raise UserError(f"--resume: the config differs from the run's in "
                            f"{', '.join(changed[:8])}; resume with the run's own config")
    seed_everything(cfg.EXPERIMENT.SEED, cfg.SOLVER.DETERMINISTIC)
    experiment = build_experiment(cfg)
    teachers = teacher_records(cfg, experiment.distiller)
    if saved_state is not None:
        check_schedule_change(saved_cfg, cfg, experiment.distiller, saved_state["epoch"])
        check_teachers_unchanged(run_dir, teachers)
    log = RunLog()
    if run_dir is None:
        run_dir = new_run_dir(cfg, opts)
    if is_main_process():
        make_dir(run_dir)
        # A resumed run rewrites it too: keys it may change (SOLVER.EPOCHS, paths) now
        # hold their new values, and config.yaml is what --resume and compare read.
        temporary = os.path.join(run_dir, ".config.yaml.tmp")
        with open(temporary, "w") as handle:
            handle.write(cfg.dump())
        os.replace(temporary, os.path.join(run_dir, "config.yaml"))
        if saved_state is not None:
            _truncate_metrics(run_dir, saved_state)
        if teachers and not os.path.isfile(os.path.join(run_dir, TEACHER_RECORD)):
            write_json_atomically(os.path.join(run_dir, TEACHER_RECORD), {"teachers": teachers})
        log = RunLog(os.path.join(run_dir, "log.txt"))
    log(f"run folder: {run_dir} ({get_world_size()} process(es), device "
        f"{experiment.device}, AMP {cfg.SOLVER.AMP})")
    distiller = experiment.distiller
    log(f"student {cfg.DISTILLER.STUDENT}: "
        f"{sum(p.numel() for p in distiller.student.parameters()):,} parameters; method "
        f"{cfg.DISTILLER.TYPE} adds {distiller.get_extra_parameters():,}")
    teacher_start = time.perf_counter()
    if distiller.teacher is not None and saved_state is None:
        names = list(cfg.DISTILLER.TEACHERS) or [cfg.DISTILLER.TEACHER]
        if len(names) > 1:
            log(f"teachers (DISTILLER.TEACHERS): {experiment.teacher_source}")
        for name, teacher in zip(names, distiller.teacher_models()):
            result = evaluate_teacher(teacher, name, experiment)
            source = f" ({experiment.teacher_source})" if len(names) == 1 else ""
            log(f"teacher {name}{source}: test top-1 "
                f"{result['top1']:.2f} top-5 {result['top5']:.2f}")
    teacher_seconds = time.perf_counter() - teacher_start
    if experiment.teacher_cache_note:
        log(experiment.teacher_cache_note)

    writer = wandb_run = None
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        if cfg.LOG.WANDB:
            # Before the SummaryWriter: wandb's sync_tensorboard patches TensorBoard's
            # writer when it starts, and a writer made earlier would go unseen.
            wandb_run = _start_wandb(cfg, run_dir, log)
        purge = saved_state["global_step"] + 1 if saved_state else None
        wait_for_event_file_order(run_dir, log)
        writer = SummaryWriter(run_dir, purge_step=purge)
    trainer = Trainer(experiment, run_dir, writer=writer, log=log)
    if saved_state is not None:
        trainer.load_state_dict(saved_state)
        log(f"resumed from {run_dir}/latest at epoch {trainer.epoch}, step {trainer.global_step}")
    loop_start = time.perf_counter()
    try:
        history = trainer.train()
    finally:
        if writer is not None:
            writer.close()
        if wandb_run is not None:
            wandb_run.finish()
    barrier()       # every process leaves together, after rank 0 has written its files
    if is_main_process():
        _write_timing(run_dir, log, loop_start - started - teacher_seconds, teacher_seconds,
                      trainer.seconds, time.perf_counter() - started)
    if history is None:
        raise RunStopped(trainer.stop_signal, run_dir)
    if trainer.history:
        chosen_on = "validation" if "val" in trainer.history[-1] else "test"
        log(f"done: best {chosen_on} top-1 {trainer.best_acc:.2f}, last test top-1 "
            f"{trainer.history[-1]['test']['top1']:.2f}; checkpoints in {run_dir}")
    return run_dir, history


# An event file's name: events.out.tfevents.<second>.<host>.<pid>.<counter>.
EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")
# Longer than this, an event file's second is taken for a clock that was wrong.
MAX_EVENT_FILE_WAIT_S = 10


def wait_for_event_file_order(run_dir, log):
    """Wait until an event file made now sorts after every one in ``run_dir``.

    TensorBoard reads a run's event files in name order, and a name holds the
    second it was made in, then the host and the pid. A resumed run made in the
    same second as an earlier writer (a killed run, a previous resume) could get
    a name that sorts before that writer's (a smaller pid): TensorBoard would
    then read the earlier file last and, taking its smaller steps for a restart,
    drop the steps written after the resume. Waiting for the next second puts
    the new file last. A file dated more than ``MAX_EVENT_FILE_WAIT_S`` ahead
    (the clock was changed) is not waited for; the log says so.

    Args:
        run_dir: the run folder the SummaryWriter writes to.
        log: ``log(text)`` for the warning.
    """
    seconds = {int(match.group(1)): name for name in os.listdir(run_dir)
               for match in [EVENT_FILE.match(name)] if match}
    if not seconds:
        return
    newest = max(seconds)
    ahead = newest + 1 - time.time()
    if ahead > MAX_EVENT_FILE_WAIT_S:
        log(f"warning: {os.path.join(run_dir, seconds[newest])} is dated {ahead:.0f}s ahead "
            f"of the clock; TensorBoard may show the steps logged now before its own")
        return
    while time.time() < newest + 1:
        time.sleep(newest + 1 - time.time())


def _write_timing(run_dir, log, startup, teacher, loop, total):
    """Log where this session's wall time went and write it to the run's
    timing.json (a resumed run's file holds its last session)."""
    seconds = {"start_up": startup, "teacher_test": teacher, **loop}
    seconds["other"] = total - sum(seconds.values())
    seconds["total"] = total
    log("time: " + ", ".join(f"{name.replace('_', '-')} {value:.1f} s"
                             for name, value in seconds.items()))
    write_json_atomically(os.path.join(run_dir, "timing.json"),
                          {name: round(value, 3) for name, value in seconds.items()})


def evaluate_teacher(teacher, name, experiment):
    """The teacher's test accuracy, on the images as the student is evaluated
    (DATASET.RESIZE). With DISTILLER.TEACHER_CACHE (one process, in-memory test
    set) it is remembered in that folder, whatever the method: the runs of a
    sweep that share the folder evaluate each teacher once."""
    cfg, test = experiment.cfg, experiment.data.test
    recipe = BatchRecipe.from_config(cfg, experiment.data.num_classes)

    def compute():
        return evaluate(recipe.test_transform(lambda image: teacher(image)[0]),
                        experiment.test_loader, experiment.device)
    folder = cfg.DISTILLER.TEACHER_CACHE
    if not folder or get_world_size() > 1 or not hasattr(test, "images"):
        return compute()
    key = teacher_test_key(cfg, teacher, name, experiment.data, experiment.device)
    return remembered(folder, key, compute)


def _truncate_metrics(run_dir, state):
    """Drop metric rows a killed run wrote after its last checkpoint."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    import json
    kept_epochs = {record["epoch"] for record in state["history"]}
    with open(path) as handle:
        rows = [line for line in handle if line.strip()
                and json.loads(line)["epoch"] in kept_epochs]
    with open(path, "w") as handle:
        handle.writelines(rows)


def _start_wandb(cfg, run_dir, log):
    """Start a wandb run that mirrors the TensorBoard scalars; None without wandb."""
    try:
        import wandb
    except ImportError:
        log("warning: LOG.WANDB is true but wandb is not installed; logging to TensorBoard only")
        return None
    return wandb.init(project=cfg.EXPERIMENT.PROJECT, name=os.path.basename(run_dir),
                      dir=run_dir, config=yaml_dict(cfg), sync_tensorboard=True)


def yaml_dict(cfg):
    import yaml
    return yaml.safe_load(cfg.dump())


def shutdown():
    """Leave the process group (all processes at once).

    What still holds the group (a DistributedDataParallel wrapper's reducer,
    kept alive by a reference cycle) is collected first, while the group is
    whole: freed later, at the interpreter's exit, gloo's threads can abort
    the process after the run has finished."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        barrier()
        dist.destroy_process_group()
