/* shmem._platform._fastpath: the system calls on the attach and create paths, a few at a time.
 *
 * Attaching a block by name, and checking a block mapped earlier, is a short
 * run of system calls (open, a lock, fstat, close). Each is cheap in the
 * kernel; from Python, os.fstat alone costs about 2 us (a stat_result of
 * floats and nanosecond ints built for three fields). This module does the
 * same calls in C and returns only the fields shmem reads. _linux.py has the
 * pure-Python twin of every function (used when this module is not built, or
 * with SHMEM_PURE_PYTHON=1) and does every check on what these return: this
 * file decides nothing, it only calls.
 *
 *   open_block(path, flags, lock_offset)
 *       open(path, flags); with lock_offset >= 0, wait for a shared OFD lock
 *       on that byte; fstat. Returns (fd, size, ino, mtime, uid, permissions)
 *       for a regular file with a name (nlink > 0), else (fd, size, ino,
 *       mtime, uid, mode, nlink), mode with its file type bits. Blocking waits release the GIL; a signal
 *       runs Python's handlers and retries (PEP 475), an exception from one
 *       closes the descriptor and propagates. A lock refused for another
 *       reason (EINVAL on a FIFO, ...) still returns the tuple, with the
 *       descriptor open and nlink -1: the caller names the file type, or
 *       raises the lock's errno (its fourth field, in place of mtime).
 *   identity(fd) -> (ino, dev, mode, nlink, size), or None if fd is not open.
 *   close_if(fd, ino, dev) -> closes fd and returns True only if it is still
 *       the regular file (dev, ino); False, leaving it alone, otherwise.
 *
 * And the create path's (block.Block.create), where Python's overhead was
 * most of the time: building a block made eight Python-level system calls.
 *
 *   build(dir, flags, total, pieces)
 *       open(dir, flags, 0600) (O_TMPFILE); fstat; fchmod(0600) if the umask
 *       took owner bits; posix_fallocate(0, total) - ftruncate instead where
 *       the file system has no fallocate (EOPNOTSUPP, EINVAL); pwrite each
 *       (offset, bytes-like) of the list or tuple ``pieces``, whole. Returns
 *       (fd, ino, mtime), or (-1, errno, stage) with the descriptor closed:
 *       stage 1 open, 2 fstat/fchmod, 3 fallocate/ftruncate, 4 pwrite - the
 *       caller decides what each means. The GIL is released for the calls;
 *       EINTR runs Python's signal handlers and resumes the step (PEP 475),
 *       an exception from one closes the descriptor and propagates.
 *   link(fd, path): linkat("/proc/self/fd/<fd>", path, AT_SYMLINK_FOLLOW),
 *       raising OSError as os.link does.
 *   open_same(path, flags, ino) -> open(path, flags) and fstat: the
 *       descriptor if the file is inode ``ino``, else -1 (closed); OSError
 *       if it cannot be opened.
 *   unlink_same(path, ino) -> lstat(path): if it is inode ``ino``, unlink it
 *       and return True; False if it is another file or none; OSError if
 *       the unlink fails.
 *
 * And the one large copy into shared memory (an ObjectStore's put), which is
 * memory bandwidth, not system calls:
 *
 *   copy_into(dst, offset, src, threads) copies the buffer src into the
 *       writable buffer dst at offset, split across ``threads`` threads (1 to
 *       8) when it is at least PARALLEL_MIN bytes: one core's memcpy does not
 *       reach the memory's bandwidth (on a 2-CPU VM, 100 MiB: 17.5 ms on one
 *       thread, 9.8 ms on two). The GIL is released; the helper threads are
 *       started with every signal blocked (no handler ever runs on them) and
 *       joined before it returns; a thread that cannot be started leaves its
 *       part to the caller's thread. ValueError if src does not fit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#define FASTPATH_VERSION 3

static PyObject *
opened_tuple(int fd, const struct stat *st, long long nlink)
{
    double mtime = (double)st->st_mtim.tv_sec + (double)st->st_mtim.tv_nsec * 1e-9;
    return Py_BuildValue("(iLKdkkL)", fd, (long long)st->st_size, (unsigned long long)st->st_ino, mtime,
                         (unsigned long)st->st_uid, (unsigned long)st->st_mode, nlink);
}

static PyObject *
open_block(PyObject *self, PyObject *args)
{
    PyObject *path_obj;
    int flags;
    long long lock_offset;
    if (!PyArg_ParseTuple(args, "O&iL:open_block", PyUnicode_FSConverter, &path_obj, &flags, &lock_offset))
        return NULL;
    int fd, saved;
    Py_BEGIN_ALLOW_THREADS
    fd = open(PyBytes_AS_STRING(path_obj), flags);
    saved = errno;
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        errno = saved;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path_obj);
        Py_DECREF(path_obj);
        return NULL;
    }
    struct stat st;
    if (lock_offset >= 0) {
        struct flock fl;
        memset(&fl, 0, sizeof fl);
        fl.l_type = F_RDLCK;
        fl.l_whence = SEEK_SET;
        fl.l_start = (off_t)lock_offset;
        fl.l_len = 1;
        for (;;) {
            int rc;
            /* Uncontended, the lock is granted at once: try without giving up the GIL first. */
            rc = fcntl(fd, F_OFD_SETLK, &fl);
            saved = errno;
            if (rc < 0 && (saved == EAGAIN || saved == EACCES)) {
                Py_BEGIN_ALLOW_THREADS
                rc = fcntl(fd, F_OFD_SETLKW, &fl);
                saved = errno;
                Py_END_ALLOW_THREADS
            }
            if (rc == 0)
                break;
            if (saved == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    close(fd);
                    Py_DECREF(path_obj);
                    return NULL;
                }
                continue;
            }
            /* Not lockable: report the file type (a FIFO, a socket...) and the lock's errno. */
            if (fstat(fd, &st) < 0) {
                errno = saved;
                close(fd);
                PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path_obj);
                Py_DECREF(path_obj);
                return NULL;
            }
            Py_DECREF(path_obj);
            return Py_BuildValue("(iLKikkL)", fd, (long long)st.st_size, (unsigned long long)st.st_ino, saved,
                                 (unsigned long)st.st_uid, (unsigned long)st.st_mode, -1LL);
        }
    }
    if (fstat(fd, &st) < 0) {
        saved = errno;
        close(fd);
        errno = saved;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path_obj);
        Py_DECREF(path_obj);
        return NULL;
    }
    Py_DECREF(path_obj);
    PyObject *result;
    if (S_ISREG(st.st_mode) && st.st_nlink > 0) /* the usual answer: the six fields of an Opened */
        result = Py_BuildValue("(iLKdkk)", fd, (long long)st.st_size, (unsigned long long)st.st_ino,
                               (double)st.st_mtim.tv_sec + (double)st.st_mtim.tv_nsec * 1e-9,
                               (unsigned long)st.st_uid, (unsigned long)(st.st_mode & 07777));
    else
        result = opened_tuple(fd, &st, (long long)st.st_nlink);
    if (result == NULL)
        close(fd);
    return result;
}

