"""The learning-rate schedule over a method's stages, and what a resume does to it.

A cosine schedule is a function of the epoch and the stage's length, so a run
resumed with another SOLVER.EPOCHS cannot simply evaluate the cosine of the new
length: 240 -> 300 epochs would multiply the rate by 2229 at epoch 241. Instead
the checkpoint records the schedule's *segments*: where a resume changed the
length of the last stage, the factor reached there and the new length. A
segment starts at the first epoch trained under the new length and anneals from
the rate of the last step taken to zero over the epochs that remain, so the rate
never rises across a resume; with the length unchanged no segment is added and
the schedule is bit-identical to an uninterrupted run's.
"""
import math

import yaml


def lr_factor(solver, epoch, epochs, schedule=True, segments=()):
    """The learning rate's multiple of its base during ``epoch`` (1-based) of ``epochs``.

    multistep follows mdistiller: ``LR_DECAY_RATE ** (number of LR_DECAY_STAGES
    < epoch)``, milestones being absolute epochs. cosine is torch's
    CosineAnnealingLR stepped once per epoch with ``T_max = epochs``, followed
    after each resume that changed the length by its segment ``(e0, f0, E)``:
    ``f0 * (1 + cos(pi * (e - e0) / (E - e0 + 1))) / 2`` for ``e >= e0`` (the
    plain cosine is the segment ``(1, 1, epochs)``).

    Args:
        solver: the SOLVER config node (LR_SCHEDULER, LR_DECAY_RATE, LR_DECAY_STAGES).
        epoch: the epoch within the stage, from 1.
        epochs: the stage's length.
        schedule: False: constant 1 (a stage that does not follow the schedule).
        segments: the resumes' segments of this stage, in order (:func:`resumed_segments`).

    Returns:
        A float.
    """
    if not schedule:
        return 1.0
    if solver.LR_SCHEDULER == "cosine":
        start, initial, length = 1, 1.0, epochs
        for segment in segments:
            if segment[0] <= epoch:
                start, initial, length = segment
        return initial * (1 + math.cos(math.pi * (epoch - start) / max(length - start + 1, 1))) / 2
    return solver.LR_DECAY_RATE ** sum(epoch > stage for stage in solver.LR_DECAY_STAGES)


def stage_at(stages, epoch):
    """``(stage index, epoch within the stage)`` of a global 1-based epoch."""
    start = 0
    for index, stage in enumerate(stages):
        if epoch <= start + stage.epochs or index == len(stages) - 1:
            return index, epoch - start
        start += stage.epochs


def warmup_factor(solver, epoch, progress=1.0):
    """The linear warm-up's multiple (SOLVER.WARMUP_EPOCHS) in ``epoch`` (1-based,
    within the final stage).

    Per epoch: ``epoch / WARMUP_EPOCHS`` while ``epoch <= WARMUP_EPOCHS``, so the
    first epoch already trains at a share of the rate and the last warm-up epoch
    at the full one. Per step (SOLVER.WARMUP_PER_ITER):
    ``(epoch - 1 + progress) / WARMUP_EPOCHS`` with ``progress`` in (0, 1] the
    share of the epoch's steps reached by the step about to be taken. After the
    warm-up: 1.

    The warm-up multiplies the schedule's factor rather than replacing it: it is
    a function of the epoch alone, so the resume segments (which record the
    schedule's own factor) compose with it unchanged.
    """
    # A stand-in solver written before the keys existed (tests', tools') has no warm-up.
    warmup = getattr(solver, "WARMUP_EPOCHS", 0)
    if warmup <= 0 or epoch > warmup:
        return 1.0
    reached = epoch - 1 + progress if getattr(solver, "WARMUP_PER_ITER", False) else epoch
    return min(reached / warmup, 1.0)


def stage_lr_factor(solver, stages, epoch, segments=(), progress=1.0):
    """The learning rate's multiple of the base at a global 1-based ``epoch``.

    Args:
        solver: the SOLVER config node.
        stages: the method's :class:`~mdistill.distillers.base.Stage` list.
        epoch: the global epoch.
        segments: the resumes' segments; they belong to the last stage, the only
            one whose length follows SOLVER.EPOCHS.
        progress: the share of the epoch's steps reached (per-step warm-up).
    """
    index, local = stage_at(stages, epoch)
    stage = stages[index]
    final = index == len(stages) - 1
    own = segments if final else ()
    factor = lr_factor(solver, local, stage.epochs, stage.schedule, own)
    # The warm-up belongs to the stage that follows SOLVER.EPOCHS (an init
    # stage runs at its own constant rate).
    if final and stage.schedule:
        factor *= warmup_factor(solver, local, progress)
    return factor


def schedule_state(stages, segments=()):
    """The checkpoint's ``schedule`` entry: the stages' lengths and the segments."""
    return {"stage_epochs": [stage.epochs for stage in stages],
            "segments": [list(segment) for segment in segments]}


def saved_schedule(state, distiller):
    """A checkpoint's ``schedule`` entry; for a checkpoint written before it was
    recorded, rebuilt from the SOLVER.EPOCHS of the config it holds (no resume
    had then changed the length)."""
    if state.get("schedule") is not None:
        return state["schedule"]
    epochs = yaml.safe_load(state["config"])["SOLVER"]["EPOCHS"]
    return schedule_state(distiller.stages(epochs))


def resumed_segments(solver, stages, saved, epoch, epoch_complete):
    """The segments of a run resumed from a checkpoint, under the lengths of ``stages``.

    When the last stage's length differs from the one the checkpoint was
    written under and the checkpoint is inside that stage, a segment is added:
    it starts at the first epoch trained under the new length (the epoch in
    progress for a mid-epoch checkpoint, else the next one) from the factor of
    the last step taken, and anneals to zero at the new end. Otherwise the
    saved segments are kept as they are.

    Args:
        solver: the SOLVER config node the run is resumed with.
        stages: the stages under the resumed config.
        saved: the checkpoint's ``schedule`` entry (:func:`saved_schedule`).
        epoch: the checkpoint's global epoch; ``epoch_complete``: whether it finished.

    Returns:
        A list of ``(start epoch, factor, length)`` in the last stage's epochs.
    """
    segments = [tuple(segment) for segment in saved["segments"]]
    old_length, new_length = saved["stage_epochs"][-1], stages[-1].epochs
    index, local = stage_at(stages, epoch)
    last = stages[-1]
    if (index != len(stages) - 1 or old_length == new_length or not last.schedule
            or solver.LR_SCHEDULER != "cosine"):
        return segments
    # The rate of the last step taken: the epoch in progress's, or the finished one's.
    reached = lr_factor(solver, local, old_length, True, segments)
    start = local if not epoch_complete else local + 1
    return [*segments, (start, reached, new_length)]
