"""What combines with what: the rules checked before the first step.

Features multiply: a method, an update rule, a precision, several teachers, the
teacher cache, stages, model families, processes. Each rule here reads the
declarations of the pieces involved (what a method reads of each model, the
temperatures it softens the teacher at, its stages, what a model really
outputs) and either lets the combination train or refuses it with one line
naming the keys. The teacher side's own rules live with the teacher sources
(:func:`~mdistill.distillers.teachers.check_teacher_source`); the teacher
cache, a speed setting that changes no result, is turned off with a note
instead (:func:`~mdistill.engine.teacher_cache.build_teacher_cache`).

``python -m mdistill.engine.combinations`` prints the README's table.
"""
import re

from ..distillers import DISTILLERS
from ..errors import UserError
from ..models import provided_outputs

#: A config key in a message: upper-case words joined by dots (DISTILLER.TEACHERS[1]).
CONFIG_KEY = re.compile(r"\b[A-Z][A-Z0-9_]*\.[A-Z][A-Z0-9_.]*")

#: Where a model output comes from, for the message that refuses a model without it.
OUTPUT_HINTS = {
    "preact_feats": "torchvision: and timm: models expose no pre-activation maps",
    "bn_stats": "torchvision: and timm: models expose no record of their BatchNorms",
    "dist_logits": "a model with a distillation token gives them, e.g. "
                   "timm:deit_tiny_distilled_patch16_224",
}
#: Update rules (SOLVER.TRAINER) that back-propagate the task loss on its own.
NEEDS_TASK_LOSS = ("dot", "crd_dot")


def check_update_rule(cfg, distiller):
    """DOT needs the task loss in every stage it trains.

    Raises:
        UserError: a stage of the method returns no ``loss_ce`` (RepDistiller's
            initialisation stages match features alone).
    """
    if cfg.SOLVER.TRAINER not in NEEDS_TASK_LOSS:
        return
    for stage in distiller.stages(cfg.SOLVER.EPOCHS):
        if stage.epochs > 0 and not stage.task_loss:
            raise UserError(f"SOLVER.TRAINER {cfg.SOLVER.TRAINER}: {cfg.DISTILLER.TYPE}'s "
                            f"{stage.name!r} stage has no task loss (loss_ce) for DOT's second "
                            f"momentum; use SOLVER.TRAINER base")


def check_model_outputs(cfg, student_reads, teacher_reads, student, teachers, feature_index=0):
    """A method reads only what its models really output.

    Called before the method is built (with its class's declarations) and after
    (with the instance's, which its options may extend).

    Args:
        cfg: the experiment config (for the names in the message).
        student_reads, teacher_reads: what the method reads of each.
        student: the student model.
        teachers: the teacher models, in DISTILLER.TEACHERS order (one without).
        feature_index: the teacher whose features are read (the others serve logits).

    Raises:
        UserError: e.g. pre-activation maps of a torchvision or timm model, which
            expose none.
    """
    roles = [("student", "DISTILLER.STUDENT", cfg.DISTILLER.STUDENT, student, student_reads)]
    names = list(cfg.DISTILLER.TEACHERS) or [cfg.DISTILLER.TEACHER]
    for index, teacher in enumerate(teachers):
        reads = teacher_reads if index == feature_index else set(teacher_reads) & {"logits"}
        key = "DISTILLER.TEACHER" if len(teachers) == 1 else f"DISTILLER.TEACHERS[{index}]"
        roles.append(("teacher", key, names[index], teacher, reads))
    for role, key, name, model, reads in roles:
        missing = sorted(set(reads) - set(provided_outputs(model)))
        if missing:
            hints = sorted({OUTPUT_HINTS[output] for output in missing if output in OUTPUT_HINTS})
            raise UserError(f"DISTILLER.TYPE {cfg.DISTILLER.TYPE} reads the {role}'s "
                            f"{', '.join(missing)}, which {key} {name} does not give"
                            + (f" ({'; '.join(hints)})" if hints else "")
                            + f"; choose another {role} or method")


