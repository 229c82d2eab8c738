/* shmem._sync: a robust, process-shared glibc mutex over a shared memory buffer.
 *
 * RobustMutex is the base class of shmem.Lock and shmem.RLock when this module
 * builds (src/shmem/_kinds/lock.py has a pure-Python twin, over ctypes, with
 * the same behaviour). The mutex lies at offset 0 of the buffer it is bound to
 * (the block's mapping); _kinds/lock_layout.py draws the block and checks its
 * header before anything here touches the memory.
 *
 * Holder death: the mutex is PTHREAD_MUTEX_ROBUST. glibc keeps every robust
 * mutex a thread holds on that thread's robust list (registered with the
 * kernel by glibc itself: this file never calls set_robust_list); when the
 * thread dies, however it dies, the kernel marks the mutex's futex word
 * OWNER_DIED and wakes a waiter, whose lock call returns EOWNERDEAD. We then
 * call pthread_mutex_consistent, own the lock, return True and report
 * owner_died (and an OwnerDiedWarning).
 *
 * The robust list is threaded through the mutexes themselves, by the virtual
 * address the holder locked them at: a page holding a mutex this process
 * holds must never be unmapped (the kernel would walk into nothing at thread
 * exit, and stop releasing the rest). So the object keeps a Py_buffer export
 * of the mapping - it cannot be closed or unmapped under us - and if it is
 * deallocated while a thread of this process still holds the mutex through
 * it, it leaks that export (and with it the mapping) on purpose.
 *
 * Waiting: pthread_mutex_trylock first, with the GIL held (the uncontended
 * case costs no GIL round trip); then the GIL is released and we wait with
 * pthread_mutex_clocklock(CLOCK_MONOTONIC) in slices of at most SLICE_NS,
 * running Python's signal handlers (PyErr_CheckSignals) between slices: Ctrl-C
 * and handlers run, and an exception from one propagates with the lock not
 * held. The remaining time is recomputed from the monotonic clock each slice.
 *
 * Below RobustMutex: the futex layer of Event, Condition, Semaphore and Barrier.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef __GLIBC__
#error "shmem._sync needs glibc's robust process-shared mutex: this C library uses the pure-Python path"
#endif

#define LAYOUT_VERSION 1
#define SYNC_VERSION 1            /* the futex layer of the other primitives (sync_wait.py) */
#define SLICE_NS 50000000LL          /* the longest wait between two looks for signals: 50 ms */
#define NS 1000000000LL
#define FUTEX_TID_MASK 0x3fffffff    /* the holder's thread id in glibc's futex word (linux/futex.h) */

/* Waits longer than this (about 146 years) are waits without end. */
#define FOREVER_NS ((long long)1 << 62)

static PyObject *owner_died_warning;  /* shmem.OwnerDiedWarning, set by lock.py (_set_warning) */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int bound;           /* usable: bound and not unbound since */
    int has_view;        /* the buffer is held (after _unbind, until the last waiter is out) */
    int waiting;         /* threads asleep in acquire (GIL released) through this object */
    pthread_mutex_t *mutex;
    char owner_died;     /* the current holder's first acquire found the previous owner dead */
    char recursive;      /* an RLock's mutex */
    Py_ssize_t depth;    /* the current holder's acquisitions through this object (several only for
                            RLock); stale after a holder dies or a fork: only a hint that this object's
                            mapping is the one on a holder's robust list */
} RobustMutex;

static long long
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * NS + ts.tv_nsec;
}

static int
futex_word(RobustMutex *self)
{
    /* glibc's __lock: the holder's tid, plus FUTEX_WAITERS / FUTEX_OWNER_DIED bits. */
    return __atomic_load_n(&self->mutex->__data.__lock, __ATOMIC_RELAXED);
}

/* Whether thread `tid` is a live thread of this process. */
static int
thread_of_ours(int tid)
{
    return tid > 0 && syscall(SYS_tgkill, getpid(), tid, 0) == 0;
}

static int
unbound_error(void)
{
    PyErr_SetString(PyExc_ValueError, "the lock is closed (not bound to a shared memory block)");
    return -1;
}

