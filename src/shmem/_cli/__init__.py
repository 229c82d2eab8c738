"""The ``shmem`` command (also ``python -m shmem``): list, inspect, remove and collect blocks.

Data goes to stdout, diagnostics to stderr. Exit codes:

    0  success
    1  nothing matched, or refused (a block in use, a permission denied)
    2  usage error

A missing name, a permission error or a damaged header is a one-line
message, never a traceback.

Names follow the library's one rule (``shmem._core.names.validate``): a name
is one entry of /dev/shm, as ``SharedMemory.name`` and ``shmem ls`` show it,
without the POSIX leading slash. ``shmem info /x`` is refused exactly as
``shmem.inspect_segment("/x")`` is - the library refuses it, with its message
(exit 1), before anything is touched; ``rm`` goes on with its other names, as
after any refusal. ``gc --prefix`` applies the same rule: a prefix holding
``/`` could never match a name.

``--json`` prints each block as an object: the fields of ``Segment`` (see
``shmem._segments``), ``age``, and the fields its kind's header holds (a
list's ``length``; an array's ``dtype``, ``shape``, ``order`` and more: see
``shmem._kinds``), flattened into the same object. docs/guides/cli.md
documents every field.

Names are printed as ``_shown()`` makes them: a name whose bytes are not
UTF-8 (Linux allows any bytes but ``/`` and NUL, and Python hands them over
surrogate-escaped) shows those bytes as ``\\xNN``, unprintable characters
are escaped and a backslash doubled, so every name prints on any terminal and
no two print alike. In ``--json`` such a name's ``name`` is that escaped text
(valid Unicode, which any JSON parser accepts) and ``name_hex`` carries its
exact bytes; a UTF-8 name appears as it is, without ``name_hex``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from .._core import names as _names
from .._errors import InvalidName, SegmentInUse
from .._segments import MAX_FIRST_BYTES, Segment, first_bytes, inspect_segment, list_segments, remove_segment, users_of

EXIT_OK, EXIT_NO_MATCH, EXIT_USAGE = 0, 1, 2


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _human_age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


def _shown(name: str) -> str:
    """``name`` as text that prints anywhere and tells names apart.

    Bytes that are not UTF-8 reach Python as lone surrogates (U+DC80-U+DCFF,
    PEP 383), which no output encoding accepts: they show as ``\\xNN``, the
    byte itself. Other unprintable characters (control characters: a name may
    hold a newline or a terminal escape) show as Python escapes, and a
    backslash is doubled so that an escape is never ambiguous.
    """
    if name.isprintable() and "\\" not in name:  # surrogates are not printable
        return name
    out = []
    for ch in name:
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ascii(ch)[1:-1])
    return "".join(out)


def _is_text(name: str) -> bool:
    """Whether ``name`` is Unicode text: no lone surrogates (bytes that were not UTF-8)."""
    return not any(0xD800 <= ord(ch) <= 0xDFFF for ch in name)


def _name_fields(name: str) -> Dict[str, Any]:
    """JSON fields for a name: ``name``, and ``name_hex`` when it is not UTF-8 text."""
    if _is_text(name):
        return {"name": name}
    return {"name": _shown(name), "name_hex": name.encode("utf-8", "surrogateescape").hex()}


def _lock_summary(fields: Dict[str, Any]) -> str:
    """A lock's holder in a few words, for the listing's KIND column ("" when free)."""
    if fields.get("waiters") is None:
        return "mutex unreadable"
    if fields.get("recoverable") is False:
        return "not recoverable"
    if fields.get("owner_died"):
        return "holder died"
    if fields.get("holder_pid") is not None:
        return f"held by pid {fields['holder_pid']}"
    if fields.get("holder_tid") is not None:
        return f"held by tid {fields['holder_tid']}"
    return ""


def _pids(pids: Sequence[int]) -> str:
    return ("pid " if len(pids) == 1 else "pids ") + ", ".join(map(str, pids))


def _permits(n: int) -> str:
    return f"{n} permit{'' if n == 1 else 's'}"


def _sync_summary(kind: str, fields: Dict[str, Any]) -> str:
    """An event's, condition's, semaphore's or barrier's live state in a few words (KIND column)."""
    if kind == "event":
        is_set = fields.get("is_set")
        return "state unreadable" if is_set is None else "set" if is_set else "not set"
    if kind == "condition":
        waiting = fields.get("n_waiting")
        return "state unreadable" if waiting is None else f"{waiting} waiting" if waiting else ""
    if kind == "barrier":
        if fields.get("broken") is None:
            return "state unreadable"
        return "broken" if fields["broken"] else f"{fields['n_waiting']} waiting" if fields["n_waiting"] else ""
    if fields.get("available") is None:
        return "state unreadable"
    words = [f"{fields['available']} available"]
    pids = sorted({pid for holder in fields["holders"] for pid in holder.pids})
    if pids:
        words.append(f"held by {_pids(pids)}")
    elif fields["held"]:
        words.append(f"{_permits(fields['held'])} held")
    if fields["held_by_dead"]:
        words.append(f"{_permits(fields['held_by_dead'])} of dead holders")
    return "; ".join(words)


_SYNC_KINDS = ("event", "condition", "semaphore", "barrier")


def _queue_summary(fields: Dict[str, Any]) -> str:
    """A queue's fill level in a few words (KIND column)."""
    items = fields.get("items")
    if items is None:
        return "state unreadable"
    words = [f"{items} item{'' if items == 1 else 's'}, {fields['used_bytes']} of {fields['capacity']} bytes"]
    if fields.get("getters_waiting"):
        words.append(f"{fields['getters_waiting']} waiting to get")
    if fields.get("putters_waiting"):
        words.append(f"{fields['putters_waiting']} waiting to put")
    return "; ".join(words)


