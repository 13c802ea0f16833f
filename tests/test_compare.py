"""Comparing real runs: the table, the plot, hparams, eval on a glob, determinism."""
import json
import os
import statistics
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, tiny_opts
from mdistill.analysis.compare import format_table, load_runs, summarize
from mdistill.analysis.plots import bar_rows, epoch_band, plot_runs, reference_lines
from mdistill.engine.launch import train
from mdistill.errors import UserError

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")


@pytest.fixture(scope="module")
def runs(cifar_root, teacher_file, tmp_path_factory):
    """Three real tiny runs: the student alone (seeds 0, 1) and KD (seed 0)."""
    prefix = tmp_path_factory.mktemp("runs")
    folders = []
    for method, seed in (("NONE", 0), ("NONE", 1), ("KD", 0)):
        opts = tiny_opts(cifar_root, prefix, "DISTILLER.TYPE", method, "EXPERIMENT.SEED",
                         str(seed), "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                         "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file)
        folders.append(train(CONFIG, opts)[0])
    return prefix, folders


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def test_table_numbers_come_from_the_runs_logs(runs):
    prefix, folders = runs
    # Readable names: method, teacher, student, seed, then the overrides.
    assert [os.path.basename(f) for f in folders] == [
        f"{name},BATCH_SIZE=32,LR_DECAY_STAGES=1" for name in
        ("vanilla,resnet8,seed0", "vanilla,resnet8,seed1", "kd,resnet20,resnet8,seed0")]
    rows = summarize(load_runs([str(prefix)]))
    alone, kd = rows                                        # "student alone" sorts first
    assert alone.label == "student alone" and alone.seeds == [0, 1]
    best = [max(r["test"]["top1"] for r in metrics(f)) for f in folders[:2]]
    last = [metrics(f)[-1]["test"]["top1"] for f in folders[:2]]
    assert alone.best == pytest.approx((statistics.fmean(best), statistics.stdev(best)))
    assert alone.last == pytest.approx((statistics.fmean(last), statistics.stdev(last)))
    assert kd.label == "KD" and kd.teacher == "resnet20" and kd.best[1] is None
    assert alone.epochs_finished == (2, 2) and alone.epochs_planned == 2
    table = format_table(rows)
    assert f"{statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f}" in table
    csv = format_table(rows, "csv").splitlines()
    assert csv[0].startswith("dataset,teacher,student,method,settings,best_top1_mean")
    assert len(csv) == 3


def fake_run(folder, top1s, *opts):
    """A run folder as the trainer leaves it: config.yaml and one record per epoch."""
    from mdistill.config import load_cfg
    os.makedirs(folder)
    cfg = load_cfg(CONFIG, ["DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8",
                            *opts])
    with open(os.path.join(folder, "config.yaml"), "w") as handle:
        handle.write(cfg.dump())
    with open(os.path.join(folder, "metrics.jsonl"), "w") as handle:
        for epoch, top1 in enumerate(top1s, 1):
            handle.write(json.dumps({"epoch": epoch, "test": {"top1": top1},
                                     "epoch_time": 1.0}) + "\n")
    return str(folder)


def records_run(folder, records, *opts):
    """A run folder whose metrics.jsonl holds ``records`` as given."""
    fake_run(folder, [], *opts)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    return str(folder)


def staged(stage, epoch, top1, best):
    """A record as the trainer writes it for a method with an init stage."""
    return {"epoch": epoch, "stage": stage, "test": {"top1": top1}, "best_top1": best,
            "epoch_time": 1.0}


def test_best_ignores_the_epochs_of_an_init_stage(tmp_path):
    # FSP-like: two init epochs (higher accuracy, another objective) then the method's.
    records = [staged("init", 1, 90.0, -1.0), staged("init", 2, 95.0, -1.0),
               staged("distill", 3, 40.0, 40.0), staged("distill", 4, 60.0, 60.0),
               staged("distill", 5, 50.0, 60.0)]
    records_run(tmp_path / "s0", records, "DISTILLER.TYPE", "FSP", "EXPERIMENT.SEED", "0")
    # Seed 1 is still in its init stage: it has no best yet, and is left out of "best".
    records_run(tmp_path / "s1", records[:2], "DISTILLER.TYPE", "FSP", "EXPERIMENT.SEED", "1")
    runs = {run.seed: run for run in load_runs([str(tmp_path)], warn=lambda text: None)}
    assert [record["epoch"] for record in runs[0].final_stage_records] == [3, 4, 5]
    assert runs[0].best_top1 == 60.0 and runs[0].last_top1 == 50.0
    assert runs[1].final_stage_records == [] and runs[1].best_top1 is None
    (group,) = summarize(list(runs.values()), warn=lambda text: None)
    assert group.best == (60.0, None)
    assert group.last == pytest.approx((72.5, statistics.stdev([50.0, 95.0])))
    assert "| FSP | 60.00 ± n/a |" in format_table([group])
    # No run has reached the final stage: "n/a", not an init epoch's accuracy.
    (early,) = summarize([runs[1]], warn=lambda text: None)
    assert early.best == (None, None) and "| FSP | n/a | 95.00 ± n/a |" in format_table([early])
    assert ",FSP,,n/a,n/a,95.0000," in format_table([early], "csv")


