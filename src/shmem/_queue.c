/* shmem._queue: the ring of shmem.Queue, whole in C (src/shmem/_kinds/queue_ring.py has the
 * pure-Python twin, with the same behaviour, and queue_layout.py draws the block).
 *
 * The block: a robust, process-shared, error-checking mutex at offset 0; control words at 64;
 * the ring of variable-length records from RING (128), `capacity` bytes (a multiple of 8).
 *
 * Every change to the control words and every copy into or out of the ring happens under the
 * mutex, in this file without running any Python code in between: a signal handler can never
 * run while this process holds it. A producer writes its record past `tail`, then moves `tail`
 * and `count`; a consumer copies its record out, then moves `head` and `count`. A process that
 * dies holding the mutex has committed nothing, or committed a move half-way (tail moved, count
 * not): the next taker gets EOWNERDEAD and repairs by walking the records from head to tail,
 * counting them again and cutting the ring at the first one that does not add up. So a killed
 * producer's record is never seen, and a killed consumer's record stays in the queue.
 *
 * Everything read from the block is hostile: head, tail and every record length are checked
 * against the capacity before anything is copied.
 *
 * Waiting: spin briefly watching `count`, then sleep on a futex sequence word (seq_get for
 * consumers, seq_put for producers) after counting oneself in the matching sleepers word; the
 * other side pays for a FUTEX_WAKE only when that word is not zero. Sleeps are slices of at
 * most SLICE_NS with the GIL released; Python's signal handlers run between slices, with the
 * mutex not held.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define QUEUE_VERSION 1
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
#define RING 128
#define REC 8 /* a record's header: u32 payload length, u32 tag */
#define TAG_WRAP 0xFFFFFFFFu
#define TAG_OOB 3 /* a pickle and its out-of-band buffers (queue_ring.oob_parts lays them out) */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int bound;
    char *base;
    uint64_t capacity;
    uint64_t maxsize; /* items; 0: no limit but the ring's bytes */
    int joinable;
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
        pos += size;
        count++;
    }
    *U64(self, OFF_TAIL) = pos;
    *U64(self, OFF_COUNT) = count;
    if (self->joinable && *U64(self, OFF_UNFINISHED) < count)
        *U64(self, OFF_UNFINISHED) = count;
}

