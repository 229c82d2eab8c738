#!/usr/bin/env python3
"""Benchmark shmem.SharedMemory against multiprocessing.shared_memory, in one run.

    python benchmarks/bench_core.py [--quick] [--json PATH] [--sizes 4K,1G]

See benchmarks/README.md for what each row measures and how to read it.
Standard library plus shmem only; Linux only (like shmem).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import itertools
import json
import multiprocessing
import os
import platform
import secrets
import select
import signal
import statistics
import subprocess
import sys
import time
from multiprocessing import resource_tracker
from multiprocessing import shared_memory as stdlib_shm
from typing import Callable, Dict, List, Optional, Tuple

from _common import SHM_DIR, GiB, KiB, MiB, fmt_ns, parse_size, remove_prefixed, shm_free_bytes, size_label, summarize

import shmem

SMALL_LIMIT = 1 * MiB  # sizes up to this get the per-operation suite, larger ones the large-block suite
# Every block this script makes starts with this (pid + random token), so cleanup
# removes exactly ours. Fresh-process probes get the parent's prefix via the environment.
PREFIX = os.environ.get("SHMBENCH_PREFIX") or f"shmbench_{os.getpid()}_{secrets.token_hex(3)}_"
_serial = itertools.count()
now = time.perf_counter_ns


class _TrackerOff:
    """Switches the stdlib's resource-tracker calls off for the duration of a call.

    Patches the functions on the resource_tracker module itself: 3.10-3.12 call
    them through that module, 3.9 imports them from it inside each call."""

    def __enter__(self) -> None:
        self.saved = (resource_tracker.register, resource_tracker.unregister)
        resource_tracker.register = resource_tracker.unregister = lambda *a: None  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        resource_tracker.register, resource_tracker.unregister = self.saved  # type: ignore[assignment]


class _StdlibUntrackedEmulated(stdlib_shm.SharedMemory):
    """The stdlib's track=False for Python < 3.13, which lacks the parameter: the
    same class with its resource-tracker calls switched off, which is all that
    track=False changes in 3.13. The swap and the extra call frame add ~0.4 µs
    per call to the stdlib's time, which flatters shmem's ratios slightly."""

    def __init__(self, name: Optional[str] = None, create: bool = False, size: int = 0) -> None:
        with _TrackerOff():
            super().__init__(name, create, size)

    def unlink(self) -> None:
        with _TrackerOff():
            super().unlink()


# Like for like: shmem track=True against the stdlib's default (tracked: its
# resource tracker hears of every create *and attach*), track=False against track=False.
STDLIB_HAS_TRACK = sys.version_info >= (3, 13)
STDLIB_TRACKED = "stdlib (default, tracked)"
STDLIB_UNTRACKED = "stdlib track=False" + ("" if STDLIB_HAS_TRACK else "*")
IMPLS: Dict[str, Tuple[type, dict]] = {
    "shmem track=True": (shmem.SharedMemory, {"track": True}),
    "shmem track=False": (shmem.SharedMemory, {"track": False}),
    STDLIB_TRACKED: (stdlib_shm.SharedMemory, {}),
    STDLIB_UNTRACKED: (stdlib_shm.SharedMemory, {"track": False})
    if STDLIB_HAS_TRACK
    else (_StdlibUntrackedEmulated, {}),
}

Row = Tuple[str, str]  # (operation, size label)
Op = Callable[[], Dict[Row, List[int]]]  # one timed round of one implementation
Results = Dict[Row, Dict[str, List[int]]]  # row -> implementation -> samples in ns


def cleanup() -> None:
    remove_prefixed(PREFIX)


def new_name() -> str:
    return f"{PREFIX}{next(_serial)}"


def time_create_close_unlink(cls: type, kw: dict, size: int) -> int:
    name = new_name()
    t0 = now()
    block = cls(name, create=True, size=size, **kw)
    block.close()
    block.unlink()
    return now() - t0


def time_attach_close(cls: type, kw: dict, name: str) -> int:
    t0 = now()
    cls(name, **kw).close()
    return now() - t0


_CHUNK = memoryview(b"\x01" * MiB)


def first_write(buf: memoryview) -> None:
    # 1 MiB slice assignments (memcpy): loop overhead is negligible next to the
    # page faults, and both implementations get exactly the same writes.
    for off in range(0, len(buf), MiB):
        end = min(off + MiB, len(buf))
        buf[off:end] = _CHUNK[: end - off]


def _worker_loop(conn) -> None:  # runs in the worker process
    for key, name, count in iter(conn.recv, None):
        conn.send([time_attach_close(*IMPLS[key], name) for _ in range(count)])


class Worker:
    """A long-lived process that attaches blocks by name on request and sends
    back its own timings: its start-up and the pipe are never timed."""

    def __enter__(self) -> Worker:
        # spawn: a clean interpreter, no inherited mappings or reaper pipe. On
        # Python < 3.13 it shares our resource tracker, so its registrations of
        # stdlib blocks are undone by our unlink() and nothing warns at exit.
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_loop, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        return self

    def attach_close(self, key: str, name: str, count: int) -> List[int]:
        self._conn.send((key, name, count))
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass  # it died already; the error that killed it is the one to see
        self._proc.join(10)


def interleaved(ops: Dict[str, Op], reps: int, warmup: int = 1) -> Results:
    """Run each implementation's op once per round, rotating who goes first, so
    slow phases of a noisy shared machine hit every implementation alike."""
    results: Results = {}
    keys = list(ops)
    gc.disable()  # as timeit does: no collection pause lands in one sample
    try:
        for r in range(warmup + reps):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                rows = ops[key]()
                if r < warmup:
                    continue  # warm-up rounds are discarded
                for row, samples in rows.items():
                    results.setdefault(row, {}).setdefault(key, []).extend(samples)
            if r + 1 == warmup:
                time.sleep(0.3)  # helpers the warm-up started (reaper, resource tracker) finish booting
    finally:
        gc.enable()
    return results


def _as_row(row: Row, timed: Callable[[str], List[int]], key: str) -> Dict[Row, List[int]]:
    return {row: timed(key)}


def run_small(size: int, reps: int, worker: Worker, batch: int = 10) -> Results:
    label = size_label(size)
    # The blocks attached to, made beforehand (one per implementation, alive throughout).
    targets = {key: cls(new_name(), create=True, size=size, **kw) for key, (cls, kw) in IMPLS.items()}
    suite = {  # operation: (rounds, timed op of one implementation)
        "create+close+unlink": (reps, lambda key: [time_create_close_unlink(*IMPLS[key], size)]),
        "attach+close, same process": (reps, lambda key: [time_attach_close(*IMPLS[key], targets[key].name)]),
        # A batch per request: fewer wake-ups; the worker's first attach after one is still in.
        "attach+close, other process": (reps // batch, lambda key: worker.attach_close(key, targets[key].name, batch)),
    }
    results: Results = {}
    try:
        # One loop per row rather than one loop doing all three: the kernel and cache
        # state one operation leaves behind (a pipe round trip, an unlink) would slow the next.
        for operation, (rounds, timed) in suite.items():
            ops = {key: functools.partial(_as_row, (operation, label), timed, key) for key in IMPLS}
            results.update(interleaved(ops, rounds))
    finally:
        for block in targets.values():
            block.close()
            block.unlink()
    return results


def large_op(key: str, size: int, worker: Worker) -> Dict[Row, List[int]]:
    """One large block's whole life; if it fails, cleanup() removes the name."""
    cls, kw = IMPLS[key]
    label = size_label(size)
    t0 = now()
    block = cls(new_name(), create=True, size=size, **kw)
    t1 = now()
    first_write(block.buf)
    t2 = now()
    remote = worker.attach_close(key, block.name, 20)
    t3 = now()
    block.close()
    t4 = now()
    block.unlink()
    t5 = now()
    return {
        ("create", label): [t1 - t0],
        ("create + first write of every page", label): [t2 - t0],
        ("attach+close, other process", label): remote,
        ("close (after the write)", label): [t4 - t3],
        ("unlink", label): [t5 - t4],
    }