static PyObject *
identity(PyObject *self, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    struct stat st;
    if (fd < 0 || fd > INT_MAX || fstat((int)fd, &st) < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(KKkLL)", (unsigned long long)st.st_ino, (unsigned long long)st.st_dev,
                         (unsigned long)st.st_mode, (long long)st.st_nlink, (long long)st.st_size);
}

static PyObject *
close_if(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long ino, dev;
    if (!PyArg_ParseTuple(args, "iKK:close_if", &fd, &ino, &dev))
        return NULL;
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (unsigned long long)st.st_ino != ino ||
        (unsigned long long)st.st_dev != dev)
        Py_RETURN_FALSE;
    close(fd); /* Linux closes the descriptor even when close() reports an error */
    Py_RETURN_TRUE;
}

enum { STAGE_OPEN = 1, STAGE_MODE = 2, STAGE_RESERVE = 3, STAGE_WRITE = 4, STAGE_DONE = 5 };

struct build_state {
    const char *dir;
    int flags;
    off_t total;
    Py_ssize_t count;
    const long long *offsets;
    const Py_buffer *buffers;
    int fd;
    int stage;
    Py_ssize_t piece;   /* the piece being written */
    Py_ssize_t written; /* bytes of it written so far */
    struct stat st;
};

/* Runs the steps from s->stage on, without the GIL; 0 when done, else the errno
 * of the step left in s->stage (EINTR: the caller checks signals and resumes). */
