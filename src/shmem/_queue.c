/* shmem._queue: the ring of shmem.Queue, whole in C (src/shmem/_kinds/queue_ring.py has the
 * pure-Python twin, with the same behaviour, and queue_layout.py draws the block).
 *
 * The block: three robust, process-shared, error-checking mutexes - the ring's at offset 0, the
 * producers' at 128, the consumers' at 192; control words at 64; the ring of variable-length
 * records from RING (256), `capacity` bytes (a multiple of 8).
 *
 * Every change to the control words happens under the ring's mutex, in this file without running
 * any Python code in between: a signal handler can never run while this process holds it. A
 * small record is put or taken under the ring's mutex alone. A large one (BIG_COPY bytes or more)
 * is copied with only its side's mutex held - the producers' from finding room to committing, the
 * consumers' from finding the record to moving head past it - and that side's busy word set, so
 * that a producer's copy runs while a consumer copies another record out. A small put (or take)
 * that finds its side busy waits for the copy to end by taking the side's mutex first; who holds
 * a side's mutex clears a busy word left set (by a copier that died, or started over after a
 * signal). A producer writes its record
 * past `tail` (no one reads there), then moves `tail` and `count`; a consumer copies its record
 * out (no one writes between head and tail), then moves `head` and `count`. A process that dies
 * holding the ring's mutex has committed nothing, or committed a move half-way (tail moved, count
 * not): the next taker gets EOWNERDEAD and repairs by walking the records from head to tail,
 * counting them again and cutting the ring at the first one that does not add up. So a killed
 * producer's record is never seen, and a killed consumer's record stays in the queue; a side
 * mutex whose holder died needs no repair, as nothing it did outside the ring's mutex is visible.
 * Lock order: a side's mutex, then the ring's.
 *
 * Everything read from the block is hostile: head, tail and every record length are checked
 * against the capacity before anything is copied.
 *
 * Waiting: spin briefly watching `count`, then sleep on a futex sequence word (seq_get for
 * consumers, seq_put for producers) after counting oneself in the matching sleepers word; the
 * other side pays for a FUTEX_WAKE only when that word is not zero. Sleeps are slices of at
 * most SLICE_NS with the GIL released; Python's signal handlers run between slices, with the
 * mutex not held - and with neither side mutex held: a handler may call the same queue.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "_plain.h"

#define QUEUE_VERSION 3
#define NS 1000000000LL
#define SLICE_NS 50000000LL
#define SPIN_NS 20000LL /* how long a taker watches an empty ring before it sleeps */

/* Offsets in the block (queue_layout.py draws them; it passes them nowhere: they are fixed). */
#define OFF_HEAD 64
#define OFF_TAIL 72
#define OFF_COUNT 80
#define OFF_UNFINISHED 88
#define OFF_SEQ_GET 96
#define OFF_SEQ_PUT 100
#define OFF_GET_SLEEPERS 104
#define OFF_PUT_SLEEPERS 108
#define OFF_SEQ_JOIN 112
#define OFF_JOIN_SLEEPERS 116
#define OFF_SEQ_WATCH 120 /* futex word fileno()'s watcher threads sleep on */
#define OFF_WATCHERS 124  /* watchers asleep there (a hint, zeroed by whoever wakes them) */
#define OFF_MUTEX 0
#define OFF_PUT_MUTEX 128 /* producers' mutex: held from finding room to committing */
#define OFF_GET_MUTEX 192 /* consumers' mutex: held from finding a record to committing its take */
#define BUSY(side) ((side) + 48) /* u32 after a side's mutex: 1 while that side copies a large record */
#define OFF_PUT_BUSY BUSY(OFF_PUT_MUTEX)
#define OFF_GET_BUSY BUSY(OFF_GET_MUTEX)
#define RING 256
#define BIG_COPY 65536 /* a record this long or longer is copied without the ring's mutex */
#define REC 8 /* a record's header: u32 payload length, u32 tag */
#define TAG_WRAP 0xFFFFFFFFu
#define TAG_PICKLE 1
#define TAG_OOB 3 /* a pickle and its out-of-band buffers (queue_ring.oob_parts lays them out) */
#define TAG_BATCH 4 /* put_many's: u32 items, u32 taken, then the pickle of a list of the items */
#define TAG_PLAIN 5 /* small builtins without pickle (_plain.h) */
#define TAG_PLAIN_BATCH 6 /* a batch whose list is in the plain encoding */
#define IS_BATCH(tag) ((tag) == TAG_BATCH || (tag) == TAG_PLAIN_BATCH)
#define BATCH_HEAD 8

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int bound;  /* usable: not released */
    int inside; /* calls in flight (other threads may be asleep in one, GIL released) */
    int has_view; /* the buffer is held: released by release(), or by the last call in flight after it */
    char *base;
    uint64_t capacity;
    uint64_t maxsize; /* items; 0: no limit but the ring's bytes */
    int joinable;
    /* The last batch record this process unpickled and has not taken every item of: the next
     * take from that record (its position, never reused) hands out the next item unpickled
     * already, instead of unpickling the whole batch again. */
    PyObject *batch_items;
    uint64_t batch_pos;
    uint32_t batch_n;
} QueueCore;

#define U64(self, off) ((uint64_t *)((self)->base + (off)))
#define U32(self, off) ((uint32_t *)((self)->base + (off)))

static inline uint64_t
rec_size(uint64_t length)
{
    return REC + ((length + 7) & ~(uint64_t)7);
}

static long long
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * NS + ts.tv_nsec;
}

static PyObject *corrupt_error; /* shmem.CorruptSegment, set by queue_ring.py */

static int
corrupt(const char *what)
{
    PyErr_Format(corrupt_error ? corrupt_error : PyExc_ValueError, "queue ring is damaged: %s", what);
    return -1;
}

/* ------------------------------------------------------------------ the mutex */

/* Walk head..tail, count the records again, cut the ring at the first one that does not add up. */
static void
repair(QueueCore *self)
{
    uint64_t head = *U64(self, OFF_HEAD), tail = *U64(self, OFF_TAIL), cap = self->capacity;
    if (tail - head > cap) /* the control words themselves are damaged: empty the ring */
        tail = head;
    uint64_t pos = head, count = 0;
    while (pos != tail) {
        uint64_t at = pos % cap, room = cap - at;
        if (room < REC || tail - pos < REC)
            break;
        uint32_t length = *(uint32_t *)(self->base + RING + at);
        uint32_t tag = *(uint32_t *)(self->base + RING + at + 4);
        if (tag == TAG_WRAP) {
            if (tail - pos < room)
                break;
            pos += room;
            continue;
        }
        uint64_t size = rec_size(length);
        if (size > room || size > tail - pos)
            break;
        if (IS_BATCH(tag)) { /* counts as the items not taken yet */
            uint32_t *counts = (uint32_t *)(self->base + RING + at + REC);
            if (length < BATCH_HEAD || counts[0] == 0 || counts[1] >= counts[0])
                break;
            count += counts[0] - counts[1];
        } else
            count++;
        pos += size;
    }
    *U64(self, OFF_TAIL) = pos;
    *U64(self, OFF_COUNT) = count;
    if (self->joinable && *U64(self, OFF_UNFINISHED) < count)
        *U64(self, OFF_UNFINISHED) = count;
}

static void
unlock_at(QueueCore *self, int off)
{
    pthread_mutex_unlock((pthread_mutex_t *)(self->base + off));
}

/* Take the mutex at `off` (OFF_MUTEX, OFF_PUT_MUTEX or OFF_GET_MUTEX). 0: taken. -1: an exception
 * is set (a signal handler's included). `outer`: the side mutex the caller holds, or -1. Holding
 * one, a wait that reaches the end of a slice lets it go before it runs Python's signal handlers
 * (a handler may call this queue), and returns 1: the caller starts its operation over. On -1,
 * `outer` is let go too. Repairs the ring if the ring mutex's holder died. */
