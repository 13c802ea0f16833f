"""Every combination of the features that combine trains correctly or is refused
before the first step, with one line naming the keys.

The features: every registered method; the update rule (base, dot); AMP (none,
bf16; fp16 where CUDA is present); channels_last; one teacher, several averaged
by probabilities, several averaged by losses; the teacher cache; methods with
stages (FSP, AB, FT: every stage runs); zoo, torchvision: and timm: models; one
process or two gloo processes. The cells are a covering design: method x update
rule x teachers in full, and every pair of any two features' values at least once;
then the SDD switch on for every method, and with other features on the methods
that honour it; then the modern recipe's keys (Mixup with CutMix, label smoothing,
resizing on the device, EMA, per-step warm-up, gradient clipping, no decay on
norms and biases), each on alone and all on together (:func:`recipe_cells`).

A cell that trains runs two steps per stage through the real trainer: the losses
are finite, every module the stage trains moved (the student in the last stage,
the method's own modules, a discriminator in its phase), the teachers did not
(weights, BatchNorm statistics, eval mode, no gradient). An ensemble cell (one
process, fp32) first checks the method's losses against a float64 reference
built from the teachers' own outputs: for ``mean_probs`` the method given one
teacher whose logits are ``T * log(mean_k softmax(z_k / T))`` at the temperature
it declares, for ``mean_loss`` the mean of its losses against each teacher alone.
"""
import itertools
import json
import math
import os
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT
from mdistill.config import load_cfg
from mdistill.distillers import DISTILLERS
from mdistill.distillers.teachers import LiveTeacher, TeacherSource
from mdistill.engine.builder import build_experiment
from mdistill.engine.trainer import Trainer
from mdistill.errors import UserError
from mdistill.models import build_model
from mdistill.engine.launch import shutdown

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")
NUM_CLASSES = 10
#: student, then the two teachers (the first is the feature teacher and the single one).
FAMILIES = {
    "zoo": ("resnet8", ("resnet14", "resnet20")),
    "torchvision": ("torchvision:shufflenet_v2_x0_5",
                    ("torchvision:mobilenet_v3_small", "torchvision:shufflenet_v2_x0_5")),
    # A ViT student with a distillation token (DeiT's), CNN and ViT teachers.
    "timm": ("timm:deit_tiny_distilled_patch16_224", ("timm:test_vit", "timm:test_convnext")),
}
FACTORS = {
    "method": DISTILLERS.names(),
    "rule": ["base", "dot"],
    "teachers": ["one", "mean_probs", "mean_loss"],
    "amp": ["none", "bf16"] + (["fp16"] if torch.cuda.is_available() else []),
    "channels_last": [False, True],
    "cache": [False, True],
    "models": list(FAMILIES),
    "processes": [1, 2],
}
#: The factors taken in full; the others are chosen to cover every pair.
FULL = ("method", "rule", "teachers")
#: The modern recipe's factors (engine/recipe.py), each off or on, and the keys "on" sets.
RECIPE = {"mixup": ["DATASET.MIXUP.ALPHA", "0.8", "DATASET.CUTMIX.ALPHA", "1.0"],
          "smoothing": ["SOLVER.LABEL_SMOOTHING", "0.1"],
          "ema": ["SOLVER.EMA.ENABLE", "True", "SOLVER.EMA.DECAY", "0.5"],
          "warmup": ["SOLVER.WARMUP_EPOCHS", "1", "SOLVER.WARMUP_PER_ITER", "True"],
          "clip": ["SOLVER.CLIP_GRAD", "1.0"],
          "no_decay": ["SOLVER.NO_DECAY_NORM_BIAS", "True"],
          "resize": ["DATASET.RESIZE", "40"]}
#: A config key in a refusal: upper-case words joined by dots (DISTILLER.TEACHERS[1]).
KEY = re.compile(r"\b[A-Z][A-Z0-9_]*\.[A-Z][A-Z0-9_.]*")


