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
* **A writer killed in the middle of a write** leaves that item marked as being
  written; readers of it get ``CorruptSegment`` after about a second instead of
  waiting forever, the other items stay readable, and the next write makes the
  item whole again.

The processes are started with "spawn": separate interpreters, as separately
started programs would be (the start methods themselves are covered in
test_list.py). The runs last about 1.5 s each; nothing is asserted about timing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any, Dict, List

import pytest
from _list_workers import CYCLE, CYCLE_SLOT, cycle_writer, endless_writer, read_all, reader
from conftest import implementations
from test_list import STDLIB, ext_offset, lists_fixture  # noqa: F401 - the "lists" fixture

import shmem

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


# ---------------------------------------------------------------- writers that die


def _leave_mid_write(sl: Any, index: int) -> None:
    """Make item ``index``'s sequence number odd, as a writer does before it writes.

    The list's extension (drawn in list_layout.py) holds one word per item, its
    sequence number in the low 16 bits (odd while a writer is at work); setting
    the lowest bit of its lowest byte (little-endian) does it."""
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


def test_a_write_that_never_finished_raises_corrupt_segment() -> None:
    """As if the writer of items 0 (an int: the fast path) and 2 (a str) was
    SIGKILLed mid-write: their sequence numbers are left odd."""
    sl = shmem.ShareableList([1, 2.5, "abc", None, b"xy"])
    name = sl.shm.name
    for index in (0, 2):
        _leave_mid_write(sl, index)

    items = _read_in_child(name)
    for index in (0, 2):
        kind, error, message = items[index]
        assert (kind, error) == ("error", "CorruptSegment") and name in message and f"item {index}" in message
    assert [items[i] for i in (1, 3, 4)] == [("ok", 2.5), ("ok", None), ("ok", b"xy")]
    with pytest.raises(shmem.CorruptSegment):  # here too, and through a slice
        sl[1:3]

    sl[0] = 5  # the next write makes each item whole again
    sl[2] = "xyz"
    assert list(sl) == [5, 2.5, "xyz", None, b"xy"]
    assert _read_in_child(name) == [("ok", v) for v in (5, 2.5, "xyz", None, b"xy")]
    sl.close()
    sl.unlink()


def test_a_writer_sigkilled_while_writing_leaves_whole_items_or_corrupt_segment() -> None:
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
        assert (item[0] == "ok" and item[1] in CYCLE) or item[:2] == ("error", "CorruptSegment"), item
    sl.close()
    sl.unlink()
