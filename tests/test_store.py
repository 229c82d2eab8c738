"""shmem.ObjectStore: many objects in one bounded block, shared by processes.

Real processes (fork, spawn, forkserver), real /dev/shm, real signals; timeouts
are only safety nets. Each test says which bug it would catch.
"""

from __future__ import annotations

import gc
import os
import pickle
import random
import signal
import struct
import subprocess
import time
from typing import Any, List

import _store_workers as workers
import pytest
from conftest import PYTHON, blocks_with_prefix, fork_child, in_child, kill_and_reap, run_pure_python, wait_exit
from test_defect_space import private_shm_available, run_in_private_shm  # noqa: F401 - a fixture

import shmem
from shmem._kinds import store_layout

np = pytest.importorskip("numpy")

HERE = os.path.dirname(os.path.abspath(__file__))


def used(store: shmem.ObjectStore) -> int:
    return store.stats().used


def fill_up(store: shmem.ObjectStore, obj: Any) -> List[Any]:
    """References to copies of ``obj`` put until the store is full (reusing any freed memory)."""
    refs: List[Any] = []
    try:
        while True:
            refs.append(store.put(obj))
    except shmem.NoSpace:
        return refs


# ------------------------------------------------------------------ 1. the API


def test_put_get_delete_views_and_copies(shm_prefix: str) -> None:
    """Catches: a get that copies or hands out writable views, copy=True that shares,
    delete that frees memory under a live view, stats that do not add up."""
    with shmem.ObjectStore(1 << 20) as store:
        assert store.name is not None and store.name.startswith(shm_prefix)
        ref = store.put(np.arange(1000.0))
        other = store.put({"k": list(range(300))})  # no buffers, too big to travel inline
        assert ref.name == store.name and str(ref).startswith("shmem-stored:")
        view = shmem.get(ref)
        assert view.sum() == 499500.0 and not view.flags.writeable
        with pytest.raises(ValueError):
            view[0] = 1.0
        with pytest.raises(ValueError):
            view.setflags(write=True)
        private = store.get(ref, copy=True)
        private[0] = -5.0
        assert view[0] == 0.0
        assert shmem.get(str(other)) == {"k": list(range(300))}
        stats = store.stats()
        assert (stats.objects, stats.held_here, stats.processes) == (2, 2, 1)
        assert stats.used + stats.free == stats.capacity == 1 << 20
        shmem.delete(ref)
        with pytest.raises(shmem.SegmentNotFound):
            shmem.get(ref)
        assert view.sum() == 499500.0  # the view keeps the memory
        del ref
        assert store.stats().objects == 2
        del view
        gc.collect()
        assert store.stats().objects == 1
        del other
        assert store.stats().used == 0
        assert shmem.get(store.put(7)) == 7  # small: inline, nothing in the store
        assert store.stats().objects == 0
    assert blocks_with_prefix(shm_prefix) == []


def test_bad_arguments_raise_before_anything_is_made(shm_prefix: str) -> None:
    """Catches: huge, negative or non-int sizes that reach the file system (or crash)."""
    for capacity, error in (
        (-1, ValueError),
        (0, ValueError),
        (1 << 60, ValueError),
        ("1", TypeError),
        (1.5, TypeError),
    ):
        with pytest.raises(error):
            shmem.ObjectStore(capacity)
    with pytest.raises(ValueError):
        shmem.ObjectStore(1 << 20, max_objects=-3)
    with pytest.raises(shmem.SegmentNotFound):
        shmem.ObjectStore(name=shm_prefix + "absent", create=False)
    assert blocks_with_prefix(shm_prefix) == []
    with shmem.ObjectStore(4096) as store:
        with pytest.raises(ValueError, match="does not fit"):
            store.put(np.zeros(10_000))
        with pytest.raises(TypeError):
            store.put(open(os.devnull))  # pickle refuses a file object
        assert store.stats().objects == 0
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.put(b"x" * 1000)


