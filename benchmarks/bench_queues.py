#!/usr/bin/env python3
"""Benchmark shmem.Queue against os.pipe, multiprocessing.Queue, faster-fifo and pyzmq in one run (the queue issue).

    python benchmarks/bench_queues.py [--quick | --smoke] [--json PATH] [--start fork|spawn|forkserver]

Every row moves messages between real processes (multiprocessing, fork by
default; ``--start spawn`` also proves the queues pickle). Throughput is timed
in the parent with time.perf_counter around a fixed number of messages, after
a warm-up round; each figure is the median of 3 rounds, and the rounds of a
row's implementations take turns (round-robin, rotating who goes first) so a
noisy machine slows them all alike. Every ratio is between figures of this run.

Rows:

* 64-byte bytes, 1 producer -> 1 consumer (msgs/s): the raw transport, no
  pickling - shmem's send_bytes/recv_bytes against os.pipe (the kernel's own
  channel at its best: 64-byte os.write()s, the reader takes 64 KiB at a
  time and counts bytes), multiprocessing.Queue (put/get of the bytes),
  faster-fifo (put/get with identity dumps/loads: no pickling either) and
  pyzmq (ipc PUSH/PULL). shmem.Queue's put/get of the same bytes is shown
  for scale. Goals: >= 2x os.pipe, ahead of every peer.
* small objects, put/get (objs/s): a tuple (int, float, short str), the
  common case of a drop-in multiprocessing.Queue: pickling included. Against
  multiprocessing.Queue (goal >= 10x) and faster-fifo.
* small objects, put_many/get_many x 64 (objs/s): 64 such tuples, each its own
  object, in a batch, where the per-message cost is shared; against faster-fifo's
  put_many/get_many. Goal: >= 3M objects/s.
* 64-byte ping-pong round trip (latency): the parent sends 64 bytes down one
  queue, a child sends them back up another; every round trip is timed alone.
  Median and p99 (each the median over the 3 rounds), against os.pipe (two
  pipes), multiprocessing.Queue, faster-fifo and pyzmq. Goal: median <= 10 us.
* 1 MiB NumPy arrays, producer -> consumer (GB/s): float64 arrays through
  put/get (pickled; the shmem queue is made with capacity=16 MiB, as a
  message must fit in its ring, 1 MiB by default), against
  multiprocessing.Queue and memcpy bandwidth (np.copyto of 1 MiB within one
  process, measured here too: an array is copied at least once on its way).
  Goal: >= 50% of memcpy. Skipped when NumPy is not installed.
* 64-byte bytes, 4 producers -> 1 consumer (msgs/s): contention on the
  producer side. Goal: >= 10x multiprocessing.Queue.
* idle: a process blocked in get() for 10 s (2 s with --quick): its CPU
  seconds (utime + stime, /proc/PID/stat) and voluntary context switches per
  second (summed over its threads, /proc/PID/task/*/status). A waiter asleep
  in the kernel has none; one that polls shows here. get(timeout=...) may
  take another path, so it has a row too; multiprocessing.Queue and
  faster-fifo are for reference. Goal: ~0 (met at <= 0.02 CPU s and < 1
  switch/s).

Peers, when installed (``pip install faster-fifo pyzmq``, or the ``bench``
extra): a missing one's rows say "not installed" and the run goes on. The
``goal:`` lines under the tables give each goal with its verdict. A full run
takes about two minutes; ``--quick`` is a short one (well under a minute);
``--smoke`` a run of seconds that only shows every row works (the tests use
it): neither gives figures to quote.
An implementation that fails prints FAILED in its row (the traceback goes to
stderr) and the script exits with status 1; a goal not met is no failure.
Linux only (like shmem).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
import timeit
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from _common import MiB, fmt_ns, remove_prefixed

# Every block this script makes starts with this (shmem's generated names too). Kept in the
# environment: a spawned child imports this module again and must come up with the same prefix.
PREFIX = os.environ.get("SHMBENCH_PREFIX") or f"shmbench_{os.getpid()}_{secrets.token_hex(3)}_"
os.environ["SHMBENCH_PREFIX"] = PREFIX
os.environ["SHMEM_NAME_PREFIX"] = PREFIX

import shmem  # noqa: E402  (after the prefix is in the environment)


def optional(module: str) -> Any:
    """A peer's module, or None when it is not installed (its rows say so)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


np, faster_fifo, zmq = optional("numpy"), optional("faster_fifo"), optional("zmq")

now = time.perf_counter_ns
REPEAT = 3  # timed rounds per figure: the median is reported
PAYLOAD = bytes(range(64))
SMALL_OBJECT = (1234567, 3.25, "a short str")
BATCH = 64


