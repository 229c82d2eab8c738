"""ShareableList under concurrent use (issue #3).

The guarantee shmem gives, and these tests check:

* **Each item is read whole.** While one shmem writer changes an item - even
  between kinds, e.g. ``'abcd'``, ``b'xy'``, ``12345`` - a reader in another
  process gets either the old or the new value: never an exception, never a
  mixture of the two. This holds for ``sl[i]`` and for every item of whole-list
  reads (iteration, slices, ``in``, ``count``, ``==``); a whole-list read is not
  a snapshot of all items at one instant (as with a list another thread
  mutates). One writer per item at a time: concurrent writers of one item need
  a lock of their own. The standard library gives no such guarantee (its
  variants are strict xfails: a torn value or an exception within the run).
* **A writer stalled or killed in the middle of a write** leaves that item
  marked as being written; readers of it get ``WriterStalled`` (a
  TimeoutError, never ``CorruptSegment``: nothing is damaged) after about a
  second instead of waiting forever, the other items stay readable, and the
  next write makes the item whole again.
* **No ABA.** The sequence numbers are 63 bits: a reader preempted while the
  item is written 32,768 times (which brought shmem 0.1's 16-bit numbers
  round to the same value) still notices the change.

The processes are started with "spawn": separate interpreters, as separately
started programs would be (the start methods themselves are covered in
test_list.py). The runs last about 1.5 s each; nothing is asserted about timing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import subprocess
import textwrap
from typing import Any, Dict, List

import pytest
from _list_workers import CYCLE, CYCLE_SLOT, cycle_writer, endless_writer, read_all, reader
from conftest import PYTHON, implementations
from test_list import STDLIB, ext_offset, lists_fixture  # noqa: F401 - the "lists" fixture

import shmem
from shmem import WriterStalled

CTX = multiprocessing.get_context("spawn")
SECONDS = 1.5


def _run(impl: Any, name: str, mode: str, indices: List[int], fixed: Dict[int, Any]) -> Dict[str, Any]:
    """A writer cycling ``indices`` and a reader, each in its own process; the reader's summary."""
    module = impl.__name__.rsplit(".", 1)[0] if impl is not STDLIB else STDLIB.__name__
    started, stop, out = CTX.Event(), CTX.Event(), CTX.Queue()
    writer = CTX.Process(target=cycle_writer, args=(module, name, indices, started, stop), daemon=True)
    writer.start()
    try:
        assert started.wait(60), "the writer did not start"
        read = CTX.Process(target=reader, args=(module, name, mode, indices, fixed, SECONDS, out), daemon=True)
        read.start()
        result = out.get(timeout=120)
        read.join(60)
    finally:
        stop.set()
        writer.join(60)
        if writer.exitcode is None:
            writer.kill()
            writer.join()
    assert writer.exitcode == 0, "the writer failed"
    return result


def _assert_whole(result: Dict[str, Any]) -> None:
    assert result["error"] is None, f"the reader got an exception: {result['error']}"
    assert result["nbad"] == 0, f"{result['nbad']} torn or wrong values, e.g. {result['bad']}"
    # Proof that reads and writes overlapped: the reader saw the item change.
    assert len(result["seen"]) >= 3, f"the reader saw only {result['seen']} in {result['reads']} reads"


@pytest.mark.parametrize("impl", implementations("readers see torn values or get exceptions"))
def test_reader_never_sees_a_torn_item(impl: Any, lists: Any) -> None:
    sl = lists(impl, [7, CYCLE_SLOT, "fixed"])
    result = _run(impl, sl.shm.name, "item", [1], {})
    _assert_whole(result)
    assert list(sl)[0::2] == [7, "fixed"]


