"""ShareableList interoperability (issue #3): a list either library made is
attached, read and written by the other - in this process, in other processes
and with the standard library of other Python versions (the 3.9+ layout) - for
every value the standard library can represent.

Standard-library handles that attach are kept out of its resource tracker
(gh-82300: it would unlink the block at exit).
"""

from __future__ import annotations

import ast
import glob
import os
import struct
import subprocess
import sys
import textwrap
from typing import Any, List

import pytest
from conftest import PYTHON
from test_list import STDLIB, attach, close, lists_fixture, tagged, tagged_list  # noqa: F401 - the "lists" fixture

import shmem

#: Every kind of value the standard library represents exactly (no trailing
#: NULs, a str's slot big enough for its UTF-8 in the standard library's sizing).
VALUES = [
    0,
    -1,
    2**63 - 1,
    -(2**63),
    1.5,
    -0.0,
    1e-300,
    True,
    False,
    None,
    "",
    "a",
    "abcdefgh",
    "h\u00e9llo",
    "x" * 23,
    b"",
    b"\xff\x01",
    b"12345678",
    b"y" * 30,
]

#: Writes into a list holding VALUES: every slot gets a value of another kind
#: that fits it (8 bytes for a number's slot), then one more change.
WRITES = [
    (0, "8 bytes!"),
    (1, b"\x00\x01"),
    (2, None),
    (3, True),
    (4, "\u20ac"),
    (5, 7),
    (6, b"z"),
    (7, 2.5),
    (8, "no"),
    (9, -(2**63)),
    (10, 3),
    (11, b"b"),
    (12, "12345678"),
    (13, None),
    (14, "\u00e9" * 11),
    (15, 1e300),
    (16, "s"),
    (17, False),
    (18, b"w" * 24),
    (0, 123),
    (2, "back"),
    (14, "short"),
]


def expected_after_writes() -> List[Any]:
    values = list(VALUES)
    for index, value in WRITES:
        values[index] = value
    return values


@pytest.mark.parametrize("creator,user", [(STDLIB, shmem), (shmem, STDLIB)], ids=["stdlib-made", "shmem-made"])
def test_each_reads_and_writes_the_others_list(creator: Any, user: Any, lists: Any) -> None:
    made = lists(creator, VALUES)
    other = attach(user, made.shm.name)
    try:
        assert len(other) == len(VALUES)
        assert tagged_list(other) == tagged_list(VALUES)
        assert tagged_list(other[i] for i in range(len(VALUES))) == tagged_list(VALUES)
        assert other.format.replace(" ", "") == made.format  # see test_standard_library_format_of_a_shmem_list
        for index, value in WRITES:
            other[index] = value
            assert tagged(made[index]) == tagged(value), (index, value)
        assert tagged_list(made) == tagged_list(expected_after_writes())
        for index, _ in WRITES:  # and back the other way
            made[index] = VALUES[index]
        assert tagged_list(other) == tagged_list(VALUES)
    finally:
        close(other)


def test_standard_library_format_of_a_shmem_list(lists: Any) -> None:
    """The standard library reads shmem's exact-length mark with the format
    ("16s "): still a struct format, of the same size."""
    made = lists(shmem, VALUES)
    theirs = attach(STDLIB, made.shm.name)
    try:
        assert struct.calcsize(theirs.format) == struct.calcsize(made.format)
        assert theirs.format.replace(" ", "") == made.format
    finally:
        close(theirs)


@pytest.mark.parametrize("kind", [str, bytes])
def test_standard_library_writes_replace_shmems_exact_length(kind: Any, lists: Any) -> None:
    """A str/bytes the standard library writes into a slot shmem filled is read
    by the standard library's rule, never with the length shmem recorded."""
    enc = (lambda s: s) if kind is str else (lambda s: s.encode())
    made = lists(shmem, [enc("abcdef"), enc("a\0"), enc("x" * 15), 5])
    theirs = attach(STDLIB, made.shm.name)
    try:
        theirs[0] = enc("xyz")  # shorter than the recorded 6
        theirs[1] = enc("abcdefgh")  # longer than the recorded 2
        theirs[2] = enc("")
        theirs[3] = enc("12345678")  # into a number's slot
        assert tagged_list(made) == tagged_list([enc("xyz"), enc("abcdefgh"), enc(""), enc("12345678")])
        made[0] = enc("a\0\0")  # shmem's own write is exact again
        made[2] = enc("\0")
        assert tagged_list(made[0:3]) == tagged_list([enc("a\0\0"), enc("abcdefgh"), enc("\0")])
        assert tagged_list(theirs[i] for i in (0, 2)) == tagged_list([enc("a"), enc("")])  # its rule
    finally:
        close(theirs)