def test_memory_is_reused_and_small_objects_share_one_block(shm_prefix: str) -> None:
    """Catches: a store that leaks units (put/drop in a loop fills it), a file per object,
    fragmentation that never heals."""
    with shmem.ObjectStore(1 << 20, max_objects=1024) as store:
        for i in range(2000):
            ref = store.put(np.full(10_000, float(i)))  # 80 KB: 13 fit
            assert shmem.get(ref)[0] == float(i)
        del ref
        assert used(store) == 0
        refs = [store.put("x" * 700 + str(i)) for i in range(1000)]  # ~1 KB each, not inline
        assert len(blocks_with_prefix(shm_prefix)) == 1
        assert store.stats().objects == 1000
        assert [shmem.get(r)[700:] for r in refs[::250]] == ["0", "250", "500", "750"]
        random.Random(1).shuffle(refs)
        del refs
        stats = store.stats()
        assert (stats.used, stats.largest_free) == (0, 1 << 20)


def test_a_full_store_raises_or_waits(shm_prefix: str) -> None:
    """Catches: a full store that hangs (timeout=0), a wait that never wakes when room
    appears, a timeout that is not kept, a failed put that leaves an entry behind."""
    with shmem.ObjectStore(256 << 10, max_objects=64) as store:
        keep = [store.put(np.zeros(12_000)) for _ in range(2)]  # 96 KB each
        with pytest.raises(shmem.NoSpace, match="full"):
            store.put(np.zeros(12_000))
        t0 = time.monotonic()
        with pytest.raises(shmem.NoSpace):
            store.put(np.zeros(12_000), timeout=0.3)
        assert time.monotonic() - t0 >= 0.29
        assert store.stats().objects == 2

        def free_one() -> None:
            time.sleep(0.3)
            keep.pop()

        import threading

        t = threading.Thread(target=free_one)
        t.start()
        ref = store.put(np.ones(12_000), timeout=30)
        t.join()
        assert shmem.get(ref).sum() == 12_000
        keep.clear()
        del ref
        with shmem.ObjectStore(1 << 20, max_objects=64) as small:
            refs = [small.put(b"y" * 1000) for _ in range(64)]
            with pytest.raises(shmem.NoSpace, match="entries"):
                small.put(b"y" * 1000)
            del refs


# ------------------------------------------------------------------ 2. processes


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pool_workers_get_refs_and_use_a_store_they_received(shm_prefix: str, method: str) -> None:
    """Catches: a ref or a store that does not pickle to another process, or whose
    object is gone there; a worker's attachment that outlives it."""
    import multiprocessing

    ctx = multiprocessing.get_context(method)
    with shmem.ObjectStore(8 << 20) as store:
        ref = store.put(np.ones(100_000))
        with ctx.Pool(2) as pool:
            assert pool.map(workers.total, [ref] * 4) == [100_000.0] * 4
            assert pool.starmap(workers.put_into, [(store, 2.0), (store, 3.0)]) == [2000.0, 3000.0]
        del ref
        assert store.stats().used == 0


