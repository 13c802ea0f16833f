"""A resumed run's TensorBoard events survive reading back, whatever the names of the
event files it finds: its own file always sorts after every earlier one."""
import glob
import os
import socket
import time
from types import SimpleNamespace

from conftest import ROOT, tiny_opts

KD = os.path.join(ROOT, "configs/cifar100/kd.yaml")


class FrozenClock:
    """A clock that stands still but for what ``sleep`` lets pass: an earlier writer
    in the very second of the resume, however fast or slow the machine is."""

    def __init__(self, now):
        self.now = now

    def time(self):
        return self.now

    def sleep(self, seconds):
        self.now += max(seconds, 0.0)


def steps_read_back(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def test_resumed_steps_survive_an_earlier_event_file_of_the_same_second(
        cifar_root, teacher_file, tmp_path, monkeypatch):
    from tensorboard.summary.writer import event_file_writer
    from mdistill.engine import launch
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                     "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file, "SOLVER.EPOCHS", "1",
                     "EXPERIMENT.NAME", "events")
    run_dir, _ = launch.train(KD, opts)                     # steps 1-5
    assert steps_read_back(run_dir, "train/loss") == [1, 2, 3, 4, 5]
    # The earlier writer made its file in the second the resume starts in, with a pid
    # that sorts after any real one (as a killed process's can).
    now = int(time.time())
    [earlier] = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    os.rename(earlier, os.path.join(
        run_dir, f"events.out.tfevents.{now:010d}.{socket.gethostname()}.9999999.0"))
    clock = FrozenClock(now + 0.5)
    fake_time = SimpleNamespace(time=clock.time, sleep=clock.sleep, perf_counter=time.perf_counter)
    monkeypatch.setattr(launch, "time", fake_time)               # the wait's clock
    monkeypatch.setattr(event_file_writer, "time", fake_time)    # the file name's clock
    launch.train(KD, opts + ["SOLVER.EPOCHS", "2"], resume=True)  # steps 6-10
    names = sorted(os.path.basename(path) for path in
                   glob.glob(os.path.join(run_dir, "events.out.tfevents.*")))
    assert names[0].endswith(".9999999.0") and names[1].startswith(
        f"events.out.tfevents.{now + 1:010d}.")
    assert steps_read_back(run_dir, "train/loss") == list(range(1, 11))


def test_a_file_dated_far_ahead_is_not_waited_for_and_the_log_says_so(tmp_path, monkeypatch):
    from mdistill.engine import launch
    clock = FrozenClock(1_000_000.0)
    monkeypatch.setattr(launch, "time", SimpleNamespace(time=clock.time, sleep=clock.sleep,
                                                       perf_counter=time.perf_counter))
    name = f"events.out.tfevents.{1_000_000 + 3600:010d}.host.1.0"
    (tmp_path / name).write_bytes(b"")
    lines = []
    launch.wait_for_event_file_order(str(tmp_path), lines.append)
    assert clock.now == 1_000_000.0
    assert lines == [f"warning: {tmp_path / name} is dated 3601s ahead of the clock; "
                     f"TensorBoard may show the steps logged now before its own"]
