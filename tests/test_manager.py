"""SharedMemoryManager: the standard library's API, blocks that belong to the manager, arrays.

Crashes and signals (a killed parent, a killed manager, Ctrl-C): ``test_manager_signals.py``.
"""

from __future__ import annotations

import array
import gc
import json
import multiprocessing
import multiprocessing.managers
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client

import _manager_workers as workers
import pytest
from conftest import REAPER_ENV, REAPER_MARK, SHM_DIR, ProcessRef, implementations, wait_until

import shmem
from shmem._core.header import FLAG_MANAGED
from shmem._kinds.manager_server import Session
from shmem._kinds.raw import block_of
from shmem.managers import ManagedBlock, ManagerNotStarted, ManagerUnavailable, SharedMemoryManager

KEY = b"shmem manager tests"

MANAGERS = [
    pytest.param(SharedMemoryManager, id="shmem"),
    pytest.param(multiprocessing.managers.SharedMemoryManager, id="stdlib"),
]


def _exists(name: str) -> bool:
    return os.path.exists(f"{SHM_DIR}/{name}")


def _names(smm: SharedMemoryManager) -> list:
    return [block.name for block in smm.blocks()]


# ---------------------------------------------------------------- API parity


def test_importable_as_documented() -> None:
    import shmem.managers

    assert shmem.managers.SharedMemoryManager is SharedMemoryManager
    assert repr(SharedMemoryManager).startswith("<class 'shmem.managers.SharedMemoryManager'")
    if hasattr(shmem, "SharedMemoryManager"):
        assert shmem.SharedMemoryManager is SharedMemoryManager
    assert issubclass(SharedMemoryManager, multiprocessing.managers.BaseManager)


def test_seed_example_one_as_written() -> None:
    smm = SharedMemoryManager()
    smm.start()  # Start the process that manages the shared memory blocks
    sl = smm.ShareableList(range(4))
    assert re.fullmatch(r"ShareableList\(\[0, 1, 2, 3\], name='[^']+'\)", repr(sl))
    raw_shm = smm.SharedMemory(size=128)
    another_sl = smm.ShareableList("alpha")
    assert re.fullmatch(r"ShareableList\(\['a', 'l', 'p', 'h', 'a'\], name='[^']+'\)", repr(another_sl))
    names = [sl.shm.name, raw_shm.name, another_sl.shm.name]
    assert all(_exists(n) for n in names)
    smm.shutdown()  # Calls unlink() on sl, raw_shm, and another_sl
    assert not any(_exists(n) for n in names)
    assert list(sl) == [0, 1, 2, 3]  # mappings stay valid after the names are gone, as in the stdlib
    sl.close(), raw_shm.close(), another_sl.close()


def test_seed_example_two_under_each_start_method(mp_context) -> None:
    with SharedMemoryManager(ctx=mp_context) as smm:
        sl = smm.ShareableList(range(2000))
        # Divide the work among two processes, storing partial results in sl
        p1 = mp_context.Process(target=workers.do_work, args=(sl, 0, 1000))
        p2 = mp_context.Process(target=workers.do_work, args=(sl, 1000, 2000))
        p1.start()
        p2.start()  # A multiprocessing.Pool might be more efficient
        p1.join()
        p2.join()  # Wait for all work to complete in both processes
        assert p1.exitcode == p2.exitcode == 0
        assert _exists(sl.shm.name), "a worker's exit removed the block"
        total_result = sum(sl)  # Consolidate the partial results now in sl
        name = sl.shm.name
    assert total_result == 2 * sum(range(2000))
    assert not _exists(name)
    sl.close()


@pytest.mark.parametrize("manager", MANAGERS)
def test_a_manager_never_started_fails_as_the_stdlib_does(manager) -> None:
    smm = manager()
    assert smm.address is None
    with pytest.raises(ValueError):
        smm.SharedMemory(64)
    with pytest.raises(ValueError):
        smm.ShareableList([1, 2])
    with pytest.raises(ValueError):
        smm.connect()
    with pytest.raises(AttributeError):
        smm.shutdown()