def test_a_run_with_several_teachers_shows_them_all(tmp_path):
    teachers = ("DISTILLER.TEACHERS", "[resnet56, wrn_40_2]")
    fake_run(tmp_path / "s0", [70.0], *teachers, "EXPERIMENT.SEED", "0",
             "DISTILLER.TEACHERS_WEIGHTS", "[/a/resnet56.pth, /a/wrn.pth]")
    # DISTILLER.TEACHER is unused next to TEACHERS: a different value is still a seed.
    fake_run(tmp_path / "s1", [72.0], *teachers, "EXPERIMENT.SEED", "1",
             "DISTILLER.TEACHER", "vgg13")
    fake_run(tmp_path / "one", [65.0], "DISTILLER.TEACHERS", "[resnet56]")
    fake_run(tmp_path / "single", [60.0])
    warnings = []
    groups = summarize(load_runs([str(tmp_path)]), warn=warnings.append)
    assert [(group.teacher, group.seeds) for group in groups] == [
        ("resnet20", [0]), ("resnet56", [0]), ("resnet56+wrn_40_2", [0, 1])]
    assert groups[2].runs[0].teachers == ["resnet56", "wrn_40_2"]
    assert "| cifar100 | resnet56+wrn_40_2 | resnet8 | KD | 71.00 ± 1.41 |" in format_table(
        groups)
    # The two seeds name different teacher files (one gives none): averaged, with a warning.
    assert len(warnings) == 1 and "DISTILLER.TEACHERS_WEIGHTS" in warnings[0]


def test_runs_differing_in_more_than_the_seed_are_separate_rows(tmp_path):
    fake_run(tmp_path / "t4s0", [70.0], "EXPERIMENT.SEED", "0")
    fake_run(tmp_path / "t4s1", [72.0], "EXPERIMENT.SEED", "1", "LOG.PREFIX", "elsewhere",
             "DATASET.ROOT", "/other/data", "CRD.NCE.K", "64")   # no effect on a KD run
    fake_run(tmp_path / "t8s0", [60.0], "EXPERIMENT.SEED", "0", "KD.TEMPERATURE", "8")
    fake_run(tmp_path / "t8s1", [62.0], "EXPERIMENT.SEED", "1", "KD.TEMPERATURE", "8")
    fake_run(tmp_path / "crd", [50.0], "DISTILLER.TYPE", "CRD")
    warnings = []
    groups = summarize(load_runs([str(tmp_path)]), warn=warnings.append)
    assert [(group.label, group.seeds, group.best[0]) for group in groups] == [
        ("CRD", [0], 50.0),
        ("KD (KD.TEMPERATURE=4.0)", [0, 1], 71.0),
        ("KD (KD.TEMPERATURE=8.0)", [0, 1], 61.0)]
    assert warnings == []
    table = format_table(groups)
    assert "| KD (KD.TEMPERATURE=8.0) | 61.00 ± 1.41 |" in table
    csv = format_table(groups, "csv").splitlines()
    assert csv[2].startswith("cifar100,resnet20,resnet8,KD,KD.TEMPERATURE=4.0,71.0000,")


def test_runs_differing_in_epochs_or_a_solver_key_are_not_seeds_of_one_row(tmp_path):
    fake_run(tmp_path / "a", [70.0], "EXPERIMENT.SEED", "0")
    fake_run(tmp_path / "b", [60.0], "EXPERIMENT.SEED", "1", "SOLVER.EPOCHS", "120",
             "SOLVER.LR", "0.1")
    groups = summarize(load_runs([str(tmp_path)]), warn=lambda text: None)
    assert [group.label for group in groups] == ["KD (SOLVER.EPOCHS=120, SOLVER.LR=0.1)",
                                                 "KD (SOLVER.EPOCHS=240, SOLVER.LR=0.05)"]