static int
build_steps(struct build_state *s)
{
    if (s->stage == STAGE_OPEN) {
        s->fd = open(s->dir, s->flags, 0600);
        if (s->fd < 0)
            return errno;
        s->stage = STAGE_MODE;
    }
    if (s->stage == STAGE_MODE) {
        if (fstat(s->fd, &s->st) < 0)
            return errno;
        if ((s->st.st_mode & 0777) != 0600 && fchmod(s->fd, 0600) < 0)
            return errno;
        s->stage = STAGE_RESERVE;
    }
    if (s->stage == STAGE_RESERVE) {
        int rc = posix_fallocate(s->fd, 0, s->total);
        if (rc == EOPNOTSUPP || rc == EINVAL) /* a file system without fallocate: sized, unreserved */
            rc = ftruncate(s->fd, s->total) < 0 ? errno : 0;
        if (rc != 0)
            return rc;
        s->stage = STAGE_WRITE;
    }
    if (s->stage == STAGE_WRITE) {
        for (; s->piece < s->count; s->piece++, s->written = 0) {
            const Py_buffer *b = &s->buffers[s->piece];
            while (s->written < b->len) {
                ssize_t n = pwrite(s->fd, (const char *)b->buf + s->written, (size_t)(b->len - s->written),
                                   (off_t)(s->offsets[s->piece] + s->written));
                if (n < 0)
                    return errno;
                s->written += n;
            }
        }
        s->stage = STAGE_DONE;
    }
    return 0;
}

static PyObject *
build(PyObject *self, PyObject *args)
{
    PyObject *dir_obj, *pieces_obj;
    int flags;
    long long total;
    if (!PyArg_ParseTuple(args, "O&iLO:build", PyUnicode_FSConverter, &dir_obj, &flags, &total, &pieces_obj))
        return NULL;
    PyObject *result = NULL, *pieces = NULL;
    Py_buffer *buffers = NULL;
    long long *offsets = NULL;
    Py_ssize_t count = 0, held = 0;
    struct build_state s;
    if (!PyList_Check(pieces_obj) && !PyTuple_Check(pieces_obj)) {
        PyErr_SetString(PyExc_TypeError, "build: pieces must be a list or a tuple");
        goto done;
    }
    pieces = PySequence_Fast(pieces_obj, "build: pieces must be a list or a tuple");
    if (pieces == NULL)
        goto done;
    count = PySequence_Fast_GET_SIZE(pieces);
    if (count > 0) {
        buffers = PyMem_Calloc((size_t)count, sizeof *buffers);
        offsets = PyMem_Calloc((size_t)count, sizeof *offsets);
        if (buffers == NULL || offsets == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    for (; held < count; held++) {
        PyObject *item = PySequence_Fast_GET_ITEM(pieces, held);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "build: each piece must be an (offset, bytes-like) tuple");
            goto done;
        }
        offsets[held] = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 0));
        if (offsets[held] == -1 && PyErr_Occurred())
            goto done;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 1), &buffers[held], PyBUF_SIMPLE) < 0)
            goto done;
    }
    memset(&s, 0, sizeof s);
    s.dir = PyBytes_AS_STRING(dir_obj);
    s.flags = flags;
    s.total = (off_t)total;
    s.count = count;
    s.offsets = offsets;
    s.buffers = buffers;
    s.fd = -1;
    s.stage = STAGE_OPEN;
    for (;;) {
        int err;
        Py_BEGIN_ALLOW_THREADS
        err = build_steps(&s);
        Py_END_ALLOW_THREADS
        if (err == 0) {
            double mtime = (double)s.st.st_mtim.tv_sec + (double)s.st.st_mtim.tv_nsec * 1e-9;
            result = Py_BuildValue("(iKd)", s.fd, (unsigned long long)s.st.st_ino, mtime);
            if (result == NULL)
                close(s.fd);
            break;
        }
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) { /* a handler raised: nothing is left behind */
                if (s.fd >= 0)
                    close(s.fd);
                break;
            }
            continue;
        }
        if (s.fd >= 0)
            close(s.fd);
        result = Py_BuildValue("(iii)", -1, err, s.stage);
        break;
    }