static int
lock_at(QueueCore *self, int off, int outer)
{
    pthread_mutex_t *mutex = (pthread_mutex_t *)(self->base + off);
    int rc = pthread_mutex_trylock(mutex);
    while (rc == EBUSY || rc == ETIMEDOUT || rc == EINTR) {
        if (rc != EBUSY) {
            if (outer >= 0)
                unlock_at(self, outer);
            if (PyErr_CheckSignals() < 0)
                return -1;
            if (!self->bound) { /* another thread closed this handle meanwhile */
                PyErr_SetString(PyExc_ValueError, "the queue was closed while this call waited");
                return -1;
            }
            if (outer >= 0)
                return 1;
        }
        Py_BEGIN_ALLOW_THREADS
#if __GLIBC_PREREQ(2, 30)
        long long end = monotonic_ns() + SLICE_NS;
        struct timespec ts = {(time_t)(end / NS), (long)(end % NS)};
        rc = pthread_mutex_clocklock(mutex, CLOCK_MONOTONIC, &ts);
#else
        struct timespec rt;
        clock_gettime(CLOCK_REALTIME, &rt);
        long long rend = (long long)rt.tv_sec * NS + rt.tv_nsec + SLICE_NS;
        rt.tv_sec = (time_t)(rend / NS);
        rt.tv_nsec = (long)(rend % NS);
        rc = pthread_mutex_timedlock(mutex, &rt);
#endif
        Py_END_ALLOW_THREADS
    }
    if (rc == EOWNERDEAD) {
        if (off == OFF_MUTEX)
            repair(self);
        rc = pthread_mutex_consistent(mutex);
        if (rc != 0)
            pthread_mutex_unlock(mutex);
    }
    if (rc != 0 && outer >= 0)
        unlock_at(self, outer);
    if (rc == EDEADLK) {
        PyErr_SetString(PyExc_RuntimeError, "this thread is inside an operation on this shmem queue already");
        return -1;
    }
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* The ring's mutex alone (task_done, join, state). */
static int
q_lock(QueueCore *self)
{
    return lock_at(self, OFF_MUTEX, -1);
}

static void
q_unlock(QueueCore *self)
{
    unlock_at(self, OFF_MUTEX);
}

/* A side's mutex, then the ring's: 0, or -1 with an exception (neither held then). The side's busy
 * word is cleared: no copy of that side is in flight while its mutex is held here. */
static int
lock_side(QueueCore *self, int side)
{
    for (;;) {
        if (lock_at(self, side, -1) < 0)
            return -1;
        int rc = lock_at(self, OFF_MUTEX, side);
        if (rc < 0)
            return -1;
        if (rc == 0) {
            *U32(self, BUSY(side)) = 0;
            return 0;
        }
    }
}

/* Holding the ring's mutex alone: let it go, then take the side's and the ring's again (the lock
 * order: side first). 0 with *side_held set, or -1 with an exception (nothing held then). */
static int
add_side(QueueCore *self, int side, int *side_held)
{
    q_unlock(self);
    if (lock_side(self, side) < 0)
        return -1;
    *side_held = 1;
    return 0;
}

/* The ring's mutex for one side's put or take, and the side's too (*side_held) if a large copy
 * of that side is in flight: this then waits for its end. 0, or -1 with an exception (nothing
 * held then). */
static int
lock_for(QueueCore *self, int side, int *side_held)
{
    *side_held = 0;
    if (q_lock(self) < 0)
        return -1;
    if (*U32(self, BUSY(side)) == 0)
        return 0;
    return add_side(self, side, side_held);
}

static void
wake(QueueCore *self, int off, int n)
{
    syscall(SYS_futex, U32(self, off), FUTEX_WAKE, n, NULL, NULL, 0);
}

/* Count this thread in as a sleeper (under the mutex), then sleep one slice with the mutex
 * free. Returns with the mutex held again, 0; or -1 with an exception (mutex not held). */
static int
sleep_once(QueueCore *self, int seq_off, int sleepers_off, long long left_ns)
{
    uint32_t seen = __atomic_load_n(U32(self, seq_off), __ATOMIC_RELAXED);
    *U32(self, sleepers_off) += 1;
    q_unlock(self);
    if (left_ns < 0 || left_ns > SLICE_NS)
        left_ns = SLICE_NS;
    struct timespec ts = {(time_t)(left_ns / NS), (long)(left_ns % NS)};
    long rc;
    int err;
    Py_BEGIN_ALLOW_THREADS
    rc = syscall(SYS_futex, U32(self, seq_off), FUTEX_WAIT, seen, &ts, NULL, 0);
    err = errno;
    Py_END_ALLOW_THREADS
    int woken = rc == 0 || err == EAGAIN; /* a waker counted us out already */
    if (!self->bound) { /* another thread closed this handle meanwhile (the memory is still ours) */
        PyErr_SetString(PyExc_ValueError, "the queue was closed while this call waited");
        return -1;
    }
    int signalled = PyErr_CheckSignals() < 0;
    if (signalled) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (q_lock(self) == 0) {
            if (!woken && __atomic_load_n(U32(self, seq_off), __ATOMIC_RELAXED) == seen && *U32(self, sleepers_off))
                *U32(self, sleepers_off) -= 1;
            q_unlock(self);
        }
        PyErr_Restore(type, value, tb);
        return -1;
    }
    if (q_lock(self) < 0)
        return -1;
    if (!woken && *U32(self, seq_off) == seen && *U32(self, sleepers_off))
        *U32(self, sleepers_off) -= 1;
    return 0;
}

/* After a change under the mutex: wake one sleeper of the other side if there is one (the
 * caller calls wake() after unlocking). Returns whether to. */
static int
count_out(QueueCore *self, int seq_off, int sleepers_off)
{
    if (*U32(self, sleepers_off) == 0)
        return 0;
    *U32(self, sleepers_off) -= 1;
    __atomic_store_n(U32(self, seq_off), *U32(self, seq_off) + 1, __ATOMIC_RELEASE);
    return 1;
}

/* After a put, or a get that left the queue empty (mutex free): wake every fileno() watcher, if
 * any is asleep - one atomic load when none is. A watcher that died leaves its count behind: one
 * wake-up for nobody, then it is zeroed. */
static void
notify_watchers(QueueCore *self)
{
    if (__atomic_load_n(U32(self, OFF_WATCHERS), __ATOMIC_ACQUIRE) == 0)
        return;
    __atomic_store_n(U32(self, OFF_WATCHERS), 0, __ATOMIC_RELAXED);
    __atomic_fetch_add(U32(self, OFF_SEQ_WATCH), 1, __ATOMIC_RELEASE);
    wake(self, OFF_SEQ_WATCH, INT32_MAX);
}

/* Spin (GIL held, mutex free) until `count` differs from `empty_or_full`'s reading or the time is
 * up: a producer on the other CPU usually answers within a few microseconds. */
static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void
spin(QueueCore *self, uint64_t seen_count, long long spin_ns)
{
    uint64_t *count = U64(self, OFF_COUNT);
    Py_BEGIN_ALLOW_THREADS
    long long end = monotonic_ns() + spin_ns;
    for (int i = 0;; i++) {
        if (__atomic_load_n(count, __ATOMIC_ACQUIRE) != seen_count)
            break;
        cpu_relax();
        if ((i & 63) == 63 && monotonic_ns() >= end)
            break;
    }
    Py_END_ALLOW_THREADS
}

/* ------------------------------------------------------------------ put and get under the mutex */

/* One record to append: `nviews` buffers laid end to end, `length` bytes in all, holding `items`
 * items (1; a batch record, its count). */
typedef struct {
    const Py_buffer *views;
    Py_ssize_t nviews;
    uint64_t length;
    uint32_t tag;
    uint32_t items;
} record_t;

/* What one take got: a whole record, or some of a batch record's items. */
typedef struct {
    PyObject *payload; /* bytes (a bytearray for TAG_OOB); a batch: its pickle, or if `cached` the
                          list this process unpickled from it already */
    uint32_t tag;
    uint32_t first, stop, n; /* a batch: this take got items first..stop-1 of its n */
    uint64_t pos;            /* a batch, or a large record: the record's position in the ring (never reused) */
    uint32_t length;         /* a large record found by take_one and not taken yet: its payload's bytes */
    int cached;
} took_t;

static inline uint64_t
took_items(const took_t *t)
{
    return IS_BATCH(t->tag) ? (uint64_t)(t->stop - t->first) : 1;
}

/* Room for a record of `size` bytes holding `items` items at tail (with a wrap record first if it
 * must go to offset 0): the bytes to skip first, or -1 if it does not fit now. */
static long long
room_for(QueueCore *self, uint64_t size, uint32_t items, uint64_t head, uint64_t tail)
{
    uint64_t cap = self->capacity, used = tail - head, at = tail % cap, skip = 0;
    if (cap - at < size)
        skip = cap - at;
    if (cap - used < skip + size)
        return -1;
    if (self->maxsize && *U64(self, OFF_COUNT) + items > self->maxsize)
        return -1;
    return (long long)skip;
}