def test_a_seed_run_twice_is_counted_once_with_a_warning(tmp_path):
    fake_run(tmp_path / "first", [70.0, 71.0], "EXPERIMENT.SEED", "0")
    again = fake_run(tmp_path / "again", [10.0], "EXPERIMENT.SEED", "0")
    fake_run(tmp_path / "other", [73.0], "EXPERIMENT.SEED", "1")
    warnings = []
    (group,) = summarize(load_runs([str(tmp_path)]), warn=warnings.append)
    assert group.seeds == [0, 1] and group.best[0] == pytest.approx(72.0)
    assert [run.path for run in group.duplicates] == [again]
    assert len(warnings) == 1 and "seed 0 was run 2 times; counting it once" in warnings[0]
    assert str(tmp_path / "first") in warnings[0] and again in warnings[0]


def test_compare_command_line_warns_about_a_duplicated_seed(tmp_path):
    fake_run(tmp_path / "first", [70.0], "EXPERIMENT.SEED", "0")
    fake_run(tmp_path / "again", [70.0], "EXPERIMENT.SEED", "0")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools/compare.py"),
                             str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning: KD (cifar100, resnet20 -> resnet8): seed 0 was run 2 times" in result.stderr
    assert "| cifar100 | resnet20 | resnet8 | KD | 70.00 ± n/a | 70.00 ± n/a | 1 |" in result.stdout


def png_shape(path):
    """The decoded image's shape (matplotlib reads the file back)."""
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image.shape


def logged_run(folder, top1s, *opts, teacher_top1=70.0):
    """A fake run whose log.txt reports its teacher as launch.train logs it."""
    fake_run(folder, top1s, *opts)
    with open(os.path.join(folder, "log.txt"), "w") as handle:
        handle.write(f"run folder: {folder}\nteacher resnet20 (/t/ckpt.pth): test top-1 "
                     f"{teacher_top1:.2f} top-5 90.00\n")
    return str(folder)


def test_pictures_show_each_method_over_its_seeds(tmp_path):
    curves = {("NONE", 0): [40.0, 50.0, 55.0], ("NONE", 1): [42.0, 54.0, 53.0],
              ("KD", 0): [45.0, 60.0, 58.0], ("KD", 1): [47.0, 56.0, 62.0],
              ("DKD", 0): [44.0, 57.0, 59.0], ("DKD", 1): [46.0, 55.0, 57.0]}
    for (method, seed), top1s in curves.items():
        logged_run(tmp_path / f"{method}{seed}", top1s, "DISTILLER.TYPE", method,
                   "EXPERIMENT.SEED", str(seed), teacher_top1=70.0 + seed)
    runs = load_runs([str(tmp_path)])
    groups = summarize(runs)
    kd = next(group for group in groups if group.label == "KD")
    # The curve is the mean per epoch; the band runs from the lowest seed to the highest.
    assert epoch_band(kd) == ([1, 2, 3], [46.0, 58.0, 60.0], [45.0, 56.0, 58.0],
                              [47.0, 60.0, 62.0])
    # The teacher is the mean of what the runs logged; the student alone its best.
    assert reference_lines(groups) == [("teacher resnet20", 70.5), ("student alone", 54.5)]
    assert [(name, best[0]) for name, best, _ in bar_rows(groups)] == [
        ("KD", 61.0), ("DKD", 58.0), ("student alone", 54.5)]
    folder = tmp_path / "pictures"
    folder.mkdir()
    paths = plot_runs(runs, str(folder / "curves.png"))
    assert paths == [str(folder / "curves.png"), str(folder / "curves_bars.png")]
    assert all(png_shape(path) for path in paths)


def test_bars_for_25_methods_give_each_its_row(tmp_path):
    for temperature in range(1, 26):
        logged_run(tmp_path / "runs" / f"t{temperature}", [50.0 + temperature / 10],
                   "KD.TEMPERATURE", str(temperature))
    runs = load_runs([str(tmp_path / "runs")])
    rows = bar_rows(summarize(runs))
    assert len(rows) == 25 and rows[0][0] == "KD (KD.TEMPERATURE=25.0)"
    _, bars = plot_runs(runs[:3], str(tmp_path / "three.png"))
    _, many = plot_runs(runs, str(tmp_path / "many.png"))
    assert png_shape(many)[0] > 2.5 * png_shape(bars)[0]


