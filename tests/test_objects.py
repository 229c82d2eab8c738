"""shmem.put / shmem.get / shmem.delete: any picklable object by reference.

Real processes (spawn, fork, forkserver), real /dev/shm, real signals; timeouts
are only safety nets. Each test says which bug it would catch.
"""

from __future__ import annotations

import base64
import collections
import gc
import json
import mmap
import multiprocessing
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, List, Optional

import _objects_workers as workers
import pytest
from _forge import forge_kind_header
from conftest import (
    PYTHON,
    blocks_with_prefix,
    fork_child,
    fork_threaded_child,
    in_child,
    kill_and_reap,
    mapped_with_prefix,
    wait_exit,
    wait_until,
)
from test_defect_space import private_shm_available, run_in_private_shm  # noqa: F401 - a fixture

import shmem
from shmem._core.block import Block
from shmem._core.header import KIND_OBJECT
from shmem._kinds import object_layout, objects

np = pytest.importorskip("numpy")

SHM_DIR = "/dev/shm"


# ------------------------------------------------------------------ helpers


def listed() -> List[str]:
    return os.listdir(SHM_DIR)


def base_chain(obj: Any) -> List[Any]:
    """An array's bases down to the memory's owner (through memoryviews)."""
    chain = []
    while obj is not None:
        chain.append(obj)
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
    return chain


def read_object_block(name: str) -> Optional[Any]:
    """Read object block ``name`` whole, as ``get`` does but without taking a lease
    (so the reader never counts as a holder): the object, or None if it is gone."""
    try:
        block = Block.attach(name, readonly=True, track=False)
    except shmem.SegmentNotFound as err:
        assert "being created" not in str(err), f"{name}: a visible block that is not complete"
        return None
    try:
        header = block.header
        assert header is not None and header.ready and header.kind == KIND_OBJECT, header
        layout = object_layout.parse(header.extra, block.size)
        assert block.mapping is not None
        view = memoryview(block.mapping)
        buffers = [view[o : o + n] for o, n in layout.buffers]
        return pickle.loads(view[: layout.pickle_length], buffers=buffers)
    finally:
        block.release()


# ------------------------------------------------------------------ 1. round trips