done:
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&buffers[i]);
    PyMem_Free(buffers);
    PyMem_Free(offsets);
    Py_XDECREF(pieces);
    Py_DECREF(dir_obj);
    return result;
}

static PyObject *
link_fd(PyObject *self, PyObject *args)
{
    int fd;
    PyObject *path_obj;
    if (!PyArg_ParseTuple(args, "iO&:link", &fd, PyUnicode_FSConverter, &path_obj))
        return NULL;
    char src[64];
    snprintf(src, sizeof src, "/proc/self/fd/%d", fd);
    int rc, saved;
    Py_BEGIN_ALLOW_THREADS
    rc = linkat(AT_FDCWD, src, AT_FDCWD, PyBytes_AS_STRING(path_obj), AT_SYMLINK_FOLLOW);
    saved = errno;
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyObject *src_obj = PyUnicode_DecodeFSDefault(src);
        if (src_obj != NULL) {
            errno = saved;
            PyErr_SetFromErrnoWithFilenameObjects(PyExc_OSError, src_obj, path_obj);
            Py_DECREF(src_obj);
        }
        Py_DECREF(path_obj);
        return NULL;
    }
    Py_DECREF(path_obj);
    Py_RETURN_NONE;
}

static PyObject *
open_same(PyObject *self, PyObject *args)
{
    PyObject *path_obj;
    int flags;
    unsigned long long ino;
    if (!PyArg_ParseTuple(args, "O&iK:open_same", PyUnicode_FSConverter, &path_obj, &flags, &ino))
        return NULL;
    int fd, saved;
    for (;;) { /* PEP 475, as os.open */
        Py_BEGIN_ALLOW_THREADS
        fd = open(PyBytes_AS_STRING(path_obj), flags);
        saved = errno;
        Py_END_ALLOW_THREADS
        if (fd >= 0 || saved != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            Py_DECREF(path_obj);
            return NULL;
        }
    }
    if (fd < 0) {
        errno = saved;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path_obj);
        Py_DECREF(path_obj);
        return NULL;
    }
    Py_DECREF(path_obj);
    struct stat st;
    if (fstat(fd, &st) < 0) {
        saved = errno;
        close(fd);
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if ((unsigned long long)st.st_ino != ino) {
        close(fd);
        fd = -1;
    }
    return PyLong_FromLong(fd);
}

static PyObject *
unlink_same(PyObject *self, PyObject *args)
{
    PyObject *path_obj;
    unsigned long long ino;
    if (!PyArg_ParseTuple(args, "O&K:unlink_same", PyUnicode_FSConverter, &path_obj, &ino))
        return NULL;
    struct stat st;
    int rc, saved = 0, same = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = lstat(PyBytes_AS_STRING(path_obj), &st);
    if (rc == 0 && (unsigned long long)st.st_ino == ino) {
        same = 1;
        rc = unlink(PyBytes_AS_STRING(path_obj));
        saved = errno;
    }
    Py_END_ALLOW_THREADS
    PyObject *result;
    if (same && rc < 0) {
        errno = saved;
        result = PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path_obj);
    }
    else
        result = PyBool_FromLong(same);
    Py_DECREF(path_obj);
    return result;
}

