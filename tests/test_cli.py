"""The ``shmem`` command, run as a user runs it: ``python -m shmem`` and the console
script, in subprocesses, against blocks made by live, exited and SIGKILLed processes
and by other programs.

Every test works under the unique name prefix of the ``shm_prefix`` fixture (inherited
by the subprocesses) and removes what it made; the fixture fails it otherwise."""

from __future__ import annotations

import argparse
import json
import multiprocessing.shared_memory
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import PYTHON, SHM_DIR, wait_until

import shmem

SCRIPT = str(Path(sys.executable).parent / "shmem")
MODULE = [PYTHON, "-m", "shmem"]
GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guides" / "cli.md"

# Makes blocks of each kind, prints "ready <reaper pid>", waits on stdin.
_MAKER = textwrap.dedent(
    """
    import os, sys
    import shmem
    prefix, track = sys.argv[1], sys.argv[2] == "1"
    raw = shmem.SharedMemory(prefix + "raw", create=True, size=5000, track=track)
    sl = shmem.ShareableList(range(7), name=prefix + "list", track=track)
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        reapers = f.read().split()
    print("ready", *reapers, flush=True)
    sys.stdin.readline()
    """
)


def run(
    *args: str, check_code: int = 0, env: Optional[Dict[str, str]] = None, script: bool = False
) -> subprocess.CompletedProcess:
    """``python -m shmem ARGS`` (the console script with ``script``), checked for its exit code."""
    done = subprocess.run(
        [*([SCRIPT] if script else MODULE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=None if env is None else {**os.environ, **env},
    )
    assert done.returncode == check_code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done


def listed(prefix: str, *extra: str) -> Dict[str, Dict[str, Any]]:
    records = json.loads(run("ls", "--json", *extra).stdout)
    return {r["name"]: r for r in records if r["name"].startswith(prefix)}


class Maker:
    def __init__(self, prefix: str, track: bool = True, new_group: bool = False) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-c", _MAKER, prefix, "1" if track else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=new_group,
        )
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()
        assert words[:1] == [b"ready"]
        self.reapers = [int(w) for w in words[1:]]

    def exit(self) -> None:
        self.proc.communicate(b"\n", timeout=30)

    def kill_all(self) -> None:
        """The maker's process group and its reaper, SIGKILLed at once."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.reapers:
            os.kill(pid, signal.SIGKILL)
        self.proc.communicate(timeout=30)


def test_ls_reports_kind_size_state_and_creator(shm_prefix: str) -> None:
    maker = Maker(shm_prefix)
    try:
        found = listed(shm_prefix)
        raw, sl = found[shm_prefix + "raw"], found[shm_prefix + "list"]
        assert (raw["kind"], raw["size"], raw["state"], raw["creator_pid"]) == ("raw", 5000, "alive", maker.proc.pid)
        assert (sl["kind"], sl["detail"], sl["state"]) == ("list", "7 items", "alive")
        table = run("ls").stdout
        assert shm_prefix + "raw" in table and "4.9 KiB" in table and "NAME" in table.splitlines()[0]
    finally:
        maker.exit()
    assert wait_until(lambda: not listed(shm_prefix))  # removed by the lifecycle after the exit


def test_ls_ends_with_the_totals_per_kind(shm_prefix: str) -> None:
    """The line under the table: blocks and bytes in all, then per kind, largest first (the
    objects that shmem.put made, say, and how much they hold)."""
    from shmem._cli import _totals

    block = shmem.SharedMemory(shm_prefix + "t", create=True, size=1000)
    try:
        one = shmem.inspect_segment(block.name)
        table = run("ls").stdout.splitlines()
        assert re.fullmatch(r"\d+ blocks?, [0-9.]+ (B|KiB|MiB|GiB|TiB): .*\braw \d+ \(.*", table[-1]), table[-1]
        assert not table[-1].startswith(shm_prefix)
    finally:
        block.close()
        block.unlink()
    segments = [one._replace(kind="object", size=3000), one, one._replace(kind="object", size=2000)]
    assert _totals(segments) == "3 blocks, 5.9 KiB: object 2 (4.9 KiB), raw 1 (1000 B)"
    assert _totals([one]) == "1 block, 1000 B: raw 1 (1000 B)"


def test_blocks_of_a_killed_group_are_dead_and_collected(shm_prefix: str) -> None:
    maker = Maker(shm_prefix, new_group=True)
    maker.kill_all()
    found = listed(shm_prefix)
    assert {r["state"] for r in found.values()} == {"dead"} and len(found) == 2

    preview = json.loads(run("gc", "--dry-run", "--json", "--prefix", shm_prefix).stdout)
    assert sorted(r["name"] for r in preview["removed"]) == sorted(found) and preview["dry_run"]
    assert len(listed(shm_prefix)) == 2  # a dry run removes nothing

    collected = run("gc", "--prefix", shm_prefix)
    assert sorted(line.split()[1] for line in collected.stdout.splitlines()) == sorted(found)
    assert listed(shm_prefix) == {}
    again = run("gc", "--prefix", shm_prefix)  # idempotent
    assert again.stdout == "" and "nothing to collect" in again.stderr


def test_untracked_blocks_are_untracked_whether_their_creator_lives_or_not(shm_prefix: str) -> None:
    """track=False blocks were listed "dead" - the word for abandoned ones - once their
    creator was gone. They have a state of their own: nobody removes them automatically."""
    maker = Maker(shm_prefix, track=False, new_group=True)
    alive = listed(shm_prefix)
    assert {r["state"] for r in alive.values()} == {"untracked"} and len(alive) == 2
    table = run("ls").stdout.splitlines()
    assert [line.split()[-3] for line in table if line.startswith(shm_prefix)] == ["untracked", "untracked"]
    info = run("info", shm_prefix + "raw").stdout
    assert "state                   untracked\n" in info and "no (track=False)" in info
    maker.kill_all()
    found = listed(shm_prefix)
    assert {r["state"] for r in found.values()} == {"untracked"} and {r["track"] for r in found.values()} == {False}
    assert json.loads(run("gc", "--dry-run", "--json", "--prefix", shm_prefix).stdout)["removed"] == []
    run("gc", "--prefix", shm_prefix)
    assert len(listed(shm_prefix)) == 2
    run("rm", *found)  # nobody uses them: rm needs no --force
    assert listed(shm_prefix) == {}


def test_foreign_blocks_are_hidden_unknown_and_never_collected(shm_name, shm_prefix: str) -> None:
    name = shm_name()
    with open(f"{SHM_DIR}/{name}", "wb") as f:
        f.write(b"not made by shmem" * 100)
    try:
        assert listed(shm_prefix) == {}
        record = listed(shm_prefix, "--all")[name]
        assert (record["kind"], record["state"], record["size"]) == ("foreign", "unknown", 1700)
        run("gc", "--prefix", shm_prefix)
        assert os.path.exists(f"{SHM_DIR}/{name}")
        info = run("info", name).stdout
        assert "foreign" in info and "6e 6f 74 20 6d 61 64 65" in info  # "not made"
    finally:
        os.unlink(f"{SHM_DIR}/{name}")


def test_rm_refuses_a_block_in_use_unless_forced(shm_prefix: str) -> None:
    maker = Maker(shm_prefix)
    try:
        name = shm_prefix + "raw"
        refused = run("rm", name, check_code=1)
        assert str(maker.proc.pid) in refused.stderr and "--force" in refused.stderr
        assert os.path.exists(f"{SHM_DIR}/{name}")
        run("rm", "--force", name)
        assert not os.path.exists(f"{SHM_DIR}/{name}")
    finally:
        maker.exit()


def test_info_shows_header_fields_and_users(shm_prefix: str) -> None:
    maker = Maker(shm_prefix)
    try:
        record = json.loads(run("info", shm_prefix + "list", "--json", "--bytes", "16").stdout)
        assert record["kind"] == "list" and record["used_by"] == [maker.proc.pid]
        assert record["first_bytes"] == (7).to_bytes(8, sys.byteorder).hex() + "00" * 8
        text = run("info", shm_prefix + "list").stdout
        assert "creator pid" in text and "00000000  07 00 00 00" in text
    finally:
        maker.exit()


def test_errors_are_one_line_with_documented_exit_codes(shm_name) -> None:
    missing = run("info", shm_name(), check_code=1)
    assert missing.stderr.count("\n") == 1 and "no shared memory block" in missing.stderr
    run("rm", shm_name(), check_code=1)
    usage = run("frobnicate", check_code=2)
    assert "invalid choice" in usage.stderr
    run(check_code=2)  # no command


def test_corrupted_header_is_reported_not_raised(shm_name) -> None:
    made = shmem.SharedMemory(shm_name(), create=True, size=100, track=False)
    made.close()
    fd = os.open(f"{SHM_DIR}/{made.name}", os.O_RDWR)
    os.pwrite(fd, b"\xff", os.fstat(fd).st_size - 4096 + 12)  # a flipped flag byte: checksum mismatch
    os.close(fd)
    record = listed(made.name, "--all")[made.name]
    assert record["kind"] == "corrupt" and "checksum" in record["detail"]
    assert "corrupt" in run("info", made.name).stdout
    run("rm", made.name)


def test_the_console_script_python_dash_m_and_the_python_api_agree(shm_prefix: str) -> None:
    made = shmem.SharedMemory(shm_prefix + "x", create=True, size=10)
    try:
        via_script = [r["name"] for r in json.loads(run("ls", "--json", script=True).stdout)]
        via_module = [r["name"] for r in json.loads(run("ls", "--json").stdout)]
        segments: List[shmem.Segment] = shmem.list_segments()
        assert made.name in via_module and made.name in via_script and made.name in [s.name for s in segments]
    finally:
        made.close()
        made.unlink()


# Names Linux allows but that are no UTF-8 text, or hold characters a terminal acts on.
# Python hands the first kind over surrogate-escaped (PEP 383): printing them raised
# UnicodeEncodeError, and `rm` removed the block before it crashed (issue 10).
ODD_NAMES = {
    "not-utf8": (os.fsdecode(b"\xff\xfe-not-utf8"), "\\xff\\xfe-not-utf8"),
    "controls": ("new\nline\x1b[31m-red", "new\\nline\\x1b[31m-red"),
}


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
@pytest.mark.parametrize("odd", list(ODD_NAMES))
def test_odd_names_are_printed_escaped_and_json_safe(odd: str, encoding: str, shm_prefix: str) -> None:
    suffix, escaped_suffix = ODD_NAMES[odd]
    name, escaped = shm_prefix + suffix, shm_prefix + escaped_suffix
    shmem.SharedMemory(name, create=True, size=64, track=False).close()
    env = {"PYTHONIOENCODING": encoding}
    try:
        table = run("ls", "--all", env=env).stdout
        assert [line.split()[0] for line in table.splitlines() if line.startswith(shm_prefix)] == [escaped]

        listing = run("ls", "--json", env=env).stdout
        assert listing.isascii()
        records = [r for r in json.loads(listing) if r["name"].startswith(shm_prefix)]
        json.dumps(records, ensure_ascii=False).encode("utf-8")  # no lone surrogate: any JSON parser takes it
        assert [(r["name"], r.get("name_hex")) for r in records] == [
            (escaped, os.fsencode(name).hex()) if odd == "not-utf8" else (name, None)
        ]

        text = run("info", name, env=env).stdout
        assert f"name                    {escaped}\n" in text
        record = json.loads(run("info", name, "--json", env=env).stdout)
        assert record["name"] == records[0]["name"] and record.get("name_hex") == records[0].get("name_hex")

        assert run("rm", name, env=env).stdout == f"removed {escaped}\n"
        assert not os.path.lexists(f"{SHM_DIR}/{name}")
        missing = run("rm", name, check_code=1, env=env)
        assert missing.stderr == f"shmem: {escaped}: no shared memory block with this name\n"
    finally:
        if os.path.lexists(f"{SHM_DIR}/{name}"):
            os.unlink(f"{SHM_DIR}/{name}")


# Maps a file of /dev/shm as a C program would (shm_open, ftruncate, mmap, close the
# descriptor): only /proc/PID/maps shows it is in use.
_MAPPER = textwrap.dedent(
    """
    import mmap, os, sys
    path = os.fsencode("/dev/shm/") + bytes.fromhex(sys.argv[1])
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 4096)
    mapping = mmap.mmap(fd, 4096)
    os.close(fd)
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