def distinct_batch(item: Any) -> List[Any]:
    """BATCH tuples like ``item``, each its own: shmem pickles a batch as one list, and the
    same object BATCH times would pickle once and flatter it."""
    number, real, text = item
    return [(number + i, real + i, f"{text} {i}") for i in range(BATCH)]


ARRAY_BYTES = MiB
# Room for several arrays in flight, so that the producer of the array row does not wait on every put.
ARRAY_RING = 16 * MiB
# faster-fifo's blocking put/get take a timeout (10 s unless told): one that never fires in a working run.
PEER_TIMEOUT = 600.0
IDLE_TIMEOUT = 3600.0  # get(timeout=...) in the idle row: far longer than the window
# What "~0" means in the idle goal (the issue measures CPU used): two clock ticks over the window. The
# voluntary switches are printed beside it: a waiter wakes every 50 ms (SLICE_NS) so that signal
# handlers - Ctrl-C - run even when the signal went to another thread; that costs no measurable CPU.
IDLE_CPU_MAX = 0.02

# The start method's context (--start): set by main() before any process or multiprocessing.Queue is made.
CTX: Any = multiprocessing.get_context("fork")
FAILURES: List[str] = []  # implementations that failed: the exit status says so

# A row's result per implementation: samples, or why there are none ("not installed", "FAILED: ...").
Result = Union[List[float], str]


# ------------------------------------------------------------------ channels