def test_a_view_in_another_process_outlives_the_parents_reference(shm_prefix: str) -> None:
    """Catches: memory freed and reused while another process still reads it."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with shmem.ObjectStore(4 << 20) as store:
        ref = store.put(np.ones(100_000))
        ready, stop = ctx.Queue(), ctx.Event()
        child = ctx.Process(target=workers.hold_view, args=(ref, ready, stop))
        child.start()
        assert ready.get(timeout=60) == 100_000.0
        del ref
        gc.collect()
        fill = fill_up(store, np.full(100_000, 7.0))
        stop.set()
        assert ready.get(timeout=60) == 100_000.0  # still the ones, not sevens
        child.join(60)
        assert child.exitcode == 0
        del fill


def test_a_forked_child_keeps_what_its_parent_held(shm_prefix: str) -> None:
    """Catches: a child whose inherited refs and views lose their object when the parent
    lets go (the child's holds must exist from the fork on, not from its first call)."""
    with shmem.ObjectStore(4 << 20) as store:
        ref = store.put(np.arange(10.0))
        view = shmem.get(ref)
        r, w = os.pipe()

        def child() -> None:
            os.close(w)
            os.read(r, 1)  # the parent has let go, and filled the store meanwhile
            assert view.sum() == 45.0 and shmem.get(ref).sum() == 45.0

        pid = fork_child(child)
        os.close(r)
        ref = view = None  # the child's copies must keep the object
        gc.collect()
        fill = fill_up(store, np.full(1000, 9.0))
        os.write(w, b"1")
        os.close(w)
        assert wait_exit(pid) == 0
        del fill
        assert store.stats().used == 0  # the child's holds went with it


def test_unrelated_programs_share_a_store_by_name(shm_prefix: str) -> None:
    """Catches: a named store that cannot be opened by name, or a text ref that does not
    resolve in a program that never had the store; capacity of the existing store wins."""
    name = shm_prefix + "named"
    with shmem.ObjectStore(1 << 20, name=name) as store:
        ref = store.put(np.arange(100.0))
        code = (
            "import shmem, sys\n"
            "s = shmem.ObjectStore(1 << 30, name=sys.argv[1])\n"
            "assert s.capacity == 1 << 20, s.capacity\n"
            "print(float(shmem.get(sys.argv[2]).sum()))\n"
            "s.close()\n"
        )
        out = subprocess.run([PYTHON, "-c", code, name, str(ref)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "4950.0"
        assert pickle.loads(pickle.dumps(store)).name == name


# ------------------------------------------------------------------ 3. promises: wait, fulfil


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_promised_objects_made_by_other_processes(shm_prefix: str, method: str) -> None:
    """Catches: wait that returns before an object is stored (or never wakes), get that
    does not wait for a promise or hands out a half-stored one, a promise kept twice."""
    import multiprocessing

    ctx = multiprocessing.get_context(method)
    with shmem.ObjectStore(1 << 20) as store:
        refs = [store.promise() for _ in range(3)]
        assert shmem.wait(refs, timeout=0) == ([], refs)
        with pytest.raises(TimeoutError):
            shmem.get(refs[0], timeout=0.1)
        workers_ = [ctx.Process(target=workers.fulfil_later, args=(r, float(i), 0.2 + i)) for i, r in enumerate(refs)]
        for w in workers_:
            w.start()
        ready, pending = shmem.wait(refs, num_returns=1, timeout=60)
        assert ready == refs[:1] and pending == refs[1:]
        assert shmem.get(refs[2], timeout=60).sum() == 2000.0  # waits for it
        assert [float(a[0]) for a in shmem.get(refs)] == [0.0, 1.0, 2.0]
        assert shmem.wait(refs, timeout=0) == (refs, [])
        for w in workers_:
            w.join(60)
            assert w.exitcode == 0
        for stored in (refs[0], store.put(b"x" * 1000)):
            with pytest.raises(ValueError, match="stored already"):
                shmem.fulfil(stored, 5)
        with pytest.raises(TypeError):
            shmem.fulfil(shmem.put(np.ones(100_000)), 5)  # a block of its own: never a promise
        with pytest.raises(ValueError):
            shmem.wait(refs, num_returns=4)
        small = store.promise()
        shmem.fulfil(str(small), {"small": True})  # small objects too (never inline here)
        assert shmem.get(small) == {"small": True}
        del workers_, refs, small, ready, pending, stored
        assert store.stats().objects == 0


def test_a_promise_everyone_let_go_of_and_a_fulfiller_killed(shm_prefix: str) -> None:
    """Catches: a promise that outlives every reference, a fulfiller killed mid-copy whose
    memory stays taken (or whose half object becomes visible)."""
    with shmem.ObjectStore(8 << 20) as store:
        text = str(store.promise())  # the reference itself is dropped at once
        with pytest.raises(shmem.SegmentNotFound):
            shmem.fulfil(text, 1)
        assert store.stats().objects == 0
        ref = store.promise()
        rng = random.Random(3)
        for _ in range(20):

            def fulfiller() -> None:
                shmem.fulfil(ref, np.ones(800_000))  # 6.4 MB: killed somewhere in here

            pid = fork_child(fulfiller)
            time.sleep(rng.uniform(0, 0.01))
            kill_and_reap(pid)
            if shmem.wait([ref], timeout=0)[0]:
                break
        done = bool(shmem.wait([ref], timeout=0)[0])
        stats = store.stats()
        assert stats.objects == 1 and (stats.used > 0) == done, stats
        if done:
            assert shmem.get(ref).sum() == 800_000.0  # all of it, never half
        else:
            shmem.fulfil(ref, np.ones(10))
            assert shmem.get(ref).sum() == 10.0
        ref = None
        assert store.stats().used == 0


# ------------------------------------------------------------------ 4. crashes


def test_a_writer_killed_anywhere_in_put_leaves_nothing(shm_prefix: str) -> None:
    """SIGKILL a writer at random instants of a put loop, 60 times. Catches: a half-written
    object that another process can see, units or entries that stay taken for good,
    a store wedged by a mutex its holder took to the grave."""
    with shmem.ObjectStore(8 << 20) as store:
        rng = random.Random(7)
        for _ in range(60):

            def writer() -> None:
                while True:
                    ref = store.put(np.full(rng.randrange(1, 50_000), 1.0))
                    del ref

            pid = fork_child(writer)
            time.sleep(rng.uniform(0, 0.02))
            kill_and_reap(pid)
        stats = store.stats()  # reaps the dead writers' slots
        assert (stats.used, stats.objects, stats.processes) == (0, 0, 0), stats  # no dead writer's slot
        ref = store.put(np.ones(1000))
        assert shmem.get(ref).sum() == 1000.0


def test_a_reader_killed_while_holding_views_does_not_pin_the_object(shm_prefix: str) -> None:
    """Catches: an object pinned forever by a dead process's views or refs."""
    with shmem.ObjectStore(4 << 20) as store:
        ref = store.put(np.ones(100_000))
        text = str(ref)

        def reader() -> None:
            view = shmem.get(text)
            assert view.sum() == 100_000.0
            os.write(w, b"1")
            time.sleep(60)

        r, w = os.pipe()
        pid = fork_child(reader)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        del ref
        assert store.stats().objects == 1  # the reader holds it
        kill_and_reap(pid)
        assert store.stats().objects == 0


def test_a_process_killed_holding_the_mutex_is_repaired(shm_prefix: str) -> None:
    """Catches: a store wedged (or its tables wrong) after a holder of its internal
    mutex died: the next caller must be handed the mutex and rebuild."""
    with shmem.ObjectStore(1 << 20) as store:
        keep = store.put(np.ones(1000))
        arena = store._arena
        assert arena is not None

        def die_inside() -> None:
            arena.enter()
            doomed = arena.put  # noqa: F841 - nothing: we die holding the mutex
            os.kill(os.getpid(), signal.SIGKILL)

        pid = fork_child(die_inside)
        wait_exit(pid)
        ref = store.put(np.full(1000, 2.0))
        assert shmem.get(ref).sum() == 2000.0 and shmem.get(keep).sum() == 1000.0
        del ref
        stats = store.stats()
        assert (stats.objects, stats.used) == (1, store.stats().used)


def test_a_signal_handler_that_puts_while_the_main_thread_puts(shm_prefix: str) -> None:
    """Catches: a handler that meets the store's mutex held by the thread it interrupted
    (EDEADLK, or a hang), or holds lost between the two."""
    with shmem.ObjectStore(8 << 20) as store:
        got: List[Any] = []

        def handler(signum: int, frame: Any) -> None:
            got.append(store.put(np.full(100, float(len(got)))))

        old = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                ref = store.put(np.ones(500))
                assert shmem.get(ref).sum() == 500.0
                del ref
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, old)
        assert got, "no handler ran"
        assert store.stats().objects == len(got)
        got.clear()
        assert store.stats().used == 0


def test_closerange_does_not_let_other_processes_free_what_we_hold(shm_prefix: str) -> None:
    """A child holds a view, then closes every descriptor (os.closerange, as daemons do).
    Catches: a process whose slot lock went that way taken for dead - its objects freed
    and reused under its views - and a store it can no longer use."""
    with shmem.ObjectStore(1 << 20) as store:
        ref = store.put(np.ones(10_000))
        r, w = os.pipe()
        back_r, back_w = os.pipe()

        def child() -> None:
            view = shmem.get(ref)
            os.closerange(3, 4096)  # the pipes too: they are dup'ed to 0 and 1 first
            assert os.read(0, 1) == b"1"  # the parent has let go and filled the store
            assert view.sum() == 10_000.0 and shmem.get(ref).sum() == 10_000.0
            other = store.put(b"z" * 2000)
            assert shmem.get(other) == b"z" * 2000
            os.write(1, b"2")

        def with_pipes() -> None:
            os.dup2(r, 0)
            os.dup2(back_w, 1)
            child()

        pid = fork_child(with_pipes)
        os.close(r)
        os.close(back_w)
        time.sleep(0.5)  # the child has closed its descriptors (the sweep below must not reap it)
        ref = None
        gc.collect()
        fill = fill_up(store, np.full(10_000, 3.0))
        os.write(w, b"1")
        assert os.read(back_r, 1) == b"2"
        os.close(w)
        os.close(back_r)
        assert wait_exit(pid) == 0
        del fill


# ------------------------------------------------------------------ 5. hostile blocks


def test_damaged_tables_give_corrupt_segment_not_a_crash(shm_prefix: str) -> None:
    """Another process scribbles on an entry and on the kind header. Catches: offsets
    trusted as they are (reads past the heap: SIGSEGV/SIGBUS), a forged header accepted."""
    with shmem.ObjectStore(1 << 20) as store:
        ref = store.put(np.ones(1000))
        arena = store._arena
        assert arena is not None
        shape = arena.shape
        raw = shmem.SharedMemory(store.name)
        at = shape.table + ref._index * store_layout.ENTRY.size
        good = bytes(raw.buf[at : at + store_layout.ENTRY.size])
        struct.pack_into("<Q", raw.buf, at + 8, 1 << 50)  # offset past the heap
        with pytest.raises(shmem.CorruptSegment):
            shmem.get(ref)
        raw.buf[at : at + len(good)] = good
        assert shmem.get(ref).sum() == 1000.0
        head = shape.heap + struct.unpack_from("<Q", good, 8)[0]
        struct.pack_into("<I", raw.buf, head, 1 << 30)  # object header length
        with pytest.raises(shmem.CorruptSegment):
            shmem.get(ref)
        raw.close()
        del ref
    for forged in (b"x" * 32, store_layout.kind_header(store_layout.layout(1 << 20, 2048))):
        with pytest.raises(shmem.CorruptSegment):
            store_layout.parse(forged, store_layout.layout(1 << 20, 1024).size)


def test_a_full_dev_shm_raises_no_space(private_shm_available: None) -> None:  # noqa: F811
    """1 MiB /dev/shm, a 4 MiB store. Catches: SIGBUS, another exception, a leftover file."""
    code = (
        "import json, os, shmem\n"
        "try:\n"
        "    shmem.ObjectStore(4 << 20)\n"
        "    err = None\n"
        "except shmem.NoSpace as e:\n"
        "    err = type(e).__name__\n"
        "s = shmem.ObjectStore(256 << 10)\n"
        "ref = s.put(b'q' * 5000)\n"
        "ok = shmem.get(ref) == b'q' * 5000\n"
        "del ref\n"
        "s.close()\n"
        "print(json.dumps({'err': err, 'ok': ok, 'left': os.listdir('/dev/shm')}))\n"
    )
    assert run_in_private_shm(code) == {"err": "NoSpace", "ok": True, "left": []}


def test_the_pure_python_path_passes_the_same_tests() -> None:
    """The ctypes twin of the C calls under the same tests (the store itself is Python)."""
    done = run_pure_python(
        os.path.join(HERE, "test_store.py"),
        "put_get or reused or full_store or forked or killed or signal_handler or closerange or promise",
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_shmem_ls_shows_a_store(shm_prefix: str) -> None:
    """Catches: a store kind the listing cannot describe (shown as corrupt)."""
    with shmem.ObjectStore(1 << 20) as store:
        found = {s.name: s for s in shmem.list_segments()}[store.name]
        assert found.kind == "store" and "1048576 bytes" in found.detail, found
        ref = store.put(b"w" * 3000)
        found = {s.name: s for s in shmem.list_segments()}[store.name]
        assert dict(found.kind_fields)["objects"] == 1 and dict(found.kind_fields)["used_bytes"] >= 3000, found
        out = subprocess.run([PYTHON, "-m", "shmem", "ls"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and store.name in out.stdout, out
        del ref


@pytest.mark.parametrize("size", [0, 1, 4095, (4 << 20) - 1, 4 << 20, (9 << 20) + 13])
def test_copy_into_is_exact_on_both_paths_and_refuses_what_does_not_fit(size: int) -> None:
    """The store's large copies are split across threads in C. Catches: a part copied twice
    or not at all (sizes around the split, odd remainders), the C and Python paths disagreeing,
    a copy past the end of the destination."""
    import mmap

    from shmem._platform import _linux

    src = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8)
    for copy in filter(None, (_linux._copy_into, _linux._copy_into_python)):
        dst = mmap.mmap(-1, size + 8192)
        copy(dst, 4099, src, 4)
        assert bytes(dst[4099 : 4099 + size]) == src.tobytes()
        assert dst[:4099] == bytes(4099) and dst[4099 + size :] == bytes(8192 - 4099)
        for offset in (-1, size + 8192 - size + 1, 1 << 40):
            with pytest.raises(ValueError):
                copy(dst, offset, src if size else b"x", 4)
        dst.close()


def test_fork_while_holding_objects_of_two_stores_leaves_no_signal_blocked(shm_prefix: str) -> None:
    """Each store held across a fork blocks signals on top of the one before. Catches: masks
    put back in the wrong order, leaving the parent's thread or the child with every signal
    blocked (Ctrl-C dead, and a SIGTERM ignored)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with shmem.ObjectStore(1 << 20) as one, shmem.ObjectStore(1 << 20) as two:
        refs = [one.put(b"a" * 1000), two.put(b"b" * 1000), shmem.put(b"c" * 1000)]  # three stores

        def child() -> None:
            assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
            assert [shmem.get(r)[:1] for r in refs] == [b"a", b"b", b"c"]

        assert wait_exit(fork_child(child)) == 0
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        refs.clear()


def test_threads_that_fork_at_once_while_holding_objects(shm_prefix: str) -> None:
    """Four threads put, get, drop and fork children that read what they held. Catches: two
    forks at once taking each other's prepared slot - a store mutex left held for good (every
    thread and child hangs), a child that cannot read what its parent held at the fork."""

    def body() -> Any:
        import threading

        store = shmem.ObjectStore(16 << 20, max_objects=128)  # 4 threads x 5 objects of 480 KB at most
        errors: List[str] = []

        def run(seed: int) -> None:
            rng = random.Random(seed)
            held: List[Any] = []
            try:
                for _ in range(150):
                    v = float(rng.randrange(100))
                    put = store.put if rng.random() < 0.5 else shmem.put
                    held.append((put(np.full(rng.choice([100, 5000, 60000]), v)), v))
                    if len(held) > 4:
                        ref, v = held.pop(0)
                        assert shmem.get(ref)[0] == v
                        del ref
                    if rng.random() < 0.1:
                        pid = os.fork()
                        if pid == 0:
                            os._exit(0 if all(shmem.get(r)[0] == v for r, v in held) else 3)
                        assert os.waitpid(pid, 0)[1] == 0
            except Exception as err:
                errors.append(repr(err))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = store.stats()
        store.close()
        return errors, stats.objects

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # forking a multi-threaded process, on purpose
        errors, left = in_child(body, timeout=120)
    assert errors == [] and left == 0