@pytest.mark.parametrize("impl", implementations("whole-list reads see torn values or get exceptions"))
def test_whole_list_reads_never_see_a_torn_item(impl: Any, lists: Any) -> None:
    fixed = {0: "constant", 5: 99, 6: b"bytes\0"[:5], 7: None}
    values = [fixed[0]] + [CYCLE_SLOT] * 4 + [fixed[5], fixed[6], fixed[7]]
    sl = lists(impl, values)
    result = _run(impl, sl.shm.name, "list", [1, 2, 3, 4], fixed)
    _assert_whole(result)


# ---------------------------------------------------------------- writers that stall or die


def _leave_mid_write(sl: Any, index: int) -> None:
    """Make item ``index``'s sequence number odd, as a writer does before it writes.

    The list's extension (drawn in list_layout.py) starts with one word per
    item, its sequence number (odd while a writer is at work); setting the
    lowest bit of its lowest byte (little-endian) does it."""
    at = ext_offset(sl.shm.name) + 8 * index
    assert sl.shm.buf[at] % 2 == 0, "the item is being written"
    sl.shm.buf[at] |= 1


def _read_in_child(name: str) -> List[Any]:
    out = CTX.Queue()
    child = CTX.Process(target=read_all, args=(name, out), daemon=True)
    child.start()
    try:
        return out.get(timeout=60)  # a reader waiting forever fails here
    finally:
        child.join(60)
        if child.exitcode is None:
            child.kill()
            child.join()


def test_a_write_that_never_finished_raises_writer_stalled() -> None:
    """As if the writer of items 0 (an int: the fast path) and 2 (a str) was
    SIGKILLed mid-write: their sequence numbers are left odd."""
    sl = shmem.ShareableList([1, 2.5, "abc", None, b"xy"])
    name = sl.shm.name
    for index in (0, 2):
        _leave_mid_write(sl, index)

    items = _read_in_child(name)
    for index in (0, 2):
        kind, error, message = items[index]
        assert (kind, error) == ("error", "WriterStalled") and name in message and f"item {index}" in message
    assert [items[i] for i in (1, 3, 4)] == [("ok", 2.5), ("ok", None), ("ok", b"xy")]
    with pytest.raises(WriterStalled) as info:  # here too, and through a slice
        sl[1:3]
    assert isinstance(info.value, TimeoutError) and not isinstance(info.value, shmem.CorruptSegment)
    assert repr(sl) == f"ShareableList(<unreadable: WriterStalled>, name={name!r})"

    sl[0] = 5  # the next write makes each item whole again
    sl[2] = "xyz"
    assert list(sl) == [5, 2.5, "xyz", None, b"xy"]
    assert _read_in_child(name) == [("ok", v) for v in (5, 2.5, "xyz", None, b"xy")]
    sl.close()
    sl.unlink()


def test_a_writer_sigkilled_while_writing_leaves_whole_items_or_writer_stalled() -> None:
    sl = shmem.ShareableList([CYCLE_SLOT] * 4 + ["fixed"])
    started = CTX.Event()
    writer = CTX.Process(target=endless_writer, args=(sl.shm.name, [0, 1, 2, 3], started), daemon=True)
    writer.start()
    try:
        assert started.wait(60), "the writer did not start"
        writer.join(0.2)  # let it write a while
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(60)
    assert writer.exitcode == -signal.SIGKILL
    items = _read_in_child(sl.shm.name)
    assert items[4] == ("ok", "fixed")
    for item in items[:4]:
        assert (item[0] == "ok" and item[1] in CYCLE) or item[:2] == ("error", "WriterStalled"), item
    sl.close()
    sl.unlink()


