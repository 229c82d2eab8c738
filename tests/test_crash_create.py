"""Defect 1 of issue 9: a creator SIGKILLed at any instant of creation.

A creator killed while ``SharedMemory(create=True)``, ``ShareableList(...)`` or
``shmem.zeros(...)`` runs leaves nothing under the name once the removal delay
has passed (at the latest after ``shmem.gc()``), so the next create of that
fixed name succeeds; and a process attaching meanwhile never sees a partial
block: it gets FileNotFoundError or the whole, valid block.

One long-lived driver process runs the rounds: it forks a child that creates
the block and SIGKILLs it after a random delay - log-uniform from 10 us to
10 ms, so that kills land at every instant of the creation whatever its
timescale on this machine - then checks. Half the children have made a
tracked block before (their reaper connection is set up), half have not (the
kill may land while it is being set up). The driver runs on a CPU of its own,
so its clock and its kill stay on time.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any, Dict

import pytest
from _core_workers import script
from conftest import REAP_WAIT

_DRIVER = """
    import json, math, os, random, signal, sys, time, warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # fork() in a threaded process (3.12+)
    import shmem
    from _core_workers import say

    kind, prefix, rounds, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    SIZE = 256 * 1024
    VALUES = [1, "two", 3.0, b"four", None, "x" * 100]
    SHAPE = (256, 128)
    MIN_DELAY, MAX_DELAY = 10e-6, 10e-3
    if kind == "array":
        import numpy

    def create(name):
        if kind == "raw":
            return shmem.SharedMemory(name, create=True, size=SIZE)
        if kind == "list":
            return shmem.ShareableList(VALUES, name=name)
        return shmem.zeros(SHAPE, name=name)

    def remove(made):
        if kind == "array":
            made.unlink()
            return
        shm = made if kind == "raw" else made.shm
        shm.close()
        shm.unlink()

    def attach(name, track=False):
        # "absent" (FileNotFoundError), "whole", or what was wrong with the block seen.
        try:
            if kind == "raw":
                shm = shmem.SharedMemory(name, track=track)
                size = shm.size
                shm.close()
                if size != SIZE:
                    return f"attached a block of {size} bytes, not {SIZE}"
            elif kind == "list":
                sl = shmem.ShareableList(name=name, track=track)
                values = list(sl)
                sl.shm.close()
                if values != VALUES:
                    return f"attached a list holding {values!r}"
            else:
                arr = shmem.attach_array(name, track=track)
                if arr.shape != SHAPE or arr.dtype != numpy.float64 or arr.any():
                    return f"attached an array {arr.dtype} {arr.shape}, any={arr.any()}"
                del arr
            segment = shmem.inspect_segment(name)
            if segment.kind != kind or not getattr(segment, "ready", True):
                return f"its header says {segment.kind}, ready={getattr(segment, 'ready', None)}"
        except FileNotFoundError:
            return "absent"
        except Exception as err:
            return f"attach raised {type(err).__name__}: {err}"
        return "whole"

    def left(name):
        try:
            return os.stat("/dev/shm/" + name).st_size
        except FileNotFoundError:
            return None

    def wait_removed(name, timeout):
        deadline = time.monotonic() + timeout
        while left(name) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        return left(name) is None

    def child(name, warm, w):
        if CPUS:
            os.sched_setaffinity(0, CPUS[1:])
        try:
            if warm:  # the reaper connection is set up: the kill lands in the create itself
                s = shmem.SharedMemory(create=True, size=4096)
                s.close()
                s.unlink()
            os.write(w, b"g")
            made = create(name)
            os.write(w, b"d")
        except BaseException as err:
            os.write(w, b"E" + repr(err).encode()[:300])
        time.sleep(60)  # SIGKILLed here at the latest

    def attacher(name, stop, report):
        # Attaches the fixed name over and over until `stop` closes, then reports.
        if CPUS:
            os.sched_setaffinity(0, CPUS[1:])
        os.set_blocking(stop, False)
        tries, problems = 0, []
        while True:
            try:
                if os.read(stop, 1) == b"":
                    break
            except BlockingIOError:
                pass
            outcome = attach(name)
            tries += 1
            if outcome not in ("absent", "whole"):
                problems.append(outcome)
        os.write(report, json.dumps({"tries": tries, "problems": problems[:5]}).encode())

    # The driver's own tracked block: its reaper (shared with its children) is up.
    anchor = shmem.SharedMemory(prefix + "anchor", create=True, size=4096)
    # The driver on one CPU, the creators on the others: the driver's clock and its
    # kill stay on time whatever else the creators start.
    CPUS = sorted(os.sched_getaffinity(0))
    if len(CPUS) > 1:
        os.sched_setaffinity(0, CPUS[:1])
    else:
        CPUS = None
    failures, inside, reaped = [], 0, []
    if mode == "gc":  # a process that attaches all along, during the creations too
        stop_r, stop_w = os.pipe()
        report_r, report_w = os.pipe()
        attacher_pid = os.fork()
        if attacher_pid == 0:
            os.close(stop_w)
            os.close(report_r)
            attacher(prefix + "fixed", stop_r, report_w)
            os._exit(0)
        os.close(stop_r)
        os.close(report_w)
    for i in range(rounds):
        name = prefix + ("fixed" if mode == "gc" else "r%d" % i)
        warm = random.random() < 0.5
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            child(name, warm, w)
            os._exit(0)
        os.close(w)
        # Spin rather than sleep: a woken parent would start the clock tens of
        # microseconds late, past the first steps of the creation.
        os.set_blocking(r, False)
        seen, give_up = None, time.monotonic() + 30
        while seen is None and time.monotonic() < give_up:
            try:
                seen = os.read(r, 1)
            except BlockingIOError:
                pass
        os.set_blocking(r, True)
        if seen != b"g":
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            failures.append(f"round {i}: the child failed before creating: {(seen or b'') + os.read(r, 400)!r}")
            os.close(r)
            break
        # Log-uniform: as many kills per octave of delay, whatever the creation's own
        # timescale on this machine (tens of microseconds to milliseconds).
        deadline = time.perf_counter() + math.exp(random.uniform(math.log(MIN_DELAY), math.log(MAX_DELAY)))
        while time.perf_counter() < deadline:
            pass
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        rest = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            rest += chunk
        os.close(r)
        if b"E" in rest:
            failures.append(f"round {i}: create failed in the child: {rest[rest.index(b'E') + 1:]!r}")
        if b"d" not in rest:
            inside += 1
        outcome = attach(name)
        if outcome not in ("absent", "whole"):
            failures.append(f"round {i}, after the kill: {outcome}")
        if mode == "reaper":
            reaped.append(name)
            continue
        shmem.gc(prefix=name)
        if not wait_removed(name, 1.0):  # (a reaper may be removing it at the same time)
            failures.append(f"round {i}: {left(name)} bytes left under the name after gc()")
            os.unlink("/dev/shm/" + name)  # made by this test: clear it for the next round
        try:
            remove(create(name))
        except Exception as err:
            failures.append(f"round {i}: the next create failed: {type(err).__name__}: {err}")
        if len(failures) >= 5:
            break
    for name in reaped:  # by the reaper alone, within the removal delay (all rounds ran meanwhile)
        if not wait_removed(name, float(sys.argv[5])):
            failures.append(f"{name}: {left(name)} bytes left after the removal delay")
            os.unlink("/dev/shm/" + name)  # made by this test
    attached = None
    if mode == "gc":
        os.close(stop_w)
        attached = json.loads(os.read(report_r, 1 << 16))
        os.waitpid(attacher_pid, 0)
        failures += ["an attacher during the rounds: " + problem for problem in attached["problems"]]
    anchor.close()
    anchor.unlink()
    say(rounds=i + 1, inside=inside, failures=failures, attached=attached)