def run_large(size: int, reps: int, worker: Worker) -> Results:
    return interleaved({key: functools.partial(large_op, key, size, worker) for key in IMPLS}, reps)


def probe_main(index: int, later: int) -> None:
    """Child side of run_first_create: a fresh process, nothing created yet."""
    cls, kw = list(IMPLS.values())[index]
    print(json.dumps([time_create_close_unlink(cls, kw, 4 * KiB) for _ in range(1 + later)]))


def first_create_op(index: int, later: int) -> Dict[Row, List[int]]:
    argv = [sys.executable, os.path.abspath(__file__), "--probe", str(index), "--later", str(later)]
    # A fresh process tree: without our SHMEM_REAPER, shmem's first tracked create starts a reaper.
    env = {**{k: v for k, v in os.environ.items() if k != REAPER_ENV}, "SHMBENCH_PREFIX": PREFIX + "p"}
    first, *rest = json.loads(subprocess.run(argv, env=env, stdout=subprocess.PIPE, check=True).stdout)
    return {
        ("first create+close+unlink, fresh process", "4 KiB"): [first],
        ("later create+close+unlink, same process", "4 KiB"): [int(statistics.median(rest))],
    }


def run_first_create(reps: int, later: int = 20) -> Results:
    """One-time cost of a process's first create (shmem track=True spawns its
    reaper there; the stdlib's default tracking starts its resource tracker).
    Each sample is a fresh subprocess; imports happen before the timing."""
    ops = {key: functools.partial(first_create_op, i, later) for i, key in enumerate(IMPLS)}
    return interleaved(ops, reps, warmup=0)


