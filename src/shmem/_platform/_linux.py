"""Linux backend: POSIX shared memory as files on the /dev/shm tmpfs.

glibc's ``shm_open(name)`` is ``open("/dev/shm/" + name, flags | O_NOFOLLOW |
O_CLOEXEC)``, so blocks opened through paths here are the very blocks the
standard library and C programs see. Working with paths lets us refuse
symlinks and special files explicitly and reserve memory with
``posix_fallocate()``.

Every ``OSError`` is translated into a shmem error at this boundary, naming the
block; nothing above this module looks at errno.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import stat
import struct
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from .._errors import InvalidName, NoSpace, SegmentExists, SegmentNotFound, ShmemError, UnsafeSegment

SHM_DIR = "/dev/shm"

try:
    NAME_MAX = os.pathconf(SHM_DIR, "PC_NAME_MAX")
except (OSError, ValueError):  # pragma: no cover - /dev/shm always answers on Linux
    NAME_MAX = 255


_OPEN_EXISTING = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_OPEN_EXISTING_RO = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# An unnamed file in /dev/shm (Linux >= 3.11 on tmpfs): it exists only through
# its descriptor until link() gives it a name, and vanishes with the descriptor.
_CREATE_UNNAMED = os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC


def path_of(name: str) -> str:
    """The path of block ``name``: always an entry directly inside /dev/shm.

    Every function here that touches a block goes through this check, whatever
    its callers already validated: a name with a directory part, ``.`` or
    ``..`` could otherwise reach files outside /dev/shm (``rm ../../etc/x``).
    The last component is never followed as a symlink (O_NOFOLLOW, lstat).
    """
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise InvalidName(f"{name!r} is not a shared memory block name: it must be one entry of {SHM_DIR}")
    return SHM_DIR + "/" + name


# --------------------------------------------------------------------- the C fast path
#
# ``_fastpath`` (C) makes the attach and create paths' system calls without
# building Python objects for fields nobody reads (os.fstat alone costs ~2 us),
# several per call; each of its functions has a pure-Python twin below, which
# behaves the same.


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "") not in ("", "0")


#: SHMEM_PURE_PYTHON=1: every C fast path off, for testing the fallbacks (the same behaviour, slower).
PURE_REQUESTED = _flag("SHMEM_PURE_PYTHON")
#: SHMEM_REQUIRE_SPEEDUPS=1 (CI): a C fast path that did not build is an ImportError, not a silent fallback.
SPEEDUPS_REQUIRED = _flag("SHMEM_REQUIRE_SPEEDUPS") and not PURE_REQUESTED

try:
    if PURE_REQUESTED:
        raise ImportError("pure Python requested (SHMEM_PURE_PYTHON)")
    from . import _fastpath

    if getattr(_fastpath, "VERSION", None) != 3:
        raise ImportError("shmem._platform._fastpath is a stale build")
    ACCELERATED = True
except ImportError as _err:
    if SPEEDUPS_REQUIRED:
        raise ImportError(
            f"SHMEM_REQUIRE_SPEEDUPS is set, but shmem's C extension for attaching is not usable ({_err}); "
            "reinstall shmem where a C compiler is present, or unset the variable"
        ) from _err
    _fastpath = None  # type: ignore[assignment]
    ACCELERATED = False


# --------------------------------------------------------------------- files


def build_unnamed(total: int, pieces: Sequence[Tuple[int, bytes]], name: str) -> Opened:
    """An unnamed file in /dev/shm of ``total`` bytes, reserved, with each
    (offset, bytes) piece written into it, for a block that will be called
    ``name`` (used in error messages only); ``publish`` names it.

    Built unnamed, a block cannot be seen half made, and a creator killed at
    any instant before ``publish`` leaves nothing behind: the kernel frees an
    unnamed file with its last descriptor. The mode is 0600 whatever the
    umask (fixed only when the umask took the owner's bits): nobody else may
    ever read or write the block. Raises NoSpace when /dev/shm cannot hold it.

    One ``_build`` call makes the file (open, fstat, fchmod if needed,
    fallocate) and writes a lone piece - a raw block's header, the whole of
    a 4 KiB create's writing; a kind's contents (several pieces, or a fill
    made one copy at a time) are written here afterwards, piece by piece.
    """
    if total >= _PRECHECK_BYTES:
        _precheck(total, name)
    lone = type(pieces) is list and len(pieces) == 1
    raw = _build(SHM_DIR, _CREATE_UNNAMED, total, pieces if lone else ())
    fd = raw[0]
    if fd < 0:
        raise _build_error(raw[1], raw[2], total, name)
    if not lone:
        try:
            for offset, data in pieces:  # through the file: no page faults, unlike a mapping
                _pwrite_all(fd, data, offset)
        except OSError as err:
            os.close(fd)
            raise _translate(err, name) from err
        except BaseException:
            os.close(fd)
            raise
    return tuple.__new__(Opened, (fd, total, raw[1], raw[2], 0, 0))  # Opened(fd, total, inode, mtime), positional


# Where ``_build`` stopped: which step an errno comes from decides what it means.
_STAGE_OPEN, _STAGE_MODE, _STAGE_RESERVE, _STAGE_WRITE = 1, 2, 3, 4


def _build_error(code: int, stage: int, total: int, name: str) -> Exception:
    """The shmem error for errno ``code`` from step ``stage`` of ``_build``."""
    err = OSError(code, os.strerror(code))
    if stage == _STAGE_OPEN and code in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
        failed: Exception = ShmemError(
            f"{SHM_DIR} does not support unnamed files (O_TMPFILE): shmem needs Linux >= 3.11 with /dev/shm on tmpfs"
        )
    elif stage == _STAGE_RESERVE and code in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
        failed = NoSpace(name, f"{total} bytes do not fit in {SHM_DIR}: {err.strerror}")
    else:
        failed = _translate(err, name)
    failed.__cause__ = err
    return failed


def _build_python(directory: str, flags: int, total: int, pieces: Sequence[Tuple[int, Any]]) -> _Raw:
    """The pure-Python twin of ``_fastpath.build``: (fd, inode, mtime), or
    (-1, errno, stage) with nothing left open."""
    try:
        fd = os.open(directory, flags, 0o600)
    except OSError as err:
        return -1, err.errno, _STAGE_OPEN
    stage = _STAGE_MODE
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o777 != 0o600:
            os.fchmod(fd, 0o600)
        stage = _STAGE_RESERVE
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, total)  # a file system without fallocate: sized, unreserved
        stage = _STAGE_WRITE
        for offset, data in pieces:
            _pwrite_all(fd, data, offset)
    except OSError as err:
        os.close(fd)
        return -1, err.errno, stage
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_ino, st.st_mtime


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    """os.pwrite until all of ``data`` is written: a signal can cut a long write short."""
    written = os.pwrite(fd, data, offset)
    size = len(data) if type(data) is bytes else memoryview(data).nbytes
    while written < size:
        written += os.pwrite(fd, memoryview(data).cast("B")[written:], offset + written)


def open_published(name: str, inode: int) -> int:
    """A read-write descriptor of block ``name``, which this process just
    published as the file with this inode; SegmentNotFound if the name leads
    elsewhere already (removed and re-created by another process)."""
    try:
        fd = _open_same(path_of(name), _OPEN_EXISTING, inode)
    except OSError as err:
        raise _translate(err, name) from err
    if fd < 0:
        raise SegmentNotFound(name, "the shared memory block was removed by another process as it was created")
    return fd


def _open_same_python(path: str, flags: int, inode: int) -> int:
    """The pure-Python twin of ``_fastpath.open_same``: open, fstat; the
    descriptor if it is the file with this inode, else -1 (closed)."""
    fd = os.open(path, flags)
    try:
        same = os.fstat(fd).st_ino == inode
    except BaseException:
        os.close(fd)
        raise
    if not same:
        os.close(fd)
        return -1
    return fd


def publish(fd: int, name: str) -> None:
    """Give the unnamed file ``fd`` the name ``name``, atomically; SegmentExists
    (a FileExistsError) if the name is taken, and then nothing changed.

    linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N is how an O_TMPFILE file gets
    a name without privileges (open(2)); link() would link the /proc symlink itself.
    """
    try:
        _link(fd, path_of(name))
    except OSError as err:
        raise _translate(err, name) from err


def _link_python(fd: int, path: str) -> None:
    """The pure-Python twin of ``_fastpath.link``. Passing ``src_dir_fd`` makes
    Python call linkat with AT_SYMLINK_FOLLOW (the source is absolute: the fd
    itself is not used)."""
    os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=fd)


# Below this, posix_fallocate fails fast enough on its own; statvfs would only add a syscall.
_PRECHECK_BYTES = 1 << 24


def reserve(fd: int, total: int, name: str) -> None:
    """Give the file ``total`` bytes of memory now, or fail with NoSpace.

    posix_fallocate, not ftruncate: a sparse tmpfs file is only backed when a
    page is first written, and a write that finds /dev/shm full kills the
    process with SIGBUS (CPython gh-114390). Reserving turns that into ENOSPC
    here, at creation, where it can be handled.
    """
    if total >= _PRECHECK_BYTES:
        _precheck(total, name)
    try:
        os.posix_fallocate(fd, 0, total)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise NoSpace(name, f"{total} bytes do not fit in {SHM_DIR}: {err.strerror}") from err
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise _translate(err, name) from err
        # A file system without fallocate: size the file, unreserved.
        os.ftruncate(fd, total)


def _precheck(total: int, name: str) -> None:
    """NoSpace at once when ``total`` bytes exceed what /dev/shm has free.
    Fast refusal: fallocate on tmpfs would allocate page by page before failing."""
    st = os.statvfs(SHM_DIR)
    if total > st.f_bavail * st.f_frsize:
        raise NoSpace(name, f"{total} bytes do not fit in {SHM_DIR} ({st.f_bavail * st.f_frsize} bytes free)")


class Opened(NamedTuple):
    fd: int
    size: int
    inode: int
    mtime: float
    uid: int = 0
    mode: int = 0  # permission bits


def open_existing(name: str, writable: bool = True) -> Opened:
    """Open an existing block; never creates one.

    O_NOFOLLOW refuses symlinks (a link planted in /dev/shm could point at any
    file the user can write), O_NONBLOCK keeps a FIFO from blocking the open,
    and anything that is not a regular file is refused after fstat.
    """
    try:  # inlined, as in open_locked: this is on every untracked attach's path
        raw = _open_block_fast(path_of(name), _OPEN_EXISTING if writable else _OPEN_EXISTING_RO, -1)
    except OSError as err:
        raise _translate(err, name) from err
    return tuple.__new__(Opened, raw) if len(raw) == 6 else _opened(name, raw)


def open_locked(name: str, offset: int, writable: bool = False) -> Opened:
    """Open an existing block and take a shared lock on byte ``offset`` of it
    (waiting while an exclusive holder has it), as ``open_existing`` would open
    it; SegmentNotFound if the block was removed before we had the lock.

    Three system calls: open, lock, fstat. The fstat after the lock tells a
    removed block by its link count (0): a remover holds the exclusive lock
    while it unlinks, and a block has one link, its name - so the count says
    what a second lookup of the name would, without one.
    """
    try:  # inlined: this is on every tracked attach's path
        raw = _open_block_fast(path_of(name), _OPEN_EXISTING if writable else _OPEN_EXISTING_RO, offset)
    except OSError as err:
        raise _translate(err, name) from err
    return tuple.__new__(Opened, raw) if len(raw) == 6 else _opened(name, raw)


# What _open_block_fast returns: the six fields of an Opened for a regular file that has a
# name; else (fd, size, inode, mtime, uid, mode, nlink), the mode with its file type
# (nlink -1: the lock was refused, and the mtime field is its errno).
_Raw = Tuple[Any, ...]


def _opened(name: str, raw: _Raw) -> Opened:
    """``raw`` checked: a regular file, locked if asked, still linked; else its descriptor closed and why."""
    if len(raw) == 6:
        # tuple.__new__: positional, no keyword handling - this is on every attach's path.
        return tuple.__new__(Opened, raw)
    fd, size, inode, mtime, uid, mode, nlink = raw
    os.close(fd)
    if not stat.S_ISREG(mode):
        raise UnsafeSegment(name, f"not a shared memory block but a {_kind_of(mode)}")
    if nlink == 0:
        raise SegmentNotFound(name, "the shared memory block was removed while attaching")
    code = int(mtime)
    raise OSError(code, f"{os.strerror(code)} (shared memory block: its users lock)", name)


def _open_block_python(path: str, flags: int, offset: int) -> _Raw:
    """The pure-Python twin of ``_fastpath.open_block``: open, lock byte
    ``offset`` if it is not negative, fstat. PEP 475 retries the lock's wait
    after a signal whose handler returns; one that raises ends it."""
    fd = os.open(path, flags)
    try:
        if offset >= 0:
            try:
                # fcntl directly, not lock_shared(): this is on every tracked attach's path.
                fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, offset, 1, 0))
            except OSError as err:
                st = os.fstat(fd)
                return fd, st.st_size, st.st_ino, err.errno or 0, st.st_uid, st.st_mode, -1
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 0:
        return fd, st.st_size, st.st_ino, st.st_mtime, st.st_uid, st.st_mode & 0o7777
    return fd, st.st_size, st.st_ino, st.st_mtime, st.st_uid, st.st_mode, st.st_nlink


def _identity_python(fd: int) -> Optional[Tuple[int, int, int, int, int]]:
    """The pure-Python twin of ``_fastpath.identity``: (inode, device, mode, nlink, size) or None."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_mode, st.st_nlink, st.st_size


def _close_if_python(fd: int, inode: int, device: int) -> bool:
    """The pure-Python twin of ``_fastpath.close_if``."""
    found = _identity_python(fd)
    if found is None or found[0] != inode or found[1] != device or not stat.S_ISREG(found[2]):
        return False
    os.close(fd)
    return True


def still_open(fd: int, inode: int) -> bool:
    """Whether descriptor ``fd`` still refers to the block file with this inode.
    Daemonizing code calls os.closerange(): a number we opened may since have
    been closed and reused for any other file, which must never be locked,
    read or closed in the block's name."""
    found = _identity(fd)
    return found is not None and found[0] == inode and found[1] == _shm_device() and stat.S_ISREG(found[2])


def close_if_open(fd: int, inode: int) -> bool:
    """Close ``fd`` if it still refers to the block file with this inode
    (``still_open``) and say whether it did; any other file is left alone."""
    return _close_if(fd, inode, _SHM_DEVICE or _shm_device())


_SHM_DEVICE = 0  # the device of /dev/shm, once known


def _shm_device() -> int:
    global _SHM_DEVICE
    if not _SHM_DEVICE:
        _SHM_DEVICE = os.stat(SHM_DIR).st_dev
    return _SHM_DEVICE


def _unlink_same_python(path: str, inode: int) -> bool:
    """The pure-Python twin of ``_fastpath.unlink_same``: unlink ``path`` if
    it is the file with this inode (lstat); False if it is not, or is gone."""
    try:
        if os.stat(path, follow_symlinks=False).st_ino != inode:
            return False
    except OSError:
        return False
    os.unlink(path)
    return True


def still_published(name: str, inode: int) -> bool:
    """Whether ``name`` still refers to the file with this inode."""
    try:
        return os.stat(path_of(name), follow_symlinks=False).st_ino == inode
    except OSError:
        return False


def exists(name: str) -> bool:
    """Whether anything (a block, or anything else) has this name in /dev/shm."""
    return os.path.lexists(path_of(name))


def unlink(name: str) -> None:
    try:
        os.unlink(path_of(name))
    except OSError as err:
        raise _translate(err, name) from err


def unlink_same(name: str, inode: int) -> None:
    """Unlink ``name`` only while it still is the file with this inode.

    SegmentNotFound when the name is gone or now belongs to another file (a
    newer block made under the same name): a stale handle never removes a
    block it did not open. POSIX has no "unlink if still this file"; the
    window between the check and the unlink is two syscalls wide.
    """
    try:
        removed = _unlink_same(path_of(name), inode)
    except OSError as err:
        raise _translate(err, name) from err
    if not removed:
        raise SegmentNotFound(name, "the shared memory block this handle opened was already removed")


def entries() -> Iterator[str]:
    """Names of everything in the shared memory directory (not only shmem's)."""
    try:
        with os.scandir(SHM_DIR) as it:
            for entry in it:
                yield entry.name
    except FileNotFoundError:  # pragma: no cover
        return


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _kind_at(name: str) -> str:
    """What kind of special file ``name`` is, for an error message."""
    try:
        mode = os.stat(path_of(name), follow_symlinks=False).st_mode
    except OSError:  # gone meanwhile
        return "special file"
    return _kind_of(mode)


def _translate(err: OSError, name: str) -> OSError:
    """The shmem error for an OSError raised while working on block ``name``."""
    if err.errno == errno.ENOENT:
        return SegmentNotFound(name)
    if err.errno == errno.EEXIST:
        return SegmentExists(name)
    if err.errno == errno.ELOOP:
        return UnsafeSegment(name, "a symbolic link, not a shared memory block")
    if err.errno == errno.EISDIR:
        return UnsafeSegment(name, "a directory, not a shared memory block")
    if err.errno == errno.ENXIO:
        # open(2) gives ENXIO for a Unix domain socket, and for a device file with
        # no device behind it: never a block. Say which it is, if it is still there.
        return UnsafeSegment(name, f"a {_kind_at(name)}, not a shared memory block")
    if err.errno == errno.ENOSPC:
        return NoSpace(name, f"{SHM_DIR} is full")
    return type(err)(err.errno, f"{err.strerror} (shared memory block)", name)


# --------------------------------------------------------------------- locks
#
# Open-file-description locks (F_OFD_SETLK, Linux >= 3.15): owned by the open
# file description, not the process, so closing some *other* descriptor of the
# same file does not drop them (the classic POSIX-lock trap), a dup() made by
# mmap keeps them, and the kernel drops them when the last descriptor closes -
# also when the process is SIGKILLed. That makes a lock a liveness token.

# struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
_FLOCK = struct.Struct("hhqqi4x")


def _lock(fd: int, cmd: int, kind: int, offset: int) -> None:
    # l_pid must be 0 for OFD locks.
    fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))


