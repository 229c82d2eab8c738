"""SharedMemoryManager workers and scripts for other processes (importable under spawn and forkserver).

Functions are ``multiprocessing`` targets; ``*_main`` functions are whole
programs, run as ``python -c "import _manager_workers as w; w.X_main()" args``
(see ``run_script``) and talking to the test through stdout (one JSON line)
and stdin (a line means "go on").
"""

from __future__ import annotations

import ast
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
#: The authkey of the managers the whole programs below start.
STARTER_KEY = b"shmem manager workers"


def script(name: str) -> List[str]:
    """argv (minus the arguments) that runs ``name`` from this module in a fresh Python."""
    code = f"import sys; sys.path.insert(0, {HERE!r}); import _manager_workers as w; w.{name}(*sys.argv[1:])"
    return [sys.executable, "-c", code]


def manager_class(impl: str) -> Any:
    if impl == "shmem":
        from shmem.managers import SharedMemoryManager
    else:
        from multiprocessing.managers import SharedMemoryManager
    return SharedMemoryManager


# ------------------------------------------------------------------ multiprocessing targets


def do_work(sl: Any, start: int, stop: int) -> None:
    """The second seed example's worker: partial results into its half of ``sl``."""
    for i in range(start, stop):
        sl[i] = 2 * i


def create_through_manager(impl: str, address: Any, authkey: bytes, queue: Any) -> None:
    """Create a raw block and a list through the manager at ``address``, report
    their names, exit: the blocks belong to the manager, not to this process."""
    smm = manager_class(impl)(address=address, authkey=authkey)
    smm.connect()
    shm = smm.SharedMemory(64)
    shm.buf[:5] = b"hello"
    sl = smm.ShareableList(["made", "by", "a", "worker"])
    queue.put([shm.name, sl.shm.name])
    shm.close()
    sl.shm.close()


def create_through_inherited(smm: Any, queue: Any) -> None:
    """The same with the parent's manager object, inherited by fork."""
    shm = smm.SharedMemory(64)
    shm.buf[:5] = b"hello"
    queue.put([shm.name])
    shm.close()


def add_to_array(arr: Any, value: float) -> None:
    arr += value


def create_in_pool_worker(address: Any, authkey: bytes, queue: Any) -> None:
    """A Pool initializer: each worker creates one block through the manager and
    reports (its pid, the block's name, the pid of the reaper it talks to)."""
    from shmem._core import tracking
    from shmem.managers import SharedMemoryManager

    smm = SharedMemoryManager(address=address, authkey=authkey)
    smm.connect()
    shm = smm.SharedMemory(64)
    queue.put((os.getpid(), shm.name, tracking.reaper_pid()))
    shm.close()


# ------------------------------------------------------------------ whole programs


def _say(**what: Any) -> None:
    print(json.dumps(what), flush=True)


def _wait() -> None:
    sys.stdin.readline()


def client_main(address: str, authkey: str) -> None:
    """Connect by address and authkey, create blocks, report; on "go", call the
    manager again (it was killed meanwhile) and report what each call raised."""
    from shmem.managers import SharedMemoryManager

    smm = SharedMemoryManager(address=ast.literal_eval(address), authkey=bytes.fromhex(authkey))
    smm.connect()
    shm = smm.SharedMemory(100)
    sl = smm.ShareableList([1, 2.5, "three"])
    _say(names=[shm.name, sl.shm.name], blocks=[b.name for b in smm.blocks()])
    shm.close()
    sl.close()
    _wait()
    outcomes: Dict[str, Any] = {}
    for call, action in [
        ("SharedMemory", lambda: smm.SharedMemory(10)),
        ("ShareableList", lambda: smm.ShareableList([1])),
        ("blocks", lambda: smm.blocks()),
    ]:
        started = time.monotonic()
        try:
            action()
        except Exception as err:
            outcomes[call] = {
                "type": type(err).__name__,
                "module": type(err).__module__,
                "connection_refused": isinstance(err, ConnectionRefusedError),
                "message": str(err),
                "seconds": time.monotonic() - started,
            }
        else:
            outcomes[call] = {"type": None, "seconds": time.monotonic() - started}
    _say(outcomes=outcomes)