def check_switches(cfg, method):
    """A switch section turned on (``<SECTION>.ENABLE True``) must be one the method
    honours (its ``option_sections``).

    Raises:
        UserError: e.g. SDD.ENABLE for a method SDD is not defined on.
    """
    for section, node in cfg.items():
        if isinstance(node, dict) and node.get("ENABLE") is True \
                and section not in method.option_sections:
            takers = sorted(name for name in DISTILLERS.names()
                            if section in DISTILLERS.get(name).option_sections)
            raise UserError(f"{section}.ENABLE is on but DISTILLER.TYPE {cfg.DISTILLER.TYPE} does "
                            f"not use it (it applies to {', '.join(takers) or 'no method'}); "
                            f"set {section}.ENABLE False")


def recipe_keys(cfg):
    """The keys of the modern recipe that change the task loss's targets, as
    ``KEY value`` strings (empty when none is on)."""
    keys = [("DATASET.MIXUP.ALPHA", cfg.DATASET.MIXUP.ALPHA),
            ("DATASET.CUTMIX.ALPHA", cfg.DATASET.CUTMIX.ALPHA),
            ("SOLVER.LABEL_SMOOTHING", cfg.SOLVER.LABEL_SMOOTHING)]
    return [f"{key} {value}" for key, value in keys if value > 0]


def check_recipe(cfg, distiller):
    """The modern recipe's batch transforms (engine/recipe.py) only where they hold.

    Raises:
        UserError: a value out of range; soft targets (Mixup, CutMix, label
            smoothing) for a method that reads the hard labels beyond its
            cross-entropy (DKD's target mask, CRD's positives, ...); the teacher
            cache with mixed or resized images (it holds the logits of the
            loader's views); DATASET.RESIZE for a model that does not take that
            size (the models and the method's modules are built for it).
    """
    for key, value, low, high in (("DATASET.MIXUP.ALPHA", cfg.DATASET.MIXUP.ALPHA, 0, None),
                                  ("DATASET.CUTMIX.ALPHA", cfg.DATASET.CUTMIX.ALPHA, 0, None),
                                  ("DATASET.MIXUP.PROB", cfg.DATASET.MIXUP.PROB, 0, 1),
                                  ("DATASET.MIXUP.SWITCH_PROB", cfg.DATASET.MIXUP.SWITCH_PROB, 0, 1),
                                  ("SOLVER.LABEL_SMOOTHING", cfg.SOLVER.LABEL_SMOOTHING, 0, 1),
                                  ("SOLVER.EMA.DECAY", cfg.SOLVER.EMA.DECAY, 0, 1),
                                  ("SOLVER.CLIP_GRAD", cfg.SOLVER.CLIP_GRAD, 0, None),
                                  ("SOLVER.WARMUP_EPOCHS", cfg.SOLVER.WARMUP_EPOCHS, 0, None),
                                  ("DATASET.RESIZE", cfg.DATASET.RESIZE, 0, None)):
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise UserError(f"{key} {value} is out of range; it must be {bounds}")
    soft = recipe_keys(cfg)
    if soft and distiller.reads_hard_labels:
        raise UserError(f"{', '.join(soft)}: DISTILLER.TYPE {cfg.DISTILLER.TYPE} reads the hard "
                        f"labels beyond its cross-entropy, which mixed or smoothed targets do "
                        f"not give; set {' and '.join(key.split()[0] + ' 0' for key in soft)}")
    mixed = [key for key in soft if not key.startswith("SOLVER")]
    if cfg.DATASET.RESIZE:
        mixed.append(f"DATASET.RESIZE {cfg.DATASET.RESIZE}")
    if mixed and cfg.DISTILLER.TEACHER_CACHE:
        raise UserError(f"{', '.join(mixed)}: the teacher's inputs are transformed on the device, "
                        f"but DISTILLER.TEACHER_CACHE holds the logits of the loader's views; "
                        f"set DISTILLER.TEACHER_CACHE ''")
    if cfg.DATASET.RESIZE:
        check_resized_inputs(cfg, distiller)


