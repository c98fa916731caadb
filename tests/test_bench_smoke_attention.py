"""bench/attention.py --smoke runs end to end and prints both providers against the floor."""

from tests.helpers import run_bench_smoke


def test_smoke_run_prints_both_providers():
    lines = run_bench_smoke("attention.py")
    assert "read bandwidth" in lines[0]
    assert "torch ms" in lines[1] and "cpu ms" in lines[1] and "floor ms" in lines[1]
    assert lines[3].startswith("| 2 |") and lines[3].count("x |") == 2