static void
rm_dealloc(RobustMutex *self)
{
    if (self->has_view) {
        self->bound = 0;
        self->has_view = 0;
        int tid = futex_word(self) & FUTEX_TID_MASK;
        if (self->depth > 0 && thread_of_ours(tid)) {
            /* A thread of ours holds the mutex through this mapping: its address is on that
             * thread's robust list. Leak the export: the mapping stays for the process's life. */
        } else {
            PyBuffer_Release(&self->view);
        }
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* glibc's __count: an RLock's recursion count while held (1 for the first acquisition). */
static unsigned int
recursion_count(RobustMutex *self)
{
    return __atomic_load_n(&self->mutex->__data.__count, __ATOMIC_RELAXED);
}

/* _bind(buffer, recursive): bind to the writable buffer whose first bytes are an initialised mutex. */
static PyObject *
rm_bind(RobustMutex *self, PyObject *args)
{
    PyObject *buf;
    int recursive;
    if (!PyArg_ParseTuple(args, "Op", &buf, &recursive))
        return NULL;
    if (self->bound || self->has_view) {
        PyErr_SetString(PyExc_ValueError, "the lock is already bound");
        return NULL;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return NULL;
    if (self->view.len < (Py_ssize_t)sizeof(pthread_mutex_t)
        || ((uintptr_t)self->view.buf % _Alignof(pthread_mutex_t)) != 0) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "the buffer cannot hold an aligned pthread_mutex_t");
        return NULL;
    }
    self->mutex = (pthread_mutex_t *)self->view.buf;
    self->bound = 1;
    self->has_view = 1;
    self->recursive = (char)recursive;
    self->owner_died = 0;
    self->depth = 0;
    Py_RETURN_NONE;
}

/* Drop the buffer export once no thread of ours is asleep in acquire through this object. */
static void
let_go_view(RobustMutex *self)
{
    if (!self->bound && self->has_view && self->waiting == 0) {
        self->has_view = 0;
        self->mutex = NULL;
        PyBuffer_Release(&self->view);
    }
}

/* _unbind(): drop the buffer export, unless a thread of ours holds the mutex through it. Threads
 * asleep in acquire through this object keep it (and so the mapping) until they are out: each
 * raises ValueError when it wakes. */
static PyObject *
rm_unbind(RobustMutex *self, PyObject *Py_UNUSED(ignored))
{
    if (self->bound) {
        int tid = futex_word(self) & FUTEX_TID_MASK;
        if (self->depth > 0 && thread_of_ours(tid))
            Py_RETURN_FALSE;
        self->bound = 0;
        let_go_view(self);
    }
    Py_RETURN_TRUE;
}

/* The lock call returned `rc` (0 or EOWNERDEAD: we hold it). 1 on success, -1 with an exception. */
static int
took(RobustMutex *self, int rc)
{
    if (rc == 0) {
        /* The first acquisition by this holder resets what earlier (dead, forked) holders left. */
        if (!self->recursive || recursion_count(self) == 1) {
            self->depth = 1;
            self->owner_died = 0;
        } else {
            self->depth++;
        }
        return 1;
    }
    /* EOWNERDEAD: the previous holder died holding it; we hold it now. */
    int crc = pthread_mutex_consistent(self->mutex);
    if (crc != 0) {
        pthread_mutex_unlock(self->mutex);
        errno = crc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->owner_died = 1;
    self->depth = 1;
    if (owner_died_warning != NULL
        && PyErr_WarnEx(owner_died_warning,
                        "the previous owner of this shmem lock died holding it: the state it protects "
                        "may be inconsistent (lock.owner_died is True until the next release)", 1) < 0) {
        /* The warning is an error here (a warnings filter): release - the mutex is consistent
         * again, usable by others - and let the exception say what happened. */
        self->depth = 0;
        self->owner_died = 0;
        pthread_mutex_unlock(self->mutex);
        return -1;
    }
    return 1;
}

static int
lock_error(int rc)
{
    if (rc == ENOTRECOVERABLE)
        PyErr_SetString(PyExc_RuntimeError,
                        "the shmem lock is not recoverable: a holder died and the next owner released it "
                        "without marking it consistent (not shmem); remove and recreate the lock");
    else if (rc == EAGAIN)
        PyErr_SetString(PyExc_OverflowError, "the RLock's maximum recursion depth is exceeded");
    else if (rc == EDEADLK)
        PyErr_SetString(PyExc_RuntimeError, "this thread already holds the lock: acquiring it would deadlock");
    else if (rc == EINVAL)
        PyErr_SetString(PyExc_ValueError, "the shared memory holds no valid robust mutex (overwritten?)");
    else {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return -1;
}

/* Parse (block=True, timeout=None) with `blocking` as a synonym of `block`.
 * *wait_ns: -1 forever, else the nanoseconds to wait. 0 on success, -1 with an exception. */
static int
parse_acquire(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int *block, long long *wait_ns)
{
    PyObject *block_obj = NULL, *timeout_obj = NULL;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "acquire() takes at most 2 arguments (%zd given)", nargs);
        return -1;
    }
    if (nargs >= 1)
        block_obj = args[0];
    if (nargs == 2)
        timeout_obj = args[1];
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, i), *value = args[nargs + i];
            if (PyUnicode_CompareWithASCIIString(key, "block") == 0
                || PyUnicode_CompareWithASCIIString(key, "blocking") == 0) {
                if (block_obj != NULL) {
                    PyErr_SetString(PyExc_TypeError, "acquire() got 'block' (or 'blocking') twice");
                    return -1;
                }
                block_obj = value;
            } else if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0) {
                if (timeout_obj != NULL) {
                    PyErr_SetString(PyExc_TypeError, "acquire() got 'timeout' twice");
                    return -1;
                }
                timeout_obj = value;
            } else {
                PyErr_Format(PyExc_TypeError, "acquire() got an unexpected keyword argument %R", key);
                return -1;
            }
        }
    }
    *block = 1;
    if (block_obj != NULL) {
        int truth = PyObject_IsTrue(block_obj);
        if (truth < 0)
            return -1;
        *block = truth;
    }
    *wait_ns = -1;
    if (timeout_obj == NULL || timeout_obj == Py_None)
        return 0;
    if (!PyFloat_Check(timeout_obj) && !PyLong_Check(timeout_obj)) {
        PyErr_Format(PyExc_TypeError, "timeout must be None or a number of seconds, not %.100s",
                     Py_TYPE(timeout_obj)->tp_name);
        return -1;
    }
    double seconds = PyFloat_AsDouble(timeout_obj);
    if (seconds == -1.0 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();  /* an int too large for a double: forever, or a negative one below */
        PyObject *zero = PyLong_FromLong(0);
        if (zero == NULL)
            return -1;
        int negative = PyObject_RichCompareBool(timeout_obj, zero, Py_LT);
        Py_DECREF(zero);
        if (negative < 0)
            return -1;
        seconds = negative ? -2.0 : 1e300;
    }
    if (seconds != seconds) {
        PyErr_SetString(PyExc_ValueError, "timeout must not be NaN");
        return -1;
    }
    if (!*block)
        return 0;  /* as multiprocessing: a timeout means nothing to a non-blocking call */
    if (seconds == -1.0)
        return 0;  /* threading's "no timeout" */
    if (seconds < 0) {
        PyErr_SetString(PyExc_ValueError, "timeout must be a non-negative number of seconds (or None)");
        return -1;
    }
    *wait_ns = seconds * 1e9 >= (double)FOREVER_NS ? -1 : (long long)(seconds * 1e9);
    return 0;
}