def covering_design():
    """The cells: FULL in full, the other factors chosen greedily (deterministic)
    so that every pair of values of any two factors appears in some cell.

    Cells with one teacher come first: they are the ones most likely to train, so
    the pairs they cover are trained, not only refused.
    """
    names = list(FACTORS)
    free = [name for name in names if name not in FULL]
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in FACTORS[a] for vb in FACTORS[b]}
    order = sorted(itertools.product(*(FACTORS[name] for name in FULL)),
                   key=lambda values: FACTORS["teachers"].index(values[2]))
    cells = []

    def add(cell):
        cells.append(cell)
        uncovered.difference_update(
            ((a, cell[a]), (b, cell[b])) for a, b in itertools.combinations(names, 2))

    def best_free_values(fixed):
        # Each free factor in turn takes the value that covers the most new pairs
        # with what is already chosen; ties go to the first (cheapest) value.
        cell = dict(fixed)
        for name in (name for name in free if name not in fixed):
            def gain(value):
                trial = dict(cell, **{name: value})
                return sum(((a, trial[a]), (b, trial[b])) in uncovered
                           for a, b in itertools.combinations(names, 2)
                           if a in trial and b in trial and name in (a, b))
            cell[name] = max(FACTORS[name], key=gain)
        return cell

    for values in order:
        add(best_free_values(dict(zip(FULL, values))))
    while uncovered:        # pairs of two free factors not met yet
        (a, va), (b, vb) = min(uncovered, key=lambda pair: (names.index(pair[0][0]),
                                                            str(pair)))
        base = dict(zip(FULL, order[0]))
        add(best_free_values(dict(base, **{a: va, b: vb})))
    return cells


def switch_cells():
    """SDD.ENABLE, a switch three methods honour: on for every method (one teacher,
    base rule), and on the methods that take it with the other features' values."""
    plain = {name: values[0] for name, values in FACTORS.items()}
    cells = [dict(plain, method=method, sdd=True) for method in FACTORS["method"]]
    for method, changes in (("KD", dict(models="timm", amp="bf16", channels_last=True,
                                         cache=True)),
                            ("DKD", dict(rule="dot", teachers="mean_probs")),
                            ("NKD", dict(models="torchvision", processes=2))):
        cells.append(dict(plain, method=method, sdd=True, **changes))
    return cells


def recipe_cells():
    """The modern recipe's keys, outside the covering design (where a cell with several
    of them on is refused by one or another and trains none): the keys whose verdict
    depends on what a method reads (mixup, smoothing, resize) on alone for every
    method; the trainer's own mechanisms (EMA, warm-up, clipping, no decay) on alone
    for methods that exercise each part of the loop (after_step, an extra phase,
    stages, DOT); then every key on together with the other features."""
    plain = dict({name: values[0] for name, values in FACTORS.items()}, sdd=False)
    cells = []
    for key in ("mixup", "smoothing", "resize"):
        cells += [dict(plain, method=method, **{key: True}) for method in FACTORS["method"]]
    for key in ("ema", "warmup", "clip", "no_decay"):
        for method, changes in (("KD", {}), ("CRD", {}), ("ADVKD", {}), ("FT", {}),
                                ("DKD", dict(rule="dot"))):
            cells.append(dict(plain, method=method, **changes, **{key: True}))
    every = dict.fromkeys(RECIPE, True)
    for changes in (dict(method="KD", models="torchvision", amp="bf16", channels_last=True),
                    dict(method="DIST", teachers="mean_probs"),
                    dict(method="KD", teachers="mean_loss"),
                    dict(method="SKD", models="timm"),
                    dict(method="DIST", processes=2)):
        cells.append(dict(plain, **every, **changes))
    return cells


#: Methods whose student only one family gives (DeiT's distillation token): a
#: plain cell there, so they are seen training, not only refused elsewhere.
ONLY_WITH = {"DEIT": "timm"}


def family_cells():
    plain = {name: values[0] for name, values in FACTORS.items()}
    return [dict(plain, method=method, models=family, sdd=False)
            for method, family in ONLY_WITH.items()]


