"""The C path and the pure-Python path of ShareableList behave the same (issue 10),
property-based: Hypothesis generates values, sizes, operations and damage.

* ``test_pack_twins_agree`` / ``test_fixed_offsets_twins_agree``: the C
  functions and their pure-Python twins in ``list_layout``, called directly
  on the same input, give the same result or raise the same exception type.
* ``test_bind_core_accepts_exactly_the_layouts_that_fit``: ``ListCore`` binds
  a layout only when it fits its buffer (Python's arithmetic, without
  overflow, is the reference) and never reads outside it.
* ``test_both_paths_agree_on_lists_operations_and_damage``: two servers
  (``_list_workers.serve``), one on the C path and one with
  ``SHMEM_PURE_PYTHON=1``, each build a list from the same sequence, suffer
  the same damage to its bytes and run the same operations: the same
  outcomes (value with its type, or exception type) and byte-identical blocks.

Without the C extension there is nothing to compare: skipped, unless
``SHMEM_REQUIRE_SPEEDUPS`` is set (then test_speedups.py fails).
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
from conftest import PYTHON
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shmem._kinds import list_layout

pytestmark = pytest.mark.skipif(not list_layout.ACCELERATED, reason="the C extension is not in use")

if list_layout.ACCELERATED:
    from shmem import _speedups

INT64 = st.integers(-(2**63), 2**63 - 1)
VALUES = st.one_of(
    INT64,
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=20),
    st.binary(max_size=20),
)
ODD_VALUES = st.sampled_from([1j, [1], bytearray(b"x"), 2**64, -(2**63) - 1])

# Ranges either small (with ends anywhere, int64 or not), or too large for any block:
# never gigabytes for real.
SMALL_RANGES = st.builds(
    lambda a, n, d: range(a, a + n * d, d),
    st.one_of(INT64, st.integers(-(2**64), 2**64)),
    st.integers(0, 64),
    st.integers(-(2**62), 2**62).filter(bool),
)
HUGE_RANGES = st.builds(
    lambda a, n, d: range(a, a + n * d, d),
    st.integers(-(2**65), 2**65),
    st.integers(2**61, 2**66),
    st.sampled_from([1, -1, 3]),
)
SEQUENCES = st.one_of(
    st.lists(VALUES, max_size=12),
    st.lists(VALUES, max_size=12).map(tuple),
    st.lists(INT64, min_size=1, max_size=40),  # the C path packs these in one go
    st.lists(st.floats(), min_size=1, max_size=40).map(tuple),
    st.lists(st.one_of(VALUES, ODD_VALUES), max_size=6),
    SMALL_RANGES,
    HUGE_RANGES,
)


def _outcome(call: Any) -> Any:
    try:
        result = call()
    except Exception as err:  # noqa: BLE001 - the type is the outcome
        return ("raises", type(err))
    if result is not None and not isinstance(result, tuple):
        result = bytes(result)
    elif result is not None:
        result = (bytes(result[0]), result[1])
    return ("returns", result)


@settings(max_examples=400, deadline=None)
@given(st.one_of(SEQUENCES, st.just([]), st.just(()), st.sampled_from(["ab", b"ab", {1: 2}, None, 5])))
def test_pack_twins_agree(seq: Any) -> None:
    assert _outcome(lambda: _speedups.pack_numbers(seq)) == _outcome(lambda: list_layout.pack_numbers_py(seq))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.integers(-5, 5000),
        st.integers(2**59, 2**70),
        st.integers(-(2**70), -1),
        st.sampled_from([1.5, "3", None, True]),
    )
)
def test_fixed_offsets_twins_agree(n: Any) -> None:
    assert _outcome(lambda: _speedups.fixed_offsets(n)) == _outcome(lambda: list_layout.fixed_offsets_py(n))


class _Core(_speedups.ListCore if list_layout.ACCELERATED else object):  # type: ignore[misc]
    def _getitem_slow(self, key: Any) -> Any:
        return "slow"


def _fits(size: int, n: int, data_len: int, ext: int) -> bool:
    """The reference: exact arithmetic, the rules of list_layout's drawing."""
    if n < 0 or data_len < 0 or ext < -1:
        return False
    codes_end = (n + 2) * 8 + data_len + 9 * n
    if ext == -1:
        return codes_end <= size
    return ext % 8 == 0 and ext >= codes_end and ext + 16 * n <= size