static int wait_for(RobustMutex *self, long long wait_ns);

/* 1: acquired, 0: not (timeout / non-blocking), -1: exception (the lock is not held). */
static int
do_acquire(RobustMutex *self, int block, long long wait_ns)
{
    if (!self->bound)
        return unbound_error();
    int rc = pthread_mutex_trylock(self->mutex);
    if (rc == 0 || rc == EOWNERDEAD)
        return took(self, rc);
    if (rc != EBUSY)
        return lock_error(rc);
    if (!block || wait_ns == 0)
        return 0;
    self->waiting++;
    int got = wait_for(self, wait_ns);
    self->waiting--;
    let_go_view(self);
    return got;
}

/* do_acquire's wait, in slices with the GIL released (counted in self->waiting by the caller).
 * A handle closed by another thread meanwhile: ValueError (a lock taken at that moment is let go). */
static int
wait_for(RobustMutex *self, long long wait_ns)
{
    int rc;
    long long deadline = wait_ns < 0 ? -1 : monotonic_ns() + wait_ns;
    for (;;) {
        long long now = monotonic_ns(), end = now + SLICE_NS;
        if (deadline >= 0 && deadline < end)
            end = deadline;
        struct timespec ts = {(time_t)(end / NS), (long)(end % NS)};
        Py_BEGIN_ALLOW_THREADS
#if __GLIBC_PREREQ(2, 30)
        rc = pthread_mutex_clocklock(self->mutex, CLOCK_MONOTONIC, &ts);
#else
        {   /* before glibc 2.30: the same slice, on the realtime clock */
            struct timespec rt;
            clock_gettime(CLOCK_REALTIME, &rt);
            long long rend = (long long)rt.tv_sec * NS + rt.tv_nsec + (end - now);
            rt.tv_sec = (time_t)(rend / NS);
            rt.tv_nsec = (long)(rend % NS);
            rc = pthread_mutex_timedlock(self->mutex, &rt);
        }
#endif
        Py_END_ALLOW_THREADS
        if (!self->bound) {
            if (rc == 0 || rc == EOWNERDEAD) {
                if (rc == EOWNERDEAD)
                    pthread_mutex_consistent(self->mutex);
                pthread_mutex_unlock(self->mutex);
            }
            PyErr_SetString(PyExc_ValueError, "the lock was closed while this acquire waited");
            return -1;
        }
        if (rc == 0 || rc == EOWNERDEAD)
            return took(self, rc);
        if (rc != ETIMEDOUT && rc != EINTR)
            return lock_error(rc);
        if (PyErr_CheckSignals() < 0)
            return -1;
        if (deadline >= 0 && monotonic_ns() >= deadline)
            return 0;
    }
}