def make_item(kind: str) -> Any:
    """What one message carries: built in the process that sends it."""
    if kind == "bytes":
        return PAYLOAD
    if kind == "object":
        return SMALL_OBJECT
    return np.ones(ARRAY_BYTES // 8)


class Channel:
    """One implementation's way from senders to a receiver. Made in the parent and handed to the
    children (inherited under fork, pickled under spawn); each process opens the end it uses and
    closes what it opened."""

    def send_fn(self) -> Callable[[Any], Any]:
        raise NotImplementedError

    def recv_fn(self) -> Callable[[], Any]:
        raise NotImplementedError

    def produce(self, n: int, item: Any) -> None:
        send = self.send_fn()  # bound once: the loop measures the queue, not attribute look-ups
        for _ in range(n):
            send(item)

    def consume(self, n: int) -> None:
        recv = self.recv_fn()
        for _ in range(n):
            recv()

    def close(self) -> None:
        """Let go of this process's end."""

    def dispose(self) -> None:
        """The parent's last word, after every child has gone."""
        self.close()


class ShmemChannel(Channel):
    """shmem.Queue: send_bytes/recv_bytes (raw) or put/get (pickled)."""

    def __init__(self, raw: bool, **kwargs: Any) -> None:
        self.raw, self.q = raw, shmem.Queue(**kwargs)

    def send_fn(self) -> Callable[[Any], Any]:
        return self.q.send_bytes if self.raw else self.q.put

    def recv_fn(self) -> Callable[[], Any]:
        return self.q.recv_bytes if self.raw else self.q.get

    def close(self) -> None:
        self.q.close()
        self.q.join_thread()  # as with multiprocessing.Queue: whatever this process put has gone in


class ShmemBatchChannel(ShmemChannel):
    """shmem.Queue's put_many/get_many, BATCH objects a call."""

    def __init__(self) -> None:
        super().__init__(raw=False)

    def produce(self, n: int, item: Any) -> None:
        put_many, batch = self.q.put_many, distinct_batch(item)
        for _ in range(n // BATCH):
            put_many(batch)

    def consume(self, n: int) -> None:
        get_many, got = self.q.get_many, 0
        while got < n:
            got += len(get_many(BATCH))


class MpChannel(Channel):
    """multiprocessing.Queue (of the run's start method): put/get, pickled, through a pipe and a feeder thread."""

    def __init__(self) -> None:
        self.q = CTX.Queue()

    def send_fn(self) -> Callable[[Any], Any]:
        return self.q.put  # type: ignore[no-any-return]

    def recv_fn(self) -> Callable[[], Any]:
        return self.q.get  # type: ignore[no-any-return]

    def close(self) -> None:
        self.q.close()
        self.q.join_thread()


def _identity(data: Any) -> Any:
    return data  # faster-fifo's dumps for bytes (module level: it pickles with the queue under spawn)


class FifoChannel(Channel):
    """faster-fifo: put/get pickled, or with identity dumps/loads for bytes (raw); put_many/get_many (batch)."""

    def __init__(self, raw: bool = False, batch: bool = False) -> None:
        codec = {"dumps": _identity, "loads": bytes} if raw else {}
        self.batch, self.q = batch, faster_fifo.Queue(max_size_bytes=1_000_000, **codec)

    def send_fn(self) -> Callable[[Any], Any]:
        return functools.partial(self.q.put, timeout=PEER_TIMEOUT)

    def recv_fn(self) -> Callable[[], Any]:
        return functools.partial(self.q.get, timeout=PEER_TIMEOUT)

    def produce(self, n: int, item: Any) -> None:
        if not self.batch:
            return super().produce(n, item)
        put_many, batch = self.q.put_many, distinct_batch(item)
        for _ in range(n // BATCH):
            put_many(batch, timeout=PEER_TIMEOUT)

    def consume(self, n: int) -> None:
        if not self.batch:
            return super().consume(n)
        get_many, got = self.q.get_many, 0
        while got < n:
            got += len(get_many(timeout=PEER_TIMEOUT, max_messages_to_get=BATCH))

    def close(self) -> None:
        pass  # faster-fifo's close() marks the shared queue closed for everyone: the parent's, in dispose()

    def dispose(self) -> None:
        self.q.close()


class PipeChannel(Channel):
    """os.pipe(): 64-byte os.write()s; a consumer reads 64 KiB at a time and counts bytes. The ends are
    Connection objects only so that they pickle under spawn (the fds go along); the I/O is os.read/os.write."""

    def __init__(self) -> None:
        r, w = os.pipe()
        self.r, self.w = Connection(r, writable=False), Connection(w, readable=False)

    def send_fn(self) -> Callable[[Any], Any]:
        return functools.partial(os.write, self.w.fileno())

    def recv_fn(self) -> Callable[[], Any]:
        return functools.partial(os.read, self.r.fileno(), len(PAYLOAD))

    def consume(self, n: int) -> None:
        read, fd, want, got = os.read, self.r.fileno(), n * len(PAYLOAD), 0
        while got < want:
            got += len(read(fd, 65536))

    def close(self) -> None:
        self.r.close()
        self.w.close()


class ZmqChannel(Channel):
    """pyzmq over ipc: the receiver binds a PULL socket, each sender connects a PUSH. Sockets are made
    in the process that uses them (a zmq context must not cross a fork), one context per process."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._open: Dict[Tuple[int, int], Tuple[Any, Any]] = {}  # (pid, socket type) -> (context, socket)

    def __getstate__(self) -> Dict[str, Any]:
        return {"endpoint": self.endpoint, "_open": {}}

    def _socket(self, kind: int) -> Any:
        key = (os.getpid(), kind)
        if key not in self._open:
            context = zmq.Context()
            sock = context.socket(kind)
            sock.setsockopt(zmq.LINGER, 2000)  # a last reply still goes out when its sender closes at once
            (sock.bind if kind == zmq.PULL else sock.connect)(self.endpoint)
            self._open[key] = (context, sock)
        return self._open[key][1]

    def send_fn(self) -> Callable[[Any], Any]:
        return self._socket(zmq.PUSH).send  # type: ignore[no-any-return]

    def recv_fn(self) -> Callable[[], Any]:
        return self._socket(zmq.PULL).recv  # type: ignore[no-any-return]

    def close(self) -> None:
        for key in [k for k in self._open if k[0] == os.getpid()]:
            context, sock = self._open.pop(key)
            sock.close()
            context.term()


class Endpoints:
    """ipc endpoints for pyzmq, in a directory of the run's own (removed at the end)."""

    def __init__(self) -> None:
        self.directory: Optional[str] = None
        self.count = 0

    def new(self) -> str:
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix=PREFIX)
        self.count += 1
        return f"ipc://{self.directory}/{self.count}"

    def remove(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


ENDPOINTS = Endpoints()
Maker = Optional[Callable[[], Channel]]  # None: the peer is not installed


def installed(module: Any, make: Callable[[], Channel]) -> Maker:
    return make if module is not None else None


# ------------------------------------------------------------------ harness


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """TimeoutError in the main thread after ``seconds``: a dead peer process must not hang the run.
    (Interval timers are not inherited by forked children.)"""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no result after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rotated(items: List[str], r: int) -> List[str]:
    """Round r's order: everyone goes first in turn."""
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def stop_all(procs: List[Any], timeout: float = 30.0) -> List[Optional[int]]:
    """Join the children (killing, by pid, any that does not end in time): their exit codes."""
    for p in procs:
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join(10)
    return [p.exitcode for p in procs]


def fail(label: str, exc: BaseException) -> str:
    print(f"{label}: FAILED", file=sys.stderr)
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    FAILURES.append(label)
    return f"FAILED: {type(exc).__name__}: {exc}"


def wind_down(running: Dict[str, Any], results: Dict[str, Result]) -> None:
    """End every process of a row (``halt()``), and only then close the parent's queues (``dispose()``).

    A forked child holds every block its parent had open at the fork, the queues of the row's other
    implementations too: closed earlier, the parent's handle would not be the last one, and the block
    would be left for shmem's reaper to remove some time after the run."""
    codes = {label: member.halt() for label, member in running.items()}
    for label, member in running.items():
        member.dispose()
        if any(code != 0 for code in codes[label]) and isinstance(results.get(label), list):
            results[label] = fail(label, RuntimeError(f"its processes failed: exit codes {codes[label]}"))
    running.clear()


def drop(running: Dict[str, Any], label: str) -> None:
    """Stop one implementation that failed in the middle of a row (the others go on)."""
    member = running.pop(label)
    with contextlib.suppress(Exception):
        member.halt()
        member.dispose()


def _producer(channel: Channel, ctrl: Connection, kind: str) -> None:
    """A producer process: on each word from the parent, send that many messages."""
    item = make_item(kind)
    try:
        while True:
            n = ctrl.recv()
            if n is None:
                return
            channel.produce(n, item)
    finally:
        channel.close()


class Producers:
    """A channel's producer processes, started once for every round of a row; each round they send on
    the parent's word while the parent consumes, timed from the word to the last message."""

    def __init__(self, channel: Channel, kind: str, count: int, limit: float) -> None:
        self.channel, self.limit = channel, limit
        self.ctrls: List[Connection] = []
        self.procs: List[Any] = []
        for _ in range(count):
            r, w = CTX.Pipe(duplex=False)
            p = CTX.Process(target=_producer, args=(channel, r, kind), daemon=True)
            p.start()
            r.close()
            self.ctrls.append(w)
            self.procs.append(p)

    def round(self, n: int) -> float:
        """Seconds to receive ``n`` messages, ``n // producers`` from each."""
        each = n // len(self.procs)
        with deadline(self.limit):
            start = time.perf_counter()
            for ctrl in self.ctrls:
                ctrl.send(each)
            self.channel.consume(each * len(self.procs))
            return time.perf_counter() - start

    def halt(self) -> List[Optional[int]]:
        """End the producers: their exit codes."""
        for ctrl in self.ctrls:
            with contextlib.suppress(OSError):
                ctrl.send(None)
            ctrl.close()
        return stop_all(self.procs)

    def dispose(self) -> None:
        self.channel.dispose()


def warm_count(n: int, unit: int) -> int:
    """The warm-up round's message count: a tenth of a round, a whole number of ``unit``s."""
    return max(n // 10 // unit, 1) * unit


def throughput(makers: Dict[str, Maker], kind: str, n: int, producers: int, plan: Plan) -> Dict[str, Result]:
    """Messages per second through each channel, one sample per round: ``producers`` processes send
    ``n`` messages of ``kind`` in all, the parent receives them. A warm-up round first."""
    results: Dict[str, Result] = {}
    running: Dict[str, Producers] = {}
    unit = producers * (BATCH if n % BATCH == 0 else 1)  # the warm-up: whole batches from every producer
    try:
        # Every process first, the warm-ups after: no fork while this process has a peer's threads running.
        for label, make in makers.items():
            if make is None:
                results[label] = "not installed"
                continue
            try:
                running[label] = Producers(make(), kind, producers, plan.limit)
            except Exception as exc:
                results[label] = fail(label, exc)
        for label in list(running):
            try:
                running[label].round(warm_count(n, unit))
                results[label] = []
            except Exception as exc:
                results[label] = fail(label, exc)
                drop(running, label)
        for r in range(REPEAT):
            for label in rotated(list(running), r):
                try:
                    results[label].append(n / running[label].round(n))  # type: ignore[union-attr]
                except Exception as exc:
                    results[label] = fail(label, exc)
                    drop(running, label)
    finally:
        wind_down(running, results)
    return {label: results[label] for label in makers}  # in the row's order


# ------------------------------------------------------------------ ping-pong


def _echo(ping: Channel, pong: Channel, rounds: int) -> None:
    """The far end of the ping-pong: send back every message, ``rounds`` times."""
    recv, send = ping.recv_fn(), pong.send_fn()
    try:
        for _ in range(rounds):
            send(recv())
    finally:
        ping.close()
        pong.close()


class Echoer:
    """A channel's ping-pong: two channels of its kind and a child that echoes, for every round of the row."""

    def __init__(self, make: Callable[[], Channel], rounds: int, limit: float) -> None:
        self.ping, self.pong, self.limit = make(), make(), limit
        self.proc = CTX.Process(target=_echo, args=(self.ping, self.pong, rounds), daemon=True)
        self.proc.start()

    def trips(self, n: int) -> List[int]:
        """``n`` round trips of 64 bytes, each timed alone (ns)."""
        send, recv, out = self.ping.send_fn(), self.pong.recv_fn(), []
        with deadline(self.limit):
            for _ in range(n):
                start = now()
                send(PAYLOAD)
                recv()
                out.append(now() - start)
        return out

    def halt(self) -> List[Optional[int]]:
        return stop_all([self.proc])

    def dispose(self) -> None:
        self.ping.dispose()
        self.pong.dispose()


def p99(samples: List[int]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def pingpong(makers: Dict[str, Maker], n: int, plan: Plan) -> Dict[str, Result]:
    """Per channel, the median round trip of each round followed by its p99 (ns): [m1, m2, m3, q1, q2, q3]."""
    results: Dict[str, Result] = {}
    running: Dict[str, Echoer] = {}
    medians: Dict[str, List[float]] = {}
    tails: Dict[str, List[float]] = {}
    warm = warm_count(n, 1)
    try:
        for label, make in makers.items():  # every process first, as in throughput()
            if make is None:
                results[label] = "not installed"
                continue
            try:
                running[label] = Echoer(make, warm + REPEAT * n, plan.limit)
            except Exception as exc:
                results[label] = fail(label, exc)
        for label in list(running):
            try:
                running[label].trips(warm)
                medians[label], tails[label] = [], []
            except Exception as exc:
                results[label] = fail(label, exc)
                drop(running, label)
        for r in range(REPEAT):
            for label in rotated(list(running), r):
                try:
                    samples = running[label].trips(n)
                    medians[label].append(statistics.median(samples))
                    tails[label].append(p99(samples))
                except Exception as exc:
                    results[label] = fail(label, exc)
                    drop(running, label)
        for label in running:
            results[label] = medians[label] + tails[label]
    finally:
        wind_down(running, results)
    return {label: results[label] for label in makers}  # in the row's order


# ------------------------------------------------------------------ memcpy, idle


def memcpy_gbps(n: int) -> List[float]:
    """np.copyto of 1 MiB float64 within this process, GB/s per round: what one copy costs."""
    src = np.ones(ARRAY_BYTES // 8)
    dst = np.empty_like(src)
    timer = timeit.Timer(lambda: np.copyto(dst, src))
    timer.timeit(number=warm_count(n, 1))
    return [n * ARRAY_BYTES / t / 1e9 for t in timer.repeat(repeat=REPEAT, number=n)]


def _blocked(q: Any, timeout: Optional[float], ready: Connection, close: bool) -> None:
    """Say so, then block in get() until the parent puts something."""
    ready.send(os.getpid())
    ready.close()
    if timeout is None:
        q.get()
    else:
        q.get(timeout=timeout)
    if close:  # not faster-fifo's: its close() is the parent's (see FifoChannel)
        q.close()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_and_switches(pid: int) -> Tuple[float, int]:
    """CPU seconds (utime + stime, all threads) and voluntary context switches (summed over the threads:
    a process's own status counts its main thread only) of a running process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command, which may hold spaces
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)
    switches = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                switches += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except FileNotFoundError:
            pass  # a thread that has just ended
    return cpu, switches


def idle(plan: Plan) -> Dict[str, Result]:
    """[CPU seconds, voluntary switches per second] of each waiter over the idle window; the waiters
    are all blocked at once (they are asleep: they do not disturb each other)."""
    results: Dict[str, Result] = {}
    makes: Dict[str, Tuple[Optional[Callable[[], Any]], Optional[float]]] = {
        "shmem.Queue get()": (shmem.Queue, None),
        f"shmem.Queue get(timeout={IDLE_TIMEOUT:.0f})": (shmem.Queue, IDLE_TIMEOUT),
        "multiprocessing.Queue get()": (CTX.Queue, None),
        f"faster-fifo get(timeout={IDLE_TIMEOUT:.0f})": (
            faster_fifo.Queue if faster_fifo is not None else None,
            IDLE_TIMEOUT,
        ),
    }
    started: Dict[str, Tuple[Any, Any]] = {}  # label -> (queue, process)
    try:
        for label, (make, timeout) in makes.items():
            if make is None:
                results[label] = "not installed"
                continue
            try:
                q = make()
                r, w = CTX.Pipe(duplex=False)
                p = CTX.Process(target=_blocked, args=(q, timeout, w, "faster" not in label), daemon=True)
                p.start()
                w.close()
                started[label] = (q, p)
                if not r.poll(plan.limit):
                    raise TimeoutError("the waiter never said it was ready")
                r.recv()
                r.close()
            except Exception as exc:
                results[label] = fail(label, exc)
        time.sleep(plan.settle)  # every waiter is inside get() by now
        before: Dict[str, Tuple[float, int]] = {}
        for label, (_, p) in started.items():
            if label not in results:
                try:
                    before[label] = cpu_and_switches(p.pid)
                except OSError as exc:  # the waiter is gone: it did not stay blocked
                    results[label] = fail(label, exc)
        time.sleep(plan.idle_window)
        for label, (cpu0, sw0) in before.items():
            try:
                cpu1, sw1 = cpu_and_switches(started[label][1].pid)
                results[label] = [cpu1 - cpu0, (sw1 - sw0) / plan.idle_window]
            except OSError as exc:
                results[label] = fail(label, exc)
    finally:
        for q, _ in started.values():
            with contextlib.suppress(Exception):
                q.put(None)
        codes = stop_all([p for _, p in started.values()])
        for (label, (q, _)), code in zip(started.items(), codes):  # closed after every waiter ended: see wind_down
            with contextlib.suppress(Exception):
                q.close()
                getattr(q, "join_thread", lambda: None)()
            if code != 0 and isinstance(results.get(label), list):
                results[label] = fail(label, RuntimeError(f"the waiter failed: exit code {code}"))
    return {label: results[label] for label in makes}  # in the row's order


# ------------------------------------------------------------------ the run


class Plan:
    """How much of each row a run measures: full, ``--quick`` or ``--smoke``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        i = ("full", "quick", "smoke").index(mode)
        # Message counts are multiples of 4 producers and of a batch of 64: every producer sends whole batches.
        self.messages = (200_192, 20_224, 512)[i]
        self.batched = (640_000, 128_000, 1_280)[i]
        self.trips = (20_000, 2_000, 100)[i]
        self.arrays = (1_000, 200, 8)[i]
        self.idle_window = (10.0, 2.0, 0.3)[i]
        self.settle = (0.5, 0.5, 0.1)[i]  # from the waiters' word to the window: time to get into get()
        self.limit = (600.0, 120.0, 60.0)[i]  # one round's deadline


Table = Dict[str, Result]


def median_of(result: Result) -> Optional[float]:
    return statistics.median(result) if isinstance(result, list) and result else None


def show_rates(title: str, unit: str, rows: Table, base: str, fmt: str = ",.0f") -> None:
    """A table of rates (median, min - max of the rounds) and each one's ratio to ``base``'s median."""
    short = base.split(" ")[0]
    print(f"\n{title:<46} {unit:>14} {'min - max':>29} {'/ ' + short:>24}")
    base_median = median_of(rows.get(base, ""))
    for label, result in rows.items():
        if not isinstance(result, list):
            print(f"{label:<46} {result}")
            continue
        med = statistics.median(result)
        versus = f"{med / base_median:.2f}x" if base_median else ""
        spread = f"{min(result):{fmt}} - {max(result):{fmt}}"
        print(f"{label:<46} {med:>14{fmt}} {spread:>29} {versus:>24}")


def ratio(rows: Table, label: str, base: str) -> Optional[float]:
    mine, theirs = median_of(rows.get(label, "")), median_of(rows.get(base, ""))
    return mine / theirs if mine is not None and theirs else None


GOALS: List[Dict[str, Any]] = []


def goal(text: str, value: Optional[str], met: Optional[bool]) -> None:
    """One goal line: ``value`` None when the row was not measured (met is then None)."""
    shown = "not measured (see the row above)" if value is None else f"{value} -> {'met' if met else 'NOT met'}"
    print(f"goal: {text}: {shown}")
    GOALS.append({"goal": text, "value": value, "met": met})


SHM_RAW = "shmem.Queue send_bytes/recv_bytes"
SHM_PUT = "shmem.Queue put/get"
MP = "multiprocessing.Queue put/get"
PIPE = "os.pipe"
FIFO_RAW = "faster-fifo put/get (no pickling)"
FIFO = "faster-fifo put/get"
ZMQ = "pyzmq ipc PUSH/PULL"
MEMCPY = "memcpy (np.copyto, one process)"

TITLES = {
    "bytes": "64-byte bytes, 1 producer -> 1 consumer",
    "objects": "small objects, put/get",
    "batched": f"small objects, put_many/get_many x {BATCH}",
    "pingpong": "64-byte ping-pong round trip",
    "arrays": "1 MiB NumPy arrays, producer -> consumer",
    "fan_in": "64-byte bytes, 4 producers -> 1 consumer",
    "idle": "idle: a process blocked in get()",
}


def ring_impl() -> str:
    """Whether shmem.Queue runs its ring in C (shmem._queue) or in the pure-Python twin."""
    try:
        from shmem._kinds import queue_ring
    except ImportError:
        return "unknown"
    accelerated = getattr(queue_ring, "ACCELERATED", None)
    return "unknown" if accelerated is None else "C" if accelerated else "pure Python"


def run(plan: Plan, start: str) -> Dict[str, Table]:
    mode_note = {"full": "", "quick": " (quick)", "smoke": " (smoke: no figures to quote)"}[plan.mode]
    print(
        f"shmem {shmem.__version__} (queue ring: {ring_impl()}), Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, start method {start}{mode_note}"
    )
    missing = [name for name, module in (("faster-fifo", faster_fifo), ("pyzmq", zmq)) if module is None]
    if missing:
        print(f"peers not installed, their rows say so: {', '.join(missing)} (pip install {' '.join(missing)})")
    tables: Dict[str, Table] = {}
    n = plan.messages

    tables["bytes"] = rows = throughput(
        {
            SHM_RAW: lambda: ShmemChannel(raw=True),
            SHM_PUT: lambda: ShmemChannel(raw=False),
            PIPE: PipeChannel,
            MP: MpChannel,
            FIFO_RAW: installed(faster_fifo, lambda: FifoChannel(raw=True)),
            ZMQ: installed(zmq, lambda: ZmqChannel(ENDPOINTS.new())),
        },
        "bytes",
        n,
        1,
        plan,
    )
    show_rates(TITLES["bytes"], "msgs/s", rows, PIPE)

    tables["objects"] = rows = throughput(
        {
            SHM_PUT: lambda: ShmemChannel(raw=False),
            MP: MpChannel,
            FIFO: installed(faster_fifo, FifoChannel),
        },
        "object",
        n,
        1,
        plan,
    )
    show_rates(TITLES["objects"], "objs/s", rows, MP)

    many: Dict[str, Maker] = {
        "shmem.Queue put_many/get_many": ShmemBatchChannel,
        "faster-fifo put_many/get_many": installed(faster_fifo, lambda: FifoChannel(batch=True)),
    }
    tables["batched"] = rows = throughput(many, "object", plan.batched, 1, plan)
    show_rates(TITLES["batched"], "objs/s", rows, "faster-fifo put_many/get_many")

    tables["pingpong"] = rows = pingpong(
        {
            SHM_RAW: lambda: ShmemChannel(raw=True),
            SHM_PUT: lambda: ShmemChannel(raw=False),
            PIPE: PipeChannel,
            MP: MpChannel,
            FIFO_RAW: installed(faster_fifo, lambda: FifoChannel(raw=True)),
            ZMQ: installed(zmq, lambda: ZmqChannel(ENDPOINTS.new())),
        },
        plan.trips,
        plan,
    )
    print(f"\n{TITLES['pingpong']:<46} {'median':>14} {'p99':>14} {'/ os.pipe':>10}")
    pipe_median = median_of(rows[PIPE][:REPEAT]) if isinstance(rows[PIPE], list) else None
    for label, result in rows.items():
        if not isinstance(result, list):
            print(f"{label:<46} {result}")
            continue
        med, tail = statistics.median(result[:REPEAT]), statistics.median(result[REPEAT:])
        versus = f"{med / pipe_median:.2f}x" if pipe_median else ""
        print(f"{label:<46} {fmt_ns(med):>14} {fmt_ns(tail):>14} {versus:>10}")

    if np is None:
        tables["arrays"] = {}
        print(f"\n{TITLES['arrays']}: skipped (NumPy is not installed)")
    else:
        tables["arrays"] = rows = throughput(
            {SHM_PUT: lambda: ShmemChannel(raw=False, capacity=ARRAY_RING), MP: MpChannel},
            "array",
            plan.arrays,
            1,
            plan,
        )
        for label in list(rows):  # messages/s -> GB/s
            result = rows[label]
            if isinstance(result, list):
                rows[label] = [rate * ARRAY_BYTES / 1e9 for rate in result]
        rows[MEMCPY] = memcpy_gbps(plan.arrays * 5)
        show_rates(TITLES["arrays"], "GB/s", rows, MEMCPY, fmt=",.2f")

    tables["fan_in"] = rows = throughput(
        {
            SHM_RAW: lambda: ShmemChannel(raw=True),
            SHM_PUT: lambda: ShmemChannel(raw=False),
            MP: MpChannel,
        },
        "bytes",
        n,
        4,
        plan,
    )
    show_rates(TITLES["fan_in"], "msgs/s", rows, MP)

    tables["idle"] = rows = idle(plan)
    window = f"{plan.idle_window:g} s"
    print(f"\n{TITLES['idle'] + ' for ' + window:<46} {'CPU s':>14} {'vol. switches/s':>16}")
    for label, result in rows.items():
        if isinstance(result, list):
            print(f"{label:<46} {result[0]:>14.2f} {result[1]:>16.1f}")
        else:
            print(f"{label:<46} {result}")

    print()
    check_goals(tables, window)
    return tables


def ratio_goal(text: str, rows: Table, label: str, base: str, at_least: float) -> None:
    r = ratio(rows, label, base)
    goal(text, None if r is None else f"{r:.2f}x", None if r is None else r >= at_least)


def check_goals(tables: Dict[str, Table], window: str) -> None:
    rows = tables["bytes"]
    ratio_goal("64-byte bytes 1 -> 1 >= 2x os.pipe", rows, SHM_RAW, PIPE, 2)
    peers = [MP, FIFO_RAW, ZMQ]
    against = {peer.split(" ")[0]: ratio(rows, SHM_RAW, peer) for peer in peers if isinstance(rows.get(peer), list)}
    absent = [peer.split(" ")[0] for peer in peers if rows.get(peer) == "not installed"]
    text = "64-byte bytes 1 -> 1 ahead of every peer"
    if not against or any(r is None for r in against.values()):
        goal(text, None, None)
    else:
        shown = ", ".join(f"{r:.2f}x {peer}" for peer, r in against.items())
        shown += f" ({', '.join(absent)} not installed)" if absent else ""
        goal(text, shown, all(r is not None and r > 1 for r in against.values()))

    ratio_goal("small objects put/get >= 10x multiprocessing.Queue", tables["objects"], SHM_PUT, MP, 10)

    rate = median_of(tables["batched"].get("shmem.Queue put_many/get_many", ""))
    text = f"put_many/get_many x {BATCH} >= 3M objects/s"
    goal(text, None if rate is None else f"{rate / 1e6:.2f}M objects/s", None if rate is None else rate >= 3e6)

    result = tables["pingpong"].get(SHM_RAW)
    text = "64-byte ping-pong median <= 10 µs"
    if isinstance(result, list) and result:
        med, tail = statistics.median(result[:REPEAT]), statistics.median(result[REPEAT:])
        goal(text, f"{fmt_ns(med)} (p99 {fmt_ns(tail)})", med <= 10_000)
    else:
        goal(text, None, None)

    text = "1 MiB arrays >= 50% of memcpy"
    if np is None:
        print(f"goal: {text}: skipped (NumPy is not installed)")
        GOALS.append({"goal": text, "value": "skipped", "met": None})
    else:
        rows = tables["arrays"]
        mine, copy = median_of(rows.get(SHM_PUT, "")), median_of(rows.get(MEMCPY, ""))
        if mine is None or not copy:
            goal(text, None, None)
        else:
            goal(text, f"{mine:.2f} GB/s = {mine / copy:.0%} of {copy:.2f} GB/s", mine / copy >= 0.5)

    ratio_goal("4 producers -> 1 consumer >= 10x multiprocessing.Queue", tables["fan_in"], SHM_RAW, MP, 10)

    result = tables["idle"].get("shmem.Queue get()")
    text = "idle blocked get() ~0"
    if isinstance(result, list):
        cpu, switches = result
        shown = f"{cpu:.2f} CPU s in {window}, {switches:.1f} voluntary switches/s"
        goal(text, shown + " (a 50 ms slice, for signal handlers)", cpu <= IDLE_CPU_MAX)
    else:
        goal(text, None, None)


def write_json(path: str, plan: Plan, start: str, tables: Dict[str, Table]) -> None:
    units = {"bytes": "msgs/s", "objects": "objs/s", "batched": "objs/s", "arrays": "GB/s", "fan_in": "msgs/s"}
    rows: List[Dict[str, Any]] = []
    for key, table in tables.items():
        for label, result in table.items():
            row: Dict[str, Any] = {"row": TITLES[key], "impl": label}
            if not isinstance(result, list):
                row["skipped"] = result
            elif key == "pingpong":
                row.update(unit="ns", medians=result[:REPEAT], p99s=result[REPEAT:])
            elif key == "idle":
                row.update(cpu_seconds=result[0], voluntary_switches_per_s=result[1])
            else:
                row.update(unit=units[key], samples=result, median=statistics.median(result))
            rows.append(row)
    out = {
        "shmem": shmem.__version__,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "mode": plan.mode,
        "start_method": start,
        "rows": rows,
        "goals": GOALS,
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts: a short run, well under a minute")
    parser.add_argument("--smoke", action="store_true", help="a few messages in every row: that they run, no figures")
    parser.add_argument("--json", metavar="PATH", help="also write every row and goal as JSON")
    parser.add_argument(
        "--start", choices=("fork", "spawn", "forkserver"), default="fork", help="multiprocessing start method"
    )
    args = parser.parse_args()
    plan = Plan("smoke" if args.smoke else "quick" if args.quick else "full")
    global CTX
    CTX = multiprocessing.get_context(args.start)
    try:
        tables = run(plan, args.start)
        if args.json:
            write_json(args.json, plan, args.start, tables)
    finally:
        ENDPOINTS.remove()
        remove_prefixed(PREFIX)
    if FAILURES:
        print(f"failed: {', '.join(dict.fromkeys(FAILURES))} (tracebacks on stderr)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
