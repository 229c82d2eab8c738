"""The README's benchmark command runs end to end (a smoke run; no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_core.py"


def test_benchmark_quick_run_prints_ratios_and_leaves_nothing(tmp_path: Path, shm_prefix: str) -> None:
    out = tmp_path / "bench.json"
    prefix = shm_prefix + "bench_"  # the run's own blocks: other runs on the machine do not count
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--sizes", "4K", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SHMBENCH_PREFIX": prefix},
    )
    assert run.returncode == 0, run.stderr
    assert "create+close+unlink" in run.stdout and "attach+close" in run.stdout
    assert json.loads(out.read_text())
    assert "cleanup: removed leftover" not in run.stderr  # the run unlinked what it made itself
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def test_list_benchmark_quick_run_reports_its_goals() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH.parent / "bench_list.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("goal:") == 6