def _kind_label(s: Segment) -> str:
    label = s.kind + (f" {s.detail}" if s.detail and s.kind != "corrupt" else "")
    if s.kind == "lock":
        summary = _lock_summary(dict(s.kind_fields))
        label += f" ({summary})" if summary else ""
    elif s.kind in _SYNC_KINDS and s.kind_fields:
        summary = _sync_summary(s.kind, dict(s.kind_fields))
        label += f" ({summary})" if summary else ""
    elif s.kind == "queue" and s.kind_fields:
        label += f" ({_queue_summary(dict(s.kind_fields))})"
    elif s.kind == "broadcast" and s.kind_fields:
        b = dict(s.kind_fields)
        label += " (state unreadable)" if b.get("held") is None else f" ({b['published']} published, {b['held']} held)"
    if s.managed:
        label += " (manager)"
    if not s.ready:
        label += " (incomplete)"
    return label


def _as_json(s: Segment) -> Dict[str, Any]:
    record = s._asdict()
    kind_fields = record.pop("kind_fields")
    record.update(_name_fields(s.name))
    record["age"] = s.age
    record.update(kind_fields)  # a list's length, an array's dtype, shape, order...: per kind, never clashing
    if record.get("holders") is not None:  # a semaphore's: (slot, permits, pids) records, as objects
        record["holders"] = [holder._asdict() for holder in record["holders"]]
    return record


def _table(rows: List[List[str]], header: List[str], right: Sequence[int] = ()) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: List[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header)] + [line(r) for r in rows])


def _fail(message: str, code: int = EXIT_NO_MATCH) -> int:
    print(f"shmem: {message}", file=sys.stderr)
    return code


def _describe_error(err: Exception) -> str:
    if isinstance(err, OSError) and isinstance(err.filename, str):
        return f"{_shown(err.filename)}: {err.strerror}"
    return str(err)  # InvalidName and the like: the name is in it as repr(), already escaped


# ------------------------------------------------------------------ commands


def cmd_ls(args: argparse.Namespace) -> int:
    segments = list_segments(include_foreign=args.all)
    if args.json:
        print(json.dumps([_as_json(s) for s in segments], indent=1))
        return EXIT_OK
    if not segments:
        print(
            "no shared memory blocks" + ("" if args.all else " made by shmem (--all shows every block)"),
            file=sys.stderr,
        )
        return EXIT_OK
    rows = [
        [
            _shown(s.name),
            _human_size(s.size),
            _kind_label(s),
            s.state,
            str(s.creator_pid) if s.creator_pid is not None else "-",
            _human_age(s.age),
        ]
        for s in segments
    ]
    print(_table(rows, ["NAME", "SIZE", "KIND", "STATE", "CREATOR", "AGE"], right=(1, 4, 5)))
    print(_totals(segments))
    return EXIT_OK