/* Where a record goes: found under the ring's mutex, written past the tail, then committed. */
typedef struct {
    uint64_t tail; /* the tail it was placed at */
    uint64_t skip; /* bytes of a wrap record before it (0: none) */
} spot_t;

/* Room for one record (both the producers' and the ring's mutexes held): 1, with *spot set; 0: no
 * room now; -1: damaged (exception set). */
static int
find_room(QueueCore *self, const record_t *rec, spot_t *spot)
{
    uint64_t head = *U64(self, OFF_HEAD), tail = *U64(self, OFF_TAIL), cap = self->capacity;
    if (tail - head > cap || head % 8 || tail % 8)
        return corrupt("head and tail do not fit the ring");
    uint64_t size = rec_size(rec->length);
    if (head == tail && cap - tail % cap < size) {
        /* An empty ring whose free bytes are split by the end: restart both ends at offset 0, else
         * a record larger than the part left before the end could never be placed. head first: a
         * crash before tail moves leaves head past tail, which repair() empties. (No consumer is
         * inside a take: one would have a record between head and tail.) */
        head = tail + (cap - tail % cap);
        *U64(self, OFF_HEAD) = head;
        *U64(self, OFF_TAIL) = head;
        tail = head;
    }
    long long skip = room_for(self, size, rec->items, head, tail);
    if (skip < 0)
        return 0;
    spot->tail = tail;
    spot->skip = (uint64_t)skip;
    return 1;
}

/* Write a record at its spot, past the tail: no one reads there, so only the producers' mutex
 * needs to be held. */
static void
write_record(QueueCore *self, const record_t *rec, const spot_t *spot)
{
    char *ring = self->base + RING;
    uint64_t cap = self->capacity, tail = spot->tail;
    if (spot->skip) {
        uint32_t *wrap = (uint32_t *)(ring + tail % cap);
        wrap[0] = 0;
        wrap[1] = TAG_WRAP;
        tail += spot->skip;
    }
    uint32_t *header = (uint32_t *)(ring + tail % cap);
    header[0] = (uint32_t)rec->length;
    header[1] = rec->tag;
    char *out = ring + tail % cap + REC;
    for (Py_ssize_t i = 0; i < rec->nviews; i++) {
        memcpy(out, rec->views[i].buf, (size_t)rec->views[i].len);
        out += rec->views[i].len;
    }
}

/* Make a written record visible (both mutexes held): tail, then count (repair recounts between).
 * 0, or 1 if the tail moved since find_room - only a repair of a damaged ring moves it under a
 * producer - and the record must be placed again. */
static int
commit_record(QueueCore *self, const record_t *rec, const spot_t *spot)
{
    if (*U64(self, OFF_TAIL) != spot->tail)
        return 1;
    *U64(self, OFF_TAIL) = spot->tail + spot->skip + rec_size(rec->length);
    *U64(self, OFF_COUNT) += rec->items;
    if (self->joinable)
        *U64(self, OFF_UNFINISHED) += rec->items;
    return 0;
}

/* Take the first record, or up to `max_items` of a batch record's items (the consumers' and the
 * ring's mutexes held; no Python code runs: nothing here allocates a tracked object). 1: taken
 * into *t; 0: the ring is empty; 2: the first record is a large one, not taken (*t has its tag,
 * pos and length: copy_out takes it); -1: damaged (exception set). `use_cache`: a batch this
 * process unpickled already comes as its list (the caller decodes; the raw calls want the pickle). */
static int
take_one(QueueCore *self, took_t *t, uint64_t max_items, int use_cache)
{
    uint64_t head = *U64(self, OFF_HEAD), tail = *U64(self, OFF_TAIL), cap = self->capacity;
    if (tail - head > cap || head % 8 || tail % 8)
        return corrupt("head and tail do not fit the ring");
    char *ring = self->base + RING;
    for (;;) {
        if (head == tail) {
            if (*U64(self, OFF_COUNT) != 0)
                *U64(self, OFF_COUNT) = 0;
            return 0;
        }
        uint64_t at = head % cap, room = cap - at;
        if (tail - head < REC)
            return corrupt("a record header is cut short");
        uint32_t length = *(uint32_t *)(ring + at), tag = *(uint32_t *)(ring + at + 4);
        if (tag == TAG_WRAP) {
            if (tail - head < room)
                return corrupt("a wrap record reaches past the tail");
            head += room;
            *U64(self, OFF_HEAD) = head;
            continue;
        }
        uint64_t size = rec_size(length);
        if (size > room || size > tail - head)
            return corrupt("a record is longer than the ring holds");
        char *data = ring + at + REC;
        uint32_t *counts = (uint32_t *)data; /* a batch's: u32 items, u32 taken */
        uint64_t got = 1;
        t->tag = tag;
        t->cached = 0;
        if (IS_BATCH(tag)) {
            if (length < BATCH_HEAD || counts[0] == 0 || counts[1] >= counts[0])
                return corrupt("a batch record's counts do not add up");
            t->n = counts[0];
            t->first = counts[1];
            t->pos = head;
            got = t->n - t->first < max_items ? t->n - t->first : max_items;
            t->stop = t->first + (uint32_t)got;
            if (use_cache && self->batch_items != NULL && self->batch_pos == head && self->batch_n == t->n) {
                Py_INCREF(self->batch_items);
                t->payload = self->batch_items;
                t->cached = 1;
            } else
                t->payload = PyBytes_FromStringAndSize(data + BATCH_HEAD, (Py_ssize_t)(length - BATCH_HEAD));
        } else if (length >= BIG_COPY) {
            t->pos = head;
            t->length = length;
            return 2;
        } else {
            /* A record with out-of-band buffers comes out writable: the arrays unpickled from it
             * are views of this copy, writable as multiprocessing's are. */
            t->payload = tag == TAG_OOB ? PyByteArray_FromStringAndSize(data, (Py_ssize_t)length)
                                        : PyBytes_FromStringAndSize(data, (Py_ssize_t)length);
        }
        if (t->payload == NULL)
            return -1;
        if (IS_BATCH(tag) && t->stop < t->n)
            counts[1] = t->stop; /* commit: the batch's taken count (one aligned store), then count */
        else
            *U64(self, OFF_HEAD) = head + size; /* commit: head, then count */
        uint64_t count = *U64(self, OFF_COUNT);
        *U64(self, OFF_COUNT) = count > got ? count - got : 0;
        return 1;
    }
}

/* ------------------------------------------------------------------ putting and taking, waiting as asked */

static int
check_bound(QueueCore *self)
{
    if (!self->bound) {
        PyErr_SetString(PyExc_ValueError, "the queue is closed");
        return -1;
    }
    return 0;
}

static int
too_big(QueueCore *self, uint64_t length)
{
    if (length > self->capacity || rec_size(length) > self->capacity || length > UINT32_MAX - 8) {
        PyErr_Format(PyExc_ValueError,
                     "a message of %llu bytes does not fit in this queue's ring of %llu bytes "
                     "(make the queue with a larger capacity=)",
                     (unsigned long long)length, (unsigned long long)self->capacity);
        return 1;
    }
    return 0;
}

/* Append recs[0..n) in order, in as few locked sections as there is room for, each waiting for
 * room in turn (timeout_ns: -1 forever, 0 not at all). Returns how many were put (all, unless the
 * time ran out), or -1 with an exception. Every record's size was checked (too_big). A large
 * record is copied with the producers' mutex held and the ring's free. */
