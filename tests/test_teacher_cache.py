"""The teacher cache: exact (cold, warm and partly warm runs train as the live teacher),
keyed (another teacher, data or precision is another file), safe to share and to crash."""
import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_opts
from mdistill.config import load_cfg
from mdistill.engine.builder import build_experiment
from mdistill.engine.launch import train
from mdistill.data import DeviceLoader, ImageTensorDataset
from mdistill.engine.teacher_cache import (HEADER_BYTES, TeacherCache, build_teacher_cache,
                                           data_fingerprint, teacher_fingerprint)
from mdistill.errors import UserError
from mdistill.models import build_model

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")


def run_kd(cifar_root, teacher_file, out, name, *extra):
    opts = tiny_opts(cifar_root, out, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                     "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                     "SOLVER.DETERMINISTIC", "True", "EXPERIMENT.NAME", name, *extra)
    run_dir, history = train(CONFIG, opts)
    student = torch.load(os.path.join(run_dir, "student_latest"), weights_only=True)["model"]
    with open(os.path.join(run_dir, "log.txt")) as handle:
        return student, history, handle.read()


def forget_entries(folder, every):
    """Empty one in ``every`` filled entries of the cache file in ``folder``."""
    path, = glob.glob(os.path.join(folder, "teacher-*.bin"))
    with open(path, "rb") as handle:
        header = json.loads(handle.read(HEADER_BYTES).split(b"\n")[1])
    checks = np.memmap(path, dtype=np.int32, mode="r+", offset=HEADER_BYTES,
                       shape=(header["num_samples"] * header["num_views"],))
    filled = np.flatnonzero(checks)
    checks[filled[::every]] = 0
    checks.flush()
    return len(filled)


def remember_result(folder, log, fake):
    """Check the one remembered teacher test in ``folder`` is what ``log`` printed,
    and replace its result with ``fake`` (so a run that reads it shows it)."""
    path, = glob.glob(os.path.join(folder, "teacher-test-*.json"))
    with open(path) as handle:
        saved = json.load(handle)
    assert f"test top-1 {saved['result']['top1']:.2f} " in log
    saved["result"] = fake
    with open(path, "w") as handle:
        json.dump(saved, handle)
    return saved["key"]


def test_cold_warm_and_partly_warm_caches_train_exactly_as_the_live_teacher(
        cifar_root, teacher_file, tmp_path):
    cache = str(tmp_path / "cache")
    live, _, live_log = run_kd(cifar_root, teacher_file, tmp_path, "live")
    cold, cold_history, cold_log = run_kd(cifar_root, teacher_file, tmp_path, "cold",
                                          "DISTILLER.TEACHER_CACHE", cache)
    # The teacher's test accuracy is remembered beside the cache file: the warm run reads it.
    remember_result(cache, cold_log, {"top1": 55.5, "top5": 66.5, "loss": 1.0, "count": 80})
    warm, warm_history, warm_log = run_kd(cifar_root, teacher_file, tmp_path, "warm",
                                          "DISTILLER.TEACHER_CACHE", cache)
    assert "test top-1 55.50 top-5 66.50" in warm_log
    # A couple of misses per epoch: computed alone, without the padding to a whole
    # batch, their forward would take the small-batch code paths and give other bits.
    stored = forget_entries(cache, every=100)
    partly, partly_history, _ = run_kd(cifar_root, teacher_file, tmp_path, "partly",
                                       "DISTILLER.TEACHER_CACHE", cache)
    for name, student in (("cold", cold), ("warm", warm), ("partly warm", partly)):
        assert live.keys() == student.keys()
        assert all(torch.equal(live[key], student[key]) for key in live), name

    # The cold run computed each epoch's views ahead (160 samples, 5 forwards of 32;
    # a few views repeat in epoch 2), so no step missed; the warm run never ran the
    # teacher; the partly warm one computed the forgotten entries in padded forwards.
    cold_stats = [record["teacher_cache"] for record in cold_history]
    assert cold_stats[0]["hits"] == 0 and cold_stats[0]["teacher_rows"] == 160
    assert cold_stats[1]["stored"] == stored and 300 <= stored <= 320
    assert all(stats["step_misses"] == 0 and stats["step_views"] == 160
               for stats in cold_stats)
    assert [record["teacher_cache"]["teacher_rows"] for record in warm_history] == [0, 0]
    assert all(record["teacher_cache"]["hit_rate"] == 1.0 for record in warm_history)
    partly_stats = [record["teacher_cache"] for record in partly_history]
    assert sum(stats["computed"] for stats in partly_stats) == len(range(0, stored, 100))
    assert sum(stats["teacher_rows"] for stats in partly_stats) in (32, 64)
    assert partly_stats[-1]["stored"] == stored and partly_stats[-1]["step_misses"] == 0

    assert "teacher cache" not in live_log
    assert "teacher cache: on, " + cache in cold_log and "0 of 25,920 views stored" in cold_log
    assert ("teacher cache: 100.0% hits (160 of the epoch's 160 views stored; the teacher ran "
            "on 0 rows)") in warm_log


def small_cache(folder, key=None, dtype=torch.float32):
    return TeacherCache(str(folder), key or {"teacher": "a"}, num_samples=40, span=9,
                        num_classes=10, dtype=dtype)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_prefilled_epochs_read_the_teachers_bits_and_a_miss_computes_the_batch(tmp_path, amp):
    torch.manual_seed(0)
    teacher = build_model("resnet8", 10).eval()
    data = ImageTensorDataset(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8),
                              torch.arange(40) % 10)
    loader = DeviceLoader(data, 16, "cpu", mean=(0.5,) * 3, std=(0.25,) * 3, seed=3)
    cache = small_cache(tmp_path, dtype=amp or torch.float32)

    def autocast():
        return torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None)

    for epoch in (1, 2):
        loader.set_epoch(epoch)
        cache.prefill(teacher, loader, autocast)
        # 40 views in forwards of 16 rows, the last one padded; epoch 2 repeats no view.
        assert (cache.computed, cache.teacher_rows) == (40, 48)
        for batch in loader:
            planned = {key: batch[key] for key in ("index", "crop_offset", "flip")}
            assert torch.equal(loader.render_views(**planned), batch["image"])
            with torch.no_grad(), autocast():
                got = cache.logits(teacher, batch["image"], batch)
                expected = teacher(batch["image"])[0]
            assert got.dtype == expected.dtype and torch.equal(got, expected)
        assert cache.step_misses == 0 and cache.step_views == 40
        cache.reset_counts()
    # A batch with one view the file lacks is computed whole by the teacher.
    batch = {key: value[:16] for key, value in loader.planned_views().items()}
    batch["flip"] = batch["flip"].clone()
    batch["flip"][5] = ~batch["flip"][5]
    image = loader.render_views(**batch)
    with torch.no_grad(), autocast():
        assert torch.equal(cache.logits(teacher, image, batch), teacher(image)[0])
    assert (cache.step_misses, cache.teacher_rows) == (1, 16)