def test_round_trips_inline_in_a_store_and_one_block_each(shm_prefix: str) -> None:
    """Catches: an object that comes back different (dtype, shape, order, 0-d, in-band
    non-contiguous data), a small object that makes a block, a middle-sized one that
    does not go in the default store (or stays there after its last reference), a large
    one that makes none or more than one, a reference that grows with its object."""
    small = [None, 0, -(2**70), 3.5, "text", b"bytes", {"a": [1, 2, {"b": (3, None)}]}, workers.Point(1, 2, "p")]
    for obj in small:
        ref = shmem.put(obj)
        assert ref.name is None, f"{obj!r} made a block"
        assert shmem.get(ref) == obj and type(shmem.get(ref)) is type(obj)
        assert len(pickle.dumps(ref)) < 1024
    assert blocks_with_prefix(shm_prefix) == [], "an inline object made a block"

    arrays = {
        "f8": np.arange(100_000, dtype=np.float64),
        "i2": (np.arange(50_000) % 3000).astype(np.int16).reshape(250, 200),
        "u1-fortran": np.asfortranarray(np.arange(60_000, dtype=np.uint8).reshape(300, 200)),
        "c16": np.arange(4096, dtype=np.complex128) * (1 + 2j),
        "bool": np.arange(9000) % 3 == 0,
        "record": np.zeros(2000, dtype=[("x", "<i4"), ("y", "<f8")]),
        "zero-d": np.array(12345.678),
        "empty": np.zeros((0, 7), dtype=np.float32),
        "strided": np.arange(200_000, dtype=np.int64)[::3],  # not contiguous: pickled in-band
    }
    large = [
        bytes(range(256)) * 8000,  # 2 MB of bytes: in the pickle
        [workers.Point(i, -i, "x" * 10) for i in range(2000)],
        *arrays.values(),
        arrays,  # a dict holding several arrays (some out of band, some in band)
        [np.arange(10.0)] * 3 + [np.ones(3)],  # the same array three times
    ]
    stored = 0
    for obj in large:
        before = set(blocks_with_prefix(shm_prefix))
        ref = shmem.put(obj)
        made = set(blocks_with_prefix(shm_prefix)) - before
        buffers: List[Any] = []
        data = pickle.dumps(obj, 5, buffer_callback=buffers.append)
        if len(data) + sum(b.raw().nbytes for b in buffers if b.raw().contiguous) <= objects.STORE_MAX:
            # The default store: made by the first such object, shared by the next ones.
            assert str(ref).startswith("shmem-stored:") and made <= {ref.name}, f"{type(obj)}: {ref} {made}"
            stored += 1
        else:
            assert ref.name is not None and made == {ref.name}, f"{type(obj)}: blocks {made}"
        assert len(pickle.dumps(ref)) < 1024 and len(str(ref)) < 200
        for copy in (False, True):
            got = shmem.get(ref, copy=copy)
            if isinstance(obj, np.ndarray):
                assert type(got) is np.ndarray and got.dtype == obj.dtype and got.shape == obj.shape
                assert np.array_equal(got, obj)
                if obj.flags.f_contiguous and not obj.flags.c_contiguous:
                    assert got.flags.f_contiguous, "a Fortran-order array came back in C order"
            elif isinstance(obj, dict):
                assert got.keys() == obj.keys()
                for k in obj:
                    assert np.array_equal(got[k], obj[k]) and got[k].dtype == obj[k].dtype, k
            elif isinstance(obj, list) and isinstance(obj[0], np.ndarray):
                assert all(np.array_equal(g, o) for g, o in zip(got, obj))
            else:
                assert got == obj
            del got
        name, in_store = ref.name, ref._index >= 0
        del ref
        if in_store:
            assert not any(arena.counts for arena in objects._defaults), "an object outlived its only reference"
        else:
            assert name not in listed(), "the block outlived its only reference"
    assert stored >= 4  # the small arrays


def test_more_arrays_than_a_block_describes_are_pickled_in_band() -> None:
    """Catches: an object with more buffers than MAX_BUFFERS that put refuses or
    writes with a truncated header (arrays lost or mixed up)."""
    many = [np.full(50, i, dtype=np.int32) for i in range(object_layout.MAX_BUFFERS + 5)]
    ref = shmem.put(many)
    assert ref.name is not None
    got = shmem.get(ref)
    assert len(got) == len(many) and all(np.array_equal(g, m) for g, m in zip(got, many))
    exact = [np.full(50, i, dtype=np.int32) for i in range(object_layout.MAX_BUFFERS)]
    ref2 = shmem.put(exact)
    assert all(np.array_equal(g, m) for g, m in zip(shmem.get(ref2), exact))


def test_references_compare_pickle_small_and_parse_from_text() -> None:
    """Catches: a reference whose pickle carries the object (or grows with it), a
    text form that does not parse back to the same object, refs made by hand."""
    a = np.arange(1_000_000, dtype=np.float64)  # 8 MB
    ref, inline = shmem.put(a), shmem.put({"k": "v"})
    for r in (ref, inline):
        copy = pickle.loads(pickle.dumps(r))
        assert copy == r and hash(copy) == hash(r) and len(pickle.dumps(r)) < 1024
        assert shmem.get(str(r)) is not None
    assert ref != shmem.put(a)  # another object
    assert np.array_equal(shmem.get(str(ref)), a) and shmem.get(str(inline)) == {"k": "v"}
    with pytest.raises(TypeError):
        shmem.ObjectRef()


STR_CHILD = r"""
import sys, shmem
big, small = shmem.get(sys.argv[1]), shmem.get(sys.argv[2])
print(repr((float(big.sum()), big.dtype.str, big.shape, small)))
"""