CELLS = ([dict(cell, sdd=False) for cell in covering_design()] + switch_cells()
         + recipe_cells() + family_cells())


def test_the_design_covers_every_pair_and_the_full_product():
    names = list(FACTORS)
    for a, b in itertools.combinations(names, 2):
        met = {(cell[a], cell[b]) for cell in CELLS}
        assert met == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)
    assert {tuple(cell[name] for name in FULL) for cell in CELLS} == set(
        itertools.product(*(FACTORS[name] for name in FULL)))


# ----------------------------------------------------------------- the cells
@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """A checkpoint ({"model": state_dict}) for every teacher of every family."""
    folder = tmp_path_factory.mktemp("combination_teachers")
    files = {}
    for _, teachers in FAMILIES.values():
        for name in teachers:
            torch.manual_seed(len(files) + 1)
            model = build_model(name, NUM_CLASSES, dataset="synthetic", image_size=32,
                                small_input=True)
            path = folder / f"{re.sub('[^a-z0-9_]', '_', name)}.pth"
            torch.save({"model": model.state_dict()}, path)
            files[name] = str(path)
    return files


def cell_opts(cell, folder, teacher_files):
    """The KEY VALUE overrides of a cell (on CONFIG, with synthetic data)."""
    student, teachers = FAMILIES[cell["models"]]
    opts = ["DATASET.TYPE", "synthetic", "DATASET.SYNTHETIC.NUM_TRAIN", "48",
            "DATASET.SYNTHETIC.NUM_TEST", "8", "DATASET.SYNTHETIC.NUM_CLASSES", str(NUM_CLASSES),
            "DATASET.SYNTHETIC.IMAGE_SIZE", "32", "DATASET.NUM_WORKERS", "0",
            "DATASET.TEST.BATCH_SIZE", "8", "DEVICE", "cpu", "SOLVER.BATCH_SIZE", "8",
            "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[1]", "LOG.PREFIX", str(folder),
            "SOLVER.TRAINER", cell["rule"], "SOLVER.AMP", cell["amp"],
            "SOLVER.CHANNELS_LAST", str(cell["channels_last"]),
            "MODEL.SMALL_INPUT", str(cell["models"] != "zoo"),
            "DISTILLER.TYPE", cell["method"], "DISTILLER.STUDENT", student,
            "CRD.NCE.K", "16", "CRD.FEAT.DIM", "8",
            "REVIEWKD.IN_CHANNELS", "[16, 32, 64, 64]", "REVIEWKD.OUT_CHANNELS", "[16, 32, 64, 64]",
            "FSP.INIT_EPOCHS", "1", "AB.INIT_EPOCHS", "1", "FT.INIT_EPOCHS", "1"]
    if cell["teachers"] == "one":
        opts += ["DISTILLER.TEACHER", teachers[0],
                 "DISTILLER.TEACHER_WEIGHTS", teacher_files[teachers[0]]]
    else:
        opts += ["DISTILLER.TEACHERS", str(list(teachers)),
                 "DISTILLER.TEACHERS_WEIGHTS", str([teacher_files[name] for name in teachers]),
                 "DISTILLER.TEACHER_REDUCE", cell["teachers"]]
    if cell["cache"]:
        opts += ["DISTILLER.TEACHER_CACHE", os.path.join(folder, "cache")]
    if cell["sdd"]:
        opts += ["SDD.ENABLE", "True"]
    for name, keys in RECIPE.items():
        if cell.get(name):
            opts += keys
    return opts


def snapshot(modules):
    return {name: [tensor.detach().clone() for tensor in
                   [*module.parameters(), *module.buffers()]] for name, module in modules}


def moved(before, module):
    after = [*module.parameters(), *module.buffers()]
    return any(not torch.equal(old, new) for old, new in zip(before, after))


