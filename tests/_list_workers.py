"""ShareableList workers run in child processes (importable under spawn and forkserver).

``module`` is the name of the implementation's module: ``"shmem"`` or
``"multiprocessing.shared_memory"``. A standard-library child that attaches a
list unregisters it from its resource tracker at once, or the tracker would
unlink the block when the test run ends (gh-82300).
"""

from __future__ import annotations

import importlib
import operator
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

#: What a concurrent writer cycles one item through (all of them fit in the 24-byte slot
#: and the standard library represents each exactly).
CYCLE: Tuple[Any, ...] = ("abcd", b"xy", 12345, "h\u00e9llo w\u00f6rld", None, 2.5, True, -7, b"0123456789abcdef")
#: The first value of the cycled item: it sizes its slot (24 bytes).
CYCLE_SLOT = b"0123456789abcdef"


def open_list(module: str, name: str) -> Any:
    mod = importlib.import_module(module)
    sl = mod.ShareableList(name=name)
    if module != "shmem":
        from multiprocessing import resource_tracker

        resource_tracker.unregister("/" + sl.shm.name, "shared_memory")  # as it registered it
    return sl


def close_list(sl: Any) -> None:
    close = getattr(sl, "close", None)
    (close or sl.shm.close)()


def fill(target: Any, start: int, stop: int) -> None:
    """Write i*i into items start..stop-1 of a list given by name or as a (pickled) list."""
    sl = open_list("shmem", target) if isinstance(target, str) else target
    for i in range(start, stop):
        sl[i] = i * i
    sl.close()


def tagged(value: Any) -> Tuple[str, Any]:
    """A value with its exact type: True == 1 == 1.0, but they are different values here."""
    return (type(value).__name__, value)


def cycle_writer(module: str, name: str, indices: Sequence[int], started: Any, stop: Any) -> None:
    """Cycle the items at ``indices`` through CYCLE until ``stop`` is set."""
    sl = open_list(module, name)
    started.set()
    n = 0
    while not stop.is_set():
        for _ in range(200):
            value = CYCLE[n % len(CYCLE)]
            for i in indices:
                sl[i] = value
            n += 1
    close_list(sl)


def _record(result: Dict[str, Any], value: Any, allowed: Any) -> None:
    key = tagged(value)
    if key in allowed:
        result["seen"].add(key)
    else:
        result["nbad"] += 1
        result["bad"] = (result["bad"] + [repr(value)])[:5]


def reader(
    module: str, name: str, mode: str, indices: Sequence[int], fixed: Dict[int, Any], seconds: float, out: Any
) -> None:
    """Read while a writer runs, for ``seconds``; put a summary on ``out``.

    mode "item": read item indices[0] again and again; "list": iterate the whole
    list, and with shmem also take slices and use ``in``, ``count`` and ``==``
    (the standard library has no slices). Items in ``fixed`` must never change.
    """
    allowed = {tagged(v) for v in CYCLE}
    result: Dict[str, Any] = {"reads": 0, "seen": set(), "bad": [], "nbad": 0, "error": None}

    def check(values: Sequence[Any], first: int) -> None:
        for j, value in enumerate(values, first):
            if j in fixed:
                if tagged(value) != tagged(fixed[j]):
                    result["nbad"] += 1
                    result["bad"] = (result["bad"] + [f"fixed item {j}: {value!r}"])[:5]
            else:
                _record(result, value, allowed)

    try:
        sl = open_list(module, name)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(20):
                if mode == "item":
                    _record(result, sl[indices[0]], allowed)
                else:
                    check(list(sl), 0)
                    if module == "shmem":
                        check(sl[:], 0)
                        check(sl[indices[0] : indices[-1] + 1], indices[0])
                        check(sl[::-1][::-1], 0)
                        "abcd" in sl  # noqa: B015 - must not raise
                        sl.count(12345)
                        sl.equals([])
                result["reads"] += 1
        close_list(sl)
    except Exception as err:  # noqa: BLE001 - any exception is the failure we look for
        result["error"] = f"{type(err).__name__}: {err}"
    result["seen"] = sorted(map(repr, result["seen"]))
    out.put(result)


