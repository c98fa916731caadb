"""bench/kernels.py --smoke runs end to end, so the benchmark cannot rot."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"


def test_kernels_benchmark_smoke_run_prints_every_provider():
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "read bandwidth" in lines[0]
    assert "torch-naive" in lines[1] and "cpu" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [(row[0], row[1]) for row in rows] == [("1", "1000"), ("4", "1000")]
    assert all(row[-1].endswith("x") and float(row[-1][:-1]) > 0 for row in rows)