@pytest.mark.parametrize("odd", list(ODD_NAMES))
def test_odd_name_in_use_is_seen_and_refused_with_the_name_escaped(odd: str, shm_prefix: str) -> None:
    """The scan of /proc/PID/maps read text: one mapped path that is not UTF-8, in
    any process, made `info` end in a traceback and `rm` refuse every block."""
    suffix, escaped_suffix = ODD_NAMES[odd]
    name, escaped = shm_prefix + suffix, shm_prefix + escaped_suffix
    mapper = subprocess.Popen(
        [PYTHON, "-c", _MAPPER, os.fsencode(name).hex()], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert mapper.stdout is not None and mapper.stdout.readline() == b"ready\n"
        env = {"PYTHONIOENCODING": "utf-8"}
        assert json.loads(run("info", name, "--json", env=env).stdout)["used_by"] == [mapper.pid]
        refused = run("rm", name, check_code=1, env=env)
        assert refused.stderr == f"shmem: {escaped}: in use by processes {mapper.pid} (--force removes it anyway)\n"
        assert os.path.lexists(f"{SHM_DIR}/{name}")
        with shmem.SharedMemory(create=True, size=64) as other:  # a block beside it is unaffected
            assert json.loads(run("info", str(other.name), "--json", env=env).stdout)["used_by"] == [os.getpid()]
            other.unlink()
    finally:
        mapper.communicate(b"\n", timeout=30)
        if os.path.lexists(f"{SHM_DIR}/{name}"):
            os.unlink(f"{SHM_DIR}/{name}")


OUT_OF_BOUNDS = ["-1", "99999999999999999999", str(2**64), "100000000000", "1e3", "0x10", "abc", "", "9" * 5000]


def _numeric_options() -> List[Any]:
    """(command, option, positional arguments it needs) for every option of every
    command that converts its value: each must be bounded."""
    import argparse

    from shmem._cli import build_parser

    found = []
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, sub in commands.choices.items():
        positionals = ["x" for a in sub._actions if not a.option_strings]
        for action in sub._actions:
            if action.option_strings and action.type not in (None, str):
                option = action.option_strings[-1]
                found.append(pytest.param(command, option, positionals, id=f"{command}-{action.dest}"))
    assert found  # shmem info --bytes, at least
    return found


@pytest.mark.parametrize("command,option,positionals", _numeric_options())
def test_every_numeric_argument_is_bounded(command: str, option: str, positionals: List[str]) -> None:
    """A value out of range is a usage error (exit 2, one line), never a MemoryError
    or OverflowError traceback (issue 10: --bytes 100000000000 allocated, then died)."""
    for value in OUT_OF_BOUNDS:
        refused = run(command, *positionals, f"{option}={value}", check_code=2)
        assert refused.stdout == "" and refused.stderr.splitlines()[-1].startswith("shmem: argument")
        assert len(refused.stderr) < 1000  # the value is not echoed in full


def test_first_bytes_is_bounded_in_the_api_too(shm_name: Any) -> None:
    from shmem._segments import MAX_FIRST_BYTES, first_bytes

    for count in (-1, MAX_FIRST_BYTES + 1, 2**64):
        with pytest.raises(ValueError):
            first_bytes(shm_name(), count)


# ================================================================ one name rule for the command and the library
#
# The command took '/my_block' where the library refused it, and then reported fewer of
# the processes using the block than for 'my_block'. Now a name is what the library
# takes, and nothing else: a leading slash is refused with the library's own message
# (exit 1, "refused"), before anything is touched.


def _subcommands() -> Dict[str, argparse.ArgumentParser]:
    from shmem._cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


def library_message(name: str) -> str:
    """What every entry point of the library says to ``name``: one message."""
    messages = set()
    for call in (
        lambda: shmem.SharedMemory(name),
        lambda: shmem.SharedMemory(name, create=True, size=10),
        lambda: shmem.ShareableList(name=name),
        lambda: shmem.inspect_segment(name),
        lambda: shmem.remove_segment(name),
    ):
        with pytest.raises(shmem.InvalidName) as refused:
            call()
        messages.add(str(refused.value))
    assert len(messages) == 1, messages
    return messages.pop()


# Every way a subcommand takes a name or the start of one: the arguments before it.
NAME_TAKERS = {
    "info": ["info"],
    "info-json": ["info", "--json"],
    "info-bytes": ["info", "--bytes", "8"],
    "rm": ["rm"],
    "rm-force": ["rm", "--force"],
    "gc-prefix": ["gc", "--prefix"],
    "gc-dry-run-json-prefix": ["gc", "--dry-run", "--json", "--prefix"],
}
SLASHED = {"leading": "/{}", "two-leading": "//{}", "trailing": "{}/", "inside": "{}/x"}


def test_every_subcommand_that_takes_a_name_is_covered() -> None:
    taking = {
        command
        for command, sub in _subcommands().items()
        for action in sub._actions
        if action.metavar in ("NAME", "PREFIX")
    }
    assert taking == {words[0] for words in NAME_TAKERS.values()}


@pytest.fixture
def maker(shm_prefix: str) -> Iterator[Maker]:
    """A live process holding a tracked raw block and a list, both under this test's prefix."""
    made = Maker(shm_prefix)
    try:
        yield made
    finally:
        made.exit()


@pytest.mark.parametrize("slashed", list(SLASHED))
@pytest.mark.parametrize("taker", list(NAME_TAKERS))
def test_a_slash_in_a_name_is_refused_with_the_library_message(
    taker: str, slashed: str, maker: Maker, shm_prefix: str
) -> None:
    is_prefix = taker.startswith("gc")
    name = shm_prefix if is_prefix else shm_prefix + "raw"
    bad = SLASHED[slashed].format(name)
    refused = run(*NAME_TAKERS[taker], bad, check_code=1)
    assert refused.stdout == ""
    assert refused.stderr == f"shmem: {library_message(bad)}\n"
    assert os.path.exists(f"{SHM_DIR}/{shm_prefix}raw") and os.path.exists(f"{SHM_DIR}/{shm_prefix}list")


def test_rm_refuses_a_slashed_name_and_goes_on_with_the_others(shm_name: Any) -> None:
    """As after any refusal: `rm /a a` refuses '/a' (touching nothing), then removes 'a'."""
    made = shmem.SharedMemory(shm_name(), create=True, size=10, track=False)
    made.close()
    refused = run("rm", "/" + made.name, made.name, check_code=1)
    assert refused.stderr == f"shmem: {library_message('/' + made.name)}\n"
    assert refused.stdout == f"removed {made.name}\n"
    assert not os.path.exists(f"{SHM_DIR}/{made.name}")


def test_names_as_ls_shows_them_are_what_info_and_rm_take(maker: Maker, shm_prefix: str) -> None:
    """`ls` prints names as the library reports them (SharedMemory.name), without a
    slash; `info` on such a name sees every process using the block, as the library does."""
    loose = shmem.SharedMemory(create=True, size=10, track=False)
    loose.close()
    try:
        records = listed(shm_prefix)
        assert sorted(records) == sorted([shm_prefix + "raw", shm_prefix + "list", loose.name])
        table = [line.split()[0] for line in run("ls").stdout.splitlines() if line.startswith(shm_prefix)]
        assert sorted(table) == sorted(records)
        assert not any("/" in name for name in records)
        for name in (shm_prefix + "raw", shm_prefix + "list"):
            info = json.loads(run("info", name, "--json").stdout)
            assert info["name"] == name and info["used_by"] == [maker.proc.pid]
            assert f"mapped or open by pids  {maker.proc.pid}\n" in run("info", name).stdout
        with shmem.SharedMemory(loose.name, track=False) as attached:  # the test process too, now
            assert json.loads(run("info", attached.name, "--json").stdout)["used_by"] == [os.getpid()]
    finally:
        assert run("rm", loose.name).stdout == f"removed {loose.name}\n"
    assert sorted(listed(shm_prefix)) == [shm_prefix + "list", shm_prefix + "raw"]


# ================================================================ --json: the fields of each kind

# The fields every record has, and their JSON types (None: null). docs/guides/cli.md lists them.
COMMON_FIELDS: Dict[str, Tuple[type, ...]] = {
    "name": (str,),
    "size": (int,),
    "file_size": (int,),
    "kind": (str,),
    "detail": (str,),
    "state": (str,),
    "managed": (bool,),
    "track": (bool, type(None)),
    "ready": (bool,),
    "in_use": (bool, type(None)),
    "creator_pid": (int, type(None)),
    "created": (float, type(None)),
    "uid": (int,),
    "mode": (int,),
    "age": (float, type(None)),
}
LIST_FIELDS = {"length": (int,)}
ARRAY_FIELDS: Dict[str, Tuple[type, ...]] = {
    "dtype": (str,),
    "shape": (list,),
    "order": (str,),
    "ndim": (int,),
    "itemsize": (int,),
    "nbytes": (int,),
    "fields": (list, type(None)),
}
LOCK_FIELDS: Dict[str, Tuple[type, ...]] = {
    "type": (str,),
    "holder_tid": (int, type(None)),
    "holder_pid": (int, type(None)),
    "waiters": (bool, type(None)),
    "owner_died": (bool, type(None)),
    "recoverable": (bool, type(None)),
}
NULLABLE_INT, NULLABLE_BOOL = (int, type(None)), (bool, type(None))
EVENT_FIELDS: Dict[str, Tuple[type, ...]] = {"type": (str,), "is_set": NULLABLE_BOOL}
CONDITION_FIELDS: Dict[str, Tuple[type, ...]] = {"type": (str,), "n_waiting": NULLABLE_INT}
SEMAPHORE_FIELDS: Dict[str, Tuple[type, ...]] = {
    "type": (str,),
    "value": (int,),
    "available": NULLABLE_INT,
    "held": NULLABLE_INT,
    "held_by_dead": NULLABLE_INT,
    "holders": (list, type(None)),
}
BARRIER_FIELDS: Dict[str, Tuple[type, ...]] = {
    "type": (str,),
    "parties": (int,),
    "n_waiting": NULLABLE_INT,
    "broken": NULLABLE_BOOL,
    "waiting_pids": (list, type(None)),
}
INFO_FIELDS = {"used_by": (list,), "first_bytes": (str,)}


def check_schema(record: Dict[str, Any], *extra: Dict[str, Tuple[type, ...]]) -> None:
    schema: Dict[str, Tuple[type, ...]] = dict(COMMON_FIELDS)
    for fields in extra:
        schema.update(fields)
    assert set(record) == set(schema), set(record) ^ set(schema)
    for key, types in schema.items():
        assert type(record[key]) in types, (key, record[key])  # exact: a bool is no int here


def test_json_fields_of_raw_and_list_blocks(maker: Maker, shm_prefix: str) -> None:
    found = listed(shm_prefix)
    raw, sl = found[shm_prefix + "raw"], found[shm_prefix + "list"]
    check_schema(raw)
    check_schema(sl, LIST_FIELDS)
    assert sl["length"] == 7 and sl["detail"] == "7 items"
    assert (raw["kind"], raw["detail"], raw["track"], raw["ready"], raw["managed"]) == ("raw", "", True, True, False)
    info = json.loads(run("info", shm_prefix + "list", "--json").stdout)
    check_schema(info, LIST_FIELDS, INFO_FIELDS)
    assert info["length"] == 7


def test_json_fields_of_foreign_and_standard_library_blocks(shm_name: Any, shm_prefix: str) -> None:
    stdlib = multiprocessing.shared_memory.SharedMemory(shm_name(), create=True, size=100)
    stdlib_list = multiprocessing.shared_memory.ShareableList([1, "two"], name=shm_name())
    other = shm_name()
    with open(f"{SHM_DIR}/{other}", "wb") as f:
        f.write(b"x" * 300)
    try:
        assert listed(shm_prefix) == {}  # hidden without --all
        found = listed(shm_prefix, "--all")
        assert sorted(found) == sorted([stdlib.name, stdlib_list.shm.name, other])
        for record in found.values():
            check_schema(record)
            assert (record["kind"], record["state"], record["track"], record["creator_pid"]) == (
                "foreign",
                "unknown",
                None,
                None,
            )
        assert (found[stdlib.name]["size"], found[other]["size"]) == (100, 300)
        info = json.loads(run("info", stdlib.name, "--json", "--bytes", "4").stdout)
        check_schema(info, INFO_FIELDS)
        assert info["used_by"] == [os.getpid()] and info["first_bytes"] == "00000000"
    finally:
        os.unlink(f"{SHM_DIR}/{other}")
        stdlib_list.shm.close()
        stdlib_list.shm.unlink()
        stdlib.close()
        stdlib.unlink()


def test_json_fields_of_lock_blocks(shm_prefix: str) -> None:
    free, held = shmem.Lock(), shmem.RLock()
    assert free.name is not None and held.name is not None
    with held:
        found = listed(shm_prefix)
        for record in (found[free.name], found[held.name]):
            check_schema(record, LOCK_FIELDS)
        assert (found[free.name]["type"], found[free.name]["holder_pid"], found[free.name]["waiters"]) == (
            "Lock",
            None,
            False,
        )
        info = json.loads(run("info", held.name, "--json").stdout)
        check_schema(info, LOCK_FIELDS, INFO_FIELDS)
        assert (info["type"], info["holder_pid"], info["holder_tid"], info["owner_died"], info["recoverable"]) == (
            "RLock",
            os.getpid(),
            threading.get_native_id(),
            False,
            True,
        )
        assert info["used_by"] == [os.getpid()]
    free.close()
    held.close()


# Two processes (this one and a forked child) each hold a permit of a BoundedSemaphore(3)
# and wait at a Barrier(3); a third child took a permit and exited; an event is set and
# a thread waits on a condition. Prints the names and pids, waits on stdin.
_SYNC_MAKER = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import shmem
    sem, barrier = shmem.BoundedSemaphore(3), shmem.Barrier(3)
    event, cond = shmem.Event(), shmem.Condition()
    event.set()
    def party():
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
    pid = os.fork()
    if pid == 0:
        sem.acquire()
        party()
        os._exit(0)
    gone = os.fork()
    if gone == 0:
        sem.acquire()
        os._exit(0)  # without releasing: its permit is held by a dead process
    os.waitpid(gone, 0)
    sem.acquire()
    threading.Thread(target=party, daemon=True).start()
    def waiter():
        with cond:
            cond.wait()
    threading.Thread(target=waiter, daemon=True).start()
    while barrier.n_waiting < 2:
        time.sleep(0.01)
    time.sleep(0.1)
    names = {k: o.name for k, o in dict(sem=sem, barrier=barrier, event=event, cond=cond).items()}
    print(json.dumps({"names": names, "pids": [os.getpid(), pid]}), flush=True)
    sys.stdin.readline()
    barrier.abort()
    os.waitpid(pid, 0)
    """
)


def test_live_state_of_events_conditions_semaphores_and_barriers(shm_prefix: str) -> None:
    maker = subprocess.Popen([PYTHON, "-c", _SYNC_MAKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert maker.stdout is not None
        made = json.loads(maker.stdout.readline())
        names, pids = made["names"], made["pids"]
        found = listed(shm_prefix)
        sem, barrier, event, cond = (found[names[k]] for k in ("sem", "barrier", "event", "cond"))
        check_schema(sem, SEMAPHORE_FIELDS)
        check_schema(barrier, BARRIER_FIELDS)
        check_schema(event, EVENT_FIELDS)
        check_schema(cond, CONDITION_FIELDS)
        assert (sem["type"], sem["value"], sem["available"], sem["held"], sem["held_by_dead"]) == (
            "BoundedSemaphore",
            3,
            0,
            2,
            1,
        )
        assert sorted(pid for h in sem["holders"] for pid in h["pids"]) == sorted(pids)
        assert all(set(h) == {"slot", "permits", "pids"} and h["permits"] == 1 for h in sem["holders"])
        assert (barrier["parties"], barrier["n_waiting"], barrier["broken"]) == (3, 2, False)
        assert sorted(barrier["waiting_pids"]) == sorted(pids)
        assert event["is_set"] is True and cond["n_waiting"] == 1
        kinds = {line.split()[0]: line for line in run("ls").stdout.splitlines()[1:]}
        assert "semaphore BoundedSemaphore(3) (0 available; held by pids " in kinds[names["sem"]]
        assert "; 1 permit of dead holders)" in kinds[names["sem"]]
        assert "barrier Barrier(3) (2 waiting)" in kinds[names["barrier"]]
        assert "event Event (set)" in kinds[names["event"]]
        assert "condition Condition (1 waiting)" in kinds[names["cond"]]
        info = run("info", names["sem"]).stdout
        assert "\nbound                   3\n" in info and "\navailable               0 permits\n" in info
        assert f"pid {pids[0]}: 1" in info and f"pid {pids[1]}: 1" in info
        assert "held by dead processes  1 permit, given back" in info
        info = run("info", names["barrier"]).stdout
        assert "\nwaiting                 2 of 3 (pids " in info and "\nbroken                  no\n" in info
        record = json.loads(run("info", names["sem"], "--json").stdout)
        check_schema(record, SEMAPHORE_FIELDS, INFO_FIELDS)
    finally:
        maker.communicate("\n", timeout=30)
    assert maker.returncode == 0


def test_an_overwritten_primitive_shows_null_state(shm_prefix: str) -> None:
    objs = [shmem.Event(), shmem.Condition(), shmem.Semaphore(2), shmem.Barrier(2)]
    for obj in objs:
        fd = os.open(f"{SHM_DIR}/{obj.name}", os.O_RDWR)
        try:
            os.pwrite(fd, b"\xff" * 512, 64)  # the words, not the mutex: garbage where the state is
        finally:
            os.close(fd)
    try:
        found = listed(shm_prefix)
        records = [found[str(o.name)] for o in objs]
        for record, schema, live in zip(
            records,
            (EVENT_FIELDS, CONDITION_FIELDS, SEMAPHORE_FIELDS, BARRIER_FIELDS),
            ("is_set", "n_waiting", "available", "broken"),
        ):
            check_schema(record, schema)
            assert record[live] is None, record
        assert "(state unreadable)" in run("ls").stdout
        for obj in objs:
            assert "overwritten?" in run("info", str(obj.name)).stdout
    finally:
        for obj in objs:
            obj.close()


# Makes arrays of several dtypes and orders, prints what NumPy says of each, waits on stdin.
_ARRAY_MAKER = textwrap.dedent(
    """
    import json, sys
    import shmem
    made = {
        "plain-f": shmem.zeros((3, 4), dtype="<f4", order="F"),
        "plain-c": shmem.zeros((2, 3, 5), dtype=">i2"),
        "scalar": shmem.zeros((), dtype="<c16"),
        "empty": shmem.zeros((0, 7), dtype="<u8"),
        "text": shmem.zeros(4, dtype="<U10"),
        "datetime": shmem.zeros(3, dtype="<M8[ns]"),
        "structured": shmem.zeros(5, dtype=[("x", "<f8"), ("y", "<i2")]),
        "subarray": shmem.zeros(2, dtype=("<i4", (3,))),
        "untracked": shmem.zeros(6, dtype="<f8", track=False),
    }
    print(json.dumps({case: {
        "name": a.name, "dtype": a.dtype.str, "shape": list(a.shape), "ndim": a.ndim,
        "order": "F" if a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous else "C",
        "itemsize": a.itemsize, "nbytes": a.nbytes,
        "fields": list(a.dtype.names) if a.dtype.names else None,
    } for case, a in made.items()}), flush=True)
    sys.stdin.readline()
    """
)


def test_json_fields_of_array_blocks(shm_prefix: str) -> None:
    pytest.importorskip("numpy")
    maker = subprocess.Popen([PYTHON, "-c", _ARRAY_MAKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    untracked = None
    try:
        assert maker.stdout is not None
        expected = json.loads(maker.stdout.readline())
        untracked = expected["untracked"]["name"]
        found = listed(shm_prefix)
        assert sorted(found) == sorted(e["name"] for e in expected.values())
        for case, numpy_says in expected.items():
            record = found[numpy_says["name"]]
            check_schema(record, ARRAY_FIELDS)
            assert {key: record[key] for key in numpy_says} == numpy_says, case
            assert record["kind"] == "array" and record["state"] == ("untracked" if case == "untracked" else "alive")
            kind_text = f"{'structured' if numpy_says['fields'] else numpy_says['dtype']} {tuple(record['shape'])}"
            assert record["detail"] == f"{kind_text} {record['order']}", case  # the text says the same
        info = json.loads(run("info", expected["structured"]["name"], "--json").stdout)
        check_schema(info, ARRAY_FIELDS, INFO_FIELDS)
        assert (info["dtype"], info["fields"], info["used_by"]) == ("|V10", ["x", "y"], [maker.pid])
    finally:
        maker.communicate("\n", timeout=30)
        if untracked is not None:
            run("rm", untracked)


def test_the_guide_documents_every_json_field() -> None:
    guide = GUIDE.read_text(encoding="utf-8")
    fields = [*COMMON_FIELDS, *LIST_FIELDS, *ARRAY_FIELDS, *LOCK_FIELDS, *INFO_FIELDS]
    fields += [*EVENT_FIELDS, *CONDITION_FIELDS, *SEMAPHORE_FIELDS, *BARRIER_FIELDS]
    for field in [*fields, "name_hex", "dry_run", "removed"]:
        assert f"| `{field}` |" in guide, field
    for state in ("alive", "dead", "untracked", "unknown"):
        assert f"`{state}`" in guide, state


# ================================================================ help and version


def test_every_option_and_argument_has_help() -> None:
    for command, sub in _subcommands().items():
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (command, action.dest)


@pytest.mark.parametrize("command", list(_subcommands()))
def test_help_of_every_subcommand(command: str) -> None:
    sub = _subcommands()[command]
    shown = run(command, "--help", env={"COLUMNS": "100"})
    assert shown.stdout.startswith(f"usage: shmem {command}") and shown.stderr == ""
    assert sub.description and " ".join(sub.description.split()[:4]) in " ".join(shown.stdout.split())
    for action in sub._actions:
        for word in action.option_strings or [action.metavar or action.dest]:
            assert word in shown.stdout, (command, word)


def test_help_lists_every_command_on_one_line() -> None:
    from shmem._cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {choice.dest: choice.help for choice in commands._choices_actions}
    assert set(summaries) == set(commands.choices)
    for args in (["--help"], ["-h"]):
        lines = run(*args, env={"COLUMNS": "100"}).stdout.splitlines()
        for command, summary in summaries.items():
            assert sum(line.split() == [command, *str(summary).split()] for line in lines) == 1, command
    for action in parser._actions:
        assert action.help, action.dest


def test_version() -> None:
    expected = f"shmem {shmem.__version__}\n"
    assert run("--version").stdout == expected
    assert run("--version", script=True).stdout == expected