def check_resized_inputs(cfg, distiller):
    """Every model takes DATASET.RESIZE-sided images (a ViT built for the data's own
    size does not): each is run once on zeros at that size, as :meth:`probe` runs them.

    Raises:
        UserError: naming the model and the first line of what it raised.
    """
    from ..distillers.base import probe_features
    size = cfg.DATASET.RESIZE
    names = list(cfg.DISTILLER.TEACHERS) or [cfg.DISTILLER.TEACHER]
    models = [("DISTILLER.STUDENT", cfg.DISTILLER.STUDENT, distiller.student)]
    teachers = distiller.teacher_models()
    models += [("DISTILLER.TEACHER" if len(teachers) == 1 else f"DISTILLER.TEACHERS[{index}]",
                names[index], teacher) for index, teacher in enumerate(teachers)]
    for key, name, model in models:
        try:
            probe_features(model, (3, size, size))
        except Exception as error:      # whatever the model's own check raises
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(f"DATASET.RESIZE {size}: {key} {name} does not take {size}x{size} "
                            f"images ({reason}); choose a size it takes or another model") from None


def check_combination(cfg, distiller):
    """Every rule of this module for the built method; raises the first UserError."""
    check_update_rule(cfg, distiller)
    check_recipe(cfg, distiller)
    teachers = distiller.teacher_models()
    check_model_outputs(cfg, distiller.student_reads, distiller.teacher_reads,
                        distiller.student, teachers,
                        next((i for i, t in enumerate(teachers) if t is distiller.teacher), 0))


def support_table():
    """The README's "what combines with what" table, from the declarations: each
    registered method built at its defaults (resnet32x4 -> resnet8x4)."""
    import torch
    from types import SimpleNamespace
    from ..config import get_cfg
    from ..distillers import build_distiller
    from ..distillers.teachers import check_teacher_source
    from ..models import build_model

    def verdict(check):
        try:
            check()
            return "yes"
        except UserError:
            return "no"

    data = SimpleNamespace(num_classes=100, image_size=32, train_targets=torch.arange(200) % 100)
    rows = ["| method | reads of the teacher | teacher cache | several teachers, mean_probs "
            "| mean_loss | SOLVER.TRAINER dot | torchvision:/timm: models "
            "| Mixup, CutMix, label smoothing |",
            "|---|---|---|---|---|---|---|---|"]
    for name in DISTILLERS.names():
        cfg = get_cfg()
        cfg.DISTILLER.TYPE = name
        torch.manual_seed(0)
        method = DISTILLERS.get(name)
        teacher = build_model("resnet32x4", 100) if method.requires_teacher else None
        distiller = build_distiller(cfg, build_model("resnet8x4", 100), teacher, data)
        if teacher is None:
            rows.append(f"| {name} | - | - | - | - | yes | yes | {soft_targets(distiller)} |")
            continue
        reads = set(distiller.teacher_reads)
        phases = bool(distiller.extra_phases())
        probs = verdict(lambda: check_teacher_source(distiller, "mean_probs", 2, phases))
        if probs == "yes" and reads != {"logits"}:
            probs = "yes (features from DISTILLER.FEATURE_TEACHER)"
        loss = verdict(lambda: check_teacher_source(distiller, "mean_loss", 2, phases))
        dot = verdict(lambda: check_update_rule(SimpleNamespace(
            SOLVER=SimpleNamespace(TRAINER="dot", EPOCHS=240), DISTILLER=cfg.DISTILLER),
            distiller))
        external = ("no (pre-activation maps)" if {"preact_feats", "bn_stats"}
                    & (reads | set(distiller.student_reads)) else "yes")
        rows.append(f"| {name} | {', '.join(sorted(reads))} | "
                    f"{'yes' if reads == {'logits'} else 'no (live teacher)'} | {probs} | "
                    f"{loss} | {dot} | {external} | {soft_targets(distiller)} |")
    return "\n".join(rows)


def soft_targets(distiller):
    """The table's verdict on Mixup, CutMix and label smoothing (:func:`check_recipe`)."""
    return "no (reads the labels)" if distiller.reads_hard_labels else "yes"


if __name__ == "__main__":
    print(support_table())
