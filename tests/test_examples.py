"""Every example in examples/ runs end to end (small sizes; no timing asserts).

The examples inherit this test's block-name prefix, so the leak guard also
checks that they leave nothing behind.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytest.importorskip("numpy")

from conftest import PYTHON, START_METHODS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("method", START_METHODS)
def test_array_pool_example(method: str) -> None:
    run = subprocess.run(
        [PYTHON, str(EXAMPLES / "array_pool.py"), "--mib", "16", "--workers", "2", "--start-method", method],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "ok" and "standardized 2048 rows in place" in run.stdout
    assert run.stderr == ""


def test_array_by_name_example_two_programs() -> None:
    publisher = subprocess.Popen(
        [PYTHON, str(EXAMPLES / "array_by_name.py"), "publish"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert publisher.stdout is not None
        name = publisher.stdout.readline().strip()
        reader = subprocess.run(
            [PYTHON, str(EXAMPLES / "array_by_name.py"), "read", name], capture_output=True, text=True, timeout=120
        )
        assert reader.returncode == 0, reader.stderr
        assert "(1000, 3) float32, sums [499500.0, 999000.0, -1000.0]" in reader.stdout
        assert "read-only, as asked" in reader.stdout
    finally:
        out, err = publisher.communicate("\n", timeout=120)
    assert publisher.returncode == 0, err
    assert "changed the last point to [7.0, 8.0, 9.0]" in out
