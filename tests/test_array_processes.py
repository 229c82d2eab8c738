"""Handing SharedArrays to other processes: every multiprocessing path, under
spawn, fork and forkserver, gives the worker the same memory, never a copy;
a worker's exit never removes the block."""

from __future__ import annotations

import concurrent.futures
import gc
import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import PYTHON, SHM_DIR, wait_until

import shmem

np = pytest.importorskip("numpy")
array_mappings = pytest.importorskip("shmem._kinds.array_mappings")

import _array_workers as workers  # noqa: E402 - it imports NumPy, known to be there by now

# This process's mapping cache outlives a test by design: drop it before the leak guard looks.
pytestmark = pytest.mark.usefixtures("drop_cached_array_mappings")


def _exists(name: str) -> bool:
    return os.path.exists(f"{SHM_DIR}/{name}")


def test_pool_map_and_apply_write_in_place(mp_context) -> None:
    arr = shmem.zeros((8, 1000))
    with mp_context.Pool(2) as pool:
        names = pool.map(workers.fill_star, [(arr[i], i + 1) for i in range(8)])
        pool.apply(workers.fill, (arr[:, :10], -1.0))
        seen = pool.apply(workers.describe, (arr[::-2, 995:],))
    assert set(names) == {arr.name}
    expected = np.repeat(np.arange(1.0, 9.0)[:, None], 1000, axis=1)
    expected[:, :10] = -1.0
    np.testing.assert_array_equal(arr, expected)
    assert seen["type"] == "SharedArray" and seen["name"] == arr.name
    assert (seen["shape"], seen["strides"]) == (arr[::-2, 995:].shape, arr[::-2, 995:].strides)
    assert seen["data"] == arr[::-2, 995:].tobytes()
    time.sleep(0.3)  # the workers have exited: the block stays
    assert _exists(arr.name)
    arr.unlink()


def test_process_pool_executor_submit(mp_context) -> None:
    arr = shmem.full((4, 4), 2.0, dtype=np.float32)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=mp_context) as executor:
        done = [executor.submit(workers.fill, arr[i], float(i)) for i in range(4)]
        assert {f.result(timeout=120) for f in done} == {arr.name}
        assert executor.submit(workers.total, arr).result(timeout=120) == 0 + 4 + 8 + 12
    assert list(arr[:, 0]) == [0.0, 1.0, 2.0, 3.0]
    arr.unlink()


def test_process_args_and_attach_by_name(mp_context) -> None:
    arr = shmem.zeros(6, dtype=np.int64)
    procs = [
        mp_context.Process(target=workers.fill, args=(arr[:3], 5)),
        mp_context.Process(target=workers.attach_and_fill, args=(arr.name, 0)),
    ]
    procs[0].start()
    procs[0].join(120)
    procs[1].start()
    procs[1].join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert list(arr) == [0] * 6  # the second overwrote the first: same memory
    p = mp_context.Process(target=workers.fill, args=(arr[3:], 9))
    p.start()
    p.join(120)
    assert p.exitcode == 0 and list(arr) == [0, 0, 0, 9, 9, 9]
    assert _exists(arr.name)
    arr.unlink()


def test_multiprocessing_queue_carries_handles(mp_context) -> None:
    arr = shmem.zeros(10)
    inbox, outbox = mp_context.Queue(), mp_context.Queue()
    proc = mp_context.Process(target=workers.from_queue, args=(inbox, outbox))
    proc.start()
    for i in range(5):
        inbox.put((arr[2 * i : 2 * i + 2], float(i)))
    names = [outbox.get(timeout=120) for _ in range(5)]
    inbox.put(None)
    proc.join(120)
    assert proc.exitcode == 0 and set(names) == {arr.name}
    assert list(arr) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    arr.unlink()


def test_readonly_views_stay_read_only_in_workers(mp_context) -> None:
    arr = shmem.zeros(4)
    seen = shmem.attach_array(arr.name, readonly=True)
    frozen = arr[1:]
    frozen.flags.writeable = False  # what is sent is what the worker gets
    with mp_context.Pool(1) as pool:
        results = [pool.apply(workers.try_write, (view,)) for view in (seen, frozen, arr[:1])]
    assert results[0].startswith("ValueError") and results[1].startswith("ValueError")
    assert results[2] == "written" and list(arr) == [1.0, 0.0, 0.0, 0.0]
    arr.unlink()


@pytest.mark.parametrize(
    "dtype",
    [
        "?",
        "<i2",
        ">u8",
        "f2",
        "<c16",
        "M8[us]",
        "m8[D]",
        "S5",
        "U3",
        [("t", "M8[s]"), ("xy", "<f4", (2,)), ("tag", "S3"), ("u", [("a", "U2")])],
    ],
    ids=str,
)
def test_fixed_size_dtypes_cross_processes(dtype) -> None:
    ctx = __import__("multiprocessing").get_context("spawn")
    source = np.frombuffer(os.urandom(np.dtype(dtype).itemsize * 5), dtype=np.uint8).view(dtype)
    arr = shmem.array(source)
    with ctx.Pool(1) as pool:
        dtype_repr, received, by_name = pool.apply(workers.dtype_round_trip, (arr,))
    assert dtype_repr == repr(arr.dtype)
    assert received == by_name == arr.tobytes()
    arr.unlink()