/* Take the mutex; -1 with an exception set if that fails (a signal handler's exception included). */
static int
q_lock(QueueCore *self)
{
    pthread_mutex_t *mutex = (pthread_mutex_t *)self->base;
    int rc = pthread_mutex_trylock(mutex);
    while (rc == EBUSY || rc == ETIMEDOUT || rc == EINTR) {
        if (rc != EBUSY && PyErr_CheckSignals() < 0)
            return -1;
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
        repair(self);
        rc = pthread_mutex_consistent(mutex);
        if (rc != 0)
            pthread_mutex_unlock(mutex);
    }
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

static void
q_unlock(QueueCore *self)
{
    pthread_mutex_unlock((pthread_mutex_t *)self->base);
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

/* Room for a record of `size` bytes at tail (with a wrap record first if it must go to offset 0):
 * the bytes to skip first, or -1 if it does not fit now. */
static long long
room_for(QueueCore *self, uint64_t size, uint64_t head, uint64_t tail)
{
    uint64_t cap = self->capacity, used = tail - head, at = tail % cap, skip = 0;
    if (cap - at < size)
        skip = cap - at;
    if (cap - used < skip + size)
        return -1;
    if (self->maxsize && *U64(self, OFF_COUNT) >= self->maxsize)
        return -1;
    return (long long)skip;
}

/* Append one record made of `n` parts laid end to end (mutex held). 1: done; 0: no room now;
 * -1: damaged (exception set). */
static int
append_parts(QueueCore *self, const Py_buffer *parts, Py_ssize_t n, uint64_t length, uint32_t tag)
{
    uint64_t head = *U64(self, OFF_HEAD), tail = *U64(self, OFF_TAIL), cap = self->capacity;
    if (tail - head > cap || head % 8 || tail % 8)
        return corrupt("head and tail do not fit the ring");
    uint64_t size = rec_size(length);
    if (head == tail && cap - tail % cap < size) {
        /* An empty ring whose free bytes are split by the end: restart both ends at offset 0, else
         * a record larger than the part left before the end could never be placed. head first: a
         * crash before tail moves leaves head past tail, which repair() empties. */
        head = tail + (cap - tail % cap);
        *U64(self, OFF_HEAD) = head;
        tail = head;
    }
    long long skip = room_for(self, size, head, tail);
    if (skip < 0)
        return 0;
    char *ring = self->base + RING;
    if (skip) {
        uint32_t *wrap = (uint32_t *)(ring + tail % cap);
        wrap[0] = 0;
        wrap[1] = TAG_WRAP;
        tail += (uint64_t)skip;
    }
    uint32_t *rec = (uint32_t *)(ring + tail % cap);
    rec[0] = (uint32_t)length;
    rec[1] = tag;
    char *out = ring + tail % cap + REC;
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(out, parts[i].buf, (size_t)parts[i].len);
        out += parts[i].len;
    }
    *U64(self, OFF_TAIL) = tail + size; /* commit: tail, then count (repair recounts between) */
    *U64(self, OFF_COUNT) += 1;
    if (self->joinable)
        *U64(self, OFF_UNFINISHED) += 1;
    return 1;
}

static int
append(QueueCore *self, const char *data, uint64_t length, uint32_t tag)
{
    Py_buffer one;
    one.buf = (void *)data;
    one.len = (Py_ssize_t)length;
    return append_parts(self, &one, 1, length, tag);
}

/* Take the first record (mutex held): its payload (tag in *tag), Py_None if empty, NULL on error. */
static PyObject *
take_raw(QueueCore *self, uint32_t *tag_out)
{
    uint64_t head = *U64(self, OFF_HEAD), tail = *U64(self, OFF_TAIL), cap = self->capacity;
    if (tail - head > cap || head % 8 || tail % 8) {
        corrupt("head and tail do not fit the ring");
        return NULL;
    }
    char *ring = self->base + RING;
    for (;;) {
        if (head == tail) {
            if (*U64(self, OFF_COUNT) != 0)
                *U64(self, OFF_COUNT) = 0;
            Py_RETURN_NONE;
        }
        uint64_t at = head % cap, room = cap - at;
        if (tail - head < REC) {
            corrupt("a record header is cut short");
            return NULL;
        }
        uint32_t length = *(uint32_t *)(ring + at), tag = *(uint32_t *)(ring + at + 4);
        if (tag == TAG_WRAP) {
            if (tail - head < room) {
                corrupt("a wrap record reaches past the tail");
                return NULL;
            }
            head += room;
            *U64(self, OFF_HEAD) = head;
            continue;
        }
        uint64_t size = rec_size(length);
        if (size > room || size > tail - head) {
            corrupt("a record is longer than the ring holds");
            return NULL;
        }
        /* A record with out-of-band buffers comes out writable: the arrays unpickled from it
         * are views of this copy, writable as multiprocessing's are. */
        PyObject *payload = tag == TAG_OOB ? PyByteArray_FromStringAndSize(ring + at + REC, (Py_ssize_t)length)
                                           : PyBytes_FromStringAndSize(ring + at + REC, (Py_ssize_t)length);
        if (payload == NULL)
            return NULL;
        *U64(self, OFF_HEAD) = head + size; /* commit: head, then count */
        if (*U64(self, OFF_COUNT))
            *U64(self, OFF_COUNT) -= 1;
        *tag_out = tag;
        return payload;
    }
}

/* take_raw, as a new (tag, bytes) tuple. */
static PyObject *
take(QueueCore *self)
{
    uint32_t tag = 0;
    PyObject *payload = take_raw(self, &tag);
    if (payload == NULL || payload == Py_None)
        return payload;
    return Py_BuildValue("(kN)", (unsigned long)tag, payload);
}

/* ------------------------------------------------------------------ the methods */

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
too_big(QueueCore *self, Py_ssize_t length)
{
    if ((uint64_t)length > self->capacity || rec_size((uint64_t)length) > self->capacity || length > UINT32_MAX - 8) {
        PyErr_Format(PyExc_ValueError,
                     "a message of %zd bytes does not fit in this queue's ring of %llu bytes "
                     "(make the queue with a larger capacity=)",
                     length, (unsigned long long)self->capacity);
        return 1;
    }
    return 0;
}

/* put_many(items, tag, timeout_ns) -> how many were put (all, unless the time ran out).
 * items: a list of bytes-like objects; each waits for room in turn. */
static PyObject *
qc_put_many(QueueCore *self, PyObject *args)
{
    PyObject *items;
    unsigned long tag;
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "O!kL", &PyList_Type, &items, &tag, &timeout_ns) || check_bound(self) < 0)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(items), done = 0;
    Py_buffer *views = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Py_buffer));
    if (views == NULL)
        return PyErr_NoMemory();
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(items, got), &views[got], PyBUF_SIMPLE) < 0)
            goto out;
        if (too_big(self, views[got].len)) {
            got++;
            goto out;
        }
    }
    long long end = timeout_ns < 0 ? -1 : monotonic_ns() + timeout_ns;
    int spun = 0;
    if (q_lock(self) < 0)
        goto out;
    while (done < n) {
        int rc = append(self, views[done].buf, (uint64_t)views[done].len, (uint32_t)tag);
        if (rc < 0) {
            q_unlock(self);
            goto out;
        }
        if (rc) {
            done++;
            continue;
        }
        /* Full: let the consumers at what is there, then wait for room. */
        int w = count_out(self, OFF_SEQ_GET, OFF_GET_SLEEPERS);
        long long left = end < 0 ? -1 : end - monotonic_ns();
        if (end >= 0 && left <= 0)
            break;
        if (!spun) {
            uint64_t seen = *U64(self, OFF_COUNT);
            q_unlock(self);
            if (w)
                wake(self, OFF_SEQ_GET, 1);
            spin(self, seen, SPIN_NS);
            spun = 1;
            if (q_lock(self) < 0)
                goto out;
            continue;
        }
        if (w) {
            q_unlock(self);
            wake(self, OFF_SEQ_GET, 1);
            if (q_lock(self) < 0)
                goto out;
            continue;
        }
        if (sleep_once(self, OFF_SEQ_PUT, OFF_PUT_SLEEPERS, left) < 0)
            goto out;
    }
    int w = done ? count_out(self, OFF_SEQ_GET, OFF_GET_SLEEPERS) : 0;
    q_unlock(self);
    if (w)
        wake(self, OFF_SEQ_GET, 1);
    result = PyLong_FromSsize_t(done);