static PyObject *
rm_acquire(RobustMutex *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int block;
    long long wait_ns;
    if (parse_acquire(args, nargs, kwnames, &block, &wait_ns) < 0)
        return NULL;
    int got = do_acquire(self, block, wait_ns);
    if (got < 0)
        return NULL;
    return PyBool_FromLong(got);
}

static PyObject *
rm_enter(RobustMutex *self, PyObject *Py_UNUSED(ignored))
{
    if (do_acquire(self, 1, -1) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static int
do_release(RobustMutex *self)
{
    if (!self->bound)
        return unbound_error();
    /* Read before the unlock, while (if it succeeds) we own it: the last release of an RLock? */
    int last = !self->recursive || recursion_count(self) <= 1;
    int rc = pthread_mutex_unlock(self->mutex);
    if (rc == 0) {
        if (last) {
            self->depth = 0;
            self->owner_died = 0;
        } else if (self->depth > 0) {
            self->depth--;
        }
        return 0;
    }
    if (rc == EPERM) {
        int tid = futex_word(self) & FUTEX_TID_MASK;
        if (tid == 0)
            PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        else
            PyErr_Format(PyExc_RuntimeError,
                         "cannot release a shmem lock held by another thread (tid %d): only its owner can",
                         tid);
        return -1;
    }
    return lock_error(rc);
}

static PyObject *
rm_release(RobustMutex *self, PyObject *Py_UNUSED(ignored))
{
    if (do_release(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
rm_exit(RobustMutex *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (do_release(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* locked(): whether any thread of any process holds it now (a snapshot). */
static PyObject *
rm_locked(RobustMutex *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->bound) {
        unbound_error();
        return NULL;
    }
    return PyBool_FromLong((futex_word(self) & FUTEX_TID_MASK) != 0);
}

/* _holder(): the thread id of the holder (as the holder's pid namespace numbers it), 0 if none. */
static PyObject *
rm_holder(RobustMutex *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->bound) {
        unbound_error();
        return NULL;
    }
    return PyLong_FromLong(futex_word(self) & FUTEX_TID_MASK);
}

static PyObject *
rm_is_owned(RobustMutex *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->bound) {
        unbound_error();
        return NULL;
    }
    return PyBool_FromLong((futex_word(self) & FUTEX_TID_MASK) == (int)syscall(SYS_gettid));
}

static PyMethodDef rm_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))rm_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(block=True, timeout=None) -> bool"},
    {"release", (PyCFunction)rm_release, METH_NOARGS, "Release the lock (only its owner thread can)."},
    {"__enter__", (PyCFunction)rm_enter, METH_NOARGS, "Acquire, waiting as long as it takes."},
    {"__exit__", (PyCFunction)(void (*)(void))rm_exit, METH_FASTCALL, "Release."},
    {"locked", (PyCFunction)rm_locked, METH_NOARGS, "Whether the lock is held now."},
    {"_holder", (PyCFunction)rm_holder, METH_NOARGS, "The holder's thread id, 0 if none."},
    {"_is_owned", (PyCFunction)rm_is_owned, METH_NOARGS, "Whether the calling thread holds it."},
    {"_bind", (PyCFunction)rm_bind, METH_VARARGS, "Bind to a buffer holding an initialised mutex."},
    {"_unbind", (PyCFunction)rm_unbind, METH_NOARGS, "Drop the buffer unless held; False if kept."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef rm_members[] = {
    {"owner_died", T_BOOL, offsetof(RobustMutex, owner_died), READONLY,
     "True from an acquire that found the previous owner dead, until the next (last) release."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RobustMutexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmem._sync.RobustMutex",
    .tp_basicsize = sizeof(RobustMutex),
    .tp_dealloc = (destructor)rm_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A robust, process-shared pthread mutex at the start of a writable buffer.",
    .tp_methods = rm_methods,
    .tp_members = rm_members,
    .tp_new = PyType_GenericNew,
};

/* new_mutex(recursive) -> bytes: an initialised robust, process-shared mutex, as bytes to
 * copy into a new block before it is published. An unlocked glibc mutex holds no pointers
 * (its robust-list links are NULL until it is locked), so it works at any address. */
static PyObject *
new_mutex(PyObject *module, PyObject *arg)
{
    int recursive = PyObject_IsTrue(arg);
    if (recursive < 0)
        return NULL;
    pthread_mutexattr_t attr;
    pthread_mutex_t mutex;
    memset(&mutex, 0, sizeof mutex);
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0) {
        if ((rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)) == 0
            && (rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)) == 0
            && (rc = pthread_mutexattr_settype(&attr, recursive ? PTHREAD_MUTEX_RECURSIVE
                                                                : PTHREAD_MUTEX_NORMAL)) == 0)
            rc = pthread_mutex_init(&mutex, &attr);
        pthread_mutexattr_destroy(&attr);
    }
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBytes_FromStringAndSize((const char *)&mutex, sizeof mutex);
}

/* ------------------------------------------------------------------------------------------
 * The futex layer of Event, Condition, Semaphore and Barrier (src/shmem/_kinds/sync_wait.py has
 * the pure-Python twin over ctypes, and draws the protocol). Module functions on a writable
 * buffer (the block's mapping) and a byte offset into it:
 *
 *   sync_lock(buf, off) -> bool       take the block's internal robust, process-shared,
 *                                     error-checking mutex; True when its previous holder died
 *                                     inside a state change (made consistent: the caller repairs)
 *   sync_unlock(buf, off)
 *   futex_wait(buf, off, expected, timeout_ns) -> bool
 *                                     one wait on the 32-bit word while it holds `expected`, at
 *                                     most min(timeout_ns, SLICE_NS) (timeout_ns < 0: a slice), with
 *                                     the GIL released; then signal handlers run. True: woken or
 *                                     the word differed; False: the slice ended (or EINTR)
 *   futex_wake(buf, off, n) -> int    wake up to n waiters of the word
 *   new_sync_mutex() -> bytes         the internal mutex, initialised
 *
 * Shared futexes (not FUTEX_PRIVATE): the waiters are in other processes. The buffer export is
 * held across each call, so the mapping cannot go away while the GIL is released.
 * ------------------------------------------------------------------------------------------ */

#include <linux/futex.h>

static int
sync_buffer(PyObject *obj, Py_ssize_t off, Py_ssize_t need, Py_ssize_t align, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return -1;
    if (off < 0 || off > view->len - need || ((uintptr_t)view->buf + (uintptr_t)off) % (uintptr_t)align) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "the offset is outside the buffer or misaligned");
        return -1;
    }
    return 0;
}