def test_a_manager_never_started_says_so() -> None:
    smm = SharedMemoryManager()
    for call in (lambda: smm.SharedMemory(64), lambda: smm.ShareableList([1]), smm.blocks):
        with pytest.raises(ManagerNotStarted, match="never started") as info:
            call()
        assert isinstance(info.value, shmem.ShmemError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("manager", MANAGERS)
def test_start_stop_and_misuse_fail_as_the_stdlib_does(manager) -> None:
    smm = manager()
    with smm as entered:
        assert entered is smm
        assert smm.address is not None
        with pytest.raises(multiprocessing.ProcessError):
            smm.start()
        with pytest.raises(ValueError):
            smm.SharedMemory(0)
        with pytest.raises(ValueError):
            smm.SharedMemory(-1)
    smm.shutdown()  # a second shutdown does nothing
    with pytest.raises(multiprocessing.ProcessError):
        smm.start()
    with pytest.raises(multiprocessing.ProcessError):
        smm.__enter__()
    with pytest.raises(FileNotFoundError):  # the stdlib: its socket file is gone
        smm.SharedMemory(64)
    with pytest.raises(FileNotFoundError):
        smm.ShareableList([1])


def test_a_shut_down_manager_names_its_address() -> None:
    with SharedMemoryManager() as smm:
        address = smm.address
    with pytest.raises(ManagerUnavailable) as info:
        smm.SharedMemory(64)
    assert isinstance(info.value, ConnectionRefusedError) and isinstance(info.value, FileNotFoundError)
    assert info.value.filename == str(address) and "shut down" in str(info.value)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is ManagerUnavailable and copy.filename == info.value.filename


# ---------------------------------------------------------------- whose blocks they are


def test_another_process_connects_by_address_and_authkey(shm_prefix: str) -> None:
    with SharedMemoryManager(authkey=KEY) as smm:
        client = subprocess.Popen(
            workers.script("client_main") + [repr(smm.address), KEY.hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = client.communicate("go\n", timeout=60)
        assert client.returncode == 0, err
        made, outcomes = (json.loads(line) for line in out.splitlines())
        names = made["names"]
        assert sorted(names) == sorted(made["blocks"])  # the client sees what it made
        assert all(o["type"] is None for o in outcomes["outcomes"].values()), outcomes
        assert all(n.startswith(shm_prefix) for n in names)
        # The client is gone, and so is its reaper's reason to keep them: the manager owns them.
        time.sleep(1.0)
        assert all(_exists(n) for n in names), "blocks made through the manager died with their creator"
        assert set(names) <= set(_names(smm))
        sl = shmem.ShareableList(name=names[1])
        assert list(sl) == [1, 2.5, "three"]
        sl.close()
    assert not any(_exists(n) for n in names)


@pytest.mark.parametrize(
    "impl",
    implementations("gh-110468, gh-82300: the creating process's resource tracker unlinks the block when it exits"),
)
def test_a_block_made_by_a_client_that_exits_lives_until_shutdown(impl) -> None:
    stdlib = impl is not shmem.shared_memory
    manager = multiprocessing.managers.SharedMemoryManager if stdlib else SharedMemoryManager
    name = None
    try:
        with manager(authkey=KEY) as smm:
            client = subprocess.run(
                workers.script("made_by_client_main") + ["stdlib" if stdlib else "shmem", repr(smm.address), KEY.hex()],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert client.returncode == 0, client.stderr
            name = json.loads(client.stdout)["name"]
            time.sleep(1.0)  # the client's tracker or reaper has had its chance
            sl = impl.ShareableList(name=name)
            assert list(sl) == ["outlives", "its", "creator"]
            sl.shm.close()
            if stdlib:
                from multiprocessing import resource_tracker

                resource_tracker.unregister(sl.shm._name, "shared_memory")
        assert not _exists(name)
    finally:
        if name is not None and _exists(name):  # the stdlib's names are not under this test's prefix
            os.unlink(f"{SHM_DIR}/{name}")


def test_blocks_made_by_workers_belong_to_the_manager(mp_context) -> None:
    with SharedMemoryManager(authkey=KEY, ctx=mp_context) as smm:
        queue = mp_context.Queue()
        targets = [(workers.create_through_manager, ("shmem", smm.address, KEY, queue))]
        if mp_context.get_start_method() == "fork":
            targets.append((workers.create_through_inherited, (smm, queue)))
        names = []
        for target, args in targets:
            worker = mp_context.Process(target=target, args=args)
            worker.start()
            names += queue.get(timeout=60)
            worker.join(60)
            assert worker.exitcode == 0
        time.sleep(1.0)  # the workers' reapers have looked at them several times
        assert all(_exists(n) for n in names), "a worker's exit removed a block the manager owns"
        assert set(names) <= set(_names(smm))
        shm = shmem.SharedMemory(names[0])
        assert bytes(shm.buf[:5]) == b"hello"
        shm.close()
    assert not any(_exists(n) for n in names)


@pytest.mark.parametrize("impl", implementations("its shutdown stops at the first block someone else unlinked"))
def test_shutdown_removes_every_block_even_some_unlinked_by_someone_else(impl) -> None:
    manager = SharedMemoryManager if impl is shmem.shared_memory else multiprocessing.managers.SharedMemoryManager
    smm = manager()
    smm.start()
    made = [smm.SharedMemory(64), smm.ShareableList([1, 2, 3]), smm.SharedMemory(128), smm.ShareableList("ab")]
    shms = [m if hasattr(m, "buf") else m.shm for m in made]
    names = [s.name for s in shms]
    try:
        for name in (names[0], names[2]):  # someone else removes two of them
            impl.SharedMemory(name).unlink()
        smm.shutdown()
        for s in shms:
            s.close()
        assert not [n for n in names if _exists(n)], "shutdown left blocks behind"
    finally:
        for name in names:  # the stdlib's names are not under this test's prefix: clean up here
            if _exists(name):
                os.unlink(f"{SHM_DIR}/{name}")


def test_blocks_reports_what_the_manager_owns() -> None:
    with SharedMemoryManager() as smm:
        assert smm.blocks() == []
        shm = smm.SharedMemory(1000)
        sl = smm.ShareableList(["a", 1])
        blocks = smm.blocks()
        assert all(type(b) is ManagedBlock for b in blocks)
        by_name = {b.name: b for b in blocks}
        assert by_name[shm.name] == ManagedBlock(shm.name, "raw", 1000, os.getpid())
        assert by_name[sl.shm.name].kind == "list" and by_name[sl.shm.name].size == sl.shm.size
        assert block_of(shm).header.flags & FLAG_MANAGED and block_of(sl.shm).header.flags & FLAG_MANAGED
        assert [b.name for b in blocks] == sorted(by_name)
        shm.unlink()  # someone else's unlink: no longer the manager's
        assert _names(smm) == [sl.shm.name]
        shm.close()
        sl.close()
    with pytest.raises(ManagerUnavailable):
        smm.blocks()


def test_the_xmlrpclib_serializer_works_too() -> None:
    with SharedMemoryManager(serializer="xmlrpclib") as smm:
        shm = smm.SharedMemory(10)
        assert _names(smm) == [shm.name]
        shm.close()
    assert not _exists(shm.name)


def test_the_manager_lets_go_of_blocks_someone_unlinked() -> None:
    """It holds a descriptor per block; an unlinked block's memory is freed
    only when it lets go (within about a second)."""
    with SharedMemoryManager() as smm:
        shm = smm.SharedMemory(1 << 20)
        name = shm.name
        manager_fds = f"/proc/{smm._process.pid}/fd"

        def held() -> bool:
            links = []
            for fd in os.listdir(manager_fds):
                try:
                    links.append(os.readlink(f"{manager_fds}/{fd}"))
                except OSError:
                    pass
            return any(name in link for link in links)

        assert wait_until(held), "the manager does not hold the block"
        shm.close()
        shm.unlink()
        assert wait_until(lambda: not held()), "the manager keeps an unlinked block's memory"


def test_many_blocks_from_several_threads() -> None:
    with SharedMemoryManager() as smm:
        made: list = []

        def make() -> None:
            for i in range(50):
                made.append(smm.SharedMemory(64) if i % 2 else smm.ShareableList([i]))

        threads = [threading.Thread(target=make) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        names = sorted(m.name if hasattr(m, "buf") else m.shm.name for m in made)
        assert len(set(names)) == 200
        assert _names(smm) == names
        for m in made:
            m.close()
    assert not any(_exists(n) for n in names)


def test_a_standard_library_client_can_use_a_shmem_manager() -> None:
    with SharedMemoryManager(authkey=KEY) as smm:
        client = subprocess.run(
            workers.script("stdlib_client_main") + [repr(smm.address), KEY.hex()],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        name = json.loads(client.stdout)["name"]
        try:
            assert _exists(name)
            assert ManagedBlock(name, "raw", os.stat(f"{SHM_DIR}/{name}").st_size, None) in smm.blocks()
        except BaseException:
            os.unlink(f"{SHM_DIR}/{name}")
            raise
    assert not _exists(name)


# ---------------------------------------------------------------- names from clients are input


def _call_as_a_client(smm: SharedMemoryManager, method: str, *args: object) -> object:
    """Call the manager as any client of the standard library's protocol can."""
    with Client(smm.address, authkey=KEY) as conn:
        return multiprocessing.managers.dispatch(conn, None, method, args)  # type: ignore[attr-defined]


@pytest.fixture
def precious(tmp_path, shm_prefix: str):
    """Two files a hostile name could reach: one outside /dev/shm, one in a
    subdirectory of it; yields the names that lead to them, and checks at the
    end that both are untouched."""
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"precious")
    subdir = f"{SHM_DIR}/{shm_prefix}dir"
    os.mkdir(subdir)
    inside = f"{subdir}/precious.txt"
    with open(inside, "wb") as f:
        f.write(b"precious")
    try:
        yield [
            os.path.relpath(outside, SHM_DIR),
            f"{shm_prefix}dir/precious.txt",
            f"{shm_prefix}dir/../{shm_prefix}dir/precious.txt",
        ]
        for path in (str(outside), inside):
            with open(path, "rb") as f:
                assert f.read() == b"precious", f"{path} was changed"
    finally:
        if os.path.exists(inside):
            os.unlink(inside)
        os.rmdir(subdir)


@pytest.mark.parametrize("method", ["track_segment", "release_segment"])
def test_a_client_cannot_make_the_manager_touch_files_outside_dev_shm(method: str, precious: list) -> None:
    with SharedMemoryManager(authkey=KEY) as smm:
        for name in precious + ["..", ".", "", "a/b", "/"]:
            # The standard library's server answers a failed call with the traceback.
            with pytest.raises(multiprocessing.managers.RemoteError, match="InvalidName"):
                _call_as_a_client(smm, method, name)
        assert smm.blocks() == []
    # The fixture checks that both files are still there, unchanged, after the manager's shutdown.


def test_a_hand_over_under_a_hostile_name_is_ignored(precious: list) -> None:
    """A client that knows the session may hand over any descriptor under any
    name: the manager only keeps one whose name is a block name under its prefix."""
    with SharedMemoryManager(authkey=KEY) as smm:
        session = Session.from_wire(_call_as_a_client(smm, "shmem_session"))  # type: ignore[arg-type]
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(session.handover)
            sock.sendmsg([session.greeting()])
            for name in precious:
                fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
                try:
                    for claimed in (name, session.prefix + "/../" + name, session.prefix + "x/../../" + name):
                        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                        sock.sendmsg([claimed.encode()], rights)
                finally:
                    os.close(fd)
            assert smm.blocks() == []  # everything sent before the call was taken in (or refused)


# ---------------------------------------------------------------- one reaper for the whole tree


def _reapers_serving(token: str) -> list:
    """The reaper processes whose environment names this process tree's reaper token."""
    mark = f"{REAPER_ENV}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if REAPER_MARK not in f.read():
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_pool_of_8_workers_creating_through_the_manager_shares_one_reaper(method: str, own_reaper) -> None:
    """Issue 9: each worker that made a block used to leave a reaper of its own
    running (8 workers, 8 reapers). A fresh program - no SHMEM_REAPER in its
    environment, so it gets a reaper of its own - starts a manager and a Pool
    of 8 workers that each create a block through it, all at once."""
    program = subprocess.Popen(
        workers.script("pool_main") + [method],
        env=own_reaper.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert program.stdout is not None and program.stdin is not None
    line = program.stdout.readline()
    if not line:
        _, err = program.communicate(timeout=60)
        raise AssertionError(f"pool_main failed: {err}")
    made = json.loads(line)
    reapers = {own_reaper.add(pid).pid for pid in made["reapers"]}  # type: ignore[union-attr]
    names = made["names"]
    try:
        assert len(set(made["workers"])) == 8, "the blocks were not made by 8 different workers"
        assert None not in made["reapers"] and len(reapers) == 1, f"reapers by worker: {made['reapers']}"
        assert _reapers_serving(made["token"]) == sorted(reapers), "more than one reaper serves the tree"
        assert all(_exists(n) for n in names)
    finally:
        out, err = program.communicate("go\n", timeout=60)
    assert program.returncode == 0, err
    assert json.loads(out) == {"done": True}
    assert not [n for n in names if _exists(n)], "the manager's shutdown left blocks behind"
    assert ProcessRef(reapers.pop()).wait_gone(), "the reaper stayed after the whole tree was gone"


# ---------------------------------------------------------------- NumPy arrays


@pytest.fixture
def np():
    numpy = pytest.importorskip("numpy")
    yield numpy
    from shmem._kinds import array_mappings

    array_mappings.drop_cached_mappings()  # attached mappings are cached by design: not a leak
    gc.collect()


def test_arrays_through_the_manager(np, mp_context) -> None:
    with SharedMemoryManager(ctx=mp_context) as smm:
        made = [
            (smm.zeros((3, 4)), np.zeros((3, 4))),
            (smm.zeros(5, dtype=np.int32), np.zeros(5, dtype=np.int32)),
            (smm.empty((2, 2), dtype="u1", order="F"), None),
            (smm.full((2, 3), 7), np.full((2, 3), 7)),
            (smm.full(4, 1.5, dtype=np.float32), np.full(4, 1.5, dtype=np.float32)),
            (smm.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]])),
            (smm.array(np.arange(6.0).reshape(2, 3).T, order="K"), np.arange(6.0).reshape(2, 3).T),
        ]
        for arr, expected in made:
            assert type(arr) is shmem.SharedArray
            if expected is not None:
                assert arr.dtype == expected.dtype and arr.shape == expected.shape
                np.testing.assert_array_equal(arr, expected)
        assert made[2][0].flags.f_contiguous and made[6][0].flags.f_contiguous
        names = [arr.name for arr, _ in made]
        assert {b.name: b.kind for b in smm.blocks()} == dict.fromkeys(names, "array")

        worker = mp_context.Process(target=workers.add_to_array, args=(made[0][0], 2.5))
        worker.start()
        worker.join(60)
        assert worker.exitcode == 0
        np.testing.assert_array_equal(made[0][0], np.full((3, 4), 2.5))
        assert all(_exists(n) for n in names)
    assert not any(_exists(n) for n in names)
    del made, arr


def test_arrays_need_a_started_manager(np) -> None:
    with pytest.raises(ManagerNotStarted):
        SharedMemoryManager().zeros(3)


# ---------------------------------------------------------------- the benchmark


def test_benchmark_quick_run_reports_its_goal_and_leaves_nothing(tmp_path) -> None:
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_manager.py")
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, bench, "--quick", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr  # 1 if it left blocks behind
    assert run.stdout.count("goal:") == 1 and "shmem manager / shmem direct" in run.stdout
    results = json.loads(out.read_text())
    assert set(results["medians"]) == {"shmem direct", "shmem manager", "stdlib direct", "stdlib manager"}
    assert results["leftovers"] == []


def test_arrays_made_through_the_manager_say_so_in_their_header() -> None:
    pytest.importorskip("numpy")
    with SharedMemoryManager() as smm:
        made = [smm.zeros(4), smm.empty(4), smm.full(4, 1.0), smm.array([1, 2])]
        for arr in made:
            assert shmem.inspect_segment(arr.name).managed
        del made


def test_manager_array_functions_take_the_module_functions_arguments() -> None:
    """smm.zeros/empty/full/array take shmem.zeros/...'s arguments, except name and
    track: the manager names its blocks (under its prefix, so that it only ever
    removes its own) and keeps them until it shuts down."""
    pytest.importorskip("numpy")
    import inspect

    for fn in ("zeros", "empty", "full", "array"):
        module_params = [p for p in inspect.signature(getattr(shmem, fn)).parameters if p not in ("name", "track")]
        manager_params = list(inspect.signature(getattr(SharedMemoryManager, fn)).parameters)[1:]
        assert manager_params == module_params, fn
