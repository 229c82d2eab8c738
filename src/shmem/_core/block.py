"""Typed blocks: creating, attaching and removing the blocks every kind is built on.

A ``Block`` is one shared memory block mapped into this process, with its
header (``header.Header``: kind, creator, size, the kind's own header). Raw
``SharedMemory``, ``ShareableList``, NumPy arrays and manager-owned blocks
are all Blocks underneath; each kind adds its own header codec and its view
of the bytes. This module is the only one that creates or maps a block::

    Block.create(name, size, kind=..., extra=..., initial=..., track=...)
        O_TMPFILE in /dev/shm          unnamed: invisible, freed if we die now
        users lock (track=True)        this process counts as a user
        header page, reservation,      the file reaches its full size with its
        initial contents               header; memory is reserved (no SIGBUS)
        tracking.track(name)           the reaper hears of it before it exists
        link() to the name             atomic publication; EEXIST if taken
    Block.attach(name)
        open (O_NOFOLLOW), users lock, check the name still leads here,
        read and validate the header against the real file size, map.

Lifecycle (``lifecycle`` draws the rule): a tracked handle holds a shared
lock on the block's users byte for as long as its mapping lives; the mapping
lives while anything in this process still uses it (a NumPy array, a
memoryview), not only until ``close``.
"""

from __future__ import annotations

import mmap
import operator
import os
import sys
import threading
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

from .. import _platform
from .._errors import InvalidSize, NoSpace, SegmentExists, SegmentNotFound
from . import forks, names, tracking
from .header import KIND_RAW, TRAILER_SIZE, Header, total_size
from .lifecycle import USERS_LOCK

# Above this, the file (data, padding and trailer) would not fit in off_t.
MAX_SIZE = (1 << 63) - 1 - 2 * 4096

Piece = Tuple[int, bytes]  # (offset, bytes-like) written into a new block before it is published

# Python >= 3.13: a mapping keeps no descriptor (mmap's trackfd=False). The kernel's mapping
# still holds the open file description, and with it a users lock taken on it (an OFD lock
# lives as long as its description): the lock lasts exactly as long as the mapping, and no
# descriptor number is left for os.closerange() to take away.
# Python < 3.13: mmap always keeps a duplicate descriptor, and closes that *number* when the
# mapping goes - whatever file it belongs to by then. _map() notes the number; release() keeps
# a mapping whose number was taken away (``_orphans``) rather than let mmap close another file.
_MMAP_DUPLICATES = sys.version_info < (3, 13)
_ACCESS = {False: mmap.ACCESS_WRITE, True: mmap.ACCESS_READ}
_orphans: List[mmap.mmap] = []


# shmem's own threads never take a number between probe and mmap. Re-entrant: a signal handler
# that creates a block runs in the thread it interrupted, maybe inside _map (its probe may then
# be wrong, which the check after mmap tells).
_mapping_lock = threading.RLock()


def _reset_mapping_lock() -> None:
    global _mapping_lock
    _mapping_lock = threading.RLock()  # another thread may have held it at the fork


forks.reset_in_child(_reset_mapping_lock)


def _map(fd: int, size: int, readonly: bool, inode: int) -> Tuple[mmap.mmap, int]:
    """A shared mapping of ``fd`` and the descriptor number the mapping keeps (-1: none, or unknown)."""
    if not _MMAP_DUPLICATES:
        return mmap.mmap(fd, size, access=_ACCESS[readonly], trackfd=False), -1
    with _mapping_lock:
        # mmap's dup() takes the lowest free number, which this dup() sees first. Checked after:
        # if another thread took the number meanwhile it holds some other file, and the mapping's
        # number stays unknown (-1: a closerange then goes unnoticed, as without this check).
        probe = os.dup(fd)
        os.close(probe)
        mapping = mmap.mmap(fd, size, access=_ACCESS[readonly])
        return mapping, probe if _platform.still_open(probe, inode) else -1


class Repeat(NamedTuple):
    """``pattern`` written back to back from offset 0 for ``length`` bytes, the
    last copy cut short: a fill of any size, written one copy at a time, so it
    never exists whole in memory."""

    pattern: Any  # bytes-like
    length: int