def test_a_torn_or_half_written_entry_is_a_miss_never_a_wrong_read(tmp_path):
    cache = small_cache(tmp_path)
    ids = torch.tensor([3, 500, 6000])
    values = torch.randn(3, 10)
    cache.write(ids, values)
    logits, hit = cache.read(ids)
    assert hit.all() and torch.equal(logits, values)
    # A crash between the logits and the checksum, or a page of logits lost: a miss.
    cache._logits[500, 4:] = 0
    cache._checks[6000] = 0
    logits, hit = cache.read(ids)
    assert hit.tolist() == [True, False, False] and torch.equal(logits[0], values[0])
    cache.close()
    # The file keeps what was written for the next run.
    logits, hit = small_cache(tmp_path).read(ids)
    assert hit.tolist() == [True, False, False] and torch.equal(logits[0], values[0])


def test_another_key_is_another_file_and_a_damaged_file_is_refused(tmp_path):
    first = small_cache(tmp_path)
    first.write(torch.tensor([7]), torch.ones(1, 10))
    other = small_cache(tmp_path, key={"teacher": "b"})
    bf16 = small_cache(tmp_path, dtype=torch.bfloat16)
    assert len({first.path, other.path, bf16.path}) == 3
    assert not other.read(torch.tensor([7]))[1].any() and not bf16.read(torch.tensor([7]))[1].any()
    with open(first.path, "r+b") as handle:
        handle.write(b"junk")
    with pytest.raises(UserError, match="not the cache it is named for"):
        small_cache(tmp_path)
    # The key's parts see a single changed weight or pixel.
    model = build_model("resnet8", 10)
    before = teacher_fingerprint(model)
    with torch.no_grad():
        model.fc.bias[3] += 1e-6
    assert teacher_fingerprint(model) != before
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    before = data_fingerprint(images)
    images[2, 1, 3, 3] = 1
    assert data_fingerprint(images) != before


WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from mdistill.engine.teacher_cache import TeacherCache
cache = TeacherCache({folder!r}, {{"teacher": "a"}}, num_samples=40, span=9, num_classes=10,
                     dtype=torch.float32)
generator = torch.Generator().manual_seed(int(sys.argv[1]))
for _ in range(200):
    ids = torch.randint(0, 40 * 162, (32,), generator=generator).unique()
    cache.write(ids, torch.sin(ids[:, None] * 0.01 + torch.arange(10)))
"""


def test_two_processes_fill_one_file_at_once(tmp_path):
    folder = str(tmp_path / "cache")
    small_cache(folder).close()         # the file exists before the writers race
    script = WRITER.format(root=ROOT, folder=folder)
    writers = [subprocess.Popen([sys.executable, "-c", script, str(seed)]) for seed in (1, 2)]
    assert [writer.wait() for writer in writers] == [0, 0]
    cache = small_cache(folder)
    ids = torch.arange(40 * 162)
    logits, hit = cache.read(ids)
    assert hit.sum() > 40 * 162 // 2
    expected = torch.sin(ids[hit, None] * 0.01 + torch.arange(10))
    assert torch.equal(logits[hit], expected)


def test_the_log_says_why_the_live_teacher_is_used(cifar_root, teacher_file, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                     "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file, "DISTILLER.TYPE",
                     "FITNET", "DISTILLER.TEACHER_CACHE", str(tmp_path / "cache"))
    experiment = build_experiment(load_cfg(CONFIG, opts))
    assert experiment.distiller.teacher_cache is None
    assert experiment.teacher_cache_note == ("teacher cache: off (method FITNET uses more of the "
                                             "teacher than its logits; the live teacher is used)")
    # KD on data without discrete crop+flip views (ImageNet's folder loader).
    kd = build_experiment(load_cfg(CONFIG, opts[:-4] + ["DISTILLER.TEACHER_CACHE",
                                                        str(tmp_path / "kd_cache")]))
    assert kd.distiller.teacher_cache is not None
    cache, note = build_teacher_cache(kd.cfg, kd.distiller, SimpleNamespace(train=None),
                                      SimpleNamespace(), kd.device)
    assert cache is None and "not CIFAR-style discrete crops and flips" in note
    # KD from an ensemble of two teachers.
    ensemble = build_experiment(load_cfg(CONFIG, opts[:-4] + [
        "DISTILLER.TEACHER_CACHE", str(tmp_path / "cache"), "DISTILLER.TEACHER_WEIGHTS", "",
        "DISTILLER.TEACHERS", "[resnet20, resnet20]",
        "DISTILLER.TEACHERS_WEIGHTS", f'["{teacher_file}", "{teacher_file}"]']))
    assert ensemble.distiller.teacher_cache is None
    assert ensemble.teacher_cache_note == ("teacher cache: off (several teachers; the live "
                                           "teachers are used)")
    assert not os.path.exists(tmp_path / "cache")


def test_the_teachers_test_pass_is_remembered_for_a_method_the_cache_cannot_serve(
        cifar_root, teacher_file, tmp_path):
    """FitNet reads the teacher's maps (no logits cache), yet runs that share the
    folder evaluate the teacher once; a different test set is evaluated afresh."""
    cache = str(tmp_path / "cache")
    _, _, first = run_kd(cifar_root, teacher_file, tmp_path, "first", "DISTILLER.TYPE", "FITNET",
                         "DISTILLER.TEACHER_CACHE", cache)
    assert "teacher cache: off (method FITNET uses more of the teacher" in first
    key = remember_result(cache, first, {"top1": 55.5, "top5": 66.5, "loss": 1.0, "count": 80})
    assert key["teacher"]["arch"] == "resnet20" and key["test"]["resize"] == 0
    _, _, second = run_kd(cifar_root, teacher_file, tmp_path, "second", "DISTILLER.TYPE",
                          "FITNET", "DISTILLER.TEACHER_CACHE", cache)
    assert "test top-1 55.50 top-5 66.50" in second
    # Another test batch size may round differently: not the same record.
    _, _, third = run_kd(cifar_root, teacher_file, tmp_path, "third", "DISTILLER.TYPE",
                         "FITNET", "DISTILLER.TEACHER_CACHE", cache, "DATASET.TEST.BATCH_SIZE", "7")
    assert "test top-1 55.50" not in third
    assert len(glob.glob(os.path.join(cache, "teacher-test-*.json"))) == 2