static PyObject *
sync_lock(PyObject *module, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t off;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "On", &obj, &off))
        return NULL;
    if (sync_buffer(obj, off, sizeof(pthread_mutex_t), _Alignof(pthread_mutex_t), &view) < 0)
        return NULL;
    pthread_mutex_t *mutex = (pthread_mutex_t *)((char *)view.buf + off);
    int rc = pthread_mutex_trylock(mutex);
    while (rc == EBUSY || rc == ETIMEDOUT || rc == EINTR) {
        if (rc != EBUSY && PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        long long end = monotonic_ns() + SLICE_NS;
        Py_BEGIN_ALLOW_THREADS
#if __GLIBC_PREREQ(2, 30)
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
    int died = 0;
    if (rc == EOWNERDEAD) {
        died = 1;
        rc = pthread_mutex_consistent(mutex);
        if (rc != 0)
            pthread_mutex_unlock(mutex);
    }
    PyBuffer_Release(&view);
    if (rc == EDEADLK) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this thread is inside a state change of this shmem primitive already "
                        "(used from a signal handler that interrupted it?)");
        return NULL;
    }
    if (rc != 0)
    {
        lock_error(rc);
        return NULL;
    }
    return PyBool_FromLong(died);
}

static PyObject *
sync_unlock(PyObject *module, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t off;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "On", &obj, &off))
        return NULL;
    if (sync_buffer(obj, off, sizeof(pthread_mutex_t), _Alignof(pthread_mutex_t), &view) < 0)
        return NULL;
    int rc = pthread_mutex_unlock((pthread_mutex_t *)((char *)view.buf + off));
    PyBuffer_Release(&view);
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *
futex_wait(PyObject *module, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t off;
    unsigned int expected;
    long long timeout_ns;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "OnIL", &obj, &off, &expected, &timeout_ns))
        return NULL;
    if (sync_buffer(obj, off, 4, 4, &view) < 0)
        return NULL;
    if (timeout_ns < 0 || timeout_ns > SLICE_NS)
        timeout_ns = SLICE_NS;
    struct timespec ts = {(time_t)(timeout_ns / NS), (long)(timeout_ns % NS)};
    long rc;
    int err;
    Py_BEGIN_ALLOW_THREADS
    rc = syscall(SYS_futex, (uint32_t *)((char *)view.buf + off), FUTEX_WAIT, expected, &ts, NULL, 0);
    err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (PyErr_CheckSignals() < 0)
        return NULL;
    if (rc == 0 || err == EAGAIN)
        Py_RETURN_TRUE;
    if (err == ETIMEDOUT || err == EINTR)
        Py_RETURN_FALSE;
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *
futex_wake(PyObject *module, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t off;
    int n;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "Oni", &obj, &off, &n))
        return NULL;
    if (sync_buffer(obj, off, 4, 4, &view) < 0)
        return NULL;
    long rc = syscall(SYS_futex, (uint32_t *)((char *)view.buf + off), FUTEX_WAKE, n, NULL, NULL, 0);
    int err = errno;
    PyBuffer_Release(&view);
    if (rc < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(rc);
}

