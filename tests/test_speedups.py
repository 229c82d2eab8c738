"""The C extension (issue 10): memory-safe on any input, required under CI, and
sizes that cannot be fail at once on both paths.

* ``SHMEM_REQUIRE_SPEEDUPS=1`` (CI sets it): ``test_the_c_path_is_in_use_when_required``
  fails unless ``shmem._speedups`` imported and ShareableList uses it; and
  shmem itself refuses to import without a usable build (a stale build of
  another layout counts as none). ``SHMEM_PURE_PYTHON=1`` wins over it.
* Every size the C code computes is overflow-checked: counts that overflow
  ``8 * n`` raise OverflowError (as the pure-Python twins do), layouts that
  do not fit their buffer ValueError - never a crash, a SystemError, or a
  list of the wrong length.
* ``ShareableList(range(...))`` of more items than a block can hold raises
  InvalidSize (a ValueError), of more than /dev/shm can hold NoSpace, of more
  than ``sys.maxsize`` OverflowError - at once, before an item is packed, on
  the C path and the pure-Python path alike.

Whatever may crash runs in a child process, where a crash is a return code.
"""

from __future__ import annotations

import ast
import os
import subprocess
import textwrap
from typing import Any, Dict

import pytest
from conftest import PYTHON

import shmem
from shmem._kinds import list_layout

needs_c = pytest.mark.skipif(not list_layout.ACCELERATED, reason="the C extension is not in use")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,  # a safety net for what used to loop forever, not a timing assertion
        env={**os.environ, **env},
    )


# ---------------------------------------------------------------- CI notices a missing extension


def test_the_c_path_is_in_use_when_required() -> None:
    if not list_layout.SPEEDUPS_REQUIRED:
        pytest.skip("SHMEM_REQUIRE_SPEEDUPS is not set (or SHMEM_PURE_PYTHON is)")
    from shmem import _speedups

    assert list_layout.ACCELERATED
    assert _speedups.ListCore in shmem.ShareableList.__mro__
    assert list_layout.FENCE is None or list_layout.FENCE is _speedups.fence


# Hides shmem._speedups from the import system, as on a machine where it did not build.
WITHOUT_EXTENSION = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "shmem._speedups":
            raise ImportError("not built")