def reference_check(trainer, batch):
    """The ensemble's losses against a float64 reference of the teachers' outputs;
    '' when they agree, else what differs."""
    distiller, source = trainer.distiller, trainer.distiller.teacher_source
    image = batch["image"]

    def losses_with(new_source):
        old = distiller.teacher_source
        distiller.teacher_source = new_source
        try:
            torch.manual_seed(0)
            with torch.no_grad():
                return {name: float(value) for name, value in distiller(**batch)[1].items()}
        finally:
            distiller.teacher_source = old

    served = losses_with(source)
    with torch.no_grad():
        outputs = [teacher(image) for teacher in source.models]
    if type(source).__name__ == "ProbabilityEnsemble":
        temperature = source.temperature
        stacked = torch.stack([logits.double() for logits, _ in outputs]) / temperature
        mean = torch.softmax(stacked, dim=-1).mean(dim=0)
        fixed = (temperature * mean.log()).float()
        reference = losses_with(FixedTeacher(fixed, outputs[source.feature_index][1]))
    else:
        per_teacher = [losses_with(LiveTeacher([teacher])) for teacher in source.models]
        reference = {name: value if name == "loss_ce" else
                     sum(losses[name] for losses in per_teacher) / len(per_teacher)
                     for name, value in per_teacher[0].items()}
    wrong = [f"{name} {served[name]:.6g} != {reference[name]:.6g}" for name in reference
             if not math.isclose(served[name], reference[name], rel_tol=2e-4, abs_tol=1e-6)]
    return "; ".join(wrong)


class FixedTeacher(TeacherSource):
    """A teacher source answering fixed logits (the float64 reference's)."""

    def __init__(self, logits, feats):
        super().__init__([])
        self.logits, self.feats = logits, feats

    def __call__(self, image, batch=None, batch_statistics=False):
        return self.logits, self.feats


def run_cell(cell, folder, teacher_files):
    """``("trained" | "refused", detail)``, or ``("failed", why)``."""
    torch.manual_seed(0)
    cfg = load_cfg(CONFIG, cell_opts(cell, folder, teacher_files))
    try:
        experiment = build_experiment(cfg)
        trainer = Trainer(experiment, run_dir=None, log=lambda text: None)
    except UserError as error:
        message = str(error)
        if "\n" in message or not KEY.search(message):
            return "failed", f"refusal not one line naming a key: {message!r}"
        return "refused", message
    distiller = trainer.distiller
    teachers = distiller.teacher_models()
    teacher_state = [snapshot([("t", teacher)])["t"] for teacher in teachers]
    checked = ""
    average = trainer.ema.module if trainer.ema is not None else None
    for index, stage in enumerate(trainer.stages):
        trainer.start_epoch(1 + sum(previous.epochs for previous in trainer.stages[:index]))
        trainer.train_loader.set_epoch(1)
        trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        modules = [(name, module) for name, module in distiller.named_children()
                   if any(id(p) in trained for p in module.parameters())]
        own = [(name, getattr(distiller, name)) for name in distiller.auxiliary_module_names()]
        before = snapshot(modules + own + ([("ema", average)] if average is not None else []))
        for step, batch in zip(range(2), trainer.train_loader):
            if step == 0 and index == 0 and len(teachers) > 1 and cell["amp"] == "none" \
                    and cell["processes"] == 1:
                wrong = reference_check(trainer, batch)
                if wrong:
                    return "failed", f"ensemble loss differs from the float64 reference: {wrong}"
                checked = " (ensemble loss = float64 reference)"
            values = trainer.run_step(batch)
            if values is None or not all(math.isfinite(value) for value in values.values()):
                return "failed", f"stage {stage.name}: step {step + 1} gave {values}"
        for name, module in modules:
            if not moved(before[name], module):
                return "failed", f"stage {stage.name}: {name} did not move"
        # The student's average follows every accepted step (SOLVER.EMA).
        if average is not None and "student" in dict(modules) \
                and not moved(before["ema"], average):
            return "failed", f"stage {stage.name}: the student's EMA did not move"
        phases = {phase.module: phase.steps for phase in distiller.extra_phases()}
        for name, module in own:
            if phases[name] > 0 and not moved(before[name], module):
                return "failed", f"stage {stage.name}: {name} (its own phase) did not move"
    if "student" not in [name for name, _ in modules]:
        return "failed", "the last stage does not train the student"
    for teacher, state in zip(teachers, teacher_state):
        if teacher.training or any(p.requires_grad or p.grad is not None
                                   for p in teacher.parameters()):
            return "failed", "a teacher trains, or is in train mode"
        if moved(state, teacher):
            return "failed", "a teacher's weights or statistics moved"
    return "trained", f"{len(trainer.stages)} stage(s){checked}"