static Py_ssize_t
put_records(QueueCore *self, const record_t *recs, Py_ssize_t n, long long timeout_ns)
{
    long long end = timeout_ns < 0 ? -1 : monotonic_ns() + timeout_ns;
    Py_ssize_t done = 0;
    int spun = 0, w = 0, fresh = 0; /* fresh: put something no sleeper was woken for yet */
    int side_held = 0;
    for (;;) { /* a round: the ring's mutex (and the producers', for a large record) */
        if (lock_for(self, OFF_PUT_MUTEX, &side_held) < 0)
            return -1;
        int rc = 0, held = 1;
        while (done < n) {
            spot_t spot;
            rc = find_room(self, &recs[done], &spot);
            if (rc <= 0)
                break;
            if (recs[done].length >= BIG_COPY) {
                if (!side_held) { /* take the producers' mutex too, then look again */
                    if (add_side(self, OFF_PUT_MUTEX, &side_held) < 0)
                        return -1;
                    continue;
                }
                /* Consumers take what is there while this copies (one is woken first, if one
                 * sleeps and this call put something already). */
                w = (fresh && count_out(self, OFF_SEQ_GET, OFF_GET_SLEEPERS)) || w;
                fresh = 0;
                *U32(self, OFF_PUT_BUSY) = 1;
                q_unlock(self);
                if (w)
                    wake(self, OFF_SEQ_GET, 1);
                w = 0;
                write_record(self, &recs[done], &spot);
                rc = lock_at(self, OFF_MUTEX, OFF_PUT_MUTEX);
                if (rc != 0) { /* -1: an exception; 1: signal handlers ran. Nothing held either way. */
                    held = 0;
                    break;
                }
                *U32(self, OFF_PUT_BUSY) = 0;
                if (commit_record(self, &recs[done], &spot) != 0)
                    continue;
            } else {
                write_record(self, &recs[done], &spot);
                commit_record(self, &recs[done], &spot); /* the ring's mutex was held throughout */
            }
            done++;
            fresh = 1;
        }
        if (!held) {
            if (rc < 0)
                return -1;
            continue;
        }
        if (rc < 0) {
            q_unlock(self);
            if (side_held)
                unlock_at(self, OFF_PUT_MUTEX);
            return -1;
        }
        if (done == n)
            break;
        /* Full: let the consumers at what is there, then wait for room - without the producers'
         * mutex, so that another producer's put_nowait does not wait for this one. */
        w = count_out(self, OFF_SEQ_GET, OFF_GET_SLEEPERS) || w;
        fresh = 0;
        long long left = end < 0 ? -1 : end - monotonic_ns();
        if (end >= 0 && left <= 0)
            break;
        if (side_held)
            unlock_at(self, OFF_PUT_MUTEX);
        side_held = 0;
        if (!spun || w) {
            uint64_t seen = *U64(self, OFF_COUNT);
            q_unlock(self);
            if (w)
                wake(self, OFF_SEQ_GET, 1);
            w = 0;
            if (!spun)
                spin(self, seen, SPIN_NS);
            spun = 1;
            continue;
        }
        if (sleep_once(self, OFF_SEQ_PUT, OFF_PUT_SLEEPERS, left) < 0)
            return -1;
        q_unlock(self);
    }
    w = (fresh && count_out(self, OFF_SEQ_GET, OFF_GET_SLEEPERS)) || w;
    q_unlock(self);
    if (side_held)
        unlock_at(self, OFF_PUT_MUTEX);
    if (w)
        wake(self, OFF_SEQ_GET, 1);
    if (done)
        notify_watchers(self);
    return done;
}

/* The buffers of the bytes-like objects in `list`; NULL with an exception (none held then). */
static Py_buffer *
get_views(PyObject *list, Py_ssize_t *n)
{
    if (!PyList_Check(list)) {
        PyErr_SetString(PyExc_TypeError, "expected a list of bytes-like objects");
        return NULL;
    }
    *n = PyList_GET_SIZE(list);
    Py_buffer *views = PyMem_Calloc((size_t)(*n ? *n : 1), sizeof(Py_buffer));
    if (views == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(list, i), &views[i], PyBUF_SIMPLE) < 0) {
            while (i--)
                PyBuffer_Release(&views[i]);
            PyMem_Free(views);
            return NULL;
        }
    }
    return views;
}

static void
release_views(Py_buffer *views, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
}

/* One record of `tag` made of `nviews` buffers laid end to end: 1 put, 0 no room in time, -1 error. */
static int
put_one(QueueCore *self, const Py_buffer *views, Py_ssize_t nviews, uint32_t tag, uint32_t items, long long timeout_ns)
{
    uint64_t length = 0;
    for (Py_ssize_t i = 0; i < nviews; i++)
        length += (uint64_t)views[i].len;
    if (too_big(self, length))
        return -1;
    record_t rec = {views, nviews, length, tag, items};
    return (int)put_records(self, &rec, 1, timeout_ns);
}

/* One record holding the bytes of `data`: 1 put, 0 no room in time, -1 error. */
static int
put_data(QueueCore *self, PyObject *data, uint32_t tag, long long timeout_ns)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return -1;
    int rc = put_one(self, &view, 1, tag, 1, timeout_ns);
    PyBuffer_Release(&view);
    return rc;
}

/* One record made of the bytes-like `parts` (a list), copied straight into the ring. */
static int
put_parts(QueueCore *self, PyObject *parts, uint32_t tag, long long timeout_ns)
{
    Py_ssize_t n;
    Py_buffer *views = get_views(parts, &n);
    if (views == NULL)
        return -1;
    int rc = put_one(self, views, n, tag, 1, timeout_ns);
    release_views(views, n);
    return rc;
}

/* Take the large record take_one found (*t: its tag, pos and length), copying it out with the
 * consumers' mutex held and the ring's free. 1: taken into *t; 0: the ring changed meanwhile,
 * nothing taken (both mutexes held: look again); -1 with an exception, or 2: signal handlers ran
 * (neither mutex held, either way). */
static int
copy_out(QueueCore *self, took_t *t)
{
    uint64_t cap = self->capacity, size = rec_size(t->length);
    const char *data = self->base + RING + t->pos % cap + REC; /* checked by take_one to fit the ring */
    *U32(self, OFF_GET_BUSY) = 1;
    q_unlock(self);
    /* A record with out-of-band buffers comes out writable, as take_one's do. */
    PyObject *payload = t->tag == TAG_OOB ? PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)t->length)
                                          : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)t->length);
    if (payload == NULL) {
        unlock_at(self, OFF_GET_MUTEX);
        return -1;
    }
    memcpy(t->tag == TAG_OOB ? PyByteArray_AS_STRING(payload) : PyBytes_AS_STRING(payload), data, t->length);
    int rc = lock_at(self, OFF_MUTEX, OFF_GET_MUTEX);
    if (rc != 0) { /* the busy word stays set: the next holder of the consumers' mutex clears it */
        Py_DECREF(payload);
        return rc < 0 ? -1 : 2;
    }
    *U32(self, OFF_GET_BUSY) = 0;
    uint64_t head = *U64(self, OFF_HEAD), tail = *U64(self, OFF_TAIL);
    if (head != t->pos || tail - head > cap || tail - head < size) { /* a repair cut the ring meanwhile */
        Py_DECREF(payload);
        return 0;
    }
    *U64(self, OFF_HEAD) = head + size; /* commit: head, then count */
    uint64_t count = *U64(self, OFF_COUNT);
    *U64(self, OFF_COUNT) = count > 1 ? count - 1 : 0;
    t->payload = payload;
    t->cached = 0;
    return 1;
}

/* Take up to `max_items` items into took[0..max_entries), waiting (as timeout_ns says) for the
 * first only. Returns the entries filled, 0 if none came in time, -1 with an exception (then
 * nothing was taken). Builds no Python object that could run code under the mutex. A large
 * record is taken alone (copy_out). */
static Py_ssize_t
take_records(QueueCore *self, took_t *took, Py_ssize_t max_entries, uint64_t max_items, long long timeout_ns,
             int use_cache)
{
    long long end = timeout_ns < 0 ? -1 : monotonic_ns() + timeout_ns;
    int spun = timeout_ns == 0;
    Py_ssize_t n = 0;
    uint64_t items = 0;
    int side_held = 0;
    for (;;) { /* a round: the ring's mutex (and the consumers', for a large record) */
        if (lock_for(self, OFF_GET_MUTEX, &side_held) < 0)
            return -1;
        int restart = 0;
        while (n < max_entries && items < max_items) {
            int rc = take_one(self, &took[n], max_items - items, use_cache);
            if (rc == 2) {
                if (n > 0)
                    break; /* a large record goes alone, in the next take */
                if (!side_held) { /* take the consumers' mutex too, then look again */
                    if (add_side(self, OFF_GET_MUTEX, &side_held) < 0)
                        return -1;
                    continue;
                }
                rc = copy_out(self, &took[0]);
                if (rc == 0)
                    continue;
                if (rc < 0)
                    return -1;
                if (rc == 2) {
                    restart = 1;
                    break;
                }
                n = 1;
                items = 1;
                break;
            }
            if (rc < 0 && n == 0) {
                q_unlock(self);
                if (side_held)
                    unlock_at(self, OFF_GET_MUTEX);
                return -1;
            }
            if (rc < 0) /* return what was taken: the next call meets the damage again */
                PyErr_Clear();
            if (rc <= 0)
                break;
            items += took_items(&took[n]);
            n++;
        }
        if (restart)
            continue;
        if (n > 0)
            break;
        long long left = end < 0 ? -1 : end - monotonic_ns();
        if (end >= 0 && left <= 0)
            break;
        /* Wait without the consumers' mutex: another consumer's get_nowait does not wait for this one. */
        if (side_held)
            unlock_at(self, OFF_GET_MUTEX);
        side_held = 0;
        if (!spun) {
            q_unlock(self);
            spin(self, 0, SPIN_NS);
            spun = 1;
            continue;
        }
        if (sleep_once(self, OFF_SEQ_GET, OFF_GET_SLEEPERS, left) < 0)
            return -1;
        q_unlock(self);
    }
    int w = n ? count_out(self, OFF_SEQ_PUT, OFF_PUT_SLEEPERS) : 0;
    int emptied = n && *U64(self, OFF_COUNT) == 0;
    q_unlock(self);
    if (side_held)
        unlock_at(self, OFF_GET_MUTEX);
    if (w)
        wake(self, OFF_SEQ_PUT, 1);
    if (emptied)
        notify_watchers(self);
    return n;
}