out:
    for (Py_ssize_t i = 0; i < got; i++)
        if (views[i].obj != NULL)
            PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    if (result == NULL && done > 0 && !PyErr_Occurred())
        result = PyLong_FromSsize_t(done);
    return result;
}

/* put(data, tag, timeout_ns) -> True if put, False if there was no room in time. */
static PyObject *
qc_put(QueueCore *self, PyObject *args)
{
    PyObject *data;
    unsigned long tag;
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "OkL", &data, &tag, &timeout_ns) || check_bound(self) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (too_big(self, view.len)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (q_lock(self) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int rc = append(self, view.buf, (uint64_t)view.len, (uint32_t)tag);
    if (rc == 1) { /* the usual case: room at once */
        int w = count_out(self, OFF_SEQ_GET, OFF_GET_SLEEPERS);
        q_unlock(self);
        PyBuffer_Release(&view);
        if (w)
            wake(self, OFF_SEQ_GET, 1);
        Py_RETURN_TRUE;
    }
    q_unlock(self);
    if (rc < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyBuffer_Release(&view);
    PyObject *one = PyList_New(1);
    if (one == NULL)
        return NULL;
    Py_INCREF(data);
    PyList_SET_ITEM(one, 0, data);
    PyObject *args2 = Py_BuildValue("(OkL)", one, tag, timeout_ns);
    Py_DECREF(one);
    if (args2 == NULL)
        return NULL;
    PyObject *n = qc_put_many(self, args2);
    Py_DECREF(args2);
    if (n == NULL)
        return NULL;
    long put = PyLong_AsLong(n);
    Py_DECREF(n);
    return PyBool_FromLong(put == 1);
}

/* get_many(max_items, timeout_ns) -> a list of (tag, bytes), empty if nothing came in time.
 * Waits for the first item only; takes whatever else is there, up to max_items. */
static PyObject *
qc_get_many(QueueCore *self, PyObject *args)
{
    Py_ssize_t max_items;
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "nL", &max_items, &timeout_ns) || check_bound(self) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    long long end = timeout_ns < 0 ? -1 : monotonic_ns() + timeout_ns;
    int spun = timeout_ns == 0;
    if (q_lock(self) < 0)
        goto fail;
    for (;;) {
        while (PyList_GET_SIZE(out) < max_items) {
            PyObject *item = take(self);
            if (item == NULL) {
                q_unlock(self);
                goto fail;
            }
            if (item == Py_None) {
                Py_DECREF(item);
                break;
            }
            int rc = PyList_Append(out, item);
            Py_DECREF(item);
            if (rc < 0) {
                q_unlock(self);
                goto fail;
            }
        }
        if (PyList_GET_SIZE(out) > 0 || max_items <= 0)
            break;
        long long left = end < 0 ? -1 : end - monotonic_ns();
        if (end >= 0 && left <= 0)
            break;
        if (!spun) {
            q_unlock(self);
            spin(self, 0, SPIN_NS);
            spun = 1;
            if (q_lock(self) < 0)
                goto fail;
            continue;
        }
        if (sleep_once(self, OFF_SEQ_GET, OFF_GET_SLEEPERS, left) < 0)
            goto fail;
    }
    int w = PyList_GET_SIZE(out) ? count_out(self, OFF_SEQ_PUT, OFF_PUT_SLEEPERS) : 0;
    q_unlock(self);
    if (w)
        wake(self, OFF_SEQ_PUT, 1);
    return out;
fail:
    /* Items already taken would be lost if we raised now: return them; the next call meets the
     * error again (a damaged ring; a signal handler's exception can only come before the first). */
    if (PyList_GET_SIZE(out) > 0) {
        PyErr_Clear();
        return out;
    }
    Py_DECREF(out);
    return NULL;
}

/* get(timeout_ns) -> (tag, bytes), or None if nothing came in time. */
static PyObject *
qc_get(QueueCore *self, PyObject *args)
{
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "L", &timeout_ns) || check_bound(self) < 0)
        return NULL;
    if (q_lock(self) < 0)
        return NULL;
    PyObject *item = take(self);
    if (item != NULL && item != Py_None) { /* the usual case */
        int w = count_out(self, OFF_SEQ_PUT, OFF_PUT_SLEEPERS);
        q_unlock(self);
        if (w)
            wake(self, OFF_SEQ_PUT, 1);
        return item;
    }
    q_unlock(self);
    if (item == NULL)
        return NULL;
    Py_DECREF(item);
    if (timeout_ns == 0)
        Py_RETURN_NONE;
    PyObject *args2 = Py_BuildValue("(nL)", (Py_ssize_t)1, timeout_ns);
    if (args2 == NULL)
        return NULL;
    PyObject *items = qc_get_many(self, args2);
    Py_DECREF(args2);
    if (items == NULL)
        return NULL;
    if (PyList_GET_SIZE(items) == 0) {
        Py_DECREF(items);
        Py_RETURN_NONE;
    }
    PyObject *first = PyList_GET_ITEM(items, 0);
    Py_INCREF(first);
    Py_DECREF(items);
    return first;
}

