"""The ring of a queue block: put and get records under the block's robust mutex.

``RingCore(mapping, capacity, maxsize, joinable)`` is ``shmem._queue.QueueCore``
(C) when it is built, else the pure-Python twin below, which follows the C
code step by step (``src/shmem/_queue.c`` explains the protocol: commit
order, repair after a holder died, sleepers and futex words). Both raise
the same exceptions for the same inputs; the twin is slower.

The twin's critical sections run Python code, where a signal handler could
run and call the same queue (the mutex is error-checking: that would be
EDEADLK). So it blocks signals in the calling thread while it holds the
mutex (``sync_wait.block_signals``); they are delivered, and their handlers
run, right after.
"""

from __future__ import annotations

import math
import pickle
import queue
import struct
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .._errors import CorruptSegment
from . import lock_layout, queue_plain, sync_wait
from .queue_layout import (
    BATCH_HEAD,
    BATCH_TAGS,
    BIG_COPY,
    BUSY_AFTER_MUTEX,
    MAX_OOB_BUFFERS,
    OFF_COUNT,
    OFF_GET_MUTEX,
    OFF_GET_SLEEPERS,
    OFF_HEAD,
    OFF_JOIN_SLEEPERS,
    OFF_PUT_MUTEX,
    OFF_PUT_SLEEPERS,
    OFF_SEQ_GET,
    OFF_SEQ_JOIN,
    OFF_SEQ_PUT,
    OFF_SEQ_WATCH,
    OFF_TAIL,
    OFF_UNFINISHED,
    OFF_WATCHERS,
    REC,
    RING,
    TAG_BATCH,
    TAG_BYTES,
    TAG_PICKLE,
    TAG_PICKLE_OOB,
    TAG_PLAIN,
    TAG_PLAIN_BATCH,
    TAG_WRAP,
    record_size,
)
from .sync_wait import Flight, block_signals, in_flight, let_go, restore_signals

QUEUE_VERSION = 3
PROTOCOL = pickle.HIGHEST_PROTOCOL
SLICE_NS = sync_wait.SLICE_NS
SPIN_NS = 20_000

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_REC = struct.Struct("<II")

#: A take as ``get``/``get_many`` give it: (tag, payload); from a batch of n items, the
#: items first..stop-1: (TAG_BATCH, pickle, first, stop, n).
Item = Tuple[Any, ...]


def _exports_buffer(obj: Any) -> bool:
    """Whether ``obj``'s type exports buffers (C: PyObject_CheckBuffer), even if this
    object cannot (a datetime64 array's ValueError)."""
    try:
        memoryview(obj).release()
    except TypeError:
        return False
    except (ValueError, BufferError):
        return True
    return True


def wait_ns(block: Any, timeout: Any) -> int:
    """How long a put or get waits, in ns (-1: forever; 0: not at all), by multiprocessing's
    rules: ``block=False`` ignores the timeout, a negative one is a ValueError. As in C."""
    if not block:
        return 0
    if timeout is None:
        return -1
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be None or a number of seconds, not {type(timeout).__name__}")
    try:
        seconds = float(timeout)
    except OverflowError:  # a huge int
        if timeout < 0:
            raise ValueError("'timeout' must be a non-negative number") from None
        return -1
    if seconds != seconds:
        raise ValueError("timeout must not be NaN")
    if seconds < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return -1 if seconds * 1e9 >= 2**62 else int(seconds * 1e9)


_OOB_HEAD = struct.Struct("<IIQ")  # buffer count, 0, pickle length
_PAD = bytes(8)


def _padding(n: int) -> bytes:
    return _PAD[: -n % 8]