static void
drop_took(took_t *took, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        Py_CLEAR(took[i].payload);
}

static PyObject *dumps_fn, *loads_fn, *full_exc, *empty_exc, *protocol_obj; /* set by _set_codec */
static PyObject *oob_parts_fn, *oob_loads_fn; /* queue_ring.oob_parts / oob_loads, set by _set_codec */

/* The list a batch take's items are in (a new reference): this process's cached one, or its
 * pickle unpickled (with the mutex free) and checked to hold the batch's count. */
static PyObject *
batch_list(const took_t *t)
{
    if (t->cached) {
        Py_INCREF(t->payload);
        return t->payload;
    }
    PyObject *list = t->tag == TAG_PLAIN_BATCH
                         ? plain_decode(PyBytes_AS_STRING(t->payload), PyBytes_GET_SIZE(t->payload),
                                        corrupt_error ? corrupt_error : PyExc_ValueError)
                         : PyObject_CallOneArg(loads_fn, t->payload);
    if (list != NULL && (!PyList_CheckExact(list) || PyList_GET_SIZE(list) != (Py_ssize_t)t->n)) {
        Py_DECREF(list);
        corrupt("a batch record's pickle does not hold its items");
        return NULL;
    }
    return list;
}

/* Item i of a batch's list, handed out: the list keeps None in its place (the list may stay
 * cached, and must not keep alive what its taker dropped). A new reference. */
static PyObject *
hand_out(PyObject *list, uint32_t i)
{
    PyObject *item = PyList_GET_ITEM(list, i);
    Py_INCREF(Py_None);
    PyList_SET_ITEM(list, i, Py_None);
    return item;
}

/* After a batch take (mutex free): keep its list for this process's next take from the same
 * record, or let it go with the record's last item. */
static void
batch_settle(QueueCore *self, const took_t *t, PyObject *list)
{
    if (t->stop < t->n) {
        Py_INCREF(list);
        Py_XSETREF(self->batch_items, list);
        self->batch_pos = t->pos;
        self->batch_n = t->n;
    } else if (self->batch_items != NULL && self->batch_pos == t->pos)
        Py_CLEAR(self->batch_items);
}

/* One whole-record take's object: decoded, unpickled, or the bytes themselves. */
static PyObject *
decode_record(const took_t *t)
{
    if (t->tag == TAG_PLAIN)
        return plain_decode(PyBytes_AS_STRING(t->payload), PyBytes_GET_SIZE(t->payload),
                            corrupt_error ? corrupt_error : PyExc_ValueError);
    if (t->tag == TAG_PICKLE || t->tag == TAG_OOB)
        return PyObject_CallOneArg(t->tag == TAG_OOB ? oob_loads_fn : loads_fn, t->payload);
    Py_INCREF(t->payload);
    return t->payload;
}

/* Append a take's objects to `out`: 0, or -1 with an exception. */
static int
decode_into(QueueCore *self, const took_t *t, PyObject *out)
{
    if (!IS_BATCH(t->tag)) {
        PyObject *obj = decode_record(t);
        if (obj == NULL)
            return -1;
        int rc = PyList_Append(out, obj);
        Py_DECREF(obj);
        return rc;
    }
    PyObject *list = batch_list(t);
    if (list == NULL)
        return -1;
    int rc = 0;
    for (uint32_t i = t->first; i < t->stop && rc == 0; i++) {
        PyObject *item = hand_out(list, i);
        rc = PyList_Append(out, item);
        Py_DECREF(item);
    }
    batch_settle(self, t, list);
    Py_DECREF(list);
    return rc;
}

/* A take as the raw calls give it: (tag, payload); from a batch of n items, the items first..stop-1:
 * (TAG_BATCH, pickle, first, stop, n). */
static PyObject *
raw_item(QueueCore *self, const took_t *t)
{
    if (!IS_BATCH(t->tag))
        return Py_BuildValue("(kO)", (unsigned long)t->tag, t->payload);
    if (t->stop == t->n && self->batch_items != NULL && self->batch_pos == t->pos)
        Py_CLEAR(self->batch_items); /* its last items went this way */
    return Py_BuildValue("(kOkkk)", (unsigned long)t->tag, t->payload, (unsigned long)t->first, (unsigned long)t->stop,
                         (unsigned long)t->n);
}

#define TAKE_CHUNK 64

/* Up to `max_items` items, waiting (as timeout_ns says) for the first only: a list, empty if none
 * came in time - of objects (`decoded`), or of raw items. */
static PyObject *
take_many(QueueCore *self, Py_ssize_t max_items, long long timeout_ns, int decoded)
{
    PyObject *out = PyList_New(0);
    if (out == NULL || max_items <= 0)
        return out;
    took_t took[TAKE_CHUNK];
    uint64_t items = 0;
    for (;;) {
        Py_ssize_t n = take_records(self, took, TAKE_CHUNK, (uint64_t)max_items - items, timeout_ns, decoded);
        if (n < 0) {
            if (PyList_GET_SIZE(out) == 0) {
                Py_DECREF(out);
                return NULL;
            }
            PyErr_Clear(); /* keep what was taken; the next call meets the error again */
            return out;
        }
        int rc = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            items += took_items(&took[i]);
            if (rc < 0)
                continue;
            if (decoded)
                rc = decode_into(self, &took[i], out);
            else {
                PyObject *raw = raw_item(self, &took[i]);
                rc = raw == NULL ? -1 : PyList_Append(out, raw);
                Py_XDECREF(raw);
            }
        }
        drop_took(took, n);
        if (rc < 0) {
            Py_DECREF(out);
            return NULL;
        }
        if (n < TAKE_CHUNK || items >= (uint64_t)max_items)
            return out;
        timeout_ns = 0; /* waited for the first already */
    }
}

/* ------------------------------------------------------------------ the methods */

/* put(data, tag, timeout_ns) -> True if put, False if there was no room in time. */
static PyObject *
qc_put_in(QueueCore *self, PyObject *args)
{
    PyObject *data;
    unsigned long tag;
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "OkL", &data, &tag, &timeout_ns) || check_bound(self) < 0)
        return NULL;
    int rc = put_data(self, data, (uint32_t)tag, timeout_ns);
    return rc < 0 ? NULL : PyBool_FromLong(rc);
}

/* put_parts(parts, tag, timeout_ns) -> bool: one record made of the bytes-like parts (a list). */
static PyObject *
qc_put_parts_in(QueueCore *self, PyObject *args)
{
    PyObject *parts;
    unsigned long tag;
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "OkL", &parts, &tag, &timeout_ns) || check_bound(self) < 0)
        return NULL;
    int rc = put_parts(self, parts, (uint32_t)tag, timeout_ns);
    return rc < 0 ? NULL : PyBool_FromLong(rc);
}

/* put_many(items, tag, timeout_ns) -> how many were put (all, unless the time ran out).
 * items: a list of bytes-like objects, a record each; each waits for room in turn. */