def made_by_client_main(impl: str, address: str, authkey: str) -> None:
    """Connect, create a list through the manager, report its name, exit."""
    smm = manager_class(impl)(address=ast.literal_eval(address), authkey=bytes.fromhex(authkey))
    smm.connect()
    sl = smm.ShareableList(["outlives", "its", "creator"])
    _say(name=sl.shm.name)
    sl.shm.close()


def stdlib_client_main(address: str, authkey: str) -> None:
    """The standard library's SharedMemoryManager as a client of a shmem manager."""
    from multiprocessing import resource_tracker
    from multiprocessing.managers import SharedMemoryManager

    smm = SharedMemoryManager(address=ast.literal_eval(address), authkey=bytes.fromhex(authkey))
    smm.connect()
    shm = smm.SharedMemory(64)
    # Its own resource tracker would unlink the block when we exit (gh-82300): the
    # manager owns it now.
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    shm.close()
    _say(name=shm.name)


def _children() -> List[int]:
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        return [int(pid) for pid in f.read().split()]


def starter_main(method: str, with_array: str = "0") -> None:
    """Start a manager (under start method ``method``), create blocks here and in a
    worker that exits, report the manager's pid, then wait to be killed."""
    from shmem.managers import SharedMemoryManager

    ctx = multiprocessing.get_context(method)
    smm = SharedMemoryManager(ctx=ctx, authkey=STARTER_KEY)
    smm.start()
    shm = smm.SharedMemory(4096)
    sl = smm.ShareableList(list(range(10)))
    names = [shm.name, sl.shm.name]
    if with_array == "1":
        names.append(smm.zeros((4, 4)).name)
    queue = ctx.Queue()
    worker = ctx.Process(target=create_through_manager, args=("shmem", smm.address, STARTER_KEY, queue))
    worker.start()
    names += queue.get(timeout=60)
    worker.join(60)
    own_group = os.getpgrp()
    reapers = [pid for pid in _children() if os.getpgid(pid) != own_group]
    _say(manager=smm._process.pid, names=names, reapers=reapers, pid=os.getpid())
    _wait()


def pool_main(method: str) -> None:
    """A manager and a Pool of 8 workers (start method ``method``) that each create
    a block through it; report what they made and which reaper each talks to,
    wait for "go", then shut everything down and report that it did."""
    from shmem._core import tracking
    from shmem.managers import SharedMemoryManager

    ctx = multiprocessing.get_context(method)
    with SharedMemoryManager(ctx=ctx, authkey=STARTER_KEY) as smm:
        queue = ctx.Queue()
        with ctx.Pool(8, initializer=create_in_pool_worker, initargs=(smm.address, STARTER_KEY, queue)) as pool:
            made = [queue.get(timeout=120) for _ in range(8)]
            _say(
                token=os.environ[tracking.ENV],
                workers=[pid for pid, _, _ in made],
                names=[name for _, name, _ in made],
                reapers=[reaper for _, _, reaper in made],
            )
            _wait()
            pool.terminate()
    _say(done=True)


def with_block_main(method: str) -> None:
    """Blocks inside ``with SharedMemoryManager()``, then wait for Ctrl-C."""
    from shmem.managers import SharedMemoryManager

    with SharedMemoryManager(ctx=multiprocessing.get_context(method)) as smm:
        shm = smm.SharedMemory(4096)
        sl = smm.ShareableList(["x"] * 10)
        _say(manager=smm._process.pid, names=[shm.name, sl.shm.name])
        time.sleep(120)  # Ctrl-C arrives here


def stdlib_hold_main(name: str) -> None:
    """Attach a block with the standard library and keep it open until told to go."""
    from multiprocessing import resource_tracker
    from multiprocessing.shared_memory import SharedMemory

    shm = SharedMemory(name)
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    _say(ready=True)
    _wait()
    shm.close()


def process_gone(pid: int, start_time: Optional[int] = None) -> bool:
    """Whether process ``pid`` has exited with all its threads (descriptors closed).

    A zombie counts as exited, but only once its last thread is gone: a killed
    multi-threaded process shows its leader as a zombie while other threads
    still hold its descriptors.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    fields = raw[raw.rfind(b")") + 2 :].split()
    if start_time is not None and int(fields[19]) != start_time:
        return True
    return fields[0] in (b"Z", b"X") and len(threads) <= 1