def _totals(segments: List[Segment]) -> str:
    """The line under ``ls``'s table: how many blocks and bytes in all, then per kind (the
    object store's objects among them), largest first."""
    kinds: Dict[str, List[int]] = {}
    for s in segments:
        count_size = kinds.setdefault(s.kind, [0, 0])
        count_size[0] += 1
        count_size[1] += s.size
    per_kind = sorted(kinds.items(), key=lambda item: (-item[1][1], item[0]))
    parts = ", ".join(f"{kind} {count} ({_human_size(size)})" for kind, (count, size) in per_kind)
    total = sum(s.size for s in segments)
    return f"{len(segments)} block{'s' if len(segments) != 1 else ''}, {_human_size(total)}: {parts}"


def cmd_info(args: argparse.Namespace) -> int:
    try:  # the library checks the name first: "/x" is refused with its message
        s = inspect_segment(args.name)
    except (OSError, ValueError) as err:
        return _fail(_describe_error(err))
    pids = sorted(users_of([s.name])[s.name])
    record = _as_json(s)
    record["used_by"] = pids
    try:
        head = first_bytes(s.name, args.bytes)
    except (OSError, ValueError) as err:
        return _fail(_describe_error(err))
    if args.json:
        record["first_bytes"] = head.hex()
        print(json.dumps(record, indent=1))
        return EXIT_OK
    fields = [
        ("name", _shown(s.name)),
        ("kind", _kind_label(s)),
        ("size", f"{s.size} bytes ({_human_size(s.size)})"),
        ("file size", f"{s.file_size} bytes"),
        ("state", s.state),
        ("creator pid", str(s.creator_pid) if s.creator_pid is not None else "-"),
        ("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created)) if s.created else "-"),
        ("age", _human_age(s.age)),
        ("removed when abandoned", {True: "yes", False: "no (track=False)", None: "- (not made by shmem)"}[s.track]),
        ("complete", "yes" if s.ready else "no"),
        ("held open (users lock)", {True: "yes", False: "no", None: "-"}[s.in_use]),
        ("mapped or open by pids", ", ".join(map(str, pids)) or "none seen"),
        ("owner uid, mode", f"{s.uid}, {s.mode:04o}"),
    ]
    if s.kind == "lock":
        fields += _lock_lines(dict(s.kind_fields))
    elif s.kind in _SYNC_KINDS and s.kind_fields:
        fields += _sync_lines(s.kind, dict(s.kind_fields))
    elif s.kind == "queue" and s.kind_fields:
        fields += _queue_lines(dict(s.kind_fields))
    elif s.kind == "broadcast" and s.kind_fields:
        b = dict(s.kind_fields)
        unreadable = "- (the control words are not a live broadcast's: overwritten?)"
        fields += [
            ("capacity", f"{b['capacity']} bytes"),
            ("published", unreadable if b.get("published") is None else str(b["published"])),
            ("held", "-" if b.get("held") is None else f"{b['held']} messages ({b['used_bytes']} bytes of the ring)"),
            ("asleep in get", "-" if b.get("subscribers_waiting") is None else str(b["subscribers_waiting"])),
        ]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key:<{width}}  {value}")
    print(f"\nfirst {len(head)} bytes:")
    print(_hexdump(head))
    return EXIT_OK


def _lock_lines(lock: Dict[str, Any]) -> List[Any]:
    """``shmem info``'s lines about a lock's mutex: who holds it, who waits, whether its holder died."""
    if lock.get("waiters") is None:
        return [("holder", "- (the block holds no valid mutex: overwritten?)")]
    tid, pid = lock.get("holder_tid"), lock.get("holder_pid")
    if tid is None:
        holder = "none"
    elif pid is None:
        holder = f"thread {tid} (no process here that we may inspect has the lock mapped with it)"
    else:
        holder = f"pid {pid} (thread {tid})"
    lines = [
        ("holder", holder),
        ("waiters", "yes (some thread has waited since it was taken)" if lock["waiters"] else "no"),
        ("owner died", "yes: the next acquire gets owner_died" if lock.get("owner_died") else "no"),
    ]
    if lock.get("recoverable") is False:
        lines.append(("recoverable", "no: a holder died and the next owner released it unrepaired"))
    return lines


def _queue_lines(q: Dict[str, Any]) -> List[Any]:
    """``shmem info``'s lines about a queue: its limits and fill level (a snapshot)."""
    lines = [("capacity", f"{q['capacity']} bytes"), ("maxsize", str(q["maxsize"] or "none (bytes only)"))]
    if q.get("items") is None:
        return lines + [("items", "- (the control words are not a live queue's: overwritten?)")]
    lines += [
        ("items", f"{q['items']} ({q['used_bytes']} bytes of the ring)"),
        ("asleep in get / put", f"{q['getters_waiting']} / {q['putters_waiting']} (one that died stays counted once)"),
    ]
    if q.get("type") == "JoinableQueue":
        lines.append(("unfinished tasks", str(q["unfinished"])))
    return lines


