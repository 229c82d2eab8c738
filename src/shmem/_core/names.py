"""Block names: what is valid, and how new ones are made."""

from __future__ import annotations

import os

from .. import _platform
from .._errors import InvalidName

# The shortest limit among the platforms we intend to support: macOS allows 31
# bytes including the leading slash (PSHMNAMLEN). Generated names stay under it.
_GENERATED_PREFIX = "shmem_"
# Lets tests and deployments tell their blocks apart: generated names start with it.
PREFIX_ENV = "SHMEM_NAME_PREFIX"


def validate(name: object) -> str:
    """Return ``name`` if it can name a block; raise InvalidName (a ValueError) otherwise.

    Checked before anything touches the system, so a bad name has no side effect.
    """
    if not isinstance(name, str):
        raise TypeError(f"a shared memory block's name must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidName("a shared memory block's name cannot be empty")
    if "/" in name:
        raise InvalidName(
            f"shared memory block name {name!r} contains '/'; names are one path component "
            "without the leading slash (as SharedMemory.name reports them)"
        )
    if "\0" in name:
        raise InvalidName(f"shared memory block name {name!r} contains a NUL character")
    if name in (".", ".."):
        raise InvalidName(f"{name!r} is reserved and cannot name a shared memory block")
    if len(name) * 4 <= _platform.NAME_MAX and name.isascii():
        return name  # short ASCII: nothing more to check (the common case, kept fast)
    try:
        encoded = os.fsencode(name)
    except UnicodeError as err:
        raise InvalidName(f"shared memory block name {name!r} cannot be encoded: {err}") from None
    if len(encoded) > _platform.NAME_MAX:
        raise InvalidName(
            f"shared memory block name {name[:20]!r}... is {len(encoded)} bytes long; "
            f"this platform allows {_platform.NAME_MAX}"
        )
    return name


def generate() -> str:
    """A new random name; the caller retries on the (unlikely) collision.

    Unguessable (os.urandom, as secrets.token_hex uses): a name is all another
    process needs to open a block of the same user.
    """
    prefix = os.environ.get(PREFIX_ENV) or _GENERATED_PREFIX
    if prefix is not _GENERATED_PREFIX:
        validate(prefix + "00000000")  # a prefix from the environment is input too
    return prefix + os.urandom(4).hex()