"""


def _drive(kind: str, prefix: str, rounds: int, mode: str) -> Dict[str, Any]:
    if kind == "array":
        pytest.importorskip("numpy")
    done = subprocess.run(
        script(_DRIVER) + [kind, prefix, str(rounds), mode, str(REAP_WAIT)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


KINDS = ["raw", "list", "array"]


@pytest.mark.parametrize("kind", KINDS)
def test_killed_at_any_instant_the_name_is_free_after_gc(kind: str, shm_prefix: str) -> None:
    """200 creators of one fixed name, each SIGKILLed at a random instant: a
    process attaching all along, and the driver after each kill, saw nothing or
    the whole block; ``gc()`` leaves the name free and the next create of it
    succeeds."""
    report = _drive(kind, shm_prefix, 200, "gc")
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["rounds"] == 200
    assert report["inside"] >= 20, f"only {report['inside']} of 200 kills landed inside the creation"


@pytest.mark.parametrize("kind", KINDS)
def test_killed_at_any_instant_the_reaper_alone_removes_what_is_left(kind: str, shm_prefix: str) -> None:
    """As above without ``gc()``: 40 names, one creator each, SIGKILLed at a random
    instant; within the removal delay nothing is left under any of them."""
    report = _drive(kind, shm_prefix, 40, "reaper")
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["rounds"] == 40
    assert report["inside"] >= 4, f"only {report['inside']} of 40 kills landed inside the creation"