/* ------------------------------------------------------------------
 * A Semaphore's uncontended acquire and release, whole in C.
 *
 * The Python code in shmem/_kinds/semaphore.py is the protocol; these two
 * calls do exactly its simplest case - a permit free / this handle's own slot
 * holding the permits it gives back - and report "not done" for anything
 * else (busy mutex, no permit, a release that needs another slot), which
 * the caller then does in Python. The word layout is handed over once by
 * sync_wait (sem_layout), so it is defined in one place, sync_layout.py.
 * ------------------------------------------------------------------ */

static struct {
    int set;
    Py_ssize_t mutex_off, words_off;
    Py_ssize_t w_seq, w_value, w_jvalid, w_jslot, w_jvalue, w_jcount, w_table, slots;
    unsigned int value_max;
} sem;

static PyObject *
sem_layout(PyObject *module, PyObject *args)
{
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnI", &sem.mutex_off, &sem.words_off, &sem.w_seq, &sem.w_value,
                          &sem.w_jvalid, &sem.w_jslot, &sem.w_jvalue, &sem.w_jcount, &sem.w_table, &sem.slots,
                          &sem.value_max))
        return NULL;
    sem.set = 1;
    Py_RETURN_NONE;
}

/* The semaphore's words in `obj` (writable), or NULL with an exception. */
static uint32_t *
sem_words(PyObject *obj, Py_ssize_t slot, Py_buffer *view)
{
    if (!sem.set) {
        PyErr_SetString(PyExc_RuntimeError, "sem_layout() was not called");
        return NULL;
    }
    if (slot < 0 || slot >= sem.slots) {
        PyErr_SetString(PyExc_ValueError, "slot out of range");
        return NULL;
    }
    if (sync_buffer(obj, sem.words_off, 4 * (sem.w_table + sem.slots), 4, view) < 0)
        return NULL;
    if ((size_t)view->len < (size_t)sem.mutex_off + sizeof(pthread_mutex_t)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "the buffer is too small for a semaphore");
        return NULL;
    }
    return (uint32_t *)((char *)view->buf + sem.words_off);
}