# ------------------------------------------------------------------ the reaper
# Issue 9's rows: one reaper per process tree, asleep while idle, small, and
# quick to remove a killed creator's blocks. Each probe is a fresh process tree:
# this script run as `--reaper-probe KIND ARG`, without SHMEM_REAPER in its
# environment, so it starts a reaper of its own instead of joining ours.

REAPER_ENV = "SHMEM_REAPER"  # names a process tree's reaper (children inherit it)
REAPER_MARK = b"shmem._core.reaper"  # in every reaper's command line
TREE_VAR = "SHMBENCH_TREE"  # marks a probe's environment: its reapers inherit it
NEEDS_SHARED_REAPER = "n/a (needs the shared reaper)"
POOL_SIZE = 8
REMOVAL_GOAL_S = 1.0  # "about a second at most" after the last holder died
# The previous release's create+close+unlink ratios at 4 KiB, from README.md's benchmark
# section (Python 3.11, where the stdlib's track=False is emulated; a 2-vCPU machine).
# None: the README does not record it.
PREVIOUS_CREATE_RATIO: Dict[str, Optional[float]] = {"shmem track=False": 1.68, "shmem track=True": None}


class ProbeFailed(Exception):
    pass


def tracking_module():  # -> Optional[module]
    """shmem's client of the shared reaper, or None before it exists."""
    try:
        from shmem._core import tracking
    except ImportError:
        return None
    return tracking if callable(getattr(tracking, "reaper_pid", None)) else None


def _say(message: dict) -> None:
    print(json.dumps(message), flush=True)


# Pool workers (pool-spawn, pool-fork): each holds one tracked block until told to unlink it.
_pool_barrier = None
_pool_prefix = ""
_pool_held: list = []


def _pool_init(barrier, prefix: str) -> None:
    global _pool_barrier, _pool_prefix
    _pool_barrier, _pool_prefix = barrier, prefix


def _pool_create(index: int) -> dict:
    block = shmem.SharedMemory(f"{_pool_prefix}{index}", create=True, size=4 * KiB)
    _pool_held.append(block)
    _pool_barrier.wait(60)  # one task per worker: all POOL_SIZE workers create a block
    return {"worker": os.getpid(), "reaper": tracking_module().reaper_pid(), "name": block.name}


def _pool_unlink(index: int) -> None:
    while _pool_held:
        block = _pool_held.pop()
        block.close()
        block.unlink()
    _pool_barrier.wait(60)  # again one task per worker, so each unlinks its own


def reaper_probe(kind: str, arg: str) -> None:
    """Child side of the reaper rows. Answers one JSON line on stdout, then
    waits for a line on stdin or its end (or for SIGKILL, for `creator`)."""
    tracking = tracking_module()
    if kind == "creator":  # removal delay: works with any design
        block = shmem.SharedMemory(arg, create=True, size=4 * KiB)
        _say({"pid": os.getpid(), "reaper": tracking.reaper_pid() if tracking else None})
        sys.stdin.read()  # the parent SIGKILLs us; closing stdin instead means it gave up
        block.close()
        block.unlink()
        return
    if tracking is None:
        return _say({"missing": True})
    if kind == "idle":
        block = shmem.SharedMemory(arg, create=True, size=4 * KiB)
        _say({"pid": os.getpid(), "reaper": tracking.reaper_pid()})
        sys.stdin.read()  # blocked in read() until the parent is done watching the reaper
        block.close()
        block.unlink()
        return
    ctx = multiprocessing.get_context(kind.split("-", 1)[1])  # pool-spawn, pool-fork
    pool = ctx.Pool(POOL_SIZE, initializer=_pool_init, initargs=(ctx.Barrier(POOL_SIZE), arg))
    try:
        made = pool.map(_pool_create, range(POOL_SIZE), chunksize=1)
        _say({"pid": os.getpid(), "workers": made})
        sys.stdin.readline()  # the parent counts the reapers meanwhile
        pool.map(_pool_unlink, range(POOL_SIZE), chunksize=1)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