sys.meta_path.insert(0, Hide())
"""

# A build of an older layout: importable, without LAYOUT_VERSION.
STALE_EXTENSION = """
import sys, types
sys.modules["shmem._speedups"] = types.ModuleType("shmem._speedups")
"""


@pytest.mark.parametrize("build", [WITHOUT_EXTENSION, STALE_EXTENSION], ids=["missing", "stale"])
def test_require_speedups_makes_a_missing_or_stale_build_an_import_error(build: str) -> None:
    code = build + "import shmem\nfrom shmem._kinds import list_layout\nprint(list_layout.ACCELERATED)"
    required = _run(code, SHMEM_REQUIRE_SPEEDUPS="1", SHMEM_PURE_PYTHON="")
    assert required.returncode != 0
    assert "ImportError: SHMEM_REQUIRE_SPEEDUPS is set" in required.stderr, required.stderr
    for env in ({"SHMEM_REQUIRE_SPEEDUPS": ""}, {"SHMEM_REQUIRE_SPEEDUPS": "0"}):
        fallback = _run(code, SHMEM_PURE_PYTHON="", **env)  # a user without a compiler: the pure path
        assert fallback.returncode == 0 and fallback.stdout.strip() == "False", fallback.stderr
    pure = _run(code, SHMEM_REQUIRE_SPEEDUPS="1", SHMEM_PURE_PYTHON="1")  # asked for: no error
    assert pure.returncode == 0 and pure.stdout.strip() == "False", pure.stderr


# ---------------------------------------------------------------- sizes that cannot be


HUGE_RANGES: Dict[str, Any] = {
    "2**61": ("range(2**61)", "InvalidSize"),
    "5..2**61+6": ("range(5, 2**61 + 6)", "InvalidSize"),
    "2**60": ("range(2**60)", "InvalidSize"),
    "2**58-step": ("range(-(2**62), 2**62, 16)", "InvalidSize"),
    "2**64": ("range(2**64)", "OverflowError"),
    "2**40": ("range(2**40)", "NoSpace"),
    "2**57": ("range(2**57)", "NoSpace"),
    "2**40-beyond-int64": ("range(2**63 - 2**40, 2**63 + 2**40)", "NoSpace"),
}


@pytest.mark.parametrize("pure", [False, True], ids=["default-path", "pure-python"])
def test_sizes_that_cannot_be_fail_at_once(pure: bool, shm_prefix: str) -> None:
    code = f"""
        import shmem
        results = {{}}
        for key, expression in {[(k, v[0]) for k, v in HUGE_RANGES.items()]!r}:
            try:
                shmem.ShareableList(eval(expression))
                results[key] = "created"
            except Exception as err:
                results[key] = type(err).__name__
        print(results)
    """
    done = _run(code, SHMEM_PURE_PYTHON="1" if pure else "0")
    assert done.returncode == 0, f"crashed ({done.returncode}): {done.stderr}"
    results = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert results == {key: error for key, (_, error) in HUGE_RANGES.items()}
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(shm_prefix)]


def test_invalid_size_and_no_space_are_the_errors_blocks_raise() -> None:
    with pytest.raises(shmem.InvalidSize, match="more than any shared memory block can be"):
        shmem.ShareableList(range(2**61))
    with pytest.raises(ValueError):
        shmem.ShareableList(range(5, 2**61 + 6))
    with pytest.raises(shmem.NoSpace) as info:
        shmem.ShareableList(range(2**40), name="shmem_never_made")
    assert isinstance(info.value, OSError) and info.value.filename == "shmem_never_made"
    with pytest.raises(OverflowError, match="more items than a list can have"):
        shmem.ShareableList(range(2**64))


# ---------------------------------------------------------------- the C functions on hostile input


@needs_c
def test_c_functions_check_every_size() -> None:
    """Each case crashed, raised SystemError or returned a wrong result before."""
    code = """
        import mmap, sys
        from shmem import _speedups as c

        def outcome(call):
            try:
                result = call()
            except Exception as err:
                return type(err).__name__
            return "ok" if result is None else ("ok", len(result[0]) if isinstance(result, tuple) else len(result))

        class Core(c.ListCore):
            def _getitem_slow(self, key):
                return "slow"
            def _setitem_slow(self, key, value):
                pass

        buf = memoryview(mmap.mmap(-1, 4096))  # page-aligned, all zero
        n_wraps = (2**64 - 1) // 17  # (n + 2) * 8 + 9 * n wraps round to 15 bytes in 64 bits
        binds = [
            (n_wraps, 0, -1), (2**62, 0, -1), (2**61, 2**62, -1), (1, 2**63 - 1, -1), (-1, 0, -1),
            (0, -8, -1), (1, 8, -2), (1, 8, 40), (1, 8, 2**63 - 8), (2**59, 0, 64),
            (3, 24, 88), (3, 24, 92), (3, 24, 4056), (3, 24, 96), (3, 24, 4048), (3, 24, -1), (3, 4096, -1),
        ]
        results = {
            "pack 2**61": outcome(lambda: c.pack_numbers(range(2**61))),
            "pack 5..2**61+6": outcome(lambda: c.pack_numbers(range(5, 2**61 + 6))),
            "pack 2**60": outcome(lambda: c.pack_numbers(range(2**60))),
            "pack 2**64": outcome(lambda: c.pack_numbers(range(2**64))),
            "pack int64 ends": outcome(lambda: c.pack_numbers(range(-(2**63), 2**63, 2**64 - 1))),
            "offsets 2**61": outcome(lambda: c.fixed_offsets(2**61)),
            "offsets 2**60 - 1": outcome(lambda: c.fixed_offsets(2**60 - 1)),
            "offsets 2**63": outcome(lambda: c.fixed_offsets(2**63)),
            "offsets -1": outcome(lambda: c.fixed_offsets(-1)),
            "offsets 1.5": outcome(lambda: c.fixed_offsets(1.5)),
        }
        for n, data_len, ext in binds:
            core = Core()
            key = f"bind {n} {data_len} {ext}"
            results[key] = outcome(lambda: core._bind_core(buf, n, data_len, ext))
            if results[key] == "ok":
                results[key] = [core[i] for i in (0, n - 1, 10**15)]
        print(results)
    """
    done = _run(code)
    assert done.returncode == 0, f"crashed ({done.returncode}): {done.stderr}"
    results = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    n_wraps = (2**64 - 1) // 17
    assert results == {
        "pack 2**61": "OverflowError",
        "pack 5..2**61+6": "OverflowError",
        "pack 2**60": "OverflowError",
        "pack 2**64": "OverflowError",
        "pack int64 ends": ("ok", 16),  # -2**63 and 2**63 - 1: the step itself is beyond int64
        "offsets 2**61": "OverflowError",
        "offsets 2**60 - 1": "OverflowError",
        "offsets 2**63": "OverflowError",
        "offsets -1": "ValueError",
        "offsets 1.5": "TypeError",
        f"bind {n_wraps} 0 -1": "ValueError",
        f"bind {2**62} 0 -1": "ValueError",
        f"bind {2**61} {2**62} -1": "ValueError",
        f"bind 1 {2**63 - 1} -1": "ValueError",
        "bind -1 0 -1": "ValueError",
        "bind 0 -8 -1": "ValueError",
        "bind 1 8 -2": "ValueError",
        "bind 1 8 40": "ValueError",  # 1 item: its type code ends at 41
        f"bind 1 8 {2**63 - 8}": "ValueError",
        f"bind {2**59} 0 64": "ValueError",
        # 3 items of 8 bytes: the type codes end at 91; the extension (48 bytes) must follow, 8-aligned
        "bind 3 24 88": "ValueError",
        "bind 3 24 92": "ValueError",
        "bind 3 24 4056": "ValueError",
        "bind 3 24 96": ["slow", "slow", "slow"],  # all zero: no item is a number, the slow path answers
        "bind 3 24 4048": ["slow", "slow", "slow"],
        "bind 3 24 -1": ["slow", "slow", "slow"],
        "bind 3 4096 -1": "ValueError",
    }


# ---------------------------------------------------------------- CPUs that reorder memory accesses

# As if on a 64-bit ARM machine: os.uname().machine is what shmem checks, at import.
ON_ARM = """
import collections, os, warnings
_real = os.uname()
_Uname = collections.namedtuple("_Uname", "sysname nodename release version machine")
os.uname = lambda: _Uname(_real.sysname, _real.nodename, _real.release, _real.version, "aarch64")
warnings.simplefilter("always")
import shmem
from shmem._kinds import list as kind, list_layout
with warnings.catch_warnings(record=True) as caught:
    first, second = shmem.ShareableList([1, "a"]), shmem.ShareableList(["b"])