static PyObject *
qc_put_many_in(QueueCore *self, PyObject *args)
{
    PyObject *items;
    unsigned long tag;
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "O!kL", &PyList_Type, &items, &tag, &timeout_ns) || check_bound(self) < 0)
        return NULL;
    Py_ssize_t n;
    Py_buffer *views = get_views(items, &n);
    if (views == NULL)
        return NULL;
    Py_ssize_t done = -1;
    record_t *recs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(record_t));
    if (recs == NULL)
        PyErr_NoMemory();
    else {
        Py_ssize_t i = 0;
        for (; i < n && !too_big(self, (uint64_t)views[i].len); i++) {
            record_t rec = {&views[i], 1, (uint64_t)views[i].len, (uint32_t)tag, 1};
            recs[i] = rec;
        }
        if (i == n)
            done = put_records(self, recs, n, timeout_ns);
        PyMem_Free(recs);
    }
    release_views(views, n);
    return done < 0 ? NULL : PyLong_FromSsize_t(done);
}

/* put_batch(data, n, timeout_ns, plain=False) -> bool: one batch record of the n items whose list
 * `data` encodes: a pickle, or (plain) the plain encoding. The items count one each towards maxsize, qsize and task_done. */
static PyObject *
qc_put_batch_in(QueueCore *self, PyObject *args)
{
    PyObject *data;
    unsigned long long n;
    long long timeout_ns;
    int plain = 0;
    if (!PyArg_ParseTuple(args, "OKL|p", &data, &n, &timeout_ns, &plain) || check_bound(self) < 0)
        return NULL;
    if (n == 0 || n > UINT32_MAX || (self->maxsize && n > self->maxsize)) {
        PyErr_Format(PyExc_ValueError, "a batch of %llu items cannot go into this queue (maxsize %llu)", n,
                     (unsigned long long)self->maxsize);
        return NULL;
    }
    uint32_t counts[2] = {(uint32_t)n, 0};
    Py_buffer views[2];
    views[0].buf = counts;
    views[0].len = BATCH_HEAD;
    if (PyObject_GetBuffer(data, &views[1], PyBUF_SIMPLE) < 0)
        return NULL;
    int rc = put_one(self, views, 2, plain ? TAG_PLAIN_BATCH : TAG_BATCH, (uint32_t)n, timeout_ns);
    PyBuffer_Release(&views[1]);
    return rc < 0 ? NULL : PyBool_FromLong(rc);
}

/* get(timeout_ns) -> the first item raw ((tag, bytes); a batch's: (tag, pickle, first, stop, n)),
 * or None if nothing came in time. */
static PyObject *
qc_get_in(QueueCore *self, PyObject *args)
{
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "L", &timeout_ns) || check_bound(self) < 0)
        return NULL;
    took_t t;
    Py_ssize_t n = take_records(self, &t, 1, 1, timeout_ns, 0);
    if (n < 0)
        return NULL;
    if (n == 0)
        Py_RETURN_NONE;
    PyObject *raw = raw_item(self, &t);
    Py_DECREF(t.payload);
    return raw;
}

/* get_many(max_items, timeout_ns) -> a list of raw items (as get's), empty if nothing came in
 * time. Waits for the first item only; takes whatever else is there, up to max_items. */
static PyObject *
qc_get_many_in(QueueCore *self, PyObject *args)
{
    Py_ssize_t max_items;
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "nL", &max_items, &timeout_ns) || check_bound(self) < 0)
        return NULL;
    return take_many(self, max_items, timeout_ns, 0);
}

/* get_objs(max_items, timeout_ns) -> get_many's items as objects (unpickled; bytes as they are). */
static PyObject *
qc_get_objs_in(QueueCore *self, PyObject *args)
{
    Py_ssize_t max_items;
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "nL", &max_items, &timeout_ns) || check_bound(self) < 0)
        return NULL;
    return take_many(self, max_items, timeout_ns, 1);
}

/* watch(nonempty, timeout_ns) -> whether the queue holds an item, once that differs from
 * `nonempty` or the time (at most one slice) is up: what a fileno() watcher thread waits in. */
static PyObject *
qc_watch_in(QueueCore *self, PyObject *args)
{
    int known;
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "pL", &known, &timeout_ns) || check_bound(self) < 0)
        return NULL;
    if (timeout_ns < 0 || timeout_ns > SLICE_NS)
        timeout_ns = SLICE_NS;
    uint32_t seen = __atomic_load_n(U32(self, OFF_SEQ_WATCH), __ATOMIC_ACQUIRE);
    __atomic_fetch_add(U32(self, OFF_WATCHERS), 1, __ATOMIC_ACQ_REL); /* counted in, then look */
    int nonempty = __atomic_load_n(U64(self, OFF_COUNT), __ATOMIC_ACQUIRE) != 0;
    if (nonempty == known) {
        struct timespec ts = {(time_t)(timeout_ns / NS), (long)(timeout_ns % NS)};
        Py_BEGIN_ALLOW_THREADS
        syscall(SYS_futex, U32(self, OFF_SEQ_WATCH), FUTEX_WAIT, seen, &ts, NULL, 0);
        Py_END_ALLOW_THREADS
        if (check_bound(self) < 0) /* released while we slept: the mapping may be gone */
            return NULL;
        nonempty = __atomic_load_n(U64(self, OFF_COUNT), __ATOMIC_ACQUIRE) != 0;
    }
    return PyBool_FromLong(nonempty);
}

/* wake_watchers(): wake every watcher now (a handle stopping its own). */
static PyObject *
qc_wake_watchers_in(QueueCore *self, PyObject *unused)
{
    if (check_bound(self) < 0)
        return NULL;
    __atomic_store_n(U32(self, OFF_WATCHERS), 1, __ATOMIC_RELAXED);
    notify_watchers(self);
    Py_RETURN_NONE;
}

static PyObject *
qc_qsize_in(QueueCore *self, PyObject *unused)
{
    if (check_bound(self) < 0)
        return NULL;
    uint64_t count = __atomic_load_n(U64(self, OFF_COUNT), __ATOMIC_ACQUIRE);
    return PyLong_FromUnsignedLongLong(count);
}

/* task_done() -> None; ValueError if called more times than items were put. */
static PyObject *
qc_task_done_in(QueueCore *self, PyObject *unused)
{
    if (check_bound(self) < 0 || q_lock(self) < 0)
        return NULL;
    uint64_t unfinished = *U64(self, OFF_UNFINISHED);
    if (unfinished == 0) {
        q_unlock(self);
        PyErr_SetString(PyExc_ValueError, "task_done() called too many times");
        return NULL;
    }
    *U64(self, OFF_UNFINISHED) = unfinished - 1;
    int w = 0;
    if (unfinished == 1) {
        __atomic_store_n(U32(self, OFF_SEQ_JOIN), *U32(self, OFF_SEQ_JOIN) + 1, __ATOMIC_RELEASE);
        w = *U32(self, OFF_JOIN_SLEEPERS) != 0;
        *U32(self, OFF_JOIN_SLEEPERS) = 0;
    }
    q_unlock(self);
    if (w)
        wake(self, OFF_SEQ_JOIN, INT32_MAX);
    Py_RETURN_NONE;
}

/* join(timeout_ns) -> True once every item put has been marked done, False if the time ran out. */
static PyObject *
qc_join_in(QueueCore *self, PyObject *args)
{
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "L", &timeout_ns) || check_bound(self) < 0)
        return NULL;
    long long end = timeout_ns < 0 ? -1 : monotonic_ns() + timeout_ns;
    if (q_lock(self) < 0)
        return NULL;
    while (*U64(self, OFF_UNFINISHED) != 0) {
        long long left = end < 0 ? -1 : end - monotonic_ns();
        if (end >= 0 && left <= 0) {
            q_unlock(self);
            Py_RETURN_FALSE;
        }
        if (sleep_once(self, OFF_SEQ_JOIN, OFF_JOIN_SLEEPERS, left) < 0)
            return NULL;
    }
    q_unlock(self);
    Py_RETURN_TRUE;
}

/* state() -> (head, tail, count, unfinished, get_sleepers, put_sleepers): a snapshot, for shmem ls. */
static PyObject *
qc_state_in(QueueCore *self, PyObject *unused)
{
    if (check_bound(self) < 0 || q_lock(self) < 0)
        return NULL;
    PyObject *r = Py_BuildValue("(KKKKkk)", (unsigned long long)*U64(self, OFF_HEAD),
                                (unsigned long long)*U64(self, OFF_TAIL), (unsigned long long)*U64(self, OFF_COUNT),
                                (unsigned long long)*U64(self, OFF_UNFINISHED),
                                (unsigned long)*U32(self, OFF_GET_SLEEPERS), (unsigned long)*U32(self, OFF_PUT_SLEEPERS));
    q_unlock(self);
    return r;
}

