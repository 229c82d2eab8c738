#!/usr/bin/env python3
"""Benchmark shmem.Lock against multiprocessing.Lock and friends, in one run (issue 12's goals).

    python benchmarks/bench_locks.py [--quick]

Rows:

* uncontended acquire + release: one thread, nobody else wants the lock -
  shmem.Lock (C path, and the pure-Python path in a child process with
  SHMEM_PURE_PYTHON=1), multiprocessing.Lock, threading.Lock, and an OFD
  fcntl lock on a file in /dev/shm (lock + unlock: two system calls).
* hand-off: two processes pass the turn back and forth through three locks,
  each releasing only locks it holds (a mutex's rule); a round trip is two
  hand-offs, the row shows half of it. multiprocessing.Lock runs the same
  protocol; two os.pipe()s are the kernel's floor.
* 8 processes x 100k acquire/release of one lock, each adding 1 to a shared
  counter under it: the throughput of shmem.Lock against
  multiprocessing.Lock's, and the counter's total (no lost updates).
* holder SIGKILLed -> a waiter owns the lock: the waiter is blocked in
  acquire() when a thread of its process SIGKILLs the holder; the time from
  the kill to acquire() returning. multiprocessing.Lock never comes back:
  shown as its timeout. The floor row is the kernel's own time to kill a
  sleeping process (its pidfd becomes readable once it has exited): on a
  small VM, waking an idle vCPU for the dying process dominates both.

Rows of the other primitives (issue 12 sets no goal for them: ratios only):

* Event ping-pong: two processes pass the turn through two events (P sets
  A and waits for B, Q waits for A, clears it and sets B; P clears B); the
  row shows half a round trip, shmem.Event against multiprocessing.Event.
* Semaphore uncontended acquire + release, against multiprocessing.Semaphore.
* semaphore holder SIGKILLed -> a waiter gets the permit (as the lock's row;
  a semaphore has no owner the kernel hands it to: the waiter finds the dead
  holder's slot after a wait slice, 50 ms). multiprocessing.Semaphore never
  gives it back: shown as its timeout.
* Barrier round trip: two processes pass a Barrier(2) over and over; the
  time per wait() in one of them, against multiprocessing.Barrier.

Peers, when installed (``pip install filelock posix_ipc``, or the ``bench``
extra): ``filelock.FileLock`` (uncontended, and holder killed: flock is
released by the kernel, filelock notices by polling) and
``posix_ipc.Semaphore`` (uncontended).

Ratios and the issue's goals are printed under the table. ``--quick`` is a
short run (fewer repeats, 8 x 10k contended); ``--smoke`` a run of seconds
that only shows every row works (the tests use it): neither gives figures
to quote. Linux only (like shmem).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import multiprocessing
import os
import secrets
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import warnings
from typing import Any, Callable, Dict, List, Optional

from _common import SHM_DIR, fmt_ns, remove_prefixed, summarize

# Every block this script makes starts with this: generated lock names too.
PREFIX = os.environ.get("SHMBENCH_PREFIX") or f"shmbench_{os.getpid()}_{secrets.token_hex(3)}_"
os.environ["SHMEM_NAME_PREFIX"] = PREFIX

import shmem  # noqa: E402  (after the prefix is in the environment)
from shmem._kinds import lock_layout  # noqa: E402

now = time.perf_counter_ns
FORK = multiprocessing.get_context("fork")


# ------------------------------------------------------------------ uncontended


def per_pair_ns(acquire: Callable[[], Any], release: Callable[[], Any], number: int, repeat: int) -> List[float]:
    """ns per acquire+release pair, one sample per repeat (timeit's loop: no Python loop overhead added)."""
    timer = timeit.Timer("a(); r()", globals={"a": acquire, "r": release})
    return [t / number * 1e9 for t in timer.repeat(repeat=repeat, number=number)]


class OfdLock:
    """An OFD write lock on one byte of a file in /dev/shm: lock and unlock are a system call each."""

    _FLOCK = struct.Struct("hhqqi4x")

    def __init__(self) -> None:
        self.path = os.path.join(SHM_DIR, PREFIX + "ofd")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._lock = self._FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        self._unlock = self._FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 1, 0)

    def acquire(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLKW, self._lock)

    def release(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, self._unlock)

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