real, calls = kind.FENCE, []
if real is not None:
    kind.FENCE = lambda: (calls.append(1), real())[1]  # the slow path looks it up when it runs
first[1] = "xyz"
value = first[1]
fence = None if real is None else "built-in function fence" in repr(real)
messages = [str(w.message) for w in caught]
print(repr([list_layout.STORES_IN_ORDER, list_layout.TORN_READS_PREVENTED, fence, messages, len(calls), value]))
for sl in (first, second):
    sl.close()
    sl.unlink()
"""


def test_on_cpus_that_reorder_memory_the_c_path_fences_and_pure_python_warns() -> None:
    assert list_layout.STORES_IN_ORDER and list_layout.TORN_READS_PREVENTED  # x86-64, where the tests run
    assert list_layout.FENCE is None  # it keeps the order itself: no fence on its paths
    if list_layout.ACCELERATED:
        c = _run(ON_ARM, SHMEM_PURE_PYTHON="0")
        assert c.returncode == 0, c.stderr
        in_order, prevented, fence, warned, fences, value = ast.literal_eval(c.stdout.strip().splitlines()[-1])
        assert (in_order, prevented, fence, warned, value) == (False, True, True, [], "xyz")
        assert fences == 4  # a fence after the write's first store and before its last; two around the read
    pure = _run(ON_ARM, SHMEM_PURE_PYTHON="1")
    assert pure.returncode == 0, pure.stderr
    in_order, prevented, fence, warned, fences, value = ast.literal_eval(pure.stdout.strip().splitlines()[-1])
    assert (in_order, prevented, fence, fences, value) == (False, False, None, 0, "xyz")
    assert len(warned) == 1 and "aarch64" in warned[0] and "half-written" in warned[0]  # once per process
