"""bench/kernels.py --smoke runs end to end, so the benchmark cannot rot."""

from tests.helpers import run_bench_smoke


def test_kernels_benchmark_smoke_run_prints_every_provider():
    lines = run_bench_smoke("kernels.py")
    assert "read bandwidth" in lines[0]
    assert "torch-naive" in lines[1] and "cpu" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [(row[0], row[1]) for row in rows] == [("1", "1000"), ("4", "1000")]
    assert all(row[-1].endswith("x") and float(row[-1][:-1]) > 0 for row in rows)