SSIZE = st.integers(-(2**63), 2**63 - 1)
COUNTS = st.one_of(st.integers(-2, 300), SSIZE, st.sampled_from([(2**64 - 1) // 17, 2**60, 2**61 - 1]))


@settings(max_examples=1000, deadline=None)
@given(COUNTS, st.one_of(st.integers(-8, 5000), SSIZE), st.one_of(st.integers(-2, 5000), SSIZE), st.binary(max_size=64))
def test_bind_core_accepts_exactly_the_layouts_that_fit(n: int, data_len: int, ext: int, noise: bytes) -> None:
    mapping = mmap.mmap(-1, 4096)
    mapping[: len(noise)] = noise
    buf = memoryview(mapping)
    core = _Core()
    try:
        core._bind_core(buf, n, data_len, ext)
        bound = True
    except ValueError:
        bound = False
    assert bound == _fits(len(buf), n, data_len, ext)
    if bound:  # every item readable without touching memory outside the buffer
        for i in {0, n // 2, n - 1} if n else ():
            core[i]
        core._release_core()
    buf.release()
    mapping.close()


# ---------------------------------------------------------------- both paths, whole lists, in two processes


class Server:
    """One ``_list_workers.serve`` process."""

    def __init__(self, pure: bool) -> None:
        env = {**os.environ, "SHMEM_PURE_PYTHON": "1" if pure else "0"}
        tests = str(Path(__file__).resolve().parent)
        code = f"import sys; sys.path.insert(0, {tests!r}); import _list_workers; _list_workers.serve()"
        self.proc = subprocess.Popen([PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        ready, accelerated, _ = self._receive()
        assert ready == "ready" and accelerated is not pure

    def _receive(self) -> Any:
        assert self.proc.stdout is not None
        head = self._read(4)
        return pickle.loads(self._read(struct.unpack("<I", head)[0]))

    def _read(self, size: int) -> bytes:
        assert self.proc.stdout is not None
        data = b""
        while len(data) < size:
            if not select.select([self.proc.stdout], [], [], 120)[0]:
                raise AssertionError("the server did not answer within 120 s (a hang)")
            chunk = os.read(self.proc.stdout.fileno(), size - len(data))
            if not chunk:
                raise AssertionError(f"the server died (exit code {self.proc.wait()})")
            data += chunk
        return data

    def __call__(self, command: str, args: Any = None) -> Any:
        assert self.proc.stdin is not None
        data = pickle.dumps((command, args))
        self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        self.proc.stdin.flush()
        return self._receive()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.wait(60) != 0:
            raise AssertionError(f"the server exited with {self.proc.returncode}")


def _both(c: Server, pure: Server, command: str, args: Any = None) -> Any:
    answers = c(command, args), pure(command, args)
    assert answers[0] == answers[1], f"{command} {args!r}: C {answers[0]!r} / pure Python {answers[1]!r}"
    return answers[0]


KEYS = st.one_of(
    st.integers(-14, 14),
    st.sampled_from([2**63, -(2**63) - 1, 2**70, True, False, 1.5, "1", None]),
    st.builds(
        slice, st.integers(-15, 15) | st.none(), st.integers(-15, 15) | st.none(), st.sampled_from([None, 1, 2, -1, -3])
    ),
)
OPS = st.one_of(
    st.tuples(st.just("get"), KEYS),
    st.tuples(st.just("set"), KEYS, st.one_of(VALUES, ODD_VALUES, st.text(min_size=8, max_size=40))),
    st.tuples(st.just("del"), KEYS),
    st.tuples(st.sampled_from(["len", "list", "format", "repr"])),
    st.tuples(st.sampled_from(["contains", "count", "index"]), VALUES),
    st.tuples(st.just("equals"), st.lists(VALUES, max_size=4)),
    st.tuples(st.just("helpers"), st.integers(-14, 14)),
    st.tuples(st.just("close"), st.booleans()),  # sl.shm.close() or sl.close()
)


def _extension(buf: bytes) -> Tuple[int, int]:
    """(offset, items) of the sequence numbers of a list shmem made (list_layout's drawing)."""
    n = struct.unpack_from("<q", buf, 0)[0]
    data_len = struct.unpack_from("<q", buf, (n + 1) * 8)[0]
    codes_end = (n + 2) * 8 + data_len + 9 * n
    return -(-codes_end // 8) * 8, n


DAMAGE = st.lists(
    st.tuples(
        st.floats(0, 1, exclude_max=True),  # where, as a fraction of the list's bytes
        st.one_of(
            st.binary(min_size=1, max_size=9),
            st.sampled_from([2**63 - 1, -(2**63), -1, 1 << 40, 8, 17, 0x7100]).map(lambda v: struct.pack("<q", v)),
            st.sampled_from([b"q\0\0\0\0\0\0\0", b"d\0\0\0\0\0\0\0", b"16s \0\0\0\0", b"8s\0\0\0\0\0\0", b"\x05"]),
        ),
        st.booleans(),  # aligned to a word
    ),
    max_size=3,
)


@pytest.fixture
def servers() -> Iterator[Tuple[Server, Server]]:
    c, pure = Server(pure=False), Server(pure=True)
    try:
        yield c, pure
    finally:
        c.close()
        pure.close()


def test_both_paths_agree_on_lists_operations_and_damage(servers: Tuple[Server, Server]) -> None:
    c, pure = servers

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(SEQUENCES, DAMAGE, st.lists(OPS, max_size=12), st.lists(OPS, max_size=6))
    def check(sequence: Any, damage: List[Any], before: List[Any], after: List[Any]) -> None:
        made = _both(c, pure, "create", sequence)
        if made[0] == "err":
            return
        try:
            _both(c, pure, "ops", before)
            buf = bytearray(_both(c, pure, "buffer"))
            assume(len(buf) > 16)
            ext, n = _extension(bytes(buf))
            for where, data, aligned in damage:
                at = int(where * len(buf)) // (8 if aligned else 1) * (8 if aligned else 1)
                buf[at : at + len(data)] = data[: len(buf) - at]
            for i in range(n):  # no item left mid-write: a reader would wait a second for it
                if ext + 8 * i < len(buf):
                    buf[ext + 8 * i] &= 0xFE
            _both(c, pure, "write", bytes(buf))
            _both(c, pure, "ops", after)
            _both(c, pure, "attach")
            _both(c, pure, "buffer")  # byte for byte the same list
        finally:
            _both(c, pure, "drop")

    check()


def test_a_server_compares_something() -> None:
    """The comparison is not vacuous: the two servers run different code."""
    c, pure = Server(pure=False), Server(pure=True)
    try:
        assert c("create", [1, 2]) == pure("create", [1, 2])
        assert c("ops", [("get", 0)]) == pure("ops", [("get", 0)]) == [("ok", ("int", "1"))]
        assert sys.modules.get("shmem._speedups") is not None
    finally:
        c("drop")
        pure("drop")
        c.close()
        pure.close()
