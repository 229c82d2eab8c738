"""Every Python example in README.md and docs/ runs as written, and checks its own results.

The convention for code blocks in the Markdown files:

* A block fenced with exactly ```` ```python ```` is a complete program. This test writes it to a
  file in an empty temporary directory and runs it there with this interpreter, in a process of its
  own: it must exit with status 0, write nothing to stderr (no warning, no traceback), and leave no
  shared memory block behind. An example checks what it shows with ``assert`` (``assert sl[0] == "hi"``),
  never with a comment (``# 'hi'``) that nothing checks. Examples that start processes really do
  (``if __name__ == "__main__":`` makes them work under spawn, since they run from a file).
* Anything not meant to run uses another fence: ```` ```sh ```` for shell commands, ```` ```text ````
  for output, drawings and tables of names, ```` ```pycon ```` for an interactive session that is
  shown but not run. There is no way to mark a ```` ```python ```` block "do not run".
* An example that needs NumPy says ``import numpy``; it is skipped where NumPy is not installed.

Leftover blocks: the test's fixture (conftest.py) gives every test a name prefix of its own, which the
example inherits through ``SHMEM_NAME_PREFIX``, so every block the example generates a name for carries
it. After the example exits, blocks with that prefix that were not there before it started get a few
seconds to be removed by the example's reaper (a tracked block whose processes all exited is removed
within about a second, which the lifecycle contract promises); any still there fails the test. Nothing
else in /dev/shm is looked at: other programs use it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import textwrap
from pathlib import Path
from typing import List, Tuple

import pytest
from conftest import PYTHON, REAP_WAIT, SHM_DIR, wait_until

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A fence may be indented (a block inside a list item); its closing fence has the same indentation.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
HAVE_NUMPY = importlib.util.find_spec("numpy") is not None
TIMEOUT = 180


def collect() -> List[Tuple[str, str]]:
    """(id, code) of every ```python block: id is the file and the line the block starts on."""
    found = []
    for source in SOURCES:
        text = source.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            code = textwrap.dedent(match.group("code"))
            found.append((f"{source.relative_to(ROOT)}:{line}", code))
    return found


EXAMPLES = collect()


def test_examples_were_found() -> None:
    """The collector works: the README and the quickstart both have examples."""
    files = {example_id.rsplit(":", 1)[0] for example_id, _ in EXAMPLES}
    assert {"README.md", os.path.join("docs", "index.md")} <= files, files


@pytest.mark.parametrize("code", [code for _, code in EXAMPLES], ids=[example_id for example_id, _ in EXAMPLES])
def test_example_runs_and_leaves_nothing(code: str, tmp_path: Path) -> None:
    if re.search(r"^\s*(import numpy|from numpy)\b", code, re.M) and not HAVE_NUMPY:
        pytest.skip("needs NumPy")
    prefix = os.environ.get("SHMEM_NAME_PREFIX") or "shmem_"  # set per test by conftest.py
    before = set(os.listdir(SHM_DIR))
    program = tmp_path / "example.py"
    program.write_text(code, encoding="utf-8")
    run = subprocess.run(
        [PYTHON, str(program)], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL
    )
    assert run.returncode == 0, f"exit status {run.returncode}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    assert run.stderr == "", run.stderr

    def left_behind() -> List[str]:
        return sorted(n for n in set(os.listdir(SHM_DIR)) - before if n.startswith(prefix))

    wait_until(lambda: not left_behind(), REAP_WAIT)
    assert left_behind() == [], "the example left these blocks in /dev/shm"


def test_no_example_reads_through_a_temporary_handle() -> None:
    """Nowhere (code or prose) ``SharedMemory(name).buf[...]``: used on a temporary, the handle is
    collected at once and its ``buf`` released, so the line fails when copied. Keep a reference."""
    pattern = re.compile(r"SharedMemory\([^()]*\)\s*\.\s*buf")
    bad = [str(source.relative_to(ROOT)) for source in SOURCES if pattern.search(source.read_text(encoding="utf-8"))]
    assert bad == []