# The writer stops itself (SIGSTOP) inside a real write of a str, after its data and
# before its format: a live writer, stalled mid-write.
STOPPING_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import shmem
    from shmem._kinds import list as kind

    real = kind.text_format_word
    def stop_here(capacity, exact):
        os.kill(os.getpid(), signal.SIGSTOP)
        return real(capacity, exact)
    kind.text_format_word = stop_here
    sl = shmem.ShareableList(name=sys.argv[1])
    sl[1] = "written by a writer that stalled"
    sl.close()
    print("finished")
    """
)


@pytest.mark.parametrize("pure", [False, True], ids=["default-path", "pure-python"])
def test_a_live_writer_stalled_mid_write_is_writer_stalled_not_corruption(pure: bool) -> None:
    sl = shmem.ShareableList([7, "x" * 40, None])
    env = {**os.environ, "SHMEM_PURE_PYTHON": "1" if pure else "0"}
    writer = subprocess.Popen([PYTHON, "-c", STOPPING_WRITER, sl.shm.name], env=env, stdout=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(writer.pid, os.WUNTRACED)  # until it has stopped itself mid-write
        assert os.WIFSTOPPED(status), f"the writer ended instead (status {status})"
        for read in (lambda: sl[1], lambda: list(sl), lambda: sl[:2]):
            with pytest.raises(TimeoutError) as info:
                read()
            assert type(info.value) is WriterStalled and "item 1" in str(info.value)
            assert not isinstance(info.value, shmem.CorruptSegment)
        assert (sl[0], sl[2]) == (7, None)  # the other items stay readable
        os.kill(writer.pid, signal.SIGCONT)
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0 and out.strip() == "finished"
        assert sl[1] == "written by a writer that stalled"
    finally:
        if writer.returncode is None:
            writer.kill()
            writer.wait()
        sl.close()
        sl.unlink()


# ---------------------------------------------------------------- sequence numbers do not come round


NEW_TEXT = "ABCDEFGHIJKLMNOP"  # as long as CYCLE_SLOT: the item's record (its length) ends as it began


def test_a_reader_preempted_during_32768_writes_does_not_accept_a_torn_value(monkeypatch: Any) -> None:
    """The reader (this process) is preempted in the middle of item 0 - after it
    read the item's sequence number, type code and record, before its data -
    while another process writes the item 32,768 times: 2**16 steps of the
    sequence number. A 16-bit number is back where it was, and the reader took
    the new str's bytes as the old bytes value: neither value."""
    sl = shmem.ShareableList([CYCLE_SLOT, 1])
    name = sl.shm.name
    writes = (
        "import shmem, sys; sl = shmem.ShareableList(name=sys.argv[1])\n"
        f"for _ in range(32768): sl[0] = {NEW_TEXT!r}\n"
        "sl.close()"
    )
    from shmem._kinds import list as kind

    real = kind.recorded_text
    preempted = []

    def preempted_here(record: int, slot: Any, marked: bool) -> Any:
        if not preempted:
            preempted.append(True)
            subprocess.run([PYTHON, "-c", writes, name], check=True, timeout=120)
        return real(record, slot, marked)

    monkeypatch.setattr(kind, "recorded_text", preempted_here)
    value = sl[0]
    assert preempted, "the reader never reached the point where it is preempted"
    assert (type(value), value) in {(bytes, CYCLE_SLOT), (str, NEW_TEXT)}, f"torn value {value!r}"
    sl.close()
    sl.unlink()


@pytest.mark.parametrize("value", [12345, 2.5, "text", None], ids=["int", "float", "str", "none"])
def test_sequence_numbers_use_63_bits_and_wrap_to_zero(value: Any) -> None:
    """Written with both paths' arithmetic (ints and floats take the C path when it
    is built): a write adds 2 to all 63 bits, and after 2**63 - 2 comes 0."""
    sl = shmem.ShareableList([0, "abcdef"])
    at = ext_offset(sl.shm.name)
    for index in (0, 1):
        for start, end in [(2**32 + 2**16 - 2, 2**32 + 2**16), (2**63 - 2, 0), (0, 2)]:
            struct.pack_into("<q", sl.shm.buf, at + 8 * index, start)
            sl[index] = value
            assert struct.unpack_from("<q", sl.shm.buf, at + 8 * index)[0] == end, (index, start)
            assert sl[index] == value
    sl.close()
    sl.unlink()
