"""The benchmark runs the real trainer step of every method against its bare models,
with the teacher cache off or warm, on any dataset type (no timing asserted)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_opts
from mdistill.distillers import DISTILLERS
from mdistill.analysis.benchmark import benchmark_setting, whole_run
from test_distillers import STUDENT_FOR

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")
# The models and method options test_distillers.py trains every method with.
TINY = ["DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8", "DEVICE", "cpu",
        "CRD.NCE.K", "64", "CRD.FEAT.DIM", "16", "REVIEWKD.IN_CHANNELS", "[16, 32, 64, 64]",
        "REVIEWKD.OUT_CHANNELS", "[16, 32, 64, 64]"]


@pytest.mark.parametrize("method", DISTILLERS.names())
def test_every_method_runs_against_its_bare_models(method):
    opts = TINY + ["DISTILLER.TYPE", method, *STUDENT_FOR.get(method, ())]
    logits_only = set(DISTILLERS.get(method).teacher_reads) == {"logits"}
    row = benchmark_setting(CONFIG, opts, iters=1, warmup=1, batch_size=8,
                            teacher_cache="warm" if logits_only else "off")
    assert row["method"] == method and row["images_per_sec"] > 0
    assert row["bare_images_per_sec"] > 0 and row["peak_memory_mb"] > 0
    if logits_only:
        # The warm cache held every view the timed steps asked for.
        assert row["hit_rate"] == 1.0
    else:
        skipped = benchmark_setting(CONFIG, opts, iters=1, warmup=1, batch_size=8,
                                    teacher_cache="warm")
        reason = "has no teacher" if method == "NONE" else "uses more of the teacher than its logits"
        assert skipped["skipped"].startswith(f"teacher cache: off (method {method} {reason}")


def test_any_dataset_type_imagenet_models_and_real_digits():
    # ImageNet-family models on a stand-in of DATASET.SYNTHETIC's shape ...
    row = benchmark_setting(os.path.join(ROOT, "configs/imagenet/r34_r18/kd.yaml"),
                            ["DISTILLER.TEACHER", "ResNet18", "DEVICE", "cpu",
                             "DATASET.SYNTHETIC.IMAGE_SIZE", "32",
                             "DATASET.SYNTHETIC.NUM_CLASSES", "10"],
                            iters=1, warmup=1, batch_size=4)
    assert row["images_per_sec"] > 0 and row["bare_images_per_sec"] > 0
    # ... and a config's own (real) dataset.
    row = benchmark_setting(os.path.join(ROOT, "configs/digits/student.yaml"), ["DEVICE", "cpu"],
                            iters=1, warmup=1, batch_size=8, data="real")
    assert row["data"] == "real" and row["images_per_sec"] > 0


def test_the_tool_writes_a_table_with_every_setting(tmp_path):
    report = tmp_path / "benchmarks.md"
    command = [sys.executable, os.path.join(ROOT, "tools/benchmark.py"), "--cfg", CONFIG,
               "--amp", "bf16", "--channels-last", "off", "--teacher-cache", "off", "warm",
               "--iters", "2", "--warmup", "1", "--batch-size", "8",
               "--append", str(report), *TINY]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = report.read_text()
    assert "### KD resnet20 -> resnet8, batch 8, synthetic data" in text and "Machine: " in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| KD")]
    assert [(row[1].strip(), row[3].strip()) for row in rows] == [("bf16", "off"),
                                                                  ("bf16", "warm (100% hits)")]
    # Each row has a throughput, the bare models' throughput and the ratio between them.
    assert all(float(row[4]) > 0 and float(row[6]) > 0 and row[8].strip().endswith("x")
               for row in rows)


def test_a_whole_run_is_timed_against_the_bare_models(cifar_root, teacher_file, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path, *TINY[:4], "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                     "SOLVER.EPOCHS", "1")
    result = whole_run(CONFIG, opts, epochs=1, iters=2, warmup=1)
    assert result["images"] == 160 and result["bare_images_per_sec"] > 0
    assert result["wall_s"] > result["loop_s"] > 0
    assert abs(result["overhead"] - (result["wall_s"] / result["bare_s"] - 1)) < 1e-9
    assert result["cpu_s"] > 0 and result["bare_cpu_s"] > 0
    assert "epoch 1/1" in result["log"]


def test_benchmark_rejects_a_bad_config_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools/benchmark.py"), "--cfg",
                             CONFIG, "SOLVER.AMP", "x"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: unknown value for SOLVER.AMP")