def _sync_lines(kind: str, sync: Dict[str, Any]) -> List[Any]:
    """``shmem info``'s lines about an event's, condition's, semaphore's or barrier's live state."""
    unreadable = "- (the block's words are not a live primitive's: overwritten?)"
    if kind == "event":
        is_set = sync.get("is_set")
        return [("set", unreadable if is_set is None else "yes" if is_set else "no")]
    if kind == "condition":
        waiting = sync.get("n_waiting")
        shown = unreadable if waiting is None else f"{waiting} (registered; one that died stays counted)"
        return [("waiting", shown)]
    if kind == "barrier":
        if sync.get("broken") is None:
            return [("waiting", unreadable)]
        pids = sync["waiting_pids"]
        waiting = f"{sync['n_waiting']} of {sync['parties']}" + (f" ({_pids(pids)})" if pids else "")
        return [("waiting", waiting), ("broken", "yes (until reset())" if sync["broken"] else "no")]
    bounded = sync.get("type") == "BoundedSemaphore"
    lines = [("bound" if bounded else "initial value", str(sync.get("value")))]
    if sync.get("available") is None:
        return lines + [("available", unreadable)]
    holders = []
    for holder in sync["holders"]:
        who = _pids(holder.pids) if holder.pids else f"slot {holder.slot} (a process not visible here)"
        holders.append(f"{who}: {holder.permits}")
    lines += [
        ("available", _permits(sync["available"])),
        ("held", _permits(sync["held"]) + (f" ({'; '.join(holders)})" if holders else "")),
    ]
    if sync["held_by_dead"]:
        dead = _permits(sync["held_by_dead"]) + ", given back at the next acquire that finds none free"
        lines.append(("held by dead processes", dead))
    return lines


def _hexdump(data: bytes) -> str:
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {hexes:<47}  {text}")
    return "\n".join(lines) or "(empty)"


