"""A run resumed with another SOLVER.EPOCHS: the cosine's rate never rises, goes on from
the rate reached and anneals to zero at the new end; unchanged, nothing changes."""
import json
import math
import os
from types import SimpleNamespace

import pytest

from conftest import ROOT, tiny_opts

KD = os.path.join(ROOT, "configs/cifar100/kd.yaml")
COSINE = SimpleNamespace(LR_SCHEDULER="cosine", LR_DECAY_RATE=0.1, LR_DECAY_STAGES=[2, 3])
MULTISTEP = SimpleNamespace(LR_SCHEDULER="multistep", LR_DECAY_RATE=0.1, LR_DECAY_STAGES=[2, 6])


def stages(*lengths):
    from mdistill.distillers.base import Stage
    return [Stage(f"stage{index}", length) for index, length in enumerate(lengths)]


def factors(solver, plan, first, last, segments=()):
    from mdistill.engine.schedule import stage_lr_factor
    return [stage_lr_factor(solver, plan, epoch, segments) for epoch in range(first, last + 1)]


def resume(solver, before, after, epoch, complete=True, segments=()):
    """The segments of a run saved at ``epoch`` under stages ``before`` and resumed under
    ``after``, through the checkpoint's entry as the trainer writes and reads it."""
    from mdistill.engine.schedule import resumed_segments, schedule_state
    return resumed_segments(solver, after, schedule_state(before, segments), epoch, complete)


def cosine(epoch, epochs):
    return (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2


@pytest.mark.parametrize("old, new, reached", [(4, 8, 4), (240, 300, 240), (240, 300, 100),
                                                (300, 240, 200), (4, 5, 4), (10, 1000, 10)])
def test_a_resumed_cosine_never_rises_and_anneals_to_zero_at_the_new_end(old, new, reached):
    segments = resume(COSINE, stages(old), stages(new), reached)
    run = factors(COSINE, stages(old), 1, reached) + factors(COSINE, stages(new), reached + 1,
                                                             new, segments)
    assert run[:reached] == [cosine(epoch, old) for epoch in range(1, reached + 1)]
    assert all(later <= earlier for earlier, later in zip(run, run[1:]))
    start, initial, length = segments[-1]
    assert (start, initial, length) == (reached + 1, cosine(reached, old), new)
    # The segment's cosine reaches zero one epoch past the new end, as the plain one does.
    assert initial * (1 + math.cos(math.pi * (new + 1 - start) / (new - start + 1))) / 2 \
        == pytest.approx(0.0, abs=1e-15)


def test_four_to_eight_epochs_by_hand():
    segments = resume(COSINE, stages(4), stages(8), 4)
    reached = (1 + math.cos(3 * math.pi / 4)) / 2            # epoch 4 of 4: 0.146
    expected = [reached * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert factors(COSINE, stages(8), 5, 8, segments) == pytest.approx(expected, rel=1e-12)
    # What the plain cosine of 8 epochs gave (the bug): 0.146 at epoch 4, then 0.500.
    assert cosine(5, 8) == pytest.approx(0.5)


def test_a_mid_epoch_checkpoint_keeps_its_epochs_rate_and_anneals_from_it():
    segments = resume(COSINE, stages(240), stages(300), 100, complete=False)
    assert segments == [(100, cosine(100, 240), 300)]
    resumed = factors(COSINE, stages(300), 100, 300, segments)
    assert resumed[0] == cosine(100, 240)                    # the epoch in progress goes on
    assert all(later < earlier for earlier, later in zip(resumed, resumed[1:]))


def test_an_unchanged_length_adds_no_segment_and_is_bit_identical():
    for complete in (True, False):
        segments = resume(COSINE, stages(5, 240), stages(5, 240), 120, complete)
        assert segments == []
        assert factors(COSINE, stages(5, 240), 1, 245, segments) == \
            [cosine(epoch, 5) for epoch in range(1, 6)] + \
            [cosine(epoch, 240) for epoch in range(1, 241)]


def test_resumed_twice_each_segment_goes_on_from_the_last():
    first = resume(COSINE, stages(10), stages(20), 6)
    second = resume(COSINE, stages(20), stages(40), 12, segments=first)
    assert second[:1] == first and second[1][:1] == (13,)
    run = (factors(COSINE, stages(10), 1, 6) + factors(COSINE, stages(20), 7, 12, first)
           + factors(COSINE, stages(40), 13, 40, second))
    assert all(later <= earlier for earlier, later in zip(run, run[1:]))
    assert run[12] == run[11]                  # epoch 13 continues at epoch 12's rate


def test_only_the_last_stage_follows_solver_epochs():
    # Saved inside an earlier stage: the last has not begun, so it runs its new length whole.
    assert resume(COSINE, stages(5, 4), stages(5, 8), 3) == []
    assert resume(COSINE, stages(5, 4), stages(5, 8), 5) == []
    # Saved inside the last stage: the segment counts that stage's own epochs.
    segments = resume(COSINE, stages(5, 4), stages(5, 8), 7)
    assert segments == [(3, cosine(2, 4), 8)]
    assert factors(COSINE, stages(5, 8), 1, 5, segments) == [cosine(e, 5) for e in range(1, 6)]


def test_multistep_milestones_stay_absolute():
    assert resume(MULTISTEP, stages(4), stages(8), 4) == []
    assert factors(MULTISTEP, stages(8), 1, 8) == pytest.approx(
        [1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_a_checkpoint_without_the_entry_is_read_from_its_config():
    from mdistill.distillers.base import Distiller
    from mdistill.engine.schedule import saved_schedule
    state = {"config": "SOLVER:\n  EPOCHS: 6\n"}
    assert saved_schedule(state, Distiller(None)) == {"stage_epochs": [6], "segments": []}


def test_the_trainer_still_exports_the_schedule_functions():
    from mdistill.engine import schedule
    from mdistill.engine.trainer import lr_factor, stage_at
    assert lr_factor is schedule.lr_factor and stage_at is schedule.stage_at


# ----------------------------------------------------------------- a real resumed run
def logged_lrs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line)["lr"] for line in handle]


def test_a_cosine_run_resumed_with_more_epochs_never_raises_its_logged_rate(
        cifar_root, teacher_file, tmp_path):
    from mdistill.engine.launch import train
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TEACHER", "resnet20",
                     "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                     "SOLVER.LR_SCHEDULER", "cosine", "SOLVER.EPOCHS", "4",
                     "EXPERIMENT.NAME", "cosine")
    run_dir, _ = train(KD, opts)
    train(KD, opts + ["SOLVER.EPOCHS", "8"], resume=True)
    lrs = logged_lrs(run_dir)
    assert len(lrs) == 8
    assert all(later <= earlier for earlier, later in zip(lrs, lrs[1:])), lrs
    reached = cosine(4, 4)
    assert lrs == pytest.approx([0.05 * cosine(epoch, 4) for epoch in range(1, 5)]
                                + [0.05 * reached * (1 + math.cos(math.pi * k / 4)) / 2
                                   for k in range(4)])