def test_a_thousand_slices_in_a_worker_hold_one_mapping() -> None:
    """1,000 slices received at once: one mapping of the block, and one
    descriptor - the users lock's - where mmap can be told to keep none of its
    own (Python >= 3.13; before, it keeps a duplicate: two). Issue 10: it was
    two mappings and two descriptors, the docstring said one of each. Once the
    slices are gone, the lock goes; the mapping stays cached, holding nothing."""
    ctx = __import__("multiprocessing").get_context("spawn")
    arr = shmem.full((1000, 10), 1.0)
    with ctx.Pool(1) as pool:
        out = pool.apply(workers.mappings_after_receiving, ([arr[i] for i in range(1000)],))
    assert out["total"] == 1000 * 10
    mmap_keeps_one = sys.version_info < (3, 13)
    assert (out["mappings"], out["fds"]) == (1, 1 + mmap_keeps_one), out
    assert (out["mappings_after"], out["fds_after"]) == (1, 0 + mmap_keeps_one), out
    arr.unlink()


def test_block_outlives_its_creator_while_a_receiver_holds_it(mp_context) -> None:
    """A worker creates an array and hands it over, then exits: the parent's
    array keeps the block alive; once the parent drops it, the block goes -
    even though this process keeps the mapping cached for a next hand-off."""
    outbox, inbox = mp_context.Queue(), mp_context.Queue()
    creator = mp_context.Process(target=workers.create_and_send, args=(outbox, inbox, (1000,)))
    creator.start()
    arr = outbox.get(timeout=120)
    inbox.put("got it")
    creator.join(120)
    assert creator.exitcode == 0
    time.sleep(1.0)  # several reaper polls
    name = arr.name
    assert _exists(name), "the block was removed while this process used it"
    assert arr.sum() == 7000.0
    arr[:] = 1.0
    del arr
    gc.collect()
    assert wait_until(lambda: not _exists(name)), "nobody uses the block any more, yet it stays"


def test_worker_exit_never_removes_the_block_of_another_creator(shm_name) -> None:
    """Creator, and a worker that receives, uses and drops the array: the
    worker's exit leaves the block to its creator."""
    name = shm_name()
    code = textwrap.dedent(
        f"""
        import multiprocessing as mp, sys, time, os
        import shmem
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import _array_workers as workers
        arr = shmem.full(1000, 2.0, name={name!r})
        with mp.get_context("spawn").Pool(1) as pool:
            assert pool.apply(workers.sum_then_drop, (arr,)) == 2000.0
        time.sleep(0.5)
        print(os.path.exists("/dev/shm/" + {name!r}), flush=True)
        """
    )
    run = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"
    assert wait_until(lambda: not _exists(name)), "the creator exited: its block should be removed"
    assert run.stderr == ""


def test_a_cached_mapping_is_dropped_once_its_name_is_removed(shm_prefix: str) -> None:
    """This process keeps an attached block mapped after its arrays are gone
    (a next hand-off costs no page fault), at most WARM_BLOCKS of them, and
    drops it at its next attach once the name is gone."""
    owner = subprocess.Popen(
        [
            PYTHON,
            "-c",
            textwrap.dedent(
                """
            import shmem, sys
            arrays = [shmem.zeros(1000) for _ in range(6)]
            print(" ".join(a.name for a in arrays), flush=True)
            sys.stdin.readline()
            arrays[0].unlink()
            print("unlinked", flush=True)
            sys.stdin.readline()
            """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        names = owner.stdout.readline().split()

        def mapped(name: str) -> bool:
            path = "/dev/shm/" + name
            with open("/proc/self/maps") as f:
                return any(line.split(None, 5)[-1].strip() in (path, path + " (deleted)") for line in f)

        arr = shmem.attach_array(names[0])
        del arr
        gc.collect()
        assert mapped(names[0])  # cached
        for name in names[1:]:
            shmem.attach_array(name)
        gc.collect()
        assert sum(mapped(n) for n in names) == array_mappings.WARM_BLOCKS  # bounded
        shmem.attach_array(names[-1])
        assert mapped(names[-1])
        shmem.attach_array(names[1])  # oldest out: names[1] is back in, names[0]'s mapping is long gone
        assert not mapped(names[0])
        arr = shmem.attach_array(names[0])
        del arr
        owner.stdin.write("\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == "unlinked"
        gc.collect()
        assert mapped(names[0])
        shmem.attach_array(names[1])  # any attach checks the cached names
        gc.collect()
        assert not mapped(names[0])
    finally:
        owner.communicate("\n", timeout=60)
