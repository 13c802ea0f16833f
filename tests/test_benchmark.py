"""tools/benchmark.py runs the real trainer step and writes its table (no timing asserted)."""
import os
import subprocess
import sys

from conftest import ROOT


def test_benchmark_writes_a_table_with_every_setting(tmp_path):
    report = tmp_path / "benchmarks.md"
    command = [sys.executable, os.path.join(ROOT, "tools/benchmark.py"), "--cfg",
               os.path.join(ROOT, "configs/cifar100/kd.yaml"), "--amp", "none", "bf16",
               "--channels-last", "off", "--iters", "2", "--warmup", "1", "--batch-size", "8",
               "--append", str(report), "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
               "resnet8", "DEVICE", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = report.read_text()
    assert "### KD resnet20 -> resnet8, batch 8" in text and "Machine: " in text
    rows = [line for line in text.splitlines() if line.startswith("| none") or
            line.startswith("| bf16")]
    assert len(rows) == 2 and all(row.count("|") == 11 for row in rows)
    # Each row has a throughput, the bare models' throughput and the overhead between them.
    assert all(float(row.split("|")[3]) > 0 and row.split("|")[5].strip().endswith("%")
               for row in rows)


def test_benchmark_rejects_a_bad_config_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools/benchmark.py"), "--cfg",
                             os.path.join(ROOT, "configs/cifar100/kd.yaml"), "SOLVER.AMP", "x"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: unknown value for SOLVER.AMP")