def endless_writer(name: str, indices: Sequence[int], started: Any) -> None:
    """Write forever (until SIGKILLed); ``started`` is set after the first round."""
    sl = open_list("shmem", name)
    n = 0
    while True:
        value = CYCLE[n % len(CYCLE)]
        for i in indices:
            sl[i] = value
        n += 1
        if n == len(CYCLE):
            started.set()


def read_all(name: str, out: Any) -> None:
    """Each item as ("ok", value) or ("error", exception type, message)."""
    items: List[Optional[Tuple[Any, ...]]] = []
    sl = open_list("shmem", name)
    for i in range(len(sl)):
        try:
            items.append(("ok", sl[i]))
        except Exception as err:  # noqa: BLE001
            items.append(("error", type(err).__name__, str(err)))
    close_list(sl)
    out.put(items)


# ---------------------------------------------------------------- a list server, for comparing the two paths


def _outcome(action: Any) -> Tuple[Any, ...]:
    """("ok", value as comparable data) or ("err", the exception's type name)."""
    try:
        return ("ok", _plain(action()))
    except Exception as err:  # noqa: BLE001 - the type is the outcome
        return ("err", type(err).__name__)


def _plain(value: Any) -> Any:
    """A value as data two processes can compare: exact type and repr (nan == nan here)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return (type(value).__name__, repr(value))


def _op(sl: Any, op: Tuple[Any, ...]) -> Any:
    kind, args = op[0], op[1:]
    if kind == "get":
        return lambda: sl[args[0]]
    if kind == "set":
        return lambda: sl.__setitem__(args[0], args[1])
    if kind == "del":
        return lambda: operator.delitem(sl, args[0])
    if kind == "repr":
        return lambda: repr(sl).replace(repr(sl.shm.name), "NAME")
    if kind == "close":
        return lambda: sl.shm.close() if args[0] else sl.close()
    if kind == "helpers":
        i = args[0]
        return lambda: [sl._get_packing_format(i), sl._get_back_transform(i)(b"ab\0"), sl._offset_packing_formats]
    return {
        "len": lambda: len(sl),
        "list": lambda: list(sl),
        "format": lambda: sl.format,
        "contains": lambda: args[0] in sl,
        "count": lambda: sl.count(args[0]),
        "index": lambda: sl.index(args[0]),
        "equals": lambda: sl.equals(args[0]),
    }[kind]


def _attach_and_read(name: str) -> List[Any]:
    import shmem

    with shmem.ShareableList(name=name) as other:
        return list(other)


def serve() -> None:
    """Answer commands from the test on stdin, one pickled (command, args) per
    line of length-prefixed frames, with pickled replies on stdout; holds one
    list at a time. The test runs one server on the C path and one on the
    pure-Python path (``SHMEM_PURE_PYTHON=1``) and compares what they answer."""
    import os
    import pickle
    import struct
    import sys

    import shmem
    from shmem._kinds import list_layout

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sl: Any = None
    block: Any = None

    def reply(value: Any) -> None:
        data = pickle.dumps(value)
        stdout.write(struct.pack("<I", len(data)) + data)
        stdout.flush()

    reply(("ready", list_layout.ACCELERATED, os.getpid()))
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        command, args = pickle.loads(stdin.read(struct.unpack("<I", head)[0]))
        if command == "create":
            try:
                sl = shmem.ShareableList(args)
                block = shmem.SharedMemory(sl.shm.name)  # the bytes, whatever is done to the list
                reply(("ok", bytes(block.buf)))
            except Exception as err:  # noqa: BLE001
                reply(("err", type(err).__name__))
        elif command == "write":  # the whole buffer, damaged by the test
            block.buf[: len(args)] = args
            reply(None)
        elif command == "ops":
            reply([_outcome(_op(sl, op)) for op in args])
        elif command == "attach":
            reply(_outcome(lambda: _attach_and_read(sl.shm.name)))
        elif command == "buffer":
            reply(bytes(block.buf))
        elif command == "drop":
            if sl is not None:
                sl.close()
                block.close()
                block.unlink()
                sl = None
            reply(None)