def test_hparams_are_in_the_event_files(runs):
    _, folders = runs
    accumulator = EventAccumulator(folders[2])
    accumulator.Reload()
    plugins = accumulator.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins
    from tensorboard.plugins.hparams import plugin_data_pb2
    start = plugin_data_pb2.HParamsPluginData.FromString(
        plugins["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["method"].string_value == "KD"
    assert start.hparams["teacher"].string_value == "resnet20"
    assert start.hparams["KD.TEMPERATURE"].number_value == 4.0
    # The recipe's keys tell runs apart too (off here).
    assert {"ema", "ema_decay", "mixup", "cutmix", "label_smoothing", "resize", "warmup_epochs",
            "clip_grad"} <= set(start.hparams)
    assert start.hparams["ema"].bool_value is False and start.hparams["mixup"].number_value == 0
    best = accumulator.Scalars("hparam/best_top1")[-1].value
    assert best == pytest.approx(max(r["test"]["top1"] for r in metrics(folders[2])))


def test_compare_and_eval_command_lines(runs, tmp_path):
    prefix, folders = runs
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools/compare.py"),
                             str(prefix), "--plot", str(tmp_path / "c.png")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert png_shape(tmp_path / "c.png") and png_shape(tmp_path / "c_bars.png")
    assert "| cifar100 | - | resnet8 | student alone |" in result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools/compare.py"), str(empty)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: no runs")
    # eval.py over a glob evaluates every run's student_best.
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools/eval.py"),
                             os.path.join(str(prefix), "*", "*"), "--device", "cpu", "--json",
                             str(tmp_path / "e.json"), "--throughput"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "e.json") as handle:
        rows = json.load(handle)
    assert sorted(os.path.dirname(row["path"]) for row in rows) == sorted(folders)
    for row in rows:
        best = max(r["test"]["top1"] for r in metrics(os.path.dirname(row["path"])))
        assert row["top1"] == pytest.approx(best) and row["images_per_sec"] > 0


def test_load_runs_without_runs_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no runs"):
        load_runs([str(tmp_path)])


def test_deterministic_mode_reproduces_a_run_exactly(cifar_root, teacher_file, tmp_path):
    histories = []
    for name in ("first", "second"):
        opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TEACHER", "resnet20",
                         "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS",
                         teacher_file, "SOLVER.DETERMINISTIC", "True", "EXPERIMENT.NAME", name,
                         "DISTILLER.TYPE", "CRD", "CRD.NCE.K", "32")
        run_dir, _ = train(CONFIG, opts)
        histories.append([(r["train"], r["test"]) for r in metrics(run_dir)])
    assert histories[0] == histories[1]


def test_each_run_records_where_its_time_went_and_compare_sums_it(runs, tmp_path):
    prefix, folders = runs
    parts = ("start_up", "teacher_test", "training", "evaluation", "checkpoints", "other")
    files = []
    for folder in folders:
        with open(os.path.join(folder, "timing.json")) as handle:
            seconds = json.load(handle)
        assert set(seconds) == set(parts) | {"total"}
        assert all(seconds[part] >= 0 for part in parts[:-1])
        assert sum(seconds[part] for part in parts) == pytest.approx(seconds["total"], abs=0.01)
        with open(os.path.join(folder, "log.txt")) as handle:
            assert f"time: start-up {seconds['start_up']:.1f} s, teacher-test" in handle.read()
        files.append(seconds)
    from mdistill.analysis.compare import timing_summary
    loaded = load_runs([str(prefix)])
    text = timing_summary(loaded)
    assert text.startswith(f"time of {len(folders)} run(s) (timing.json; 0 without one):")
    training = sum(seconds["training"] for seconds in files)
    assert f"| training | {training:.0f} s | {training / len(folders):.1f} s |" in text
    path = os.path.join(folders[0], "timing.json")
    os.rename(path, path + ".aside")
    try:
        assert "(timing.json; 1 without one)" in timing_summary(load_runs([str(prefix)]))
    finally:
        os.rename(path + ".aside", path)


def test_a_switch_turned_on_is_its_own_row_named_as_the_run_folders():
    """SD-KD runs (SDD.ENABLE) are not seeds of KD: the Fashion-MNIST table counted
    a kd+sdd run as KD's seed 2 before."""
    from mdistill.analysis.compare import Run
    from mdistill.config import flatten_cfg, get_cfg
    record = {"epoch": 1, "stage": "distill", "test": {"top1": 50.0, "top5": 90.0},
              "best_top1": 50.0}
    runs = []
    for sdd in (False, True):
        cfg = get_cfg()
        cfg.DISTILLER.TYPE, cfg.SDD.ENABLE = "KD", sdd
        runs.append(Run(f"/runs/{sdd}", flatten_cfg(cfg), [record]))
    warnings = []
    groups = summarize(runs, warn=warnings.append)
    assert [group.method for group in groups] == ["KD", "KD+SDD"] and not warnings
    assert all(group.settings == {} for group in groups)