/* semaphore.py's _commit: the value and one slot's count as one step, through the journal. */
static void
sem_commit(volatile uint32_t *w, uint32_t value, Py_ssize_t slot, uint32_t count)
{
    w[sem.w_jvalue] = value;
    w[sem.w_jslot] = (uint32_t)slot;
    w[sem.w_jcount] = count;
    __atomic_store_n(&w[sem.w_jvalid], 1, __ATOMIC_SEQ_CST);
    w[sem.w_value] = value;
    w[sem.w_table + slot] = count;
    __atomic_store_n(&w[sem.w_jvalid], 0, __ATOMIC_SEQ_CST);
}

/* Take the mutex without waiting: 1 taken, 0 not (busy: the caller goes the Python way, which
   waits). A holder that died inside a state change is repaired as semaphore.py's _repair does:
   the journal, if valid, is replayed. */
static int
sem_enter(pthread_mutex_t *mutex, volatile uint32_t *w)
{
    int rc = pthread_mutex_trylock(mutex);
    if (rc == EOWNERDEAD) {  /* we hold it now, marked inconsistent */
        if (pthread_mutex_consistent(mutex) != 0) {
            pthread_mutex_unlock(mutex);
            return 0;
        }
        if (w[sem.w_jvalid]) {
            uint32_t slot = w[sem.w_jslot];
            if ((Py_ssize_t)slot < sem.slots) {
                w[sem.w_value] = w[sem.w_jvalue];
                w[sem.w_table + slot] = w[sem.w_jcount];
            }
            w[sem.w_jvalid] = 0;
        }
        return 1;
    }
    return rc == 0;
}

static PyObject *
sem_take(PyObject *module, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t slot;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "On", &obj, &slot))
        return NULL;
    volatile uint32_t *w = sem_words(obj, slot, &view);
    if (w == NULL)
        return NULL;
    pthread_mutex_t *mutex = (pthread_mutex_t *)((char *)view.buf + sem.mutex_off);
    int taken = 0;
    if (sem_enter(mutex, w)) {
        uint32_t value = w[sem.w_value];
        if (value > 0 && value <= sem.value_max) {
            uint32_t count = w[sem.w_table + slot];
            sem_commit(w, value - 1, slot, count < sem.value_max ? count + 1 : sem.value_max);
            taken = 1;
        }
        pthread_mutex_unlock(mutex);
    }
    PyBuffer_Release(&view);
    return PyBool_FromLong(taken);
}

static PyObject *
sem_give(PyObject *module, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t slot;
    unsigned int n, limit;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "OnII", &obj, &slot, &n, &limit))
        return NULL;
    volatile uint32_t *w = sem_words(obj, slot, &view);
    if (w == NULL)
        return NULL;
    pthread_mutex_t *mutex = (pthread_mutex_t *)((char *)view.buf + sem.mutex_off);
    int given = 0;
    if (n > 0 && sem_enter(mutex, w)) {
        uint32_t value = w[sem.w_value], count = w[sem.w_table + slot];
        if (count >= n && value <= limit && n <= limit - value) {
            sem_commit(w, value + n, slot, count - n);
            w[sem.w_seq] = w[sem.w_seq] + 1;
            given = 1;
        }
        pthread_mutex_unlock(mutex);
        if (given)
            syscall(SYS_futex, (uint32_t *)&w[sem.w_seq], FUTEX_WAKE, (int)(n > INT_MAX ? INT_MAX : n), NULL, NULL, 0);
    }
    PyBuffer_Release(&view);
    return PyBool_FromLong(given);
}

static PyObject *
new_sync_mutex(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    pthread_mutexattr_t attr;
    pthread_mutex_t mutex;
    memset(&mutex, 0, sizeof mutex);
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0) {
        if ((rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)) == 0
            && (rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)) == 0
            && (rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK)) == 0)
            rc = pthread_mutex_init(&mutex, &attr);
        pthread_mutexattr_destroy(&attr);
    }
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBytes_FromStringAndSize((const char *)&mutex, sizeof mutex);
}

