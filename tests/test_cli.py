"""The ``shmem`` command, run as a user runs it: the console script, in subprocesses,
against blocks made by live, exited and SIGKILLed processes and by other programs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from conftest import PYTHON, SHM_DIR, wait_until

import shmem

SCRIPT = str(Path(sys.executable).parent / "shmem")

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


def run(*args: str, check_code: int = 0, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, timeout=60, env=None if env is None else {**os.environ, **env}
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


def test_untracked_blocks_of_a_dead_creator_are_dead_but_kept(shm_prefix: str) -> None:
    maker = Maker(shm_prefix, track=False, new_group=True)
    maker.kill_all()
    found = listed(shm_prefix)
    assert {r["state"] for r in found.values()} == {"dead"} and {r["track"] for r in found.values()} == {False}
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


def test_python_dash_m_and_the_python_api_agree(shm_prefix: str) -> None:
    made = shmem.SharedMemory(shm_prefix + "x", create=True, size=10)
    try:
        via_module = subprocess.run([PYTHON, "-m", "shmem", "ls", "--json"], capture_output=True, text=True)
        names = [r["name"] for r in json.loads(via_module.stdout)]
        segments: List[shmem.Segment] = shmem.list_segments()
        assert made.name in names and made.name in [s.name for s in segments]
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