def test_str_of_a_reference_works_in_an_unrelated_program() -> None:
    """Catches: a text form that depends on the process that made it (a pid, an
    fd number, an address), or an unrelated program that cannot attach."""
    a = np.arange(300_000, dtype=np.int64).reshape(1000, 300)
    ref, inline = shmem.put(a), shmem.put(("small", 1))
    run = subprocess.run([PYTHON, "-c", STR_CHILD, str(ref), str(inline)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == repr((float(a.sum()), a.dtype.str, a.shape, ("small", 1)))
    assert ref.name in listed(), "the program's get removed an object this process still holds"


# ------------------------------------------------------------------ 2. zero copy


def test_get_is_a_read_only_view_of_the_block_and_copy_is_private(shm_prefix: str) -> None:
    """Catches: get that copies (the view is not the block's memory), a view that is
    writable (or can be made writable: a write into a read-only mapping is a SIGSEGV),
    copy=True that still shares (or still maps) the block."""
    a = np.arange(200_000, dtype=np.float64)
    ref = shmem.put(a)
    view = shmem.get(ref)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 1.0
    with pytest.raises(ValueError):
        view.setflags(write=True)
    assert isinstance(base_chain(view)[-1], mmap.mmap), base_chain(view)
    private = shmem.get(ref, copy=True)
    assert private.flags.writeable
    private[0] = -1.0
    assert view[0] == 0.0 and a[0] == 0.0

    # Another process writes into the block (raw, writable attach): the view sees it, the copy does not.
    name = ref.name

    def writer() -> None:
        raw = shmem.SharedMemory(name)
        assert raw.buf is not None
        at = bytes(raw.buf).find(a[:1000].tobytes())
        assert at >= 0 and at % object_layout.ALIGN == 0
        raw.buf[at : at + 8] = struct.pack("<d", 42.5)
        raw.close()

    assert wait_exit(fork_child(writer)) == 0
    assert view[0] == 42.5, "get's array is not the shared block's memory"
    assert private[0] == -1.0 and shmem.get(ref, copy=True)[0] == 42.5

    # A list of references (any iterable): a list of objects.
    inline = shmem.put("tiny")
    got = shmem.get([ref, str(ref), inline])
    assert isinstance(got, list) and len(got) == 3 and got[2] == "tiny"
    assert np.array_equal(got[0][1:], a[1:]) and got[1][0] == 42.5 and not got[0].flags.writeable
    assert shmem.get(r for r in (inline, inline)) == ["tiny", "tiny"]
    assert shmem.get([]) == []
    del got

    # Dropping the reference: the views stay readable, the copy holds no mapping.
    del ref
    assert name not in listed()
    assert view[1] == 1.0 and float(view[2:].sum()) == float(a[2:].sum())
    assert mapped_with_prefix(shm_prefix), "the view's mapping is gone under it"
    del view
    gc.collect()
    assert not mapped_with_prefix(shm_prefix), "copy=True kept the block mapped"
    assert private[5] == 5.0


# ------------------------------------------------------------------ 3. other processes


def test_pool_workers_and_processes_get_the_array(mp_context: Any) -> None:
    """Catches: a reference that does not survive pickling into a Pool task or a
    Process argument under this start method, or a worker's let-go that removes
    an object the parent still holds."""
    a = np.arange(250_000, dtype=np.float64)
    ref = shmem.put(a)
    with mp_context.Pool(2) as pool:
        sums = pool.map(workers.sum_of, [ref] * 6)
        pool.close()
        pool.join()
    assert sums == [float(a.sum())] * 6
    procs = [mp_context.Process(target=workers.check_sum, args=(ref, float(a.sum()))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert ref.name in listed() and np.array_equal(shmem.get(ref), a)
    name = ref.name
    del ref
    assert wait_until(lambda: name not in listed())


# ------------------------------------------------------------------ 4. errors before side effects


def test_unpicklable_object_raises_and_leaves_nothing(shm_prefix: str) -> None:
    """Catches: a put that makes (or leaks) a block before pickling has succeeded."""
    for obj in (lambda: 1, [np.zeros(1 << 18), lambda: 1], {"lock": threading.Lock(), "a": np.ones(10)}):
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            shmem.put(obj)
    assert blocks_with_prefix(shm_prefix) == []
    assert not mapped_with_prefix(shm_prefix)


def test_bad_references_deleted_objects_and_double_delete() -> None:
    """Catches: get of a non-reference that does not raise TypeError/ValueError, get
    after delete that finds something, a second delete that raises."""
    with pytest.raises(TypeError):
        shmem.get(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        shmem.get([1, 2])  # type: ignore[list-item]
    for text in ("garbage", "shmem-object:", "shmem-object:x:zz:1", "shmem-object:x:1:2:3", "shmem-object-inline:!!"):
        with pytest.raises(ValueError):
            shmem.get(text)
    ref = shmem.put(np.arange(100_000))
    text, name = str(ref), ref.name
    shmem.delete(ref)
    assert name not in listed()
    for r in (ref, text):
        with pytest.raises(shmem.SegmentNotFound) as info:
            shmem.get(r)
        assert isinstance(info.value, FileNotFoundError)
    shmem.delete(ref)
    shmem.delete(text)
    shmem.delete(shmem.put(1))  # inline: nothing to do


@pytest.mark.parametrize("impostor", ["raw", "object"])
def test_a_name_reused_by_another_block_is_not_the_object(impostor: str, tmp_path: Any) -> None:
    """Catches: get that trusts the name alone (unpickling whatever block now has it:
    the object impostor's pickle would write a marker file), or a let-go that removes
    the impostor."""
    marker = str(tmp_path / "unpickled")
    ref = shmem.put(np.arange(100_000))
    text, name = str(ref), ref.name
    shmem.delete(ref)
    if impostor == "raw":
        other: Any = shmem.SharedMemory(name=name, create=True, size=1 << 16)
    else:
        data = pickle.dumps(workers.Tripwire(marker), 5)
        layout = object_layout.plan(len(data), [])
        other = Block.create(
            name, layout.size, kind=KIND_OBJECT, extra=object_layout.kind_header(layout), initial=[(0, data)]
        )
    try:
        for r in (ref, text, pickle.loads(pickle.dumps(ref))):
            with pytest.raises(shmem.SegmentNotFound):
                shmem.get(r)
        assert not os.path.exists(marker), "get unpickled the impostor"
        del r
        del ref
        gc.collect()
        assert name in listed(), "letting go of the old reference removed the impostor"
    finally:
        if impostor == "raw":
            other.close()
            other.unlink()
        else:
            other.unlink()
            other.release()


# ------------------------------------------------------------------ 5. lifetime


def test_a_child_holding_a_reference_keeps_the_object() -> None:
    """Catches: an unpickled reference that does not count as a holder (the object
    goes when the parent drops its own), or a last let-go in the child that leaves
    the object behind."""
    a = np.arange(100_000, dtype=np.float64)
    ref = shmem.put(a)
    name = ref.name
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=workers.hold_then_let_go, args=(pickle.dumps(ref), theirs))
    p.start()
    theirs.close()
    assert mine.poll(60)
    assert mine.recv() == ("ready", float(a.sum()))
    del ref
    gc.collect()
    assert name in listed(), "the object went while a child still held a reference"
    mine.send("parent dropped")
    assert mine.poll(60)
    assert mine.recv() == ("let go", float(a.sum()), True, False)
    p.join(60)
    assert p.exitcode == 0
    assert name not in listed()
    mine.close()


HOLDER_CHILD = r"""
import base64, pickle, sys, time, shmem
ref = pickle.loads(base64.b64decode(sys.argv[1]))
views = [shmem.get(ref), shmem.get(ref)]
print("ready", float(views[0].sum()), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize(
    "trigger",
    ["large-put", "let-go", "inline-put"],
)
def test_a_holder_sigkilled_the_object_goes_at_the_next_put_or_let_go(trigger: str) -> None:
    """The "look again" rule. The parent drops its reference while a child holds one
    (and views), then the child is SIGKILLed: nobody lets go any more and the creator
    lives, so no reaper removes it. Catches: an object that lingers past the
    parent's next put (any put) or let-go."""
    a = np.arange(100_000, dtype=np.float64)
    ref = shmem.put(a)
    other = shmem.put(np.ones(50_000)) if trigger == "let-go" else None
    name = ref.name
    proc = subprocess.Popen(
        [PYTHON, "-c", HOLDER_CHILD, base64.b64encode(pickle.dumps(ref)).decode()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().split() == ["ready", str(float(a.sum()))]
        del ref
        gc.collect()
        assert name in listed()
    finally:
        proc.kill()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert name in listed()  # nobody let go since: still there (a precondition, not the point)
    kept = None
    if trigger == "large-put":
        kept = shmem.put(np.zeros(50_000))
    elif trigger == "inline-put":
        kept = shmem.put(7)
    else:
        del other
    assert name not in listed(), f"the object outlived its last holder past the parent's next {trigger}"
    del kept


# ------------------------------------------------------------------ 6. a producer killed anywhere


def test_producer_sigkilled_at_random_instants_leaves_no_partial_object(shm_prefix: str) -> None:
    """A forked producer puts large objects (keeping the last few) and is SIGKILLed at
    random instants. Catches: a block visible under its name before it is complete (a
    torn object), or blocks of a dead creator that no one removes."""
    anchor = shmem.put(np.arange(1000.0))  # this test's reaper is running; the producers share it
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)

    def produce() -> None:
        r = random.Random(os.getpid())
        kept: Any = collections.deque(maxlen=3)
        n = 0
        while True:
            size = r.randrange(1 << 12, 1 << 19)
            kept.append(shmem.put({"n": n, "size": size, "a": np.full(size, float(n)), "tail": b"t" * (n % 700)}))
            n += 1

    def check_visible() -> int:
        seen = 0
        for name in blocks_with_prefix(shm_prefix):
            if name == anchor.name:
                continue
            obj = read_object_block(name)
            if obj is None:
                continue
            seen += 1
            a = obj["a"]
            assert a.shape == (obj["size"],) and bool((a == obj["n"]).all()), f"torn object (seed {seed})"
            assert obj["tail"] == b"t" * (obj["n"] % 700)
            del obj, a
        return seen

    rounds, seen, deadline = 0, 0, time.monotonic() + 4
    while rounds < 100 or (rounds < 300 and time.monotonic() < deadline):
        rounds += 1
        pid = fork_child(produce)
        time.sleep(rng.random() * 0.006)
        if rounds % 2:
            seen += check_visible()  # while the producer runs
        kill_and_reap(pid)
        seen += check_visible()
    assert seen > 0, "no object was ever seen: the producers did nothing"
    gc.collect()
    assert wait_until(lambda: blocks_with_prefix(shm_prefix) == [anchor.name], 20), (
        f"objects of dead producers were not removed: {blocks_with_prefix(shm_prefix)}"
    )
    assert np.array_equal(shmem.get(anchor), np.arange(1000.0))


# ------------------------------------------------------------------ 7. a full /dev/shm

FULL_CHILD = r"""
import json, os, shmem
import numpy as np
out = {}
for obj in (bytes(2 << 20), {"a": np.zeros(300_000)}):
    try:
        shmem.put(obj)
        out.setdefault("errors", []).append(None)
    except OSError as err:
        out.setdefault("errors", []).append([type(err).__name__, isinstance(err, shmem.NoSpace)])
    out.setdefault("left", []).append(sorted(os.listdir("/dev/shm")))
ref = shmem.put(np.arange(50_000.0))  # one that fits works
out["fits"] = float(shmem.get(ref).sum()) == float(np.arange(50_000.0).sum())
del ref
out["end"] = sorted(os.listdir("/dev/shm"))
print(json.dumps(out))
"""


def test_a_full_dev_shm_raises_no_space_and_leaves_nothing(private_shm_available: None) -> None:  # noqa: F811
    """1 MiB /dev/shm, 2 MiB and 2.4 MiB objects. Catches: a put that SIGBUSes, raises
    something other than NoSpace, or leaves a (partial) block or hidden file."""
    out = run_in_private_shm(FULL_CHILD)
    assert out == {"errors": [["NoSpace", True]] * 2, "left": [[], []], "fits": True, "end": []}


# ------------------------------------------------------------------ 8. forged blocks


def _forgeries(extra: bytes, size: int) -> List[Any]:
    magic, version, count, zero, plen = struct.unpack_from("<8sHHIQ", extra)
    offset, length = struct.unpack_from("<QQ", extra, 24)
    head = struct.Struct("<8sHHIQ")

    def with_buffer(o: int, n: int) -> bytes:
        return head.pack(magic, version, 1, 0, plen) + struct.pack("<QQ", o, n)

    return [
        pytest.param(with_buffer(size + 64, 8), id="buffer-offset-past-end"),
        pytest.param(with_buffer(offset, size), id="buffer-length-past-end"),
        pytest.param(with_buffer(0, length), id="buffer-over-the-pickle"),
        pytest.param(with_buffer((1 << 64) - 64, 128), id="buffer-offset-wraps"),
        pytest.param(b"shmobjcX" + extra[8:], id="wrong-magic"),
        pytest.param(head.pack(magic, 2, 1, 0, plen) + extra[24:], id="version"),
        pytest.param(head.pack(magic, version, 1, 7, plen) + extra[24:], id="reserved-field"),
        pytest.param(head.pack(magic, version, 1, 0, size + 1) + extra[24:], id="pickle-past-end"),
        pytest.param(head.pack(magic, version, 2, 0, plen) + extra[24:], id="count-without-records"),
        pytest.param(
            head.pack(magic, version, object_layout.MAX_BUFFERS + 1, 0, plen)
            + struct.pack("<QQ", offset, length) * object_layout.MAX_BUFFERS,
            id="too-many-buffers",
        ),
        pytest.param(head.pack(magic, version, 0xFFFF, 0, plen) + extra[24:], id="huge-count"),
        pytest.param(extra[:12], id="short"),
        pytest.param(b"", id="empty"),
    ]


_SAMPLE = object_layout.plan(150, [800_000])
FORGERIES = _forgeries(object_layout.kind_header(_SAMPLE), _SAMPLE.size)


@pytest.mark.parametrize("extra", FORGERIES)
def test_a_forged_object_header_is_corrupt_segment_and_the_listing_survives(extra: bytes) -> None:
    """Valid checksums, hostile fields. Catches: get reading past the block (a crash or
    garbage), unpickling with the wrong buffers, a listing that raises on the block."""
    ref = shmem.put({"a": np.arange(100_000, dtype=np.float64)})  # 150-byte pickle region, one 800 kB buffer
    real = Block.attach(ref.name, readonly=True, track=False)
    assert real.header is not None
    layout = object_layout.parse(real.header.extra, real.size)
    real.release()
    assert len(layout.buffers) == 1 and layout.buffers[0][1] == 800_000
    # Rebuild the forgery for this very block (the sample's pickle length may differ).
    extra = extra.replace(struct.pack("<Q", _SAMPLE.pickle_length), struct.pack("<Q", layout.pickle_length), 1)
    forge_kind_header(ref.name, extra)

    def attempt() -> str:
        try:
            shmem.get(ref)
        except shmem.CorruptSegment as err:
            assert ref.name in str(err)
            return "corrupt"
        return "read"

    assert in_child(attempt) == "corrupt"  # a crash shows as the child's death, not pytest's
    with pytest.raises(shmem.CorruptSegment):
        shmem.get(str(ref))
    # Listed as corrupt (with the reason), which lists with the foreign blocks.
    assert ref.name not in [s.name for s in shmem.list_segments()]
    (segment,) = [s for s in shmem.list_segments(include_foreign=True) if s.name == ref.name]
    assert segment.kind == "corrupt" and segment.detail, segment
    run = subprocess.run([PYTHON, "-m", "shmem", "ls", "--all", "--json"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["kind"] for r in json.loads(run.stdout) if r["name"] == ref.name] == ["corrupt"]


def test_the_listing_shows_object_blocks() -> None:
    """Catches: object blocks listed as another kind, or without their description."""
    ref = shmem.put({"a": np.zeros(10_000), "b": np.ones(5_000, dtype=np.int32)})
    (segment,) = [s for s in shmem.list_segments() if s.name == ref.name]
    assert segment.kind == "object" and segment.ready and segment.state == "alive"
    assert "2 buffers" in segment.detail and "100000 B" in segment.detail, segment.detail
    run = subprocess.run([PYTHON, "-m", "shmem", "ls", "--json"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    (record,) = [r for r in json.loads(run.stdout) if r["name"] == ref.name]
    assert record["kind"] == "object"
    run = subprocess.run([PYTHON, "-m", "shmem", "ls"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and ref.name in run.stdout


# ------------------------------------------------------------------ 9. signal handlers


def test_threads_put_and_let_go_while_objects_wait_to_be_looked_at_again(shm_prefix: str) -> None:
    """Objects let go of while another program holds them wait in a list that every put and
    let-go looks at again. Catches: that list shared unsafely by threads (IndexError out of
    put, or from __del__), an object looked at twice or never."""
    refs = [shmem.put(np.full(20_000, float(i))) for i in range(64)]
    code = (
        "import base64, pickle, sys, time\n"
        "refs = [pickle.loads(base64.b64decode(line)) for line in sys.stdin if line.strip()]\n"
        "print(len(refs), flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen([PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("".join(base64.b64encode(pickle.dumps(r)).decode() + "\n" for r in refs))
    holder.stdin.close()
    assert holder.stdout.readline().strip() == "64"
    names = [r.name for r in refs]
    del refs  # held by the other program: waiting to be looked at again
    assert len(objects._pending) == 64
    errors: List[str] = []

    def churn() -> None:
        try:
            for _ in range(300):
                ref = shmem.put(np.full(10_000, 1.0))
                del ref
        except Exception:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=churn) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes, not every 5 ms
    try:
        for t in threads:
            t.start()
        time.sleep(0.2)
        holder.kill()  # now the threads remove them, and the list runs empty under them
        holder.wait()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    for _ in range(20):  # every one of them is looked at again, and removed now that nobody holds it
        shmem.put(np.ones(10_000))
    assert wait_until(lambda: not set(names) & set(listed())), "objects nobody holds any more were never removed"


def test_a_signal_handler_puts_and_gets_while_the_main_thread_does(shm_prefix: str) -> None:
    """SIGALRM every 0.5 ms; the handler puts, gets and lets go (sometimes deletes)
    while the main thread is anywhere inside put/get/let-go. Catches: a deadlock
    (a non-reentrant lock), a wrong object, a block left behind, a lost let-go."""

    def body() -> Any:
        fired, errors = [0], []

        def handler(signum: int, frame: Any) -> None:
            fired[0] += 1
            n = fired[0]
            try:
                obj = {"h": n, "a": np.full(4000 + n % 300, n)} if n % 2 else ("small", n)
                ref = shmem.put(obj)
                got = shmem.get(ref)
                ok = got == obj if n % 2 == 0 else (got["h"] == n and bool((got["a"] == n).all()))
                if not ok:
                    errors.append(n)
                if n % 3 == 0:
                    shmem.delete(ref)
            except Exception:
                errors.append(traceback.format_exc())

        old = signal.signal(signal.SIGALRM, handler)
        i, deadline = 0, time.monotonic() + 30
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
            while fired[0] < 400 and time.monotonic() < deadline:
                a = np.full(20_000 + i % 50, i, dtype=np.int64)
                ref = shmem.put(a)
                got = shmem.get(ref)
                assert got.shape == a.shape and bool((got == i).all())
                assert shmem.get([ref, shmem.put(i)])[1] == i
                assert float(shmem.get(ref, copy=True).sum()) == float(a.sum())
                del ref, got
                i += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, old)
        gc.collect()
        objects._drop_default_stores()
        return fired[0], i, errors, blocks_with_prefix(shm_prefix)

    fired, rounds, errors, left = in_child(body, timeout=90)
    assert fired >= 400 and rounds > 0
    assert errors == []
    assert left == [], "blocks left after every reference was dropped"


# ------------------------------------------------------------------ 10. fork


def test_fork_while_holding_references_and_a_thread_puts() -> None:
    """Children forked while this process holds references (and a thread is inside
    put/get) get the objects through the inherited references, put objects of their
    own, drop the inherited reference and exit. Catches: a deadlock after fork, a
    child whose let-go of an inherited reference removes the parent's object, a
    parent reference broken by the children."""
    a = np.arange(100_000, dtype=np.float64)
    held = [shmem.put(a), shmem.put({"small": 1})]
    name = held[0].name
    stop = threading.Event()
    thread_errors: List[str] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                r = shmem.put(np.ones(30_000))
                assert float(shmem.get(r).sum()) == 30_000.0
        except Exception:
            thread_errors.append(traceback.format_exc())

    t = threading.Thread(target=churn)
    t.start()

    def child() -> None:
        assert np.array_equal(shmem.get(held[0]), a) and shmem.get(held[1]) == {"small": 1}
        own = shmem.put(np.arange(50_000.0))
        assert float(shmem.get(own).sum()) == float(np.arange(50_000.0).sum())
        own_name = own.name
        del own
        assert own_name not in listed()
        held.clear()  # let go of the inherited references
        gc.collect()
        assert name in listed(), "a child's let-go of an inherited reference removed the parent's object"

    try:
        for _ in range(5):
            pid = fork_threaded_child(child)
            assert wait_exit(pid) == 0
    finally:
        stop.set()
        t.join(30)
    assert thread_errors == []
    assert name in listed() and np.array_equal(shmem.get(held[0]), a)
    assert shmem.get(held[1]) == {"small": 1}
    held.clear()
    assert name not in listed()


# ------------------------------------------------------------------ closed descriptors

CLOSERANGE_CHILD = r"""
import json, os, sys, shmem
import numpy as np
a = np.arange(50_000.0)
ref = shmem.put(a)
os.closerange(3, 1024)  # the reaper's socket, the mapping's descriptor (Python < 3.13) ...
paths = [os.path.join(sys.argv[1], f"f{i}") for i in range(16)]
fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in paths]
out = {"get": float(shmem.get(ref).sum()) == float(a.sum())}
ref2 = shmem.put(np.ones(40_000))
out["get2"] = float(shmem.get(ref2, copy=True).sum())
name2 = ref2.name
del ref2
out["gone2"] = not os.path.exists("/dev/shm/" + name2)
del ref
out["sizes"] = [os.fstat(fd).st_size for fd in fds]
print(json.dumps(out))
"""


def test_objects_survive_closerange_and_write_no_unrelated_fd(tmp_path: Any, shm_prefix: str, own_reaper: Any) -> None:
    """Catches: a stale descriptor number (reaper socket, mapping) written to or
    closed after os.closerange, a put that fails after it, objects left behind when
    the program exits."""
    run = subprocess.run(
        [PYTHON, "-c", CLOSERANGE_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60, env=own_reaper.env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"get": True, "get2": 40_000.0, "gone2": True, "sizes": [0] * 16}
    assert wait_until(lambda: blocks_with_prefix(shm_prefix) == [], 10)


def test_small_builtins_travel_plain_encoded_and_a_damaged_text_form_is_corrupt_segment() -> None:
    """A small object of builtins only is carried in the plain encoding (its get runs no
    unpickler); one with anything else is a pickle; both compare as the object put."""
    import base64

    plain = shmem.put({"id": 7, "tags": ("a", "b"), "score": 1.5})
    pickled = shmem.put(collections.OrderedDict(a=1))
    assert plain.name is None and pickled.name is None
    assert not plain._inline.startswith(b"\x80") and pickled._inline.startswith(b"\x80")  # type: ignore[union-attr]
    assert shmem.get(str(plain)) == {"id": 7, "tags": ("a", "b"), "score": 1.5}
    assert shmem.get(pickled) == collections.OrderedDict(a=1)
    damaged = "shmem-object-inline:" + base64.b64encode(b"\x09\xff\xff\xff\x7f").decode()
    with pytest.raises(shmem.CorruptSegment):
        shmem.get(damaged)