def optional(module: str) -> Any:
    """A peer's module, or None when it is not installed (the row is skipped, and says so)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


filelock, posix_ipc = optional("filelock"), optional("posix_ipc")


class FileLockAdapter:
    """filelock.FileLock behind the (block, timeout) signature the rows call."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, f"{secrets.token_hex(4)}.lock")
        self.made_in, self.lock = os.getpid(), filelock.FileLock(self.path)

    def acquire(self, block: bool = True, timeout: Optional[float] = None) -> bool:
        if self.made_in != os.getpid():  # filelock refuses an instance inherited across fork: one per process
            self.made_in, self.lock = os.getpid(), filelock.FileLock(self.path)
        try:
            self.lock.acquire(timeout=-1 if timeout is None else timeout, blocking=block)
        except filelock.Timeout:
            return False
        return True

    def release(self) -> None:
        self.lock.release()


def peer_rows(number: int, repeat: int) -> Dict[str, List[float]]:
    """Uncontended rows of the peers that are installed."""
    rows: Dict[str, List[float]] = {}
    if filelock is not None:
        directory = tempfile.mkdtemp(prefix=PREFIX)
        try:
            fl = FileLockAdapter(directory)
            rows["filelock.FileLock"] = per_pair_ns(fl.acquire, fl.release, max(number // 100, 100), repeat)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    if posix_ipc is not None:
        sem = posix_ipc.Semaphore("/" + PREFIX + "sem", posix_ipc.O_CREX, initial_value=1)
        try:
            rows["posix_ipc.Semaphore"] = per_pair_ns(sem.acquire, sem.release, number, repeat)
        finally:
            sem.unlink()
            sem.close()
    return rows


def uncontended(quick: bool, pure_only: bool = False, smoke: bool = False) -> Dict[str, List[float]]:
    number, repeat = (2_000, 3) if smoke else (100_000, 5) if quick else (1_000_000, 9)
    rows: Dict[str, List[float]] = {}
    lock = shmem.Lock()
    label = "shmem.Lock (C)" if lock_layout.ACCELERATED else "shmem.Lock (pure)"
    rows[label] = per_pair_ns(lock.acquire, lock.release, number // (1 if lock_layout.ACCELERATED else 10), repeat)
    lock.close()
    if pure_only:
        return rows
    rlock = shmem.RLock()
    rows["shmem.RLock (C)" if lock_layout.ACCELERATED else "shmem.RLock (pure)"] = per_pair_ns(
        rlock.acquire, rlock.release, number, repeat
    )
    rlock.close()
    mp = multiprocessing.Lock()
    rows["multiprocessing.Lock"] = per_pair_ns(mp.acquire, mp.release, number, repeat)
    th = threading.Lock()
    rows["threading.Lock"] = per_pair_ns(th.acquire, th.release, number, repeat)
    ofd = OfdLock()
    try:
        rows["OFD fcntl lock"] = per_pair_ns(ofd.acquire, ofd.release, number // 10, repeat)
    finally:
        ofd.close()
    rows.update(peer_rows(number, repeat))
    return rows


# ------------------------------------------------------------------ contended


def _contender(lock: Any, counter: Any, n: int, go: Any) -> None:
    """One of the contending processes: ``n`` times, take the lock and add 1 to the counter."""
    c = counter.buf.cast("q")
    go.wait(60)
    for _ in range(n):
        with lock:
            c[0] += 1
    c.release()


def contended(make: Callable[[], Any], procs: int, n: int) -> Dict[str, float]:
    """``procs`` forked processes, ``n`` locked increments each of one counter:
    acquire/release pairs per second (from the start signal to the last exit)
    and the counter's final value."""
    lock = make()
    counter = shmem.SharedMemory(create=True, size=64)
    go = FORK.Event()
    workers = [FORK.Process(target=_contender, args=(lock, counter, n, go)) for _ in range(procs)]
    for p in workers:
        p.start()
    time.sleep(0.2)  # every worker is waiting for the signal
    start = now()
    go.set()
    for p in workers:
        p.join(600)
    elapsed = now() - start
    c = counter.buf.cast("q")  # type: ignore[union-attr]
    total = c[0]
    c.release()
    counter.close()
    counter.unlink()
    getattr(lock, "close", lambda: None)()
    failed = [p.exitcode for p in workers if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"contending workers failed: exit codes {failed}")
    return {"per_second": procs * n / elapsed * 1e9, "total": total, "expected": procs * n, "seconds": elapsed / 1e9}


# ------------------------------------------------------------------ hand-off


def _partner(locks: List[Any], rounds: int, ready: Any) -> None:
    """Q's side of the three-lock ping-pong (see handoff)."""
    locks[2].acquire()
    ready.set()
    for i in range(rounds):
        locks[i % 3].acquire()
        locks[(i + 2) % 3].release()
    locks[(rounds + 2) % 3].release()  # after round i, Q holds L[i%3]


def handoff(make: Callable[[], Any], rounds: int) -> List[int]:
    """Round trips (ns) of the turn between this process (P) and a forked partner (Q).

    Three locks L0..L2; P starts holding L0 and L1, Q holds L2. Round i: P
    releases L[i%3] and takes L[(i+2)%3]; Q takes L[i%3] and releases
    L[(i+2)%3]. Each only releases what it holds, and P's take waits for Q's
    release, which waits for P's: one round is one round trip."""
    locks = [make() for _ in range(3)]
    locks[0].acquire()
    locks[1].acquire()
    ready = FORK.Event()
    q = FORK.Process(target=_partner, args=(locks, rounds, ready))
    q.start()
    ready.wait(30)
    samples = []
    for i in range(rounds):
        start = now()
        locks[i % 3].release()
        locks[(i + 2) % 3].acquire()
        samples.append(now() - start)
    q.join(30)
    for i in (rounds % 3, (rounds + 1) % 3):  # what P holds at the end
        locks[i].release()
    for lock in locks:
        getattr(lock, "close", lambda: None)()
    return samples


def _pipe_partner(r: int, w: int, rounds: int) -> None:
    for _ in range(rounds):
        os.read(r, 1)
        os.write(w, b"x")


def pipe_handoff(rounds: int) -> List[int]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    q = FORK.Process(target=_pipe_partner, args=(r1, w2, rounds))
    q.start()
    samples = []
    for _ in range(rounds):
        start = now()
        os.write(w1, b"x")
        os.read(r2, 1)
        samples.append(now() - start)
    q.join(30)
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    return samples


# ------------------------------------------------------------------ holder killed


def kill_to_owner(make: Callable[[], Any], rounds: int, timeout: float) -> List[Optional[int]]:
    """ns from SIGKILL of the holder to the waiter's acquire() returning; None: it never did."""
    samples: List[Optional[int]] = []
    for _ in range(rounds):
        lock = make()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the holder: takes the lock, says so, sleeps until killed
            try:
                lock.acquire()
                os.write(w, b"1")
                time.sleep(60)
            finally:
                os._exit(0)
        os.close(w)
        ready = select.select([r], [], [], 30)[0] and os.read(r, 1)
        os.close(r)
        if not ready:  # the holder failed (or hung) before it took the lock
            kill_and_reap(pid)
            raise RuntimeError(f"the holder of {make!r} never took it")
        killed: List[int] = []

        def kill(pid: int = pid, killed: List[int] = killed) -> None:
            time.sleep(0.02)  # the main thread is blocked in acquire() by now
            killed.append(now())
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill)
        killer.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = lock.acquire(True, timeout)
        done = now()
        killer.join()
        os.waitpid(pid, 0)
        samples.append(done - killed[0] if got else None)
        if got:
            lock.release()
        getattr(lock, "close", lambda: None)()
    return samples


def kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def kill_to_exit(rounds: int) -> List[Optional[int]]:
    """The floor: ns from SIGKILL of a sleeping child to its pidfd saying it exited."""
    samples: List[Optional[int]] = []
    for _ in range(rounds):
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(60)
            finally:
                os._exit(0)
        pidfd = os.pidfd_open(pid)
        time.sleep(0.02)
        start = now()
        os.kill(pid, signal.SIGKILL)
        select.select([pidfd], [], [], 10)
        samples.append(now() - start)
        os.close(pidfd)
        os.waitpid(pid, 0)
    return samples


# ------------------------------------------------------------------ events, semaphores, barriers


def _event_partner(a: Any, b: Any, rounds: int) -> None:
    for _ in range(rounds):
        a.wait()
        a.clear()
        b.set()


def event_pingpong(make: Callable[[], Any], rounds: int) -> List[int]:
    """Round trips (ns) of the turn between this process and a forked partner through two events."""
    a, b = make(), make()
    q = FORK.Process(target=_event_partner, args=(a, b, rounds))
    q.start()
    samples = []
    for _ in range(rounds):
        start = now()
        a.set()
        b.wait()
        b.clear()
        samples.append(now() - start)
    q.join(30)
    for e in (a, b):
        getattr(e, "close", lambda: None)()
    return samples


def _barrier_partner(barrier: Any, rounds: int) -> None:
    for _ in range(rounds):
        barrier.wait()


def barrier_rounds(make: Callable[[], Any], rounds: int) -> List[int]:
    """ns per wait() of a Barrier(2) passed by this process and a forked partner, ``rounds`` times."""
    barrier = make()
    q = FORK.Process(target=_barrier_partner, args=(barrier, rounds + 1))
    q.start()
    barrier.wait()  # both are running
    samples = []
    for _ in range(rounds):
        start = now()
        barrier.wait()
        samples.append(now() - start)
    q.join(30)
    getattr(barrier, "close", lambda: None)()
    return samples


def sync_rows(plan: Plan) -> None:
    """The rows of Event, Semaphore and Barrier (no goals: ratios to multiprocessing's)."""
    impl = "C" if lock_layout.ACCELERATED else "pure"
    number, repeat = (2_000, 3) if plan.smoke else (100_000, 5) if plan.quick else (1_000_000, 9)
    print(f"\n{'events, semaphores, barriers (no goal)':<40} {'median':>10} {'p25 - p75':>22} {'/ mp':>8}")

    def show(label: str, samples: List[int], base: Optional[float]) -> float:
        s = summarize(samples)
        ratio = f"{s['median'] / base:>8.2f}" if base else f"{'':>8}"
        print(f"{label:<40} {fmt_ns(s['median']):>10} {fmt_ns(s['p25']):>10} - {fmt_ns(s['p75']):<10} {ratio}")
        return float(s["median"])

    mp_ping = [x // 2 for x in event_pingpong(FORK.Event, plan.handoff_rounds)]
    ping = [x // 2 for x in event_pingpong(shmem.Event, plan.handoff_rounds)]
    base = show("multiprocessing.Event ping-pong", mp_ping, None)
    show(f"shmem.Event ping-pong ({impl})", ping, base)

    mp_sem = FORK.Semaphore(1)
    mp_pairs = per_pair_ns(mp_sem.acquire, mp_sem.release, number, repeat)
    sem = shmem.Semaphore(1)
    pairs = per_pair_ns(sem.acquire, sem.release, number // (1 if lock_layout.ACCELERATED else 10), repeat)
    sem.close()
    print(f"{'multiprocessing.Semaphore acq + rel':<40} {fmt_ns(min(mp_pairs)):>10} {'(min)':>22}")
    ratio = min(pairs) / min(mp_pairs)
    print(f"{'shmem.Semaphore acq + rel (' + impl + ')':<40} {fmt_ns(min(pairs)):>10} {'(min)':>22} {ratio:>8.2f}")

    mp_bar = barrier_rounds(lambda: FORK.Barrier(2), plan.handoff_rounds // 2)
    bar = barrier_rounds(lambda: shmem.Barrier(2), plan.handoff_rounds // 2)
    base = show("multiprocessing.Barrier(2) wait", mp_bar, None)
    show(f"shmem.Barrier(2) wait ({impl})", bar, base)

    kills = kill_to_owner(lambda: shmem.Semaphore(1), plan.sem_kill_rounds, 5.0)
    mp_kills = kill_to_owner(lambda: FORK.Semaphore(1), plan.mp_kill_rounds, plan.mp_timeout)
    print(f"{'sem holder SIGKILLed -> a waiter has it':<40} {'median':>10} {'max':>10}")
    got = [x for x in kills if x is not None]
    if len(got) == len(kills):
        print(f"{'shmem.Semaphore (' + impl + ')':<40} {fmt_ns(statistics.median(got)):>10} {fmt_ns(max(got)):>10}")
    else:
        print(
            f"{'shmem.Semaphore (' + impl + ')':<40} {'never':>10}  ({len(kills) - len(got)} of {len(kills)} timed out)"
        )
    never = all(x is None for x in mp_kills)
    shown = (
        f"{'never':>10} {'':>10}  (gave up after {fmt_ns(plan.mp_timeout * 1e9)} timeouts)" if never else "came back"
    )
    print(f"{'multiprocessing.Semaphore':<40} {shown}")


# ------------------------------------------------------------------ the run


class Plan:
    """How much of each row a run measures: full, ``--quick`` or ``--smoke``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.quick, self.smoke = mode != "full", mode == "smoke"
        self.handoff_rounds = {"full": 20_000, "quick": 2_000, "smoke": 200}[mode]
        self.kill_rounds = {"full": 50, "quick": 10, "smoke": 2}[mode]
        self.peer_kill_rounds = {"full": 20, "quick": 5, "smoke": 1}[mode]
        self.mp_kill_rounds = {"full": 3, "quick": 2, "smoke": 1}[mode]
        self.sem_kill_rounds = {"full": 20, "quick": 5, "smoke": 2}[mode]
        self.mp_timeout = {"full": 2.0, "quick": 0.5, "smoke": 0.2}[mode]
        self.procs = 8
        self.per_proc = {"full": 100_000, "quick": 10_000, "smoke": 500}[mode]

    def flag(self) -> List[str]:
        return [] if self.mode == "full" else [f"--{self.mode}"]


def pure_child(plan: Plan) -> Dict[str, Any]:
    """The pure-Python path's rows, measured in a child with SHMEM_PURE_PYTHON=1."""
    env = {**os.environ, "SHMEM_PURE_PYTHON": "1", "SHMBENCH_PREFIX": PREFIX + "pure_"}
    argv = [sys.executable, __file__, "--pure-child"] + plan.flag()
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"the pure-Python child failed:\n{run.stderr}")
    result: Dict[str, Any] = json.loads(run.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and rounds (a short run)")
    parser.add_argument("--smoke", action="store_true", help="a few rounds of every row: that they run, no figures")
    parser.add_argument("--pure-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = Plan("smoke" if args.smoke else "quick" if args.quick else "full")
    try:
        if args.pure_child:
            out = {
                "uncontended": uncontended(plan.quick, pure_only=True, smoke=plan.smoke),
                "handoff": handoff(shmem.Lock, plan.handoff_rounds // 4),
                "kill": kill_to_owner(shmem.Lock, plan.kill_rounds, 5.0),
                "contended": contended(shmem.Lock, plan.procs, max(plan.per_proc // 10, 100)),
            }
            print(json.dumps(out))
            return
        run(plan)
    finally:
        remove_prefixed(PREFIX)


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def run(plan: Plan) -> None:
    if not lock_layout.ACCELERATED:
        print("note: shmem._sync is not in use (not built, or SHMEM_PURE_PYTHON set): the C rows are pure Python")
    pure = pure_child(plan)
    mode_note = {"full": "", "quick": " (quick)", "smoke": " (smoke: no figures to quote)"}[plan.mode]
    print(f"shmem {shmem.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs{mode_note}")
    missing = [name for name, module in (("filelock", filelock), ("posix_ipc", posix_ipc)) if module is None]
    if missing:
        print(f"peers not installed, their rows are skipped: {', '.join(missing)} (pip install {' '.join(missing)})")
    c_label = "shmem.Lock (C)" if lock_layout.ACCELERATED else "shmem.Lock (pure)"

    rows = uncontended(plan.quick, smoke=plan.smoke)
    rows.update(pure["uncontended"])
    print(f"\n{'uncontended acquire + release':<40} {'min':>10} {'median':>10} {'/ mp.Lock':>10}")
    mp_min = min(rows["multiprocessing.Lock"])
    for label, samples in rows.items():
        print(
            f"{label:<40} {fmt_ns(min(samples)):>10} {fmt_ns(statistics.median(samples)):>10} "
            f"{min(samples) / mp_min:>10.2f}"
        )

    hand: Dict[str, List[int]] = {
        c_label: handoff(shmem.Lock, plan.handoff_rounds),
        "shmem.Lock (pure)": pure["handoff"],
        "multiprocessing.Lock": handoff(FORK.Lock, plan.handoff_rounds),
        "os.pipe": pipe_handoff(plan.handoff_rounds),
    }
    print(f"\n{'hand-off between two processes':<40} {'median':>10} {'p25 - p75':>22}")
    for label, samples in hand.items():
        s = summarize([x // 2 for x in samples])  # a round trip is two hand-offs
        print(f"{label:<40} {fmt_ns(s['median']):>10} {fmt_ns(s['p25']):>10} - {fmt_ns(s['p75']):<10}")

    many: Dict[str, Dict[str, float]] = {
        c_label: contended(shmem.Lock, plan.procs, plan.per_proc),
        "multiprocessing.Lock": contended(FORK.Lock, plan.procs, plan.per_proc),
        "shmem.Lock (pure)": pure["contended"],
    }
    title = f"{plan.procs} processes x {plan.per_proc:,} on one lock"
    print(f"\n{title:<40} {'pairs/s':>12} {'/ mp.Lock':>10} {'counter':>24}")
    mp_rate = many["multiprocessing.Lock"]["per_second"]
    for label, r in many.items():
        counted = f"{int(r['total']):,} of {int(r['expected']):,}"
        print(f"{label:<40} {r['per_second']:>12,.0f} {r['per_second'] / mp_rate:>10.2f} {counted:>24}")

    kills: Dict[str, List[Optional[int]]] = {
        c_label: kill_to_owner(shmem.Lock, plan.kill_rounds, 5.0),
        "shmem.Lock (pure)": pure["kill"],
        "multiprocessing.Lock": kill_to_owner(FORK.Lock, plan.mp_kill_rounds, plan.mp_timeout),
    }
    if filelock is not None:
        directory = tempfile.mkdtemp(prefix=PREFIX)
        try:
            kills["filelock.FileLock"] = kill_to_owner(lambda: FileLockAdapter(directory), plan.peer_kill_rounds, 5.0)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    kills["(floor: kill -> the holder's pidfd fires)"] = kill_to_exit(plan.kill_rounds)
    print(f"\n{'holder SIGKILLed -> a waiter owns it':<40} {'median':>10} {'max':>10}")
    for label, got in kills.items():
        if any(x is None for x in got):
            print(f"{label:<40} {'never':>10} {'':>10}  (gave up after {fmt_ns(plan.mp_timeout * 1e9)} timeouts)")
        else:
            print(f"{label:<40} {fmt_ns(statistics.median(got)):>10} {fmt_ns(max(got)):>10}")  # type: ignore

    sync_rows(plan)

    print()
    if lock_layout.ACCELERATED:
        ratio = min(rows[c_label]) / mp_min
        print(f"goal: uncontended <= 2x multiprocessing.Lock (C): {ratio:.2f}x -> {_verdict(ratio <= 2)}")
        med = statistics.median(hand[c_label]) / 2
        print(f"goal: hand-off median <= 10 µs (C): {fmt_ns(med)} -> {_verdict(med <= 10_000)}")
        kill_med = statistics.median(kills[c_label])  # type: ignore[type-var]
        print(f"goal: kill -> owner <= 1 ms (C): {fmt_ns(kill_med)} -> {_verdict(kill_med <= 1e6)}")
        mine = many[c_label]
        rate = mine["per_second"] / mp_rate
        exact = all(r["total"] == r["expected"] for r in many.values())
        print(
            f"goal: {plan.procs} processes contending >= 0.5x multiprocessing.Lock's throughput, no lost updates (C): "
            f"{rate:.2f}x, {'no lost updates' if exact else 'LOST UPDATES'} -> {_verdict(rate >= 0.5 and exact)}"
        )
    pure_med = statistics.median(kills["shmem.Lock (pure)"])  # type: ignore[type-var]
    print(f"goal: kill -> owner <= 60 ms (pure): {fmt_ns(pure_med)} -> {_verdict(pure_med <= 60e6)}")
    print("       multiprocessing.Lock: never (its waiter gave up at the timeout every time)")


if __name__ == "__main__":
    main()