static PyObject *
set_warning(PyObject *module, PyObject *category)
{
    Py_INCREF(category);
    Py_XSETREF(owner_died_warning, category);
    Py_RETURN_NONE;
}

/* block_signals() -> the old mask (bytes); restore_signals(mask). What a critical section written in
 * Python (a Condition's, a Broadcast's, the queue's pure-Python ring) wraps itself in, so that no
 * signal handler runs while it holds a mutex: a handler could call the same object (the mutex is
 * error-checking: EDEADLK) or raise between the lock and the try that lets it go.
 *
 * Blocking alone is not enough: a signal caught just before has its Python handler pending, and
 * the interpreter would run it at the next bytecode, after the mutex is taken. So once every
 * signal is blocked, the pending handlers run here (PyErr_CheckSignals): if one raises, the old
 * mask is put back and its exception is this call's, with nothing changed. When this returns, no
 * handler of this thread's signals runs until restore_signals() (a signal another thread catches
 * for the process still may: see sync_wait.py). signal.pthread_sigmask runs handlers too, but
 * after changing the mask, and one that raises there loses the old mask: the thread would keep
 * every signal blocked. It also costs ~30 us a pair, converting every signal to an enum. */
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
    PyObject *mask = PyErr_CheckSignals() < 0 ? NULL : PyBytes_FromStringAndSize((const char *)&old, sizeof old);
    if (mask == NULL)
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    return mask;
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
    {"block_signals", (PyCFunction)block_signals, METH_NOARGS,
     "Block every signal in this thread and run the handlers already due; the old mask."},
    {"restore_signals", (PyCFunction)restore_signals, METH_O, "Restore a mask block_signals() returned."},
    {"new_mutex", (PyCFunction)new_mutex, METH_O, "An initialised robust process-shared mutex, as bytes."},
    {"_set_warning", (PyCFunction)set_warning, METH_O, "The warning category of an owner-died acquire."},
    {"sync_lock", (PyCFunction)sync_lock, METH_VARARGS, "Take a primitive's internal mutex; True if its holder died."},
    {"sync_unlock", (PyCFunction)sync_unlock, METH_VARARGS, "Release a primitive's internal mutex."},
    {"futex_wait", (PyCFunction)futex_wait, METH_VARARGS, "Wait one slice on a futex word; True if woken."},
    {"futex_wake", (PyCFunction)futex_wake, METH_VARARGS, "Wake up to n waiters of a futex word."},
    {"new_sync_mutex", (PyCFunction)new_sync_mutex, METH_NOARGS, "A primitive's internal mutex, as bytes."},
    {"sem_layout", (PyCFunction)sem_layout, METH_VARARGS, "Hand over a Semaphore's word layout (once)."},
    {"sem_take", (PyCFunction)sem_take, METH_VARARGS, "A Semaphore's uncontended acquire; False: do it in Python."},
    {"sem_give", (PyCFunction)sem_give, METH_VARARGS, "A Semaphore's release from its own slot; False: do it in Python."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sync_module = {
    PyModuleDef_HEAD_INIT, "shmem._sync", "Robust process-shared locks for shmem.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__sync(void)
{
    if (PyType_Ready(&RobustMutexType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&sync_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "LAYOUT_VERSION", LAYOUT_VERSION) < 0
        || PyModule_AddIntConstant(m, "MUTEX_SIZE", (long)sizeof(pthread_mutex_t)) < 0
        || PyModule_AddIntConstant(m, "MUTEX_ALIGN", (long)_Alignof(pthread_mutex_t)) < 0
        || PyModule_AddIntConstant(m, "KIND_OFFSET", (long)offsetof(pthread_mutex_t, __data.__kind)) < 0
        || PyModule_AddIntConstant(m, "SLICE_NS", (long)SLICE_NS) < 0
        || PyModule_AddIntConstant(m, "SYNC_VERSION", SYNC_VERSION) < 0
        || PyModule_AddStringConstant(m, "LIBC", "glibc") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RobustMutexType);
    if (PyModule_AddObject(m, "RobustMutex", (PyObject *)&RobustMutexType) < 0) {
        Py_DECREF(&RobustMutexType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