def cmd_rm(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for name in args.names:
        report = f"removed {_shown(name)}"  # made before acting: nothing can fail once it is removed
        try:
            remove_segment(name, force=args.force)  # checks the name first: "/x" is refused, untouched
        except (OSError, ValueError) as err:
            _fail(_describe_error(err) + (" (--force removes it anyway)" if isinstance(err, SegmentInUse) else ""))
            status = EXIT_NO_MATCH
        else:
            print(report)
    return status


def cmd_gc(args: argparse.Namespace) -> int:
    from .._core.sweep import gc

    # A prefix is the start of a name: one holding "/" (or NUL) could never match, and is
    # refused as the name itself would be. Others ("", ".") are starts of valid names.
    if "/" in args.prefix or "\0" in args.prefix:
        try:
            _names.validate(args.prefix)
        except InvalidName as err:
            return _fail(str(err))
    report = gc(dry_run=args.dry_run, prefix=args.prefix)
    if args.json:
        print(
            json.dumps(
                {
                    "dry_run": report.dry_run,
                    "removed": [{**r._asdict(), **_name_fields(r.name)} for r in report],
                    "in_use": [name if _is_text(name) else _shown(name) for name in report.in_use],
                },
                indent=1,
            )
        )
        return EXIT_OK
    verb = "would remove" if args.dry_run else "removed"
    for r in report:
        print(
            f"{verb} {_shown(r.name)} ({_human_size(r.size)}, creator pid {r.creator_pid}, "
            f"age {_human_age(time.time() - r.created)})"
        )
    for name in report.in_use:
        print(f"kept {_shown(name)}: its creator is gone but a process still has it open", file=sys.stderr)
    if not report.removed:
        print("nothing to collect", file=sys.stderr)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run()


def cmd_bench(args: argparse.Namespace) -> int:
    # The benchmarks ship with the source tree, beside src/.
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench.py")
    if not os.path.exists(script):
        return _fail("the benchmarks come with the source repository (benchmarks/bench.py); run it there")
    return subprocess.call([sys.executable, os.path.normpath(script)] + (["--quick"] if args.quick else []))


# ------------------------------------------------------------------ parsing


def _bounded_int(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: a decimal integer from ``low`` to ``high``, or a usage error.

    Decimal digits only (int() would also take "1_000" and other scripts'
    digits), and a number too long to be in range is refused without being
    converted (a 5000-digit one would exceed int's string limit) or echoed
    in full.
    """

    widest = len(str(max(abs(low), abs(high))))

    def convert(text: str) -> int:
        short = text if len(text) <= 24 else text[:20] + "..."
        number = re.fullmatch(r"\s*([+-]?)0*([0-9]+)\s*", text)
        if number is None:
            raise argparse.ArgumentTypeError(f"not a number of {what}: {short!r}")
        sign, magnitude = number.groups()
        if len(magnitude) > widest or not low <= int(sign + magnitude) <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, not {short}")
        return int(sign + magnitude)

    return convert


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"shmem: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _version() -> str:
    import shmem  # the package's single source of its version

    return f"shmem {shmem.__version__}"


_JSON_HELP = "print JSON instead of text (the command guide of the documentation lists every field)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shmem",
        description="List, inspect, remove and collect shared memory blocks (those in /dev/shm).",
        epilog="exit codes: 0 success, 1 nothing matched or refused, 2 usage error. "
        "Names are as `shmem ls` shows them, without a leading slash.",
    )
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    commands = parser.add_subparsers(
        title="commands",
        dest="command",
        metavar="COMMAND",
        parser_class=_Parser,
        help="one of these (`shmem COMMAND --help` tells more):",
    )

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=description)

    ls = command(
        "ls",
        "list shmem's blocks (--all: every block)",
        "List the blocks in /dev/shm that shmem made: name, size, kind, state, creator, age. "
        "States: alive (its creator or a user lives), dead (abandoned: gc removes it), "
        "untracked (made with track=False: nobody removes it automatically), unknown.",
    )
    ls.add_argument("--all", action="store_true", help="also list blocks other programs made (kind foreign)")
    ls.add_argument("--json", action="store_true", help=_JSON_HELP)
    ls.set_defaults(run=cmd_ls)

    info = command(
        "info",
        "everything known about one block",
        "Show one block's header fields, state, the processes that have it mapped or open, "
        "and a hexdump of its first bytes.",
    )
    info.add_argument("name", metavar="NAME", help="the block's name, as `shmem ls` shows it")
    info.add_argument("--json", action="store_true", help=_JSON_HELP)
    info.add_argument(
        "--bytes",
        type=_bounded_int(0, MAX_FIRST_BYTES, "bytes"),
        default=64,
        metavar="N",
        help=f"hexdump the first N bytes (default 64; at most {MAX_FIRST_BYTES})",
    )
    info.set_defaults(run=cmd_info)

    rm = command(
        "rm",
        "remove blocks; refuses one in use unless --force",
        "Remove the named blocks. A block that a process has mapped or open is kept, "
        "unless --force; processes that have it mapped keep their memory either way.",
    )
    rm.add_argument("names", nargs="+", metavar="NAME", help="a block's name, as `shmem ls` shows it")
    rm.add_argument("--force", action="store_true", help="remove blocks even while processes use them")
    rm.set_defaults(run=cmd_rm)

    gc = command(
        "gc",
        "remove abandoned shmem blocks",
        "Remove the blocks shmem made whose creator is gone and that nobody holds open "
        "(state dead). Never touches blocks in use, untracked ones, or other programs' blocks.",
    )
    gc.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    gc.add_argument("--json", action="store_true", help=_JSON_HELP)
    gc.add_argument("--prefix", default="", metavar="PREFIX", help="only blocks whose names start with PREFIX")
    gc.set_defaults(run=cmd_gc)

    demo = command(
        "demo",
        "two processes share a block; what happened and how long it took",
        "Create a 64 MiB block, let a second Python process attach it by name and check it, "
        "and print each step with its time.",
    )
    demo.set_defaults(run=cmd_demo)

    bench = command(
        "bench",
        "run the benchmarks (from a source checkout)",
        "Run benchmarks/bench.py, which comes with the source repository, not with the installed package.",
    )
    bench.add_argument("--quick", action="store_true", help="a short smoke run of every suite, not figures to quote")
    bench.set_defaults(run=cmd_bench)
    return parser


def _never_fail_to_print() -> None:
    """Text that the output encoding cannot hold (a non-ASCII name under
    ``PYTHONIOENCODING=ascii``, say) prints escaped rather than raising
    UnicodeEncodeError - which would come after ``rm`` removed the block."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def main(argv: Optional[List[str]] = None) -> int:
    _never_fail_to_print()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args))
    except BrokenPipeError:  # `shmem ls | head`
        return EXIT_OK
    except OSError as err:
        return _fail(_describe_error(err))