def summarise(results):
    counts = {}
    for (status, _), _ in results:
        counts[status] = counts.get(status, 0) + 1
    failures = [f"{describe(cell)}: {detail}" for (status, detail), cell in results
                if status == "failed"]
    return counts, failures


def describe(cell):
    return " ".join(f"{name}={value}" for name, value in cell.items())


@pytest.mark.usefixtures("one_thread")
def test_every_single_process_cell_trains_or_is_refused(teacher_files, tmp_path):
    cells = [cell for cell in CELLS if cell["processes"] == 1]
    results = [(run_cell(cell, tmp_path / str(i), teacher_files), cell)
               for i, cell in enumerate(cells)]
    counts, failures = summarise(results)
    if os.environ.get("MDISTILL_SHOW_CELLS"):
        for (status, detail), cell in results:
            print(status, describe(cell), detail)
    print(f"\ncombinations, one process: {len(cells)} cells, {counts.get('trained', 0)} "
          f"trained, {counts.get('refused', 0)} refused, {len(failures)} failed")
    assert not failures, "\n".join(failures)
    trained = {cell["method"] for (status, _), cell in results if status == "trained"}
    assert trained == set(FACTORS["method"]), set(FACTORS["method"]) - trained
    assert any("float64 reference" in detail for (_, detail), _ in results)
    untrained = [key for key in RECIPE if not any(status == "trained" and cell.get(key)
                                                  for (status, _), cell in results)]
    assert not untrained, f"no cell trains with {untrained} on"


# ------------------------------------------------------------- two processes
def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, cells, folder, teacher_files, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from datetime import timedelta
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    results = []
    for index, cell in enumerate(cells):
        try:
            results.append(run_cell(cell, os.path.join(folder, str(index)), teacher_files))
        except Exception as error:     # a crash: reported, and the group is not trusted after it
            results.append(("failed", f"{type(error).__name__}: {error}"))
            break
        dist.barrier()
    with open(f"{out}.{rank}", "w") as handle:
        json.dump(results, handle)
    shutdown()


def test_every_two_process_cell_trains_or_is_refused(teacher_files, tmp_path):
    from pathlib import Path
    cells = [cell for cell in CELLS if cell["processes"] == 2]
    out = str(tmp_path / "results")
    threads = torch.get_num_threads()
    try:
        mp.start_processes(_worker, args=(2, free_port(), cells, str(tmp_path), teacher_files,
                                          out), nprocs=2, join=True, start_method="spawn")
    finally:
        torch.set_num_threads(threads)
    per_rank = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    results = [(tuple(first if first[0] == "failed" else second), cell)
               for first, second, cell in zip(*per_rank, cells)]
    counts, failures = summarise(results)
    failures += [f"{describe(cell)}: the ranks disagree ({first[0]} / {second[0]})"
                 for first, second, cell in zip(*per_rank, cells) if first[0] != second[0]]
    failures += [f"{describe(cell)}: not run after a crash" for cell in cells[len(results):]]
    print(f"\ncombinations, two processes: {len(cells)} cells, {counts.get('trained', 0)} "
          f"trained, {counts.get('refused', 0)} refused, {len(failures)} failed")
    assert not failures, "\n".join(failures)
    assert counts.get("trained", 0) > 0


def test_the_readme_table_is_generated_from_the_declarations():
    from mdistill.engine.combinations import support_table
    with open(os.path.join(ROOT, "README.md")) as handle:
        assert support_table() in handle.read()