static PyObject *
qc_qsize(QueueCore *self, PyObject *unused)
{
    if (check_bound(self) < 0)
        return NULL;
    uint64_t count = __atomic_load_n(U64(self, OFF_COUNT), __ATOMIC_ACQUIRE);
    return PyLong_FromUnsignedLongLong(count);
}

/* task_done() -> None; ValueError if called more times than items were put. */
static PyObject *
qc_task_done(QueueCore *self, PyObject *unused)
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
qc_join(QueueCore *self, PyObject *args)
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
qc_state(QueueCore *self, PyObject *unused)
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

static PyObject *
qc_release(QueueCore *self, PyObject *unused)
{
    if (self->bound) {
        self->bound = 0;
        PyBuffer_Release(&self->view);
    }
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
    if (self->bound) {
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
    return 0;
}

static void
qc_dealloc(QueueCore *self)
{
    if (self->bound)
        PyBuffer_Release(&self->view);
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

static PyObject *dumps_fn, *loads_fn, *full_exc, *empty_exc, *protocol_obj; /* set by _set_codec */
static PyObject *oob_parts_fn, *oob_loads_fn; /* queue_ring.oob_parts / oob_loads, set by _set_codec */

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

/* One record in, waiting as asked; 1 put, 0 no room in time, -1 error. */
static int
put_data(QueueCore *self, PyObject *data, uint32_t tag, long long timeout_ns)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if (too_big(self, view.len) || q_lock(self) < 0) {
        PyBuffer_Release(&view);
        return -1;
    }
    int rc = append(self, view.buf, (uint64_t)view.len, tag);
    if (rc == 1) {
        int w = count_out(self, OFF_SEQ_GET, OFF_GET_SLEEPERS);
        q_unlock(self);
        PyBuffer_Release(&view);
        if (w)
            wake(self, OFF_SEQ_GET, 1);
        return 1;
    }
    q_unlock(self);
    PyBuffer_Release(&view);
    if (rc < 0 || timeout_ns == 0)
        return rc;
    PyObject *one = PyList_New(1);
    if (one == NULL)
        return -1;
    Py_INCREF(data);
    PyList_SET_ITEM(one, 0, data);
    PyObject *args = Py_BuildValue("(OkL)", one, (unsigned long)tag, timeout_ns);
    Py_DECREF(one);
    if (args == NULL)
        return -1;
    PyObject *n = qc_put_many(self, args);
    Py_DECREF(args);
    if (n == NULL)
        return -1;
    long put = PyLong_AsLong(n);
    Py_DECREF(n);
    return put == 1;
}

/* The first record's (tag, payload), waiting as asked; Py_None if none came in time. */
static PyObject *
get_item(QueueCore *self, long long timeout_ns)
{
    PyObject *args = Py_BuildValue("(L)", timeout_ns);
    if (args == NULL)
        return NULL;
    PyObject *item = qc_get(self, args);
    Py_DECREF(args);
    return item;
}

/* One record made of the bytes-like `parts` (a list), waiting as asked: 1 put, 0 no room in time,
 * -1 error. The usual case copies each part straight into the ring; a wait joins them first. */
static int
put_parts(QueueCore *self, PyObject *parts, uint32_t tag, long long timeout_ns)
{
    if (!PyList_Check(parts)) {
        PyErr_SetString(PyExc_TypeError, "put_parts() takes a list");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(parts), got = 0;
    Py_buffer *views = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Py_buffer));
    if (views == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int rc = -1;
    uint64_t total = 0;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(parts, got), &views[got], PyBUF_SIMPLE) < 0)
            goto out;
        total += (uint64_t)views[got].len;
    }
    if (total > (uint64_t)PY_SSIZE_T_MAX || too_big(self, (Py_ssize_t)total) || q_lock(self) < 0)
        goto out;
    rc = append_parts(self, views, n, total, tag);
    if (rc == 1) {
        int w = count_out(self, OFF_SEQ_GET, OFF_GET_SLEEPERS);
        q_unlock(self);
        if (w)
            wake(self, OFF_SEQ_GET, 1);
        goto out;
    }
    q_unlock(self);
    if (rc < 0 || timeout_ns == 0)
        goto out;
    PyObject *joined = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (joined == NULL) {
        rc = -1;
        goto out;
    }
    char *dst = PyByteArray_AS_STRING(joined);
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(dst, views[i].buf, (size_t)views[i].len);
        dst += views[i].len;
    }
    rc = put_data(self, joined, tag, timeout_ns);
    Py_DECREF(joined);
out:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    return rc;
}

static PyObject *
qc_put_parts(QueueCore *self, PyObject *args)
{
    PyObject *parts;
    unsigned long tag;
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "OkL", &parts, &tag, &timeout_ns) || check_bound(self) < 0)
        return NULL;
    int rc = put_parts(self, parts, (uint32_t)tag, timeout_ns);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

static PyObject *
qc_put_obj(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "put() missing its object");
        return NULL;
    }
    long long ns = wait_arg(args, nargs, kwnames, 1);
    if (ns == -2 || check_bound(self) < 0)
        return NULL;
    int rc;
    PyObject *obj = args[0];
    if (PyObject_CheckBuffer(obj) && !PyBytes_CheckExact(obj) && !PyByteArray_CheckExact(obj)) {
        /* An array or other buffer: its bytes go into the ring beside the pickle, not through it
         * (pickle protocol 5); oob_parts gives the record's parts, or bytes if none went out of band. */
        PyObject *parts = PyObject_CallOneArg(oob_parts_fn, obj);
        if (parts == NULL)
            return NULL;
        rc = PyList_Check(parts) ? put_parts(self, parts, TAG_OOB, ns) : put_data(self, parts, 1, ns);
        Py_DECREF(parts);
    } else {
        PyObject *call[2] = {obj, protocol_obj};
        PyObject *data = PyObject_Vectorcall(dumps_fn, call, 2, NULL);
        if (data == NULL)
            return NULL;
        rc = put_data(self, data, 1, ns);
        Py_DECREF(data);
    }
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        PyErr_SetNone(full_exc);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
qc_send_bytes(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
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

/* The first record's payload (its tag in *tag), waiting as asked; queue.Empty if none came in time. */
static PyObject *
got_or_empty(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, uint32_t *tag)
{
    long long ns = wait_arg(args, nargs, kwnames, 0);
    if (ns == -2 || check_bound(self) < 0 || q_lock(self) < 0)
        return NULL;
    PyObject *payload = take_raw(self, tag); /* the usual case: an item there at once */
    if (payload != NULL && payload != Py_None) {
        int w = count_out(self, OFF_SEQ_PUT, OFF_PUT_SLEEPERS);
        q_unlock(self);
        if (w)
            wake(self, OFF_SEQ_PUT, 1);
        return payload;
    }
    q_unlock(self);
    if (payload == NULL)
        return NULL;
    Py_DECREF(payload);
    PyObject *item = ns == 0 ? Py_None : get_item(self, ns);
    if (item == Py_None) {
        if (ns == 0)
            Py_INCREF(item);
        Py_DECREF(item);
        PyErr_SetNone(empty_exc);
        return NULL;
    }
    if (item == NULL)
        return NULL;
    *tag = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(item, 0));
    payload = PyTuple_GET_ITEM(item, 1);
    Py_INCREF(payload);
    Py_DECREF(item);
    return payload;
}