@pytest.mark.parametrize("kind", [str, bytes])
def test_standard_library_writes_into_a_large_slot_are_read_by_its_rule(kind: Any, lists: Any) -> None:
    """Slots of a megabyte or more have no room for the exact-length mark in
    their format; a standard-library write into one must still never be read
    with the length shmem recorded for the value before."""
    enc = (lambda s: s) if kind is str else (lambda s: s.encode())
    big = enc("x" * 1_000_000 + "\0")
    made = lists(shmem, [big, 1])
    theirs = attach(STDLIB, made.shm.name)
    try:
        assert theirs[0] == big.rstrip(enc("\0"))  # the standard library's own rule
        for value in (enc("short"), enc("y" * 1_000_001), enc("x" * 999_999 + "z\0"), enc("z" * 1_000_007), enc("")):
            theirs[0] = value
            assert made[0] == value.rstrip(enc("\0")), len(value)
        made[0] = big  # shmem's own write is exact again
        assert made[0] == big
    finally:
        close(theirs)


# ---------------------------------------------------------------- other processes, other Pythons

STDLIB_CHILD = textwrap.dedent(
    """
    import ast, sys
    from multiprocessing import resource_tracker, shared_memory
    mode, name, payload = sys.argv[1], sys.argv[2], ast.literal_eval(sys.argv[3])
    if mode == "create":
        sl = shared_memory.ShareableList(payload, name=name)
    else:
        sl = shared_memory.ShareableList(name=name)
    resource_tracker.unregister("/" + sl.shm.name, "shared_memory")  # the block outlives us (gh-82300)
    seen = list(sl)
    if mode == "write":
        for index, value in payload:
            sl[index] = value
    print(repr([seen, sl.format, list(sl)]))
    sl.shm.close()
    """
)


def _interpreters() -> List[Any]:
    """This Python, and the other 3.9+ Pythons installed next to it (pyenv)."""
    found = {f"{sys.version_info[0]}.{sys.version_info[1]}": PYTHON}
    for path in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))):
        version = path.split("/versions/")[1].split("/")[0]
        minor = ".".join(version.split(".")[:2])
        if int(minor.split(".")[1]) >= 9 and minor not in found:
            found[minor] = path
    return [pytest.param(path, id=f"py{minor}") for minor, path in sorted(found.items())]


def _stdlib_child(python: str, mode: str, name: str, payload: Any) -> List[Any]:
    proc = subprocess.run(
        [python, "-c", STDLIB_CHILD, mode, name, repr(payload)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("python", _interpreters())
def test_standard_library_of_another_process_and_version(python: str, shm_name: Any) -> None:
    # The standard library (of that Python) makes a list; shmem here reads and writes it.
    name = shm_name()
    seen, fmt, _ = _stdlib_child(python, "create", name, VALUES)
    mine = shmem.ShareableList(name=name)
    try:
        assert tagged_list(mine) == tagged_list(seen) == tagged_list(VALUES)
        assert mine.format == fmt
        for index, value in WRITES:
            mine[index] = value
        seen, _, _ = _stdlib_child(python, "read", name, None)
        assert tagged_list(seen) == tagged_list(expected_after_writes())
    finally:
        mine.close()
        mine.unlink()

    # shmem makes a list; the standard library of that Python reads and writes it.
    made = shmem.ShareableList(VALUES)
    try:
        seen, fmt, after = _stdlib_child(python, "write", made.shm.name, WRITES)
        assert tagged_list(seen) == tagged_list(VALUES)
        assert fmt.replace(" ", "") == made.format
        assert tagged_list(made) == tagged_list(after) == tagged_list(expected_after_writes())
    finally:
        made.close()
        made.unlink()