/* ------------------------------------------------------------------ copy_into */

#define PARALLEL_MIN (4u << 20)
#define COPY_THREADS_MAX 8

typedef struct {
    char *dst;
    const char *src;
    size_t n;
} copy_part;

static void *
copy_worker(void *arg)
{
    copy_part *part = (copy_part *)arg;
    memcpy(part->dst, part->src, part->n);
    return NULL;
}

static PyObject *
copy_into(PyObject *module, PyObject *args)
{
    Py_buffer dst, src;
    Py_ssize_t offset;
    int threads;
    if (!PyArg_ParseTuple(args, "w*ny*i", &dst, &offset, &src, &threads))
        return NULL;
    if (offset < 0 || offset > dst.len || src.len > dst.len - offset) {
        PyBuffer_Release(&dst);
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "copy_into: the source does not fit in the destination at that offset");
        return NULL;
    }
    char *to = (char *)dst.buf + offset;
    const char *from = (const char *)src.buf;
    size_t n = (size_t)src.len;
    if (threads > COPY_THREADS_MAX)
        threads = COPY_THREADS_MAX;
    if (threads < 2 || n < PARALLEL_MIN)
        threads = 1;
    Py_BEGIN_ALLOW_THREADS
    pthread_t ids[COPY_THREADS_MAX];
    copy_part parts[COPY_THREADS_MAX];
    int started[COPY_THREADS_MAX] = {0};
    size_t each = (n / (size_t)threads) & ~(size_t)4095; /* page-aligned parts; the last takes the rest */
    for (int i = 0; i < threads; i++) {
        parts[i].dst = to + (size_t)i * each;
        parts[i].src = from + (size_t)i * each;
        parts[i].n = i == threads - 1 ? n - (size_t)i * each : each;
    }
    if (threads > 1) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old); /* inherited by the helpers */
        for (int i = 1; i < threads; i++)
            started[i] = pthread_create(&ids[i], NULL, copy_worker, &parts[i]) == 0;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    memcpy(parts[0].dst, parts[0].src, parts[0].n);
    for (int i = 1; i < threads; i++) {
        if (started[i])
            pthread_join(ids[i], NULL);
        else
            memcpy(parts[i].dst, parts[i].src, parts[i].n);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"build", build, METH_VARARGS,
     "build(dir, flags, total, pieces) -> (fd, ino, mtime), or (-1, errno, stage) with nothing left open"},
    {"link", link_fd, METH_VARARGS, "link(fd, path): linkat(/proc/self/fd/<fd>, path, AT_SYMLINK_FOLLOW)"},
    {"open_same", open_same, METH_VARARGS, "open_same(path, flags, ino) -> fd if path is inode ino, else -1"},
    {"unlink_same", unlink_same, METH_VARARGS, "unlink_same(path, ino) -> bool: unlink path if it is inode ino"},
    {"open_block", open_block, METH_VARARGS,
     "open_block(path, flags, lock_offset) -> (fd, size, ino, mtime, uid, mode, nlink)"},
    {"identity", identity, METH_O, "identity(fd) -> (ino, dev, mode, nlink, size) or None"},
    {"close_if", close_if, METH_VARARGS, "close_if(fd, ino, dev) -> bool: close fd if it is still that file"},
    {"copy_into", copy_into, METH_VARARGS, "copy_into(dst, offset, src, threads): copy src into dst at offset"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "shmem._platform._fastpath", "The system calls on shmem's attach and create paths, in C.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "VERSION", FASTPATH_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