static PyObject *
qc_get_obj(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    uint32_t tag = 0;
    PyObject *payload = got_or_empty(self, args, nargs, kwnames, &tag);
    if (payload == NULL || (tag != 1 && tag != TAG_OOB))
        return payload;
    /* unpickled with the mutex free */
    PyObject *result = PyObject_CallOneArg(tag == TAG_OOB ? oob_loads_fn : loads_fn, payload);
    Py_DECREF(payload);
    return result;
}

static PyObject *
qc_recv_bytes(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    uint32_t tag = 0;
    PyObject *payload = got_or_empty(self, args, nargs, kwnames, &tag);
    if (payload == NULL || !PyByteArray_Check(payload))
        return payload;
    PyObject *bytes = PyBytes_FromObject(payload); /* always bytes, as multiprocessing's */
    Py_DECREF(payload);
    return bytes;
}

static PyMethodDef qc_methods[] = {
    {"put", (PyCFunction)qc_put, METH_VARARGS, "put(data, tag, timeout_ns) -> bool"},
    {"put_many", (PyCFunction)qc_put_many, METH_VARARGS, "put_many(items, tag, timeout_ns) -> int"},
    {"get", (PyCFunction)qc_get, METH_VARARGS, "get(timeout_ns) -> (tag, bytes) or None"},
    {"get_many", (PyCFunction)qc_get_many, METH_VARARGS, "get_many(max_items, timeout_ns) -> list"},
    {"qsize", (PyCFunction)qc_qsize, METH_NOARGS, "qsize() -> int"},
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

/* block_signals() -> the old mask (bytes); restore_signals(mask). What a critical section written in
 * Python (the broadcast's ring) wraps itself in, so that no signal handler runs while it holds a
 * mutex: signal.pthread_sigmask costs ~30 us a pair, converting every signal to an enum. */
static PyObject *
block_signals(PyObject *module, PyObject *unused)
{
    sigset_t all, old;
    sigfillset(&all);
    int rc = pthread_sigmask(SIG_BLOCK, &all, &old);
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBytes_FromStringAndSize((const char *)&old, sizeof old);
}

static PyObject *
restore_signals(PyObject *module, PyObject *mask)
{
    if (!PyBytes_Check(mask) || PyBytes_GET_SIZE(mask) != (Py_ssize_t)sizeof(sigset_t)) {
        PyErr_SetString(PyExc_ValueError, "restore_signals() takes what block_signals() returned");
        return NULL;
    }
    int rc = pthread_sigmask(SIG_SETMASK, (const sigset_t *)PyBytes_AS_STRING(mask), NULL);
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"block_signals", (PyCFunction)block_signals, METH_NOARGS, "Block every signal in this thread; the old mask."},
    {"restore_signals", (PyCFunction)restore_signals, METH_O, "Restore a mask block_signals() returned."},
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
        PyModule_AddIntConstant(m, "QUEUE_VERSION", QUEUE_VERSION) < 0 || PyModule_AddIntConstant(m, "RING", RING) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