def _wait_for_lock(fd: int, kind: int, offset: int) -> None:
    while True:
        try:
            _lock(fd, fcntl.F_OFD_SETLKW, kind, offset)
            return
        except InterruptedError:  # pragma: no cover - PEP 475 retries, but be explicit
            continue


def lock_shared(fd: int, offset: int) -> None:
    """Take a read lock on one byte, waiting while an exclusive holder has it."""
    _wait_for_lock(fd, fcntl.F_RDLCK, offset)


def lock_exclusive(fd: int, offset: int) -> None:
    """Take a write lock on one byte, waiting until nobody holds any lock on it."""
    _wait_for_lock(fd, fcntl.F_WRLCK, offset)


def try_lock_exclusive(fd: int, offset: int) -> bool:
    """Take a write lock on one byte if nobody holds any lock on it."""
    try:
        _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, offset)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock_byte(fd: int, offset: int) -> None:
    """Let go of this description's lock on one byte."""
    _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, offset)


def is_locked(fd: int, offset: int) -> bool:
    """Whether any open file description (other than fd's) holds a lock on this byte."""
    raw = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    kind: int = _FLOCK.unpack(raw)[0]
    return kind != fcntl.F_UNLCK


# --------------------------------------------------------------- processes


def processes_using(names: Iterable[str]) -> Dict[str, List[int]]:
    """For each block name, the pids that have it mapped or open (as fuser would
    say), among the processes this user may inspect. One pass over /proc."""
    paths = {path_of(name): name for name in names}
    # Read as bytes: any process may map a file whose path is not UTF-8 (a
    # block's name too), and one such line must not break the scan. The
    # kernel writes a newline in a path as "\012" there (seq_file_path).
    in_maps = {os.fsencode(path).replace(b"\n", b"\\012"): name for path, name in paths.items()}
    found: Dict[str, List[int]] = {name: [] for name in paths.values()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid, seen = int(entry), set()
        try:
            with open(f"/proc/{pid}/maps", "rb") as maps:
                for line in maps:
                    path = line.rstrip(b"\n").split(None, 5)[-1]
                    if path.endswith(b" (deleted)"):
                        continue
                    if path in in_maps:
                        seen.add(in_maps[path])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target in paths:
                    seen.add(paths[target])
        except OSError:  # gone meanwhile, or not ours to inspect
            pass
        for name in seen:
            found[name].append(pid)
    return found


def ofd_lock_holders(name: str, inode: int, first: int, count: int) -> Dict[int, List[int]]:
    """For each byte ``first`` .. ``first + count - 1`` of block ``name`` (``inode``) that an
    OFD lock holds, the pids whose open descriptors hold it, among the processes this user
    may inspect: one pass over /proc/*/fd, reading the locks /proc/PID/fdinfo/FD lists for
    the descriptors that lead to the block."""
    path = path_of(name)
    ino = str(inode)
    found: Dict[int, List[int]] = {}
    try:
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != path:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as info:
                    lines = info.read(1 << 20).splitlines()
            except OSError:
                continue
            for line in lines:
                offset = _locked_byte(line, ino)
                if offset is not None and first <= offset < first + count and pid not in found.setdefault(offset, []):
                    found[offset].append(pid)
    return found


def _locked_byte(line: bytes, ino: str) -> Optional[int]:
    """The one byte a line of /proc/PID/fdinfo/FD locks (``lock:\t1: OFDLCK ADVISORY WRITE -1
    00:1b:INODE START END``), None when it is no one-byte OFD lock of the file with inode ``ino``."""
    fields = line.split()
    if len(fields) < 8 or fields[0] != b"lock:" or b"OFDLCK" not in fields:
        return None
    try:
        where, start, end = fields[-3].decode("ascii"), int(fields[-2]), int(fields[-1])
    except (UnicodeDecodeError, ValueError):
        return None
    if where.rsplit(":", 1)[-1] != ino or start != end:
        return None
    return start


def process_of_thread_mapping(tid: int, device: int, inode: int) -> Optional[int]:
    """The pid of the process that has thread ``tid`` and has the file (``device``,
    ``inode``) mapped; None when there is none we may see. (A lock's holder keeps its
    block mapped while it holds it: the mapping confirms that a tid read from hostile
    memory, numbered in the holder's pid namespace, is the holder here and not an
    unrelated thread that happens to bear the same number.)"""
    try:
        with open(f"/proc/{tid}/status", "rb") as status:  # a thread's own entry: /proc/TID, though unlisted
            tgid = [line.split()[1] for line in status if line.startswith(b"Tgid:")]
        pid = int(tgid[0]) if len(tgid) == 1 and tgid[0].isdigit() else 0
        if pid <= 0 or not os.path.exists(f"/proc/{pid}/task/{tid}"):
            return None
        dev = f"{os.major(device):02x}:{os.minor(device):02x}".encode()
        ino = str(inode).encode()
        with open(f"/proc/{pid}/maps", "rb") as maps:
            for line in maps:
                fields = line.split(None, 5)  # address, perms, offset, device, inode, path
                if len(fields) >= 5 and fields[3] == dev and fields[4] == ino:
                    return pid
    except (OSError, ValueError):  # gone meanwhile, or not ours to inspect
        return None
    return None


def thread_of_this_process(tid: int) -> bool:
    """Whether ``tid`` is a live thread of this process."""
    return tid > 0 and os.path.exists(f"/proc/self/task/{tid}")


def spawn_with_stdin(argv: List[str], stdin_fd: int, blocked: Iterable[int] = ()) -> int:
    """Start ``argv`` with ``stdin_fd`` as its stdin and /dev/null as stdout and
    stderr; return its pid. Nothing else of ours is inherited that is not
    already inheritable (the child closes those itself).

    Never our stdout/stderr: whoever reads them (a shell pipe, subprocess.run
    with capture_output) would wait for the child to exit.

    The child gets a process group of its own, from its first instruction:
    Ctrl-C at a terminal signals the foreground group, and ``kill -<pgid>``
    one group - neither should stop the process that cleans up after them.
    The ``blocked`` signals start blocked in it, so one sent before it could
    install its handlers stays pending instead of killing it.
    """
    return os.posix_spawn(
        argv[0],
        argv,
        os.environ,
        setpgroup=0,
        setsigmask=list(blocked),
        file_actions=[
            (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        ],
    )


# ------------------------------------------------------- the reaper's socket
#
# A process tree talks to its reaper over a Unix stream socket in the abstract
# namespace (Linux): no file to leave behind, and the address is free again the
# moment the listening socket closes - when the reaper dies, however it died.


def reaper_address(token: str) -> bytes:
    # The uid keeps users apart; the random token, known only to the tree
    # (through its environment), keeps anyone else from guessing it.
    return f"\0shmem-reaper-{os.geteuid()}-{token}".encode()


def listen(address: bytes) -> Optional[socket.socket]:
    """A listening socket bound to ``address``; None if another process has it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(64)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            return None
        raise
    return sock


def connect(address: bytes) -> Optional[socket.socket]:
    """A connection to ``address`` if a process of this user listens there, else None.

    The listener's uid (SO_PEERCRED) must be ours: an abstract address has no
    file permissions, so another user could have bound it first.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
        _, uid = peer(sock)
    except OSError as err:
        sock.close()
        if err.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
            return None
        raise
    if uid != os.geteuid():
        sock.close()
        return None
    # Room for a burst of messages while the reaper batches its reads: as much as
    # the kernel grants (net.core.wmem_max); below that, senders wait for it.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setblocking(False)
    return sock


# struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_UCRED = struct.Struct("iII")


def peer(sock: socket.socket) -> Tuple[int, int]:
    """(pid, uid) of the process at the other end, as the kernel recorded them
    when it connected (or, seen from a client, when the server called listen)."""
    pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


def send_message(sock: socket.socket, message: bytes) -> bool:
    """Send one short message on a non-blocking stream socket; False if the peer is gone.

    MSG_NOSIGNAL: a peer that died gives EPIPE here, never SIGPIPE - which kills
    programs that restored its default action (as CLI tools do for ``| head``).
    A message this short is one skb: it is queued whole or not at all, so
    messages from threads or a signal handler never interleave.
    """
    while True:
        try:
            sent = sock.send(message, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            # The reaper has not read for a while (it batches reads): wait for room.
            if not select.select([], [sock], [], 5.0)[1]:
                return False
            continue
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        except OSError:
            return False
        return sent == len(message)


def file_identity(fd: int) -> Optional[Tuple[int, int]]:
    """(device, inode) of what descriptor ``fd`` refers to now, or None if it is closed.

    A descriptor number can be closed behind our back (``os.closerange`` in
    daemonizing code) and reused by a file the program opened afterwards:
    compare this with the value recorded when the descriptor was made before
    writing to it.
    """
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def watch_process(pid: int) -> Optional[int]:
    """A descriptor that becomes readable when process ``pid`` exits (a pidfd,
    Linux >= 5.3), or None when the kernel has none; ProcessLookupError if
    the process is already gone."""
    if pid <= 0 or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except OSError:
        return None


# ------------------------------------------------------------ process identity


class ProcessIdentity(NamedTuple):
    """A process, told apart from a later one that reuses its pid (psutil's rule)."""

    pid: int
    start_time: int  # clock ticks after boot, field 22 of /proc/<pid>/stat
    pid_namespace: int  # inode of /proc/self/ns/pid: pids mean nothing across namespaces


def _start_time(pid: int) -> Optional[int]:
    """Start time of a running process, or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # exited, waiting to be reaped: it holds no memory or locks
        return None
    return int(fields[19])


def _read_pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # pragma: no cover - /proc without ns (very old kernels)
        return 0


# A process cannot change its own pid namespace (unshare/setns affect children only).
_PID_NAMESPACE = _read_pid_namespace()


_current: Optional[ProcessIdentity] = None


def current_process() -> ProcessIdentity:
    """This process's identity; read from /proc once per process (a fork is a new one)."""
    global _current
    pid = os.getpid()
    if _current is None or _current.pid != pid:
        start = _start_time(pid)
        assert start is not None
        _current = ProcessIdentity(pid, start, _PID_NAMESPACE)
    return _current


def process_alive(who: ProcessIdentity) -> Optional[bool]:
    """True/False when we can tell; None when the process lives in another pid
    namespace (a container sharing /dev/shm), where its pid means nothing here."""
    if who.pid_namespace != _PID_NAMESPACE:
        return None
    return _start_time(who.pid) == who.start_time


# Each C fast path or its pure-Python twin, chosen once here and called
# unconditionally. The C functions make their system calls directly, never
# through ``os``: code that replaces an os function (fault injection) must
# select the twins too - the tests do, with the ``python_platform`` fixture.
_open_block_fast = _fastpath.open_block if _fastpath is not None else _open_block_python
_identity = _fastpath.identity if _fastpath is not None else _identity_python
_close_if = _fastpath.close_if if _fastpath is not None else _close_if_python
_build = _fastpath.build if _fastpath is not None else _build_python
_link = _fastpath.link if _fastpath is not None else _link_python
_open_same = _fastpath.open_same if _fastpath is not None else _open_same_python
_unlink_same = _fastpath.unlink_same if _fastpath is not None else _unlink_same_python
_copy_into = _fastpath.copy_into if _fastpath is not None else None


def _copy_into_python(dst: Any, offset: int, src: Any, threads: int) -> None:
    """The pure-Python twin of ``_fastpath.copy_into``: one thread (it cannot release the GIL)."""
    source = memoryview(src).cast("B")
    if offset < 0 or offset + source.nbytes > len(dst):
        raise ValueError("copy_into: the source does not fit in the destination at that offset")
    memoryview(dst)[offset : offset + source.nbytes] = source


def copy_into(dst: Any, offset: int, src: Any) -> None:
    """Copy the buffer ``src`` into the writable buffer ``dst`` (a mapping) at ``offset``: a large
    copy is split between this thread and up to one more per CPU (at most 4), the GIL released."""
    if _copy_into is not None:
        _copy_into(dst, offset, src, _COPY_THREADS)
    else:
        _copy_into_python(dst, offset, src, 1)


_COPY_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
