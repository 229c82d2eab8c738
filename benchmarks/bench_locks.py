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
* holder SIGKILLed -> a waiter owns the lock: the waiter is blocked in
  acquire() when a thread of its process SIGKILLs the holder; the time from
  the kill to acquire() returning. multiprocessing.Lock never comes back:
  shown as its timeout. The floor row is the kernel's own time to kill a
  sleeping process (its pidfd becomes readable once it has exited): on a
  small VM, waking an idle vCPU for the dying process dominates both.

Ratios and the issue's goals are printed under the table. Standard library
plus shmem only; Linux only (like shmem).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing
import os
import secrets
import select
import signal
import statistics
import struct
import subprocess
import sys
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


def uncontended(quick: bool, pure_only: bool = False) -> Dict[str, List[float]]:
    number, repeat = (100_000, 5) if quick else (1_000_000, 9)
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
    return rows


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
        os.read(r, 1)
        os.close(r)
        os.close(w)
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


# ------------------------------------------------------------------ the run


def pure_child(quick: bool) -> Dict[str, Any]:
    """The pure-Python path's rows, measured in a child with SHMEM_PURE_PYTHON=1."""
    env = {**os.environ, "SHMEM_PURE_PYTHON": "1", "SHMBENCH_PREFIX": PREFIX + "pure_"}
    argv = [sys.executable, __file__, "--pure-child"] + (["--quick"] if quick else [])
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"the pure-Python child failed:\n{run.stderr}")
    result: Dict[str, Any] = json.loads(run.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and rounds (a smoke run)")
    parser.add_argument("--pure-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    handoff_rounds = 2_000 if quick else 20_000
    kill_rounds = 10 if quick else 50
    try:
        if args.pure_child:
            out = {
                "uncontended": uncontended(quick, pure_only=True),
                "handoff": handoff(shmem.Lock, handoff_rounds // 4),
                "kill": kill_to_owner(shmem.Lock, kill_rounds, 5.0),
            }
            print(json.dumps(out))
            return
        run(quick, handoff_rounds, kill_rounds)
    finally:
        remove_prefixed(PREFIX)


def run(quick: bool, handoff_rounds: int, kill_rounds: int) -> None:
    if not lock_layout.ACCELERATED:
        print("note: shmem._sync is not in use (not built, or SHMEM_PURE_PYTHON set): the C rows are pure Python")
    pure = pure_child(quick)
    quick_note = " (quick)" if quick else ""
    print(f"shmem {shmem.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs{quick_note}")

    rows = uncontended(quick)
    rows.update(pure["uncontended"])
    print(f"\n{'uncontended acquire + release':<40} {'min':>10} {'median':>10} {'/ mp.Lock':>10}")
    mp_min = min(rows["multiprocessing.Lock"])
    for label, samples in rows.items():
        print(
            f"{label:<40} {fmt_ns(min(samples)):>10} {fmt_ns(statistics.median(samples)):>10} "
            f"{min(samples) / mp_min:>10.2f}"
        )

    hand: Dict[str, List[int]] = {
        "shmem.Lock (C)" if lock_layout.ACCELERATED else "shmem.Lock (pure)": handoff(shmem.Lock, handoff_rounds),
        "shmem.Lock (pure)": pure["handoff"],
        "multiprocessing.Lock": handoff(FORK.Lock, handoff_rounds),
        "os.pipe": pipe_handoff(handoff_rounds),
    }
    print(f"\n{'hand-off between two processes':<40} {'median':>10} {'p25 - p75':>22}")
    for label, samples in hand.items():
        s = summarize([x // 2 for x in samples])  # a round trip is two hand-offs
        print(f"{label:<40} {fmt_ns(s['median']):>10} {fmt_ns(s['p25']):>10} - {fmt_ns(s['p75']):<10}")

    mp_timeout = 0.5 if quick else 2.0
    kills: Dict[str, List[Optional[int]]] = {
        "shmem.Lock (C)" if lock_layout.ACCELERATED else "shmem.Lock (pure)": kill_to_owner(
            shmem.Lock, kill_rounds, 5.0
        ),
        "shmem.Lock (pure)": pure["kill"],
        "multiprocessing.Lock": kill_to_owner(FORK.Lock, 2 if quick else 3, mp_timeout),
        "(floor: kill -> the holder's pidfd fires)": kill_to_exit(kill_rounds),
    }
    print(f"\n{'holder SIGKILLed -> a waiter owns it':<40} {'median':>10} {'max':>10}")
    for label, got in kills.items():
        if any(x is None for x in got):
            print(f"{label:<40} {'never':>10} {'':>10}  (gave up after {fmt_ns(mp_timeout * 1e9)} timeouts)")
        else:
            print(f"{label:<40} {fmt_ns(statistics.median(got)):>10} {fmt_ns(max(got)):>10}")  # type: ignore

    print()
    c_label = "shmem.Lock (C)"
    if c_label in rows:
        ratio = min(rows[c_label]) / mp_min
        print(f"goal: uncontended <= 2x multiprocessing.Lock: {ratio:.2f}x -> {'met' if ratio <= 2 else 'NOT met'}")
        med = statistics.median(hand[c_label]) / 2
        print(f"goal: hand-off median <= 10 µs (C): {fmt_ns(med)} -> {'met' if med <= 10_000 else 'NOT met'}")
        kill_med = statistics.median(kills[c_label])  # type: ignore[type-var]
        print(f"goal: kill -> owner <= 1 ms (C): {fmt_ns(kill_med)} -> {'met' if kill_med <= 1e6 else 'NOT met'}")
    pure_med = statistics.median(kills["shmem.Lock (pure)"])  # type: ignore[type-var]
    print(f"goal: kill -> owner <= 60 ms (pure): {fmt_ns(pure_med)} -> {'met' if pure_med <= 60e6 else 'NOT met'}")
    print("       multiprocessing.Lock: never (its waiter gave up at the timeout every time)")


if __name__ == "__main__":
    main()