class _Pieces(Sequence[Piece]):
    """``head``, then the copies of ``repeat`` as (offset, data) pieces, each made as it is written."""

    def __init__(self, head: List[Piece], repeat: Repeat) -> None:
        self.head, self.repeat, self.step = head, repeat, len(repeat.pattern)

    def __len__(self) -> int:
        return len(self.head) + -(-self.repeat.length // self.step)

    def __getitem__(self, i: Any) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i < len(self.head):
            return self.head[i]
        offset = (i - len(self.head)) * self.step
        return offset, memoryview(self.repeat.pattern)[: self.repeat.length - offset]


def checked_size(size: object, *, create: bool) -> int:
    """``size`` as an int, or InvalidSize/TypeError - before anything happens."""
    size = operator.index(size)  # type: ignore[arg-type]
    if size < 0:
        raise InvalidSize("'size' must be a positive integer")
    if create and size == 0:
        raise InvalidSize("'size' must be a positive number different from zero")
    if create and size > MAX_SIZE:
        # Only when creating: attaching ignores the size, as in the standard library.
        raise InvalidSize(f"'size' {size} is larger than any shared memory block can be ({MAX_SIZE} bytes)")
    return size


class Block:
    """One shared memory block, mapped into this process."""

    __slots__ = ("name", "size", "inode", "header", "mapping", "tracked", "_trailer", "_dup")

    name: str
    size: int  # bytes of data (the header's size; the file's for blocks other programs made)
    inode: int  # tells this block from a later one under the same name
    header: Optional[Header]  # None: made by another program (the standard library, C...)
    mapping: Optional[mmap.mmap]  # the data only: the header stays out of reach; None once released
    tracked: bool  # this handle holds the users lock

    def __init__(
        self,
        name: str,
        size: int,
        inode: int,
        header: Optional[Header],
        mapping: mmap.mmap,
        tracked: bool,
        dup: int = -1,
    ) -> None:
        self.name, self.size, self.inode, self.header = name, size, inode, header
        self.mapping, self.tracked, self._dup = mapping, tracked, dup
        # (file size, trailer offset, the header's bytes): what ``unchanged`` expects to find
        self._trailer: Optional[Tuple[int, int, bytes]] = None

    # ------------------------------------------------------------ creating

    @classmethod
    def create(
        cls,
        name: Optional[str],
        size: int,
        *,
        kind: int = KIND_RAW,
        extra: bytes = b"",
        initial: Sequence[Piece] = (),
        repeat: Optional[Repeat] = None,
        flags: int = 0,
        track: bool = True,
    ) -> Block:
        """A new block of ``size`` bytes under ``name`` (None: a new random name).

        ``kind`` and ``extra`` (the kind's own header) go into its header,
        ``repeat`` (a pattern tiled over the start of the block), then
        ``initial`` pieces are written before anyone can see it, ``flags`` are
        extra header flags (``header.FLAG_MANAGED``). ``track``: the block is
        removed once its creator and every user are gone. Raises
        SegmentExists (FileExistsError) if the name is taken, NoSpace (OSError
        ENOSPC) if /dev/shm cannot hold it; either way nothing is left behind.
        """
        size = checked_size(size, create=True)
        if name is not None:
            name = names.validate(name)
        if (initial and any(offset < 0 or offset + len(data) > size for offset, data in initial)) or (
            repeat is not None and (repeat.length > size or (repeat.length > 0 and not len(repeat.pattern)))
        ):
            raise InvalidSize(f"initial contents do not fit in {size} bytes")
        header = Header.new(size, kind=kind, track=track, creator=_platform.current_process(), extra=extra, flags=flags)
        total = total_size(size)
        pieces: Sequence[Piece] = [(total - TRAILER_SIZE, header.pack()), *initial]
        if repeat is not None and repeat.length > 0:
            pieces = _Pieces(list(pieces), repeat)  # made one copy at a time, as they are written
        try:
            built = _platform.build_unnamed(total, pieces, name if name is not None else "(new block)")
        except NoSpace:
            # The standard library would have failed on the taken name first.
            if name is not None and _platform.exists(name):
                raise SegmentExists(name) from None
            raise
        try:
            published = _publish(built.fd, name, header.block_id, track)
        finally:
            os.close(built.fd)  # unpublished, the file is gone with it: nothing to undo
        # Mapped through its name, not through the unnamed file's descriptor, whose
        # path stays "/dev/shm/#<inode> (deleted)" in /proc/PID/maps and fd/: fuser,
        # lsof, `shmem info` and leak checks must see the block by its name.
        try:
            fd = _platform.open_published(published, built.inode)
            try:
                if track:
                    _platform.lock_shared(fd, USERS_LOCK)
                mapping, dup = _map(fd, size, False, built.inode)
            finally:
                os.close(fd)  # the mapping holds the description (and with it the users lock)
        except BaseException:
            if _platform.still_published(published, built.inode):
                _platform.unlink_same(published, built.inode)
            if track:
                tracking.untrack(published, header.block_id)
            raise
        return cls(published, size, built.inode, header, mapping, track, dup)

    # ------------------------------------------------------------ attaching

    @classmethod
    def attach(cls, name: str, *, readonly: bool = False, track: bool = True, descriptor: bool = True) -> Block:
        """Map the existing block ``name``. ``track``: count as a user until the
        mapping is gone. SegmentNotFound (FileNotFoundError) if there is none;
        CorruptSegment (ValueError) if its header is damaged. Never unlinks.

        ``descriptor`` is no longer used: on Python >= 3.13 no mapping keeps a
        descriptor, before it every mapping does (``_map``). Any mapping refers
        to the file's open file description, in the kernel - which is why a
        users lock is never taken on the description a long-lived mapping is
        made from unless it should last as long (``UsersLease``).
        """
        name = names.validate(name)
        if track:
            # Waits while a reaper, gc() or remove_segment() holds the exclusive lock to
            # remove it; then the name is gone, and we say so rather than map a removed block.
            opened = _platform.open_locked(name, USERS_LOCK, writable=not readonly)
        else:
            opened = _platform.open_existing(name, writable=not readonly)
        fd, file_size, inode = opened[0], opened[1], opened[2]
        try:  # one frame: this is every attach's path
            if file_size == 0:
                # Only another program's block looks like this: the standard library
                # creates the file first and sizes it afterwards.
                raise SegmentNotFound(name, "the shared memory block is empty: its creator has not sized it yet")
            header = Header.read(fd, file_size, name)
            if header is not None and not header.ready:
                raise SegmentNotFound(name, "the shared memory block is still being created")
            size = header.size if header is not None else file_size
            mapping, dup = _map(fd, size, bool(readonly), inode)
            return cls(name, size, inode, header, mapping, track, dup)
        finally:
            os.close(fd)  # the mapping holds the description (and with it the users lock)

    # ------------------------------------------------------------ the block

    def still_published(self) -> bool:
        """Whether the name still leads to this block (not removed, not replaced)."""
        return _platform.still_published(self.name, self.inode)

    def unchanged(self, lease: Optional[UsersLease] = None) -> bool:
        """Whether the name still leads to this block, whole and as it was mapped:
        the same file (inode), the same file size, the same header. O(1): open,
        fstat, read the header, close - or only read the header through
        ``lease``, a UsersLease this process just took on the name. False when
        anything differs - removed, replaced, truncated or grown (a mapping past
        the end of the file is a SIGBUS), header overwritten - or cannot be
        read: attaching afresh then says what is wrong, as in a process that
        never had it mapped."""
        if lease is not None:
            return self._same(lease.fileno(), lease.size, lease.inode)
        try:
            opened = _platform.open_existing(self.name, writable=False)
        except OSError:
            return False
        try:
            return self._same(opened.fd, opened.size, opened.inode)
        finally:
            os.close(opened.fd)

    def _same(self, fd: int, file_size: int, inode: int) -> bool:
        if inode != self.inode:
            return False
        if self.header is None:  # another program's block: its size is the file's
            try:
                return file_size == self.size and Header.read(fd, file_size, self.name) is None
            except (OSError, ValueError):  # CorruptSegment is a ValueError
                return False
        # The header as the creator wrote it (a header that parses alike but reads
        # differently only costs a fresh attach). One read, no parsing.
        if self._trailer is None:
            total = total_size(self.size)
            self._trailer = (total, Header.trailer_offset(total), self.header.pack())
        total, offset, trailer = self._trailer
        if file_size != total:
            return False
        try:
            return os.pread(fd, len(trailer), offset) == trailer
        except OSError:
            return False

    def unlink(self) -> None:
        """Remove the block's name - only if it still is this block: SegmentNotFound
        (FileNotFoundError) when it was removed already, even if a newer block
        took the name meanwhile (that one is left alone)."""
        _platform.unlink_same(self.name, self.inode)
        if self.header is not None and self.header.auto_remove:
            tracking.untrack(self.name, self.header.block_id)

    def release(self) -> None:
        """Drop this handle's reference to the mapping. It is unmapped - and the
        users lock released - when the last object using it is gone: at once
        when nothing else refers to it, later if a NumPy array or memoryview
        still does (unmapping under those would crash the process).

        Python < 3.13: if the descriptor number the mapping keeps was closed
        behind our back (``os.closerange``) - and may belong to another file
        now - the mapping is kept for the life of the process instead: mmap
        would close that number when it goes."""
        mapping, self.mapping = self.mapping, None
        if mapping is not None and self._dup >= 0 and not _platform.still_open(self._dup, self.inode):
            _orphans.append(mapping)

    def __del__(self) -> None:
        if self.mapping is not None and self._dup >= 0 and _platform is not None:
            self.release()

    def __repr__(self) -> str:
        return f"<Block {self.name!r} size={self.size}>"


def hold_users_lock(name: str) -> _platform.Opened:
    """Open block ``name`` read-only and take the shared users lock on it: the
    descriptor counts this process as a user until it is closed. Waits while a
    remover holds the exclusive lock; SegmentNotFound (FileNotFoundError) if
    there is no such block, or it was removed meanwhile."""
    return _platform.open_locked(name, USERS_LOCK)


class UsersLease:
    """This process counted as a user of block ``name`` (``lifecycle``), with
    nothing mapped: one read-only descriptor holding the shared users lock,
    closed - and the lock dropped - by ``release()`` or when the lease is
    garbage. For a kind that maps the block untracked (and keeps that mapping
    for reuse, which must not count as a user) but counts as a user while its
    objects live. Never map through its descriptor: the kernel keeps the lock
    of an open file description as long as a mapping made from it.
    SegmentNotFound (FileNotFoundError) if there is no such block, or it was
    removed while we waited for the lock."""

    __slots__ = ("name", "inode", "size", "_fd")

    def __init__(self, name: str) -> None:
        self._fd = -1
        opened = _platform.open_locked(name, USERS_LOCK)  # hold_users_lock, one call shorter: a hot path
        self.name, self.inode, self.size, self._fd = name, opened.inode, opened.size, opened.fd

    def fileno(self) -> int:
        """The descriptor (-1 once released): read it, never close it."""
        return self._fd

    def release(self) -> None:
        """Drop the lease (idempotent). Never closes a descriptor number that
        no longer refers to the block: after os.closerange() it may belong to
        any other file (the lease's lock went with the closed descriptor)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            _platform.close_if_open(fd, self.inode)

    def __del__(self) -> None:
        if self._fd >= 0 and os is not None:  # os is None late in interpreter shutdown
            self.release()

    def __repr__(self) -> str:
        return f"<UsersLease {self.name!r}{'' if self._fd >= 0 else ' released'}>"


def _publish(fd: int, name: Optional[str], block_id: int, track: bool) -> str:
    """Link the finished file ``fd`` under ``name``, or a new random name; return the name."""
    while True:
        candidate = name if name is not None else names.generate()
        if track:
            # The reaper hears of the block before it has a name: a creator killed
            # right after the link still has it removed.
            tracking.track(candidate, block_id)
        try:
            _platform.publish(fd, candidate)
        except BaseException as err:
            if track:
                tracking.untrack(candidate, block_id)
            if name is None and isinstance(err, SegmentExists):
                continue  # a generated name collided: draw another
            raise
        return candidate