# A plain C-contiguous ndarray's pickle (protocol 5, its data out of band) depends only on its
# dtype and shape, and NumPy's reduce takes ~15 us to make it and ~10 us to undo - a sixth of a
# 1 MiB array's trip through the ring. So each process keeps the pickles it made, by (dtype,
# shape), and the (dtype, shape) of the pickles it undid, by their exact bytes: the same bytes
# unpickle to the same array over the same buffer. Only dtypes without fields, metadata or
# objects; a bounded number of each.
_ARRAY_CACHE_SIZE = 64
_array_pickles: Dict[Any, bytes] = {}
_array_layouts: Dict[bytes, Tuple[Any, Any, Any]] = {}  # pickle -> (numpy.frombuffer, dtype, shape)


def _plain_array_key(obj: Any) -> Any:
    """(dtype, shape, F-contiguous) of an exact, C-contiguous ndarray of a simple dtype; else None."""
    np = sys.modules.get("numpy")
    if np is None or type(obj) is not np.ndarray or not obj.flags.c_contiguous:
        return None
    dtype = obj.dtype
    if dtype.fields is not None or dtype.metadata is not None or dtype.hasobject:
        return None
    return (dtype, obj.shape, obj.flags.f_contiguous)


def _remember(cache: Dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _ARRAY_CACHE_SIZE:
        cache.clear()
    cache[key] = value


def oob_parts(obj: Any) -> Any:
    """``obj`` pickled for the ring: the parts of one out-of-band record (a list:
    its head, the pickle, each buffer, with their padding) when pickle protocol 5
    hands out buffers (NumPy arrays and other PEP 574 objects), else the plain
    pickle (bytes). The buffers' bytes are copied once, into the ring."""
    key = _plain_array_key(obj)
    data = _array_pickles.get(key) if key is not None else None
    if data is not None:
        raws = [pickle.PickleBuffer(obj).raw()]
    else:
        buffers: List[Any] = []
        data = pickle.dumps(obj, 5, buffer_callback=buffers.append)
        if not buffers:
            return data
        if len(buffers) > MAX_OOB_BUFFERS:
            return pickle.dumps(obj, PROTOCOL)
        try:
            raws = [b.raw() for b in buffers]  # BufferError for a buffer that is not contiguous
        except BufferError:
            return pickle.dumps(obj, PROTOCOL)
        if key is not None and len(raws) == 1 and raws[0].nbytes == obj.nbytes:
            _remember(_array_pickles, key, data)
    lengths = [r.nbytes for r in raws]
    parts: List[Any] = [_OOB_HEAD.pack(len(raws), 0, len(data)), struct.pack(f"<{len(raws)}Q", *lengths)]
    parts += [data, _padding(len(data))]
    for raw in raws:
        parts += [raw, _padding(raw.nbytes)]
    return parts


def oob_loads(payload: Any) -> Any:
    """Unpickle an out-of-band record's payload (a bytearray: the arrays made from
    it are writable views of it). Every length is checked against the payload:
    CorruptSegment if they do not add up."""
    size = len(payload)
    if size < _OOB_HEAD.size:
        raise _corrupt("an out-of-band record is cut short")
    count, zero, pickle_len = _OOB_HEAD.unpack_from(payload)
    if zero or count == 0 or count > MAX_OOB_BUFFERS or _OOB_HEAD.size + 8 * count > size:
        raise _corrupt("an out-of-band record's head does not add up")
    lengths = struct.unpack_from(f"<{count}Q", payload, _OOB_HEAD.size)
    view = memoryview(payload)
    at = _OOB_HEAD.size + 8 * count
    pieces = []
    for length in (pickle_len, *lengths):
        if length > size - at:
            raise _corrupt("an out-of-band record's lengths reach past its end")
        pieces.append(view[at : at + length])
        at += length + (-length % 8)
    if at != size:
        raise _corrupt("an out-of-band record's lengths do not add up to its size")
    head = bytes(pieces[0]) if count == 1 else b""
    known = _array_layouts.get(head) if head else None
    if known is not None:
        frombuffer, dtype, shape = known
        if len(pieces[1]) == dtype.itemsize * math.prod(shape):
            return frombuffer(pieces[1], dtype=dtype).reshape(shape)
    obj = pickle.loads(pieces[0], buffers=pieces[1:])
    key = _plain_array_key(obj) if head else None
    if key is not None and obj.nbytes == len(pieces[1]):
        _remember(_array_layouts, head, (sys.modules["numpy"].frombuffer, obj.dtype, obj.shape))
    return obj


def decoded(item: Item) -> List[Any]:
    """The objects of one take (raw, as ``get``/``get_many`` give it): unpickled, or bytes."""
    tag, payload = item[0], item[1]
    if tag == TAG_PLAIN:
        return [queue_plain.decode(payload)]
    if tag == TAG_PICKLE:
        return [pickle.loads(payload)]
    if tag == TAG_PICKLE_OOB:
        return [oob_loads(bytearray(payload))]
    if tag in BATCH_TAGS:
        batch = queue_plain.decode(payload) if tag == TAG_PLAIN_BATCH else pickle.loads(payload)
        if type(batch) is not list or len(batch) != item[4]:
            raise _corrupt("a batch record's pickle does not hold its items")
        return batch[item[2] : item[3]]
    return [bytes(payload)]


def _corrupt(what: str) -> CorruptSegment:
    return CorruptSegment(f"queue ring is damaged: {what}")


def _too_big(length: int, capacity: int) -> ValueError:
    return ValueError(
        f"a message of {length} bytes does not fit in this queue's ring of {capacity} bytes "
        "(make the queue with a larger capacity=)"
    )


class PyRingCore:
    """The pure-Python twin of ``shmem._queue.QueueCore``."""

    def __init__(self, mapping: Any, capacity: int, maxsize: int, joinable: bool) -> None:
        view = memoryview(mapping)
        if capacity < 64 or capacity % 8 or len(view) < RING or capacity > len(view) - RING:
            view.release()
            raise ValueError("the queue's capacity does not fit its block")
        self._view: Optional[memoryview] = view
        self._calls = sync_wait.calls(mapping)
        # Calls that touch the block count in, as C's enter/leave do: release() while another
        # thread is asleep in one leaves the mapping to the last call in flight.
        self.flight = Flight("the queue")
        self.capacity, self.maxsize, self.joinable = capacity, maxsize, joinable

    # ------------------------------------------------------------ the mutex

    def _buf(self) -> memoryview:
        if self._view is None:
            raise ValueError("the queue is closed")
        return self._view

    def _u64(self, off: int) -> int:
        return int(_U64.unpack_from(self._buf(), off)[0])

    def _set64(self, off: int, value: int) -> None:
        _U64.pack_into(self._buf(), off, value & 0xFFFFFFFFFFFFFFFF)

    def _u32(self, off: int) -> int:
        return int(_U32.unpack_from(self._buf(), off)[0])

    def _set32(self, off: int, value: int) -> None:
        _U32.pack_into(self._buf(), off, value & 0xFFFFFFFF)

    def _lock(self) -> Any:
        """Block signals, take the mutex (repair if its holder died); the old signal mask to restore."""
        mask = block_signals()
        try:
            if self._calls.lock(0):
                self._repair()
        except BaseException:
            restore_signals(mask)
            raise
        return mask

    def _unlock(self, mask: Any) -> None:
        try:
            self._calls.unlock(0)
        finally:
            restore_signals(mask)

    def _lock_side(self, side: int) -> Any:
        """Block signals, take a side's mutex (the producers' or the consumers'), then the
        ring's, as C's lock_side, and clear the side's busy word; the old signal mask. (The
        twin copies every record under both, which C's protocol allows: it waits for any large
        copy of its side in flight, and never sets a busy word itself.)"""
        mask = block_signals()
        try:
            self._calls.lock(side)  # a holder that died left nothing to repair
            try:
                if self._calls.lock(0):
                    self._repair()
                if self._u32(side + BUSY_AFTER_MUTEX):  # left by a copier that died or started over
                    self._set32(side + BUSY_AFTER_MUTEX, 0)
            except BaseException:
                self._calls.unlock(side)
                raise
        except BaseException:
            restore_signals(mask)
            raise
        return mask

    def _unlock_side(self, side: int, mask: Any) -> None:
        try:
            self._calls.unlock(0)
            self._calls.unlock(side)
        finally:
            restore_signals(mask)

    def _let_go(self, side: int, side_held: bool, mask: Any) -> None:
        """After an exception in a round: let go of what this thread holds (the ring's mutex,
        unless a signal handler raised while it was free: around a sleep)."""
        try:
            let_go(self._calls, 0)
            if side_held:
                self._calls.unlock(side)
        finally:
            restore_signals(mask)

    def _repair(self) -> None:
        buf, cap = self._buf(), self.capacity
        head, tail = self._u64(OFF_HEAD), self._u64(OFF_TAIL)
        if (tail - head) & 0xFFFFFFFFFFFFFFFF > cap:
            tail = head
        pos, count = head, 0
        while pos != tail:
            at = pos % cap
            room = cap - at
            if room < REC or tail - pos < REC:
                break
            length, tag = _REC.unpack_from(buf, RING + at)
            if tag == TAG_WRAP:
                if tail - pos < room:
                    break
                pos += room
                continue
            size = record_size(length)
            if size > room or size > tail - pos:
                break
            if tag in BATCH_TAGS:  # counts as the items not taken yet
                n, taken = _REC.unpack_from(buf, RING + at + REC) if length >= BATCH_HEAD else (0, 0)
                if n == 0 or taken >= n:
                    break
                count += n - taken
            else:
                count += 1
            pos += size
        self._set64(OFF_TAIL, pos)
        self._set64(OFF_COUNT, count)
        if self.joinable and self._u64(OFF_UNFINISHED) < count:
            self._set64(OFF_UNFINISHED, count)

    def _wake(self, off: int, n: int) -> None:
        self._calls.wake(off, n)

    def _count_out(self, seq_off: int, sleepers_off: int) -> bool:
        if self._u32(sleepers_off) == 0:
            return False
        self._set32(sleepers_off, self._u32(sleepers_off) - 1)
        self._set32(seq_off, self._u32(seq_off) + 1)
        return True

    def _sleep_once(self, mask: Any, seq_off: int, sleepers_off: int, left_ns: int) -> Any:
        """Count in as a sleeper, sleep one slice with the mutex free; the mutex held again (its
        mask). Signal handlers run while it is free: one that raises there (the ring's mutex
        then free or held again, which the caller's let_go finds out) or in the lock after
        leaves this a sleeper too many, which costs one needless wake-up."""
        seen = self._u32(seq_off)
        self._set32(sleepers_off, self._u32(sleepers_off) + 1)
        if left_ns < 0 or left_ns > SLICE_NS:
            left_ns = SLICE_NS
        woken = False
        try:
            self._unlock(mask)
            woken = self._calls.wait(seq_off, seen, left_ns)
        finally:  # also when a signal handler raised: count ourselves out
            mask = self._lock()
            if not woken and self._u32(seq_off) == seen and self._u32(sleepers_off):
                self._set32(sleepers_off, self._u32(sleepers_off) - 1)
        self.flight.check_open()  # another thread closed this handle meanwhile (the memory is still ours)
        return mask

    def _notify_watchers(self) -> None:
        """As in C: after a put, or a get that emptied the queue, wake fileno()'s watchers if any sleep."""
        if self._u32(OFF_WATCHERS):
            self._set32(OFF_WATCHERS, 0)
            self._set32(OFF_SEQ_WATCH, self._u32(OFF_SEQ_WATCH) + 1)
            self._wake(OFF_SEQ_WATCH, 0x7FFFFFFF)

    @in_flight
    def watch(self, known: bool, timeout_ns: int) -> bool:
        """Whether the queue holds an item, once that differs from ``known`` or the time
        (at most one slice) is up: what a fileno() watcher thread waits in."""
        self._buf()
        if timeout_ns < 0 or timeout_ns > SLICE_NS:
            timeout_ns = SLICE_NS
        seen = self._u32(OFF_SEQ_WATCH)
        self._set32(OFF_WATCHERS, self._u32(OFF_WATCHERS) + 1)  # counted in, then look
        nonempty = self._u64(OFF_COUNT) != 0
        if nonempty == bool(known):
            self._calls.wait(OFF_SEQ_WATCH, seen, timeout_ns)
            nonempty = self._u64(OFF_COUNT) != 0
        return nonempty

    @in_flight
    def wake_watchers(self) -> None:
        self._buf()
        self._set32(OFF_WATCHERS, 1)
        self._notify_watchers()

    def _spin(self, seen_count: int) -> None:
        end = time.monotonic_ns() + SPIN_NS
        while self._u64(OFF_COUNT) == seen_count and time.monotonic_ns() < end:
            pass

    # ------------------------------------------------------------ records

    def _ends(self) -> Tuple[int, int]:
        head, tail = self._u64(OFF_HEAD), self._u64(OFF_TAIL)
        if (tail - head) & 0xFFFFFFFFFFFFFFFF > self.capacity or head % 8 or tail % 8:
            raise _corrupt("head and tail do not fit the ring")
        return head, tail

    def _append(self, data: Any, tag: int, items: int = 1) -> bool:
        head, tail = self._ends()
        cap = self.capacity
        length = len(data)
        size = record_size(length)
        if head == tail and cap - tail % cap < size:  # as in C: an empty ring restarts at offset 0
            head = tail = tail + (cap - tail % cap)
            self._set64(OFF_HEAD, head)
            self._set64(OFF_TAIL, tail)
        at = tail % cap
        skip = cap - at if cap - at < size else 0
        if cap - (tail - head) < skip + size:
            return False
        if self.maxsize and self._u64(OFF_COUNT) + items > self.maxsize:
            return False
        buf = self._buf()
        if skip:
            _REC.pack_into(buf, RING + at, 0, TAG_WRAP)
            tail += skip
            at = 0
        _REC.pack_into(buf, RING + at, length, tag)
        buf[RING + at + REC : RING + at + REC + length] = data
        self._set64(OFF_TAIL, tail + size)
        self._set64(OFF_COUNT, self._u64(OFF_COUNT) + items)
        if self.joinable:
            self._set64(OFF_UNFINISHED, self._u64(OFF_UNFINISHED) + items)
        return True

    def _take(self, max_items: int = 1, first: bool = True) -> Optional[Item]:
        """The first record's take, or None: the ring is empty, or (not ``first``) the first
        record is a large one, which is taken alone (as in C)."""
        head, tail = self._ends()
        cap, buf = self.capacity, self._buf()
        while True:
            if head == tail:
                if self._u64(OFF_COUNT):
                    self._set64(OFF_COUNT, 0)
                return None
            at = head % cap
            room = cap - at
            if tail - head < REC:
                raise _corrupt("a record header is cut short")
            length, tag = _REC.unpack_from(buf, RING + at)
            if tag == TAG_WRAP:
                if tail - head < room:
                    raise _corrupt("a wrap record reaches past the tail")
                head += room
                self._set64(OFF_HEAD, head)
                continue
            size = record_size(length)
            if size > room or size > tail - head:
                raise _corrupt("a record is longer than the ring holds")
            if not first and length >= BIG_COPY and tag not in BATCH_TAGS:
                return None
            got = 1
            item: Item
            if tag in BATCH_TAGS:
                n, taken = _REC.unpack_from(buf, RING + at + REC) if length >= BATCH_HEAD else (0, 0)
                if n == 0 or taken >= n:
                    raise _corrupt("a batch record's counts do not add up")
                got = min(n - taken, max_items)
                item = (tag, bytes(buf[RING + at + REC + BATCH_HEAD : RING + at + REC + length]), taken, taken + got, n)
            else:
                item = (tag, bytes(buf[RING + at + REC : RING + at + REC + length]))
            if tag in BATCH_TAGS and taken + got < n:
                _U32.pack_into(buf, RING + at + REC + 4, taken + got)  # commit: the batch's taken count
            else:
                self._set64(OFF_HEAD, head + size)  # commit: head
            self._set64(OFF_COUNT, max(0, self._u64(OFF_COUNT) - got))
            return item

    # ------------------------------------------------------------ the methods (as in C)

    def _check_size(self, length: int) -> None:
        if length > self.capacity or record_size(length) > self.capacity or length > 0xFFFFFFFF - 8:
            raise _too_big(length, self.capacity)

    @in_flight
    def put(self, data: Any, tag: int, timeout_ns: int) -> bool:
        return self.put_many([data], tag, timeout_ns) == 1

    @in_flight
    def put_many(self, items: List[Any], tag: int, timeout_ns: int) -> int:
        if not isinstance(items, list):
            raise TypeError("put_many() takes a list")
        self._buf()
        views = [memoryview(item).cast("B") for item in items]
        for view in views:
            self._check_size(len(view))
        return self._put_records([(view, tag, 1) for view in views], timeout_ns)

    @in_flight
    def put_batch(self, data: Any, n: int, timeout_ns: int, plain: bool = False) -> bool:
        """One record holding the ``n`` items whose list ``data`` encodes (a pickle, or plain)."""
        self._buf()
        if not 0 < n <= 0xFFFFFFFF or (self.maxsize and n > self.maxsize):
            raise ValueError(f"a batch of {n} items cannot go into this queue (maxsize {self.maxsize})")
        record = _REC.pack(n, 0) + memoryview(data).cast("B")
        self._check_size(len(record))
        return self._put_records([(record, TAG_PLAIN_BATCH if plain else TAG_BATCH, n)], timeout_ns) == 1

    def _put_records(self, records: List[Tuple[Any, int, int]], timeout_ns: int) -> int:
        end = -1 if timeout_ns < 0 else time.monotonic_ns() + timeout_ns
        done, spun, w = 0, False, False
        while True:  # a round: the producers' mutex, then the ring's (as in C)
            mask = self._lock_side(OFF_PUT_MUTEX)
            side_held = True
            try:
                while done < len(records) and self._append(*records[done]):
                    done += 1
                if done < len(records):
                    w = self._count_out(OFF_SEQ_GET, OFF_GET_SLEEPERS) or w
                left = -1 if end < 0 else end - time.monotonic_ns()
                if done == len(records) or (end >= 0 and left <= 0):
                    w = (done > 0 and self._count_out(OFF_SEQ_GET, OFF_GET_SLEEPERS)) or w
                    break  # both held
                # Full: wait for room without the producers' mutex, so that another
                # producer's put_nowait does not wait for this one.
                self._calls.unlock(OFF_PUT_MUTEX)
                side_held = False
                if spun and not w:
                    mask = self._sleep_once(mask, OFF_SEQ_PUT, OFF_PUT_SLEEPERS, left)
                    self._unlock(mask)
                    continue
                seen = self._u64(OFF_COUNT)
                self._unlock(mask)
            except BaseException:
                self._let_go(OFF_PUT_MUTEX, side_held, mask)
                raise
            if w:
                self._wake(OFF_SEQ_GET, 1)
                w = False
            if not spun:
                self._spin(seen)
                spun = True
        self._unlock_side(OFF_PUT_MUTEX, mask)
        if w:
            self._wake(OFF_SEQ_GET, 1)
        if done:
            self._notify_watchers()
        return done

    @in_flight
    def get(self, timeout_ns: int) -> Optional[Item]:
        items = self.get_many(1, timeout_ns)
        return items[0] if items else None

    @in_flight
    def get_many(self, max_items: int, timeout_ns: int) -> List[Item]:
        self._buf()
        out: List[Item] = []
        items = 0
        end = -1 if timeout_ns < 0 else time.monotonic_ns() + timeout_ns
        spun = timeout_ns == 0
        while True:  # a round: the consumers' mutex, then the ring's (as in C)
            mask = self._lock_side(OFF_GET_MUTEX)
            side_held = True
            try:
                while items < max_items:
                    try:
                        item = self._take(max_items - items, not out)
                    except CorruptSegment:
                        if out:
                            break  # return what was taken; the next call meets the damage again
                        raise
                    if item is None:
                        break
                    out.append(item)
                    items += item[3] - item[2] if item[0] in BATCH_TAGS else 1
                    if item[0] not in BATCH_TAGS and len(item[1]) >= BIG_COPY:
                        break  # a large record goes alone (as in C)
                left = -1 if end < 0 else end - time.monotonic_ns()
                if out or max_items <= 0 or (end >= 0 and left <= 0):
                    w = bool(out) and self._count_out(OFF_SEQ_PUT, OFF_PUT_SLEEPERS)
                    emptied = bool(out) and self._u64(OFF_COUNT) == 0
                    break  # both held
                # Wait without the consumers' mutex: another consumer's get_nowait does not
                # wait for this one.
                self._calls.unlock(OFF_GET_MUTEX)
                side_held = False
                if spun:
                    mask = self._sleep_once(mask, OFF_SEQ_GET, OFF_GET_SLEEPERS, left)
                    self._unlock(mask)
                    continue
                self._unlock(mask)
            except BaseException:
                self._let_go(OFF_GET_MUTEX, side_held, mask)
                raise
            self._spin(0)
            spun = True
        self._unlock_side(OFF_GET_MUTEX, mask)
        if w:
            self._wake(OFF_SEQ_PUT, 1)
        if emptied:
            self._notify_watchers()
        return out

    @in_flight
    def qsize(self) -> int:
        return self._u64(OFF_COUNT)

    # multiprocessing's calls (the C core's put_obj, get_obj, send_bytes, recv_bytes)

    @in_flight
    def put_obj(self, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        ns = wait_ns(block, timeout)
        self._buf()
        if isinstance(obj, (bytes, bytearray)) or not _exports_buffer(obj):
            plain = queue_plain.encode(obj)  # as in C: small builtins without pickle
            if plain is not None:
                done = self.put(plain, TAG_PLAIN, ns)
            else:
                done = self.put(pickle.dumps(obj, PROTOCOL), TAG_PICKLE, ns)
        else:  # as in C: an array's bytes beside its pickle
            parts = oob_parts(obj)
            done = self.put_parts(parts, TAG_PICKLE_OOB, ns) if isinstance(parts, list) else self.put(parts, 1, ns)
        if not done:
            raise queue.Full

    @in_flight
    def put_parts(self, parts: List[Any], tag: int, timeout_ns: int) -> bool:
        """One record made of ``parts`` laid end to end (C: copied straight into the ring)."""
        return self.put(b"".join(memoryview(p).cast("B") for p in parts), tag, timeout_ns)

    @in_flight
    def send_bytes(self, data: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        ns = wait_ns(block, timeout)
        self._buf()
        if not self.put(data, TAG_BYTES, ns):
            raise queue.Full

    @in_flight
    def get_objs(self, max_items: int, timeout_ns: int) -> List[Any]:
        """get_many's items as objects. (C keeps the list a batch unpickled to for this
        process's next take from it; the twin unpickles the batch each time.)"""
        out: List[Any] = []
        for item in self.get_many(max_items, timeout_ns):
            out += decoded(item)
        return out

    @in_flight
    def get_obj(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        ns = wait_ns(block, timeout)
        self._buf()
        item = self.get(ns)
        if item is None:
            raise queue.Empty
        return decoded(item)[0]

    @in_flight
    def recv_bytes(self, block: bool = True, timeout: Optional[float] = None) -> bytes:
        ns = wait_ns(block, timeout)
        self._buf()
        item = self.get(ns)
        if item is None:
            raise queue.Empty
        if item[0] in (TAG_BATCH, TAG_PLAIN_BATCH, TAG_PLAIN):  # an object comes as its pickle, however it was put
            return pickle.dumps(decoded(item)[0], PROTOCOL)
        return bytes(item[1])

    @in_flight
    def task_done(self) -> None:
        self._buf()
        mask = self._lock()
        try:
            unfinished = self._u64(OFF_UNFINISHED)
            if unfinished == 0:
                raise ValueError("task_done() called too many times")
            self._set64(OFF_UNFINISHED, unfinished - 1)
            w = False
            if unfinished == 1:
                self._set32(OFF_SEQ_JOIN, self._u32(OFF_SEQ_JOIN) + 1)
                w = self._u32(OFF_JOIN_SLEEPERS) != 0
                self._set32(OFF_JOIN_SLEEPERS, 0)
        finally:
            self._unlock(mask)
        if w:
            self._wake(OFF_SEQ_JOIN, 0x7FFFFFFF)

    @in_flight
    def join(self, timeout_ns: int) -> bool:
        self._buf()
        end = -1 if timeout_ns < 0 else time.monotonic_ns() + timeout_ns
        mask = self._lock()
        try:
            while self._u64(OFF_UNFINISHED) != 0:
                left = -1 if end < 0 else end - time.monotonic_ns()
                if end >= 0 and left <= 0:
                    return False
                mask = self._sleep_once(mask, OFF_SEQ_JOIN, OFF_JOIN_SLEEPERS, left)
            return True
        finally:
            self._unlock(mask)

    @in_flight
    def state(self) -> Tuple[int, int, int, int, int, int]:
        self._buf()
        mask = self._lock()
        try:
            return (
                self._u64(OFF_HEAD),
                self._u64(OFF_TAIL),
                self._u64(OFF_COUNT),
                self._u64(OFF_UNFINISHED),
                self._u32(OFF_GET_SLEEPERS),
                self._u32(OFF_PUT_SLEEPERS),
            )
        finally:
            self._unlock(mask)

    def release(self) -> None:
        self.flight.close(self._let_go_view)

    def _let_go_view(self) -> None:
        view, self._view = self._view, None
        if view is not None:
            self._calls.release()
            view.release()


RingCore: Any
#: The plain encoding of an object, or None (pickle it), and back: C when shmem._queue is built
#: (``queue_plain`` chooses; the object store takes it from there).
plain_encode: Callable[[Any], Optional[bytes]]
plain_decode: Callable[[Any], Any]
try:
    if lock_layout.PURE_REQUESTED:
        raise ImportError("pure Python requested (SHMEM_PURE_PYTHON)")
    from .. import _queue

    if getattr(_queue, "QUEUE_VERSION", None) != QUEUE_VERSION or _queue.RING != RING:
        raise ImportError("shmem._queue is a stale build of another ring layout")
    _queue._set_corrupt(CorruptSegment)
    _queue._set_codec(pickle.dumps, pickle.loads, PROTOCOL, queue.Full, queue.Empty, oob_parts, oob_loads)
    RingCore = _queue.QueueCore
    plain_encode, plain_decode = queue_plain.fast_encode, queue_plain.fast_decode  # C, if this is
    ACCELERATED = True
except ImportError as err:
    if lock_layout.SPEEDUPS_REQUIRED:
        raise ImportError(
            f"SHMEM_REQUIRE_SPEEDUPS is set, but shmem's C extension for queues is not usable ({err}); "
            "reinstall shmem where a C compiler is present, or unset the variable"
        ) from err
    RingCore = PyRingCore
    plain_encode, plain_decode = queue_plain.encode, queue_plain.decode
    ACCELERATED = False


def new_core(mapping: Any, capacity: int, maxsize: int, joinable: bool) -> Any:
    """The ring over a queue block's mapping (C or the twin)."""
    return RingCore(mapping, capacity, maxsize, joinable)


__all__: Sequence[str] = [
    "ACCELERATED",
    "PROTOCOL",
    "PyRingCore",
    "RingCore",
    "decoded",
    "new_core",
    "oob_loads",
    "oob_parts",
    "plain_decode",
    "plain_encode",
    "wait_ns",
]