class Probe:
    """A fresh process tree: this script with --reaper-probe, started without
    SHMEM_REAPER (unless inherit_reaper) and with a marker in its environment.
    Its stderr is ours: a child's traceback shows up in the benchmark's output."""

    def __init__(self, kind: str, arg: str, inherit_reaper: bool = False) -> None:
        self.marker = f"{TREE_VAR}={secrets.token_hex(8)}".encode()
        env = {k: v for k, v in os.environ.items() if inherit_reaper or k != REAPER_ENV}
        env[TREE_VAR] = self.marker.split(b"=", 1)[1].decode()
        argv = [sys.executable, os.path.abspath(__file__), "--reaper-probe", kind, arg]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env)

    def __enter__(self) -> Probe:
        return self

    def read(self, timeout: float = 60) -> dict:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise ProbeFailed(f"the probe process gave no answer within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise ProbeFailed(f"the probe process exited with status {self.proc.wait()} (its stderr is above)")
        return json.loads(line)

    def finish(self, timeout: float = 60) -> None:
        """Let the probe go on (a line on stdin) and end (stdin closed); wait for it."""
        try:
            self.proc.stdin.write(b"\n")
            self.proc.stdin.close()
        except OSError:
            pass  # it exited already; the status says how
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ProbeFailed(f"the probe process did not finish within {timeout:.0f} s") from None
        if status:
            raise ProbeFailed(f"the probe process exited with status {status} (its stderr is above)")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if not pipe.closed:
                pipe.close()


def _proc_read(pid: int, what: str) -> Optional[bytes]:
    try:
        with open(f"/proc/{pid}/{what}", "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return None


def proc_stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state, parent pid, start time) of a process, None if there is none."""
    stat = _proc_read(pid, "stat")
    if stat is None:
        return None
    fields = stat.rsplit(b")", 1)[1].split()  # the command name may hold spaces and ')'
    return fields[0].decode(), int(fields[1]), int(fields[19])


def is_reaper(pid: int) -> bool:
    return REAPER_MARK in (_proc_read(pid, "cmdline") or b"")


def context_switches(pid: int) -> int:
    """voluntary + nonvoluntary context switches of every thread of pid (the
    process's own /proc/PID/status counts its main thread only)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in (_proc_read(pid, f"task/{tid}/status") or b"").splitlines():
            if line.startswith((b"voluntary_ctxt_switches:", b"nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


def vm_rss_mib(pid: int) -> float:
    for line in (_proc_read(pid, "status") or b"").splitlines():
        if line.startswith(b"VmRSS:"):
            return int(line.split()[1]) / 1024  # kB (KiB) in /proc
    raise ProbeFailed(f"process {pid} has no VmRSS (gone?)")


def reapers_in_tree(root: int, marker: bytes) -> Dict[int, int]:
    """Reaper processes of a probe's tree -> their start time: found by command
    line among the descendants of `root` and among the processes whose
    environment holds the probe's marker (a reaper outlives its parent)."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                procs[int(entry)] = stat
    descendants, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for pid, (_, ppid, _) in procs.items():
            if ppid == parent and pid not in descendants:
                descendants.add(pid)
                todo.append(pid)
    return {
        pid: start
        for pid, (state, _, start) in procs.items()
        if state != "Z"
        and is_reaper(pid)
        and (pid in descendants or marker in (_proc_read(pid, "environ") or b"").split(b"\0"))
    }


def _alive(pid: int, start: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == start  # same start time: not a reused pid


def wait_exited(pids: Dict[int, int], timeout: float) -> Tuple[float, List[int]]:
    """Wait until every (pid, start time) has exited: (seconds waited, pids still running)."""
    t0 = time.monotonic()
    while True:
        left = sorted(pid for pid, start in pids.items() if _alive(pid, start))
        waited = time.monotonic() - t0
        if not left or waited > timeout:
            return waited, left
        time.sleep(0.01)


def measure_idle(seconds: float, settle: float = 0.5) -> dict:
    """A fresh tree makes one tracked block and idles; its reaper's context
    switches over `seconds`, and its VmRSS beside a bare interpreter's."""
    with Probe("idle", new_name()) as probe:
        info = probe.read()
        if info.get("missing"):
            return {"missing": True}
        pid = info["reaper"]
        if not pid:
            raise ProbeFailed("reaper_pid() is None after a tracked create")
        if not is_reaper(pid):
            raise ProbeFailed(f"reaper_pid() {pid}: its command line lacks {REAPER_MARK.decode()}")
        time.sleep(settle)  # the reaper finishes starting up: only idleness is counted
        before, t0 = context_switches(pid), time.monotonic()
        time.sleep(max(seconds - 1.0, 0.0))
        # The baseline, started in the window's last second: asleep by its end.
        bare = subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(5)"])
        try:
            time.sleep(min(1.0, seconds))
            try:
                after, t1 = context_switches(pid), time.monotonic()
            except FileNotFoundError:
                raise ProbeFailed(f"the reaper (pid {pid}) exited while its block existed") from None
            rss, bare_rss = vm_rss_mib(pid), vm_rss_mib(bare.pid)
        finally:
            bare.kill()
            bare.wait()
        probe.finish()
    return {
        "reaper_pid": pid,
        "switches": after - before,
        "seconds": t1 - t0,
        "wakeups_per_s": (after - before) / (t1 - t0),
        "rss_mib": rss,
        "bare_rss_mib": bare_rss,
    }


def measure_pool(method: str, exit_timeout: float) -> dict:
    """A fresh tree runs Pool(POOL_SIZE) (`method`), every worker creates a
    tracked block: how many reapers serve them, and whether they exit after."""
    with Probe(f"pool-{method}", f"{PREFIX}pool_{method}_") as probe:
        info = probe.read(timeout=120)
        if info.get("missing"):
            return {"missing": True}
        in_proc = reapers_in_tree(probe.proc.pid, probe.marker)  # while the workers hold their blocks
        probe.finish(timeout=120)
    workers = info["workers"]
    reported = sorted({w["reaper"] for w in workers if w["reaper"]})
    running = dict(in_proc)
    for pid in reported:
        stat = proc_stat(pid)
        if pid not in running and stat is not None and is_reaper(pid):
            running[pid] = stat[2]
    waited, left = wait_exited(running, exit_timeout)
    for pid in left:  # ours: report them, then end them by pid
        if _alive(pid, running[pid]) and is_reaper(pid):
            os.kill(pid, signal.SIGKILL)
    return {
        "method": method,
        "workers": len({w["worker"] for w in workers}),
        "reaper_pids": reported,
        "no_reaper": sum(1 for w in workers if not w["reaper"]),
        "in_proc": sorted(in_proc),
        "exit_seconds": waited,
        "not_exited": left,
    }


def measure_removal(rounds: int, shared: bool, timeout: float) -> dict:
    """SIGKILL a creator, time until its block leaves /dev/shm. `shared`: the
    creator is a child of this process and shares its reaper (which has other
    clients); otherwise it is a fresh tree and its reaper's only client."""
    ours, anchor = None, None
    if shared:
        tracking = tracking_module()
        if tracking is None:
            return {"missing": True}
        anchor = shmem.SharedMemory(new_name(), create=True, size=4 * KiB)  # we are a client too
    delays, failures, reapers = [], 0, set()
    try:
        if shared:
            ours = tracking.reaper_pid()
            if REAPER_ENV not in os.environ:
                raise ProbeFailed(f"{REAPER_ENV} is not set after a tracked create")
        for _ in range(rounds):
            name = new_name()
            path = os.path.join(SHM_DIR, name)
            with Probe("creator", name, inherit_reaper=shared) as probe:
                reapers.add(probe.read()["reaper"])
                time.sleep(0.2)  # the reaper has heard of the block
                if not os.path.lexists(path):
                    raise ProbeFailed(f"{path} does not exist after the create")
                t0 = now()
                probe.proc.kill()
                probe.proc.wait()  # reaped at once, as a parent (or init) would
                while os.path.lexists(path) and now() - t0 < timeout * 1e9:
                    time.sleep(0.001)
                if os.path.lexists(path):
                    failures += 1
                    os.unlink(path)
                else:
                    delays.append(now() - t0)
    finally:
        if anchor is not None:
            anchor.close()
            anchor.unlink()
    return {
        "delays_ns": delays,
        "not_removed": failures,
        "timeout_s": timeout,
        "reaper_pids": sorted(p for p in reapers if p),
        "ours": ours,
    }


def run_reaper(quick: bool) -> Dict[str, dict]:
    """Every reaper row; a row whose probe fails says why instead."""
    idle_s, rounds, exit_timeout, removal_timeout = (2.0, 3, 5.0, 5.0) if quick else (10.0, 7, 10.0, 10.0)
    steps = {
        "idle": (f"idle wake-ups and memory ({idle_s:.0f} s)", lambda: measure_idle(idle_s)),
        "pool_spawn": (f"Pool({POOL_SIZE}), spawn", lambda: measure_pool("spawn", exit_timeout)),
        "pool_fork": (f"Pool({POOL_SIZE}), fork", lambda: measure_pool("fork", exit_timeout)),
        "removal_own": ("removal delay, own reaper", lambda: measure_removal(rounds, False, removal_timeout)),
        "removal_shared": ("removal delay, shared reaper", lambda: measure_removal(rounds, True, removal_timeout)),
    }
    out: Dict[str, dict] = {}
    for key, (what, measure) in steps.items():
        print(f"... reaper: {what}", file=sys.stderr)
        try:
            out[key] = measure()
        except Exception as err:  # one broken probe must not cost the other rows
            out[key] = {"failed": f"{type(err).__name__}: {err}"}
    return out


def create_goals(rows: List[dict]) -> List[dict]:
    """create+close+unlink at 4 KiB against the previous release's ratio."""
    goals = []
    for impl, previous in PREVIOUS_CREATE_RATIO.items():
        kind = "untracked" if impl.endswith("False") else "tracked"
        found = [
            r
            for r in rows
            if (r["operation"], r["size"], r["implementation"]) == ("create+close+unlink", "4 KiB", impl)
        ]
        goals.append(
            {
                "implementation": impl,
                "against": kind,
                "previous": previous,
                "ratio": found[0][f"ratio_{kind}"] if found else None,
            }
        )
    return goals


def print_create_goals(goals: List[dict]) -> None:
    for g in goals:
        stdlib = STDLIB_UNTRACKED if g["against"] == "untracked" else STDLIB_TRACKED
        what = f"goal: {g['implementation']} create+close+unlink (4 KiB) no slower than before, ÷ {stdlib}"
        now_ = "n/a (4K not in --sizes)" if g["ratio"] is None else f"{g['ratio']:.2f}x"
        if g["previous"] is None:
            print(f"{what}: {now_} (previous release: not recorded in README.md, no verdict)")
        else:
            verdict = "" if g["ratio"] is None else ", met" if g["ratio"] <= g["previous"] else ", NOT met"
            # On Python >= 3.13 the stdlib's track=False is real, not emulated as on 3.11: not quite like for like.
            caveat = ", Python 3.11 with track=False emulated" if STDLIB_HAS_TRACK else ""
            print(f"{what} <= {g['previous']:.2f}x (previous release{caveat}): {now_}{verdict}")


def reaper_rows(rep: Dict[str, dict]) -> List[Tuple[str, str, str]]:
    """(measure, value, detail) per row of the reaper table."""

    def unavailable(r: dict) -> Optional[str]:
        if r.get("missing"):
            return NEEDS_SHARED_REAPER
        return f"FAILED: {r['failed']}" if "failed" in r else None

    rows = []
    idle = rep["idle"]
    bad = unavailable(idle)
    if bad:
        rows += [("reaper idle wake-ups/s (1 tracked block)", bad, ""), ("reaper resident memory (VmRSS)", bad, "")]
    else:
        rows.append(
            (
                "reaper idle wake-ups/s (1 tracked block)",
                f"{idle['wakeups_per_s']:.1f} /s",
                f"{idle['switches']} context switches in {idle['seconds']:.1f} s (pid {idle['reaper_pid']})",
            )
        )
        rows.append(
            (
                "reaper resident memory (VmRSS)",
                f"{idle['rss_mib']:.1f} MiB",
                f"bare python -I -S: {idle['bare_rss_mib']:.1f} MiB, "
                f"ratio {idle['rss_mib'] / idle['bare_rss_mib']:.2f}",
            )
        )
    for key in ("pool_spawn", "pool_fork"):
        pool, method = rep[key], key.split("_")[1]
        label = f"reapers for a Pool({POOL_SIZE}) of creators, {method}"
        bad = unavailable(pool)
        if bad:
            rows.append((label, bad, ""))
            continue
        detail = f"/proc: {len(pool['in_proc'])}; {pool['workers']} workers"
        if pool["no_reaper"]:
            detail += f", {pool['no_reaper']} with reaper_pid() None"
        detail += (
            f"; reapers exited {pool['exit_seconds']:.2f} s after the pool"
            if not pool["not_exited"]
            else f"; NOT exited {pool['exit_seconds']:.0f} s after the pool: {pool['not_exited']} (killed)"
        )
        rows.append((label, str(len(pool["reaper_pids"])), detail))
    for key, which in (("removal_own", "own reaper"), ("removal_shared", "shared reaper")):
        rem = rep[key]
        label = f"removal delay after SIGKILL, {which}"
        bad = unavailable(rem)
        if bad:
            rows.append((label, bad, ""))
            continue
        delays = rem["delays_ns"]
        value = fmt_ns(statistics.median(delays)) if delays else "never"
        detail = f"n={len(delays)}" + (f", {fmt_ns(min(delays))} - {fmt_ns(max(delays))}" if delays else "")
        if rem["not_removed"]:
            detail += f"; {rem['not_removed']} NOT removed within {rem['timeout_s']:.0f} s (unlinked by the benchmark)"
        if key == "removal_shared" and rem["reaper_pids"] != [rem["ours"]]:
            detail += f"; NOT shared: the creators reported reapers {rem['reaper_pids']}, ours is {rem['ours']}"
        rows.append((label, value, detail))
    return rows


def print_reaper(rep: Dict[str, dict]) -> None:
    fmt = "{:<46} {:>34}  {}"
    print(fmt.format("reaper (fresh process trees, no SHMEM_REAPER)", "value", "detail, baseline in the same run"))
    print("-" * 135)
    for row in reaper_rows(rep):
        print(fmt.format(*row))
    print()


def print_reaper_goals(rep: Dict[str, dict]) -> None:
    def status(r: dict) -> Optional[str]:
        if r.get("missing"):
            return NEEDS_SHARED_REAPER
        return "FAILED (see the table)" if "failed" in r else None

    idle = rep["idle"]
    print(
        "goal: reaper idle wake-ups/s = 0 (previous design: 10/s): "
        + (status(idle) or (f"{idle['wakeups_per_s']:.1f}/s, {'met' if idle['switches'] == 0 else 'NOT met'}"))
    )
    print(
        "goal: reaper resident memory as small as an interpreter allows (previous design: ~17 MB): "
        + (
            status(idle)
            or f"{idle['rss_mib']:.1f} MiB, {idle['rss_mib'] / idle['bare_rss_mib']:.2f}x a bare "
            f"python -I -S ({idle['bare_rss_mib']:.1f} MiB)"
        )
    )
    pools = [rep["pool_spawn"], rep["pool_fork"]]
    bad = next((status(p) for p in pools if status(p)), None)
    counts = [len(p["reaper_pids"]) for p in pools] if not bad else []
    met = not bad and all(
        len(p["reaper_pids"]) == len(p["in_proc"]) == 1 and not p["no_reaper"] and not p["not_exited"] for p in pools
    )
    print(
        f"goal: reapers for a Pool({POOL_SIZE}) of creators = 1, and they exit after it (previous design: "
        f"{POOL_SIZE}): " + (bad or f"spawn {counts[0]}, fork {counts[1]}, {'met' if met else 'NOT met'}")
    )
    parts, met = [], True
    for key, which in (("removal_own", "own reaper"), ("removal_shared", "shared reaper")):
        rem = rep[key]
        if status(rem):
            parts.append(f"{which} {status(rem)}")
            met = met and bool(rem.get("missing"))
            continue
        delays = rem["delays_ns"]
        median = statistics.median(delays) if delays else None
        unshared = key == "removal_shared" and rem["reaper_pids"] != [rem["ours"]]
        parts.append(
            f"{which} {fmt_ns(median) if median is not None else 'never'}"
            + (" (NOT shared, see the table)" if unshared else "")
        )
        met = met and not rem["not_removed"] and median is not None and median <= REMOVAL_GOAL_S * 1e9
    print(
        f"goal: removal delay after SIGKILL of the creator <= ~{REMOVAL_GOAL_S:.0f} s (median): "
        + ", ".join(parts)
        + (", met" if met else ", NOT met")
    )


def print_header() -> None:
    print(f"shmem benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"Python {platform.python_version()} ({platform.python_implementation()}) on {platform.platform()}")
    print(
        f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"/dev/shm free {shm_free_bytes() / GiB:.1f} GiB"
    )
    if not STDLIB_HAS_TRACK:
        print("* Python < 3.13 has no track=False: emulated by switching off the stdlib's resource-tracker")
        print("  calls around each call (see _StdlibUntrackedEmulated).")
    print()


def table_rows(results: Results) -> List[dict]:
    rows = []
    for (operation, size), by_impl in results.items():
        untracked, tracked = (statistics.median(by_impl[k]) for k in (STDLIB_UNTRACKED, STDLIB_TRACKED))
        for key in IMPLS:
            stats = summarize(by_impl[key])
            ratios = {"ratio_untracked": stats["median"] / untracked, "ratio_tracked": stats["median"] / tracked}
            rows.append(
                {
                    "operation": operation,
                    "size": size,
                    "implementation": key,
                    **(ratios if key.startswith("shmem") else {}),
                    **stats,
                }
            )
    return rows


def print_table(rows: List[dict]) -> None:
    fmt = "{:<42} {:>7}  {:<26} {:>9}  {:>21} {:>5}  {:>9} {:>9}"
    print(fmt.format("operation", "size", "implementation", "median", "p25 - p75", "n", "÷stdlib", "÷stdlib"))
    print(fmt.format("", "", "", "", "", "", "untracked", "tracked"))
    print("-" * 135)
    for i, row in enumerate(rows):
        first = i == 0 or (row["operation"], row["size"]) != (rows[i - 1]["operation"], rows[i - 1]["size"])
        ratios = [f"{row[k]:.2f}" if k in row else "" for k in ("ratio_untracked", "ratio_tracked")]
        print(
            fmt.format(
                row["operation"] if first else "",
                row["size"] if first else "",
                row["implementation"],
                fmt_ns(row["median"]),
                f"{fmt_ns(row['p25'])} - {fmt_ns(row['p75'])}",
                row["n"],
                *ratios,
            )
        )
    print(f"ratios = shmem median / median of {STDLIB_UNTRACKED!r} or {STDLIB_TRACKED!r}: < 1 is faster.")
    print("Like for like: track=False vs untracked, track=True vs tracked.\n")


def print_goal(rows: List[dict]) -> None:
    for row in rows:
        if row["operation"].startswith("attach+close") and row["implementation"] == "shmem track=False":
            verdict = "met" if row["ratio_untracked"] <= 1.5 else "NOT met"
            print(
                f"goal: shmem track=False {row['operation']} ({row['size']}) <= 1.5x {STDLIB_UNTRACKED}: "
                f"{row['ratio_untracked']:.2f}x, {verdict}"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fast smoke run (< 20 s): few repetitions, 256 MiB")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--sizes",
        type=lambda s: [parse_size(x) for x in s.split(",")],
        help=f"comma-separated sizes; up to {size_label(SMALL_LIMIT)}: per-operation suite, "
        "larger: large-block suite (default 4K,1G; with --quick 4K,256M)",
    )
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)  # internal: the fresh-process child
    parser.add_argument("--later", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--reaper-probe", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)  # likewise
    return parser.parse_args()


def run_all(sizes: List[int], quick: bool) -> Results:
    small_reps, large_reps, probe_reps = (300, 2, 2) if quick else (3000, 7, 11)
    results: Results = {}
    with Worker() as worker:
        for size in sizes:
            if size <= SMALL_LIMIT:
                print(f"... {size_label(size)}: per-operation suite", file=sys.stderr)
                results.update(run_small(size, small_reps, worker))
            elif shm_free_bytes() < size + size // 8 + 64 * MiB:  # one block at a time, plus slack
                print(f"skipped {size_label(size)}: {SHM_DIR} has only {shm_free_bytes() / GiB:.2f} GiB free\n")
            else:
                print(f"... {size_label(size)}: large-block suite", file=sys.stderr)
                results.update(run_large(size, large_reps, worker))
    print("... first create in a fresh process", file=sys.stderr)
    results.update(run_first_create(probe_reps))
    return results


def main() -> None:
    args = parse_args()
    if args.probe is not None:
        return probe_main(args.probe, args.later)
    if args.reaper_probe is not None:
        return reaper_probe(*args.reaper_probe)
    print_header()
    try:
        results = run_all(args.sizes or ([4 * KiB, 256 * MiB] if args.quick else [4 * KiB, GiB]), args.quick)
        reaper = run_reaper(args.quick)
    finally:
        cleanup()
    rows = table_rows(results)
    print_table(rows)
    print_goal(rows)
    goals = create_goals(rows)
    print_create_goals(goals)
    print()
    print_reaper(reaper)
    print_reaper_goals(reaper)
    if args.json:
        meta = {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "quick": args.quick,
            "stdlib_track_emulated": not STDLIB_HAS_TRACK,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows, "create_goals": goals, "reaper": reaper}, f, indent=1)
    if any("failed" in r for r in reaper.values()):
        sys.exit(1)  # a probe broke (not a goal missed): the table says which


if __name__ == "__main__":
    main()