/* Drop the buffer (and so let the mapping go) once released and no call is in flight. */
static void
let_go_view(QueueCore *self)
{
    if (!self->bound && self->inside == 0 && self->has_view) {
        self->has_view = 0;
        PyBuffer_Release(&self->view);
    }
}

static PyObject *
qc_release(QueueCore *self, PyObject *unused)
{
    self->bound = 0;
    let_go_view(self); /* now, or by the last call in flight */
    Py_CLEAR(self->batch_items);
    Py_RETURN_NONE;
}

static int
qc_init(QueueCore *self, PyObject *args, PyObject *kwds)
{
    PyObject *buf;
    unsigned long long capacity, maxsize;
    int joinable;
    if (!PyArg_ParseTuple(args, "OKKp", &buf, &capacity, &maxsize, &joinable))
        return -1;
    if (self->bound || self->has_view) {
        PyErr_SetString(PyExc_ValueError, "already bound");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return -1;
    if (capacity < 64 || capacity % 8 || (uint64_t)self->view.len < RING || capacity > (uint64_t)self->view.len - RING ||
        ((uintptr_t)self->view.buf % 64)) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "the queue's capacity does not fit its block");
        return -1;
    }
    self->base = self->view.buf;
    self->capacity = capacity;
    self->maxsize = maxsize;
    self->joinable = joinable;
    self->bound = 1;
    self->has_view = 1;
    return 0;
}

static void
qc_dealloc(QueueCore *self)
{
    if (self->has_view)
        PyBuffer_Release(&self->view);
    Py_CLEAR(self->batch_items);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ------------------------------------------------------------------ multiprocessing's calls
 *
 * put(obj, block=True, timeout=None), get(block=True, timeout=None), send_bytes(data, block, timeout)
 * and recv_bytes(block, timeout) whole in C: shmem.Queue binds these as its methods, so a call costs
 * no Python frame. queue_ring.py's twin has the same four, with the same rules and exceptions
 * (multiprocessing's: a negative timeout is ValueError; block=False ignores the timeout;
 * queue.Full / queue.Empty when the time runs out).
 */


/* (block, timeout) from positional args starting at `first` and keywords; -2 on error. */
static long long
wait_arg(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, Py_ssize_t first)
{
    PyObject *block = NULL, *timeout = NULL;
    Py_ssize_t npos = nargs - first;
    if (npos > 2) {
        PyErr_SetString(PyExc_TypeError, "too many arguments: (block=True, timeout=None)");
        return -2;
    }
    if (npos >= 1)
        block = args[first];
    if (npos == 2)
        timeout = args[first + 1];
    if (kwnames != NULL) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, i), *value = args[nargs + i];
            if (PyUnicode_CompareWithASCIIString(key, "block") == 0 && block == NULL)
                block = value;
            else if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0 && timeout == NULL)
                timeout = value;
            else {
                PyErr_Format(PyExc_TypeError, "unexpected or repeated keyword argument %R", key);
                return -2;
            }
        }
    }
    if (block != NULL) {
        int b = PyObject_IsTrue(block);
        if (b < 0)
            return -2;
        if (!b)
            return 0;
    }
    if (timeout == NULL || timeout == Py_None)
        return -1;
    if (PyBool_Check(timeout) || !(PyLong_Check(timeout) || PyFloat_Check(timeout))) {
        PyErr_Format(PyExc_TypeError, "timeout must be None or a number of seconds, not %.100s",
                     Py_TYPE(timeout)->tp_name);
        return -2;
    }
    double seconds = PyFloat_AsDouble(timeout);
    if (seconds == -1.0 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -2;
        PyErr_Clear();
        int sign = PyObject_RichCompareBool(timeout, Py_False, Py_GT); /* a huge int: its sign */
        if (sign < 0)
            return -2;
        if (!sign) {
            PyErr_SetString(PyExc_ValueError, "'timeout' must be a non-negative number");
            return -2;
        }
        return -1;
    }
    if (seconds != seconds) {
        PyErr_SetString(PyExc_ValueError, "timeout must not be NaN");
        return -2;
    }
    if (seconds < 0) {
        PyErr_SetString(PyExc_ValueError, "'timeout' must be a non-negative number");
        return -2;
    }
    if (seconds * 1e9 >= 4611686018427387904.0) /* 2**62 ns: about 146 years, forever */
        return -1;
    return (long long)(seconds * 1e9);
}

/* Put `obj` in the ring: small builtins (a tuple of numbers and strs, a dict...) in the plain
 * encoding, an array or other buffer with its bytes beside its pickle, the rest pickled.
 * 1 put, 0 no room in time, -1 error. */
static int
put_object(QueueCore *self, PyObject *obj, long long ns)
{
    if (PyObject_CheckBuffer(obj) && !PyBytes_CheckExact(obj) && !PyByteArray_CheckExact(obj)) {
        /* pickle protocol 5: oob_parts gives the record's parts, or bytes if none went out of band */
        PyObject *parts = PyObject_CallOneArg(oob_parts_fn, obj);
        if (parts == NULL)
            return -1;
        int rc = PyList_Check(parts) ? put_parts(self, parts, TAG_OOB, ns) : put_data(self, parts, TAG_PICKLE, ns);
        Py_DECREF(parts);
        return rc;
    }
    plain_out out;
    plain_out_init(&out);
    int encoded = plain_encode_into(&out, obj, 0);
    if (encoded != 0) {
        int rc = -1;
        if (encoded > 0) {
            Py_buffer view;
            view.buf = out.data;
            view.len = out.len;
            rc = put_one(self, &view, 1, TAG_PLAIN, 1, ns);
        }
        plain_out_free(&out);
        return rc;
    }
    plain_out_free(&out);
    PyObject *call[2] = {obj, protocol_obj};
    PyObject *data = PyObject_Vectorcall(dumps_fn, call, 2, NULL);
    if (data == NULL)
        return -1;
    int rc = put_data(self, data, TAG_PICKLE, ns);
    Py_DECREF(data);
    return rc;
}

static PyObject *
qc_put_obj_in(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "put() missing its object");
        return NULL;
    }
    long long ns = wait_arg(args, nargs, kwnames, 1);
    if (ns == -2 || check_bound(self) < 0)
        return NULL;
    int rc = put_object(self, args[0], ns);
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        PyErr_SetNone(full_exc);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
qc_send_bytes_in(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "send_bytes() missing its data");
        return NULL;
    }
    long long ns = wait_arg(args, nargs, kwnames, 1);
    if (ns == -2 || check_bound(self) < 0)
        return NULL;
    int rc = put_data(self, args[0], 2, ns);
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        PyErr_SetNone(full_exc);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The first item's take, waiting as the (block, timeout) arguments say: 1, or -1 with an exception
 * (queue.Empty if none came in time). */
static int
take_first(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, took_t *t)
{
    long long ns = wait_arg(args, nargs, kwnames, 0);
    if (ns == -2 || check_bound(self) < 0)
        return -1;
    Py_ssize_t n = take_records(self, t, 1, 1, ns, 1);
    if (n == 0)
        PyErr_SetNone(empty_exc);
    return n > 0 ? 1 : -1;
}

/* A one-item take's object (unpickled with the mutex free). */
static PyObject *
decode_one(QueueCore *self, const took_t *t)
{
    if (!IS_BATCH(t->tag))
        return decode_record(t);
    PyObject *list = batch_list(t);
    if (list == NULL)
        return NULL;
    PyObject *item = hand_out(list, t->first);
    batch_settle(self, t, list);
    Py_DECREF(list);
    return item;
}

static PyObject *
qc_get_obj_in(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    took_t t;
    if (take_first(self, args, nargs, kwnames, &t) < 0)
        return NULL;
    PyObject *obj = decode_one(self, &t);
    Py_DECREF(t.payload);
    return obj;
}

static PyObject *
qc_recv_bytes_in(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    took_t t;
    if (take_first(self, args, nargs, kwnames, &t) < 0)
        return NULL;
    PyObject *out;
    if (IS_BATCH(t.tag) || t.tag == TAG_PLAIN) { /* an object comes as its pickle, however it was put */
        PyObject *obj = decode_one(self, &t);
        PyObject *call[2] = {obj, protocol_obj};
        out = obj == NULL ? NULL : PyObject_Vectorcall(dumps_fn, call, 2, NULL);
        Py_XDECREF(obj);
    } else
        out = PyBytes_FromObject(t.payload); /* always bytes, as multiprocessing's */
    Py_DECREF(t.payload);
    return out;
}

/* Every call that touches the block counts itself in: release() while a call of another thread
 * is asleep in it (GIL released) leaves the buffer - and so the mapping - held until that call
 * is out, instead of unmapping memory it is about to touch. */
static int
enter(QueueCore *self)
{
    if (check_bound(self) < 0)
        return -1;
    self->inside++;
    return 0;
}

static PyObject *
leave(QueueCore *self, PyObject *result)
{
    self->inside--;
    let_go_view(self);
    return result;
}

/* The methods, each counted in (enter/leave) around its _in body. */
#define GUARDED_VARARGS(name)                                                                      \
    static PyObject *qc_##name(QueueCore *self, PyObject *args)                                    \
    {                                                                                              \
        return enter(self) < 0 ? NULL : leave(self, qc_##name##_in(self, args));                   \
    }
#define GUARDED_NOARGS(name)                                                                       \
    static PyObject *qc_##name(QueueCore *self, PyObject *unused)                                  \
    {                                                                                              \
        return enter(self) < 0 ? NULL : leave(self, qc_##name##_in(self, unused));                 \
    }
#define GUARDED_FASTCALL(name)                                                                     \
    static PyObject *qc_##name(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) \
    {                                                                                              \
        return enter(self) < 0 ? NULL : leave(self, qc_##name##_in(self, args, nargs, kwnames));   \
    }
GUARDED_VARARGS(put)
GUARDED_VARARGS(put_parts)
GUARDED_VARARGS(put_many)
GUARDED_VARARGS(put_batch)
GUARDED_VARARGS(get)
GUARDED_VARARGS(get_many)
GUARDED_VARARGS(get_objs)
GUARDED_VARARGS(watch)
GUARDED_VARARGS(join)
GUARDED_NOARGS(wake_watchers)
GUARDED_NOARGS(qsize)
GUARDED_NOARGS(task_done)
GUARDED_NOARGS(state)
GUARDED_FASTCALL(put_obj)
GUARDED_FASTCALL(send_bytes)
GUARDED_FASTCALL(get_obj)
GUARDED_FASTCALL(recv_bytes)

static PyMethodDef qc_methods[] = {
    {"put", (PyCFunction)qc_put, METH_VARARGS, "put(data, tag, timeout_ns) -> bool"},
    {"put_many", (PyCFunction)qc_put_many, METH_VARARGS, "put_many(items, tag, timeout_ns) -> int"},
    {"get", (PyCFunction)qc_get, METH_VARARGS, "get(timeout_ns) -> (tag, bytes) or None"},
    {"get_many", (PyCFunction)qc_get_many, METH_VARARGS, "get_many(max_items, timeout_ns) -> list of raw items"},
    {"get_objs", (PyCFunction)qc_get_objs, METH_VARARGS, "get_objs(max_items, timeout_ns) -> list of objects"},
    {"put_batch", (PyCFunction)qc_put_batch, METH_VARARGS, "put_batch(pickle, n, timeout_ns) -> bool: n items, one record"},
    {"qsize", (PyCFunction)qc_qsize, METH_NOARGS, "qsize() -> int"},
    {"watch", (PyCFunction)qc_watch, METH_VARARGS, "watch(nonempty, timeout_ns) -> bool: the queue's state once it differs"},
    {"wake_watchers", (PyCFunction)qc_wake_watchers, METH_NOARGS, "wake_watchers(): wake every watch()"},
    {"task_done", (PyCFunction)qc_task_done, METH_NOARGS, "task_done()"},
    {"join", (PyCFunction)qc_join, METH_VARARGS, "join(timeout_ns) -> bool"},
    {"state", (PyCFunction)qc_state, METH_NOARGS, "state() -> (head, tail, count, unfinished, gs, ps)"},
    {"release", (PyCFunction)qc_release, METH_NOARGS, "release the buffer"},
    {"put_parts", (PyCFunction)qc_put_parts, METH_VARARGS, "put_parts(parts, tag, timeout_ns) -> bool: one record"},
    {"put_obj", (PyCFunction)(void (*)(void))qc_put_obj, METH_FASTCALL | METH_KEYWORDS,
     "put_obj(obj, block=True, timeout=None): pickle and put; queue.Full if no room in time"},
    {"get_obj", (PyCFunction)(void (*)(void))qc_get_obj, METH_FASTCALL | METH_KEYWORDS,
     "get_obj(block=True, timeout=None): the first item (unpickled); queue.Empty if none in time"},
    {"send_bytes", (PyCFunction)(void (*)(void))qc_send_bytes, METH_FASTCALL | METH_KEYWORDS,
     "send_bytes(data, block=True, timeout=None): put bytes as they are; queue.Full if no room in time"},
    {"recv_bytes", (PyCFunction)(void (*)(void))qc_recv_bytes, METH_FASTCALL | METH_KEYWORDS,
     "recv_bytes(block=True, timeout=None): the first message's bytes; queue.Empty if none in time"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject QueueCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmem._queue.QueueCore",
    .tp_basicsize = sizeof(QueueCore),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The ring of a shmem queue, over a block's mapping.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)qc_init,
    .tp_dealloc = (destructor)qc_dealloc,
    .tp_methods = qc_methods,
};

static PyObject *
set_corrupt(PyObject *module, PyObject *category)
{
    Py_INCREF(category);
    Py_XSETREF(corrupt_error, category);
    Py_RETURN_NONE;
}

/* _set_codec(dumps, loads, protocol, Full, Empty, oob_parts, oob_loads): what put_obj/get_obj call
 * and raise. */
static PyObject *
set_codec(PyObject *module, PyObject *args)
{
    PyObject *d, *l, *p, *f, *e, *op, *ol;
    if (!PyArg_ParseTuple(args, "OOOOOOO", &d, &l, &p, &f, &e, &op, &ol))
        return NULL;
    Py_INCREF(op);
    Py_INCREF(ol);
    Py_XSETREF(oob_parts_fn, op);
    Py_XSETREF(oob_loads_fn, ol);
    Py_INCREF(d);
    Py_INCREF(l);
    Py_INCREF(p);
    Py_INCREF(f);
    Py_INCREF(e);
    Py_XSETREF(dumps_fn, d);
    Py_XSETREF(loads_fn, l);
    Py_XSETREF(protocol_obj, p);
    Py_XSETREF(full_exc, f);
    Py_XSETREF(empty_exc, e);
    Py_RETURN_NONE;
}

/* plain_encode(obj) -> bytes, or None when obj is outside the plain codec; plain_decode(data) -> obj.
 * The queue calls the codec itself; these are for its twin's parity tests. */
static PyObject *
m_plain_encode(PyObject *module, PyObject *obj)
{
    plain_out out;
    plain_out_init(&out);
    int rc = plain_encode_into(&out, obj, 0);
    PyObject *result = rc < 0 ? NULL : rc == 0 ? (Py_INCREF(Py_None), Py_None) : PyBytes_FromStringAndSize(out.data, out.len);
    plain_out_free(&out);
    return result;
}

static PyObject *
m_plain_decode(PyObject *module, PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *obj = plain_decode(view.buf, view.len, corrupt_error ? corrupt_error : PyExc_ValueError);
    PyBuffer_Release(&view);
    return obj;
}

static PyMethodDef module_methods[] = {
    {"plain_encode", (PyCFunction)m_plain_encode, METH_O, "The plain encoding of obj, or None (pickle it)."},
    {"plain_decode", (PyCFunction)m_plain_decode, METH_O, "The object a plain encoding holds."},
    {"_set_corrupt", (PyCFunction)set_corrupt, METH_O, "The exception for a damaged ring."},
    {"_set_codec", (PyCFunction)set_codec, METH_VARARGS,
     "pickle.dumps, pickle.loads, protocol, Full, Empty, oob_parts, oob_loads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef queue_module = {
    PyModuleDef_HEAD_INIT, "shmem._queue", "The ring of shmem's queues.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__queue(void)
{
    if (PyType_Ready(&QueueCoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&queue_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&QueueCoreType);
    if (PyModule_AddObject(m, "QueueCore", (PyObject *)&QueueCoreType) < 0 ||
        PyModule_AddIntConstant(m, "QUEUE_VERSION", QUEUE_VERSION) < 0 || PyModule_AddIntConstant(m, "RING", RING) < 0 ||
        PyModule_AddIntConstant(m, "BIG_COPY", BIG_COPY) < 0 || PyModule_AddIntConstant(m, "PLAIN_VERSION", PLAIN_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
