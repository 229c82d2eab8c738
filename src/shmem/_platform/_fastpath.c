/* shmem._platform._fastpath: the system calls on the attach path, a few at a time.
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FASTPATH_VERSION 1

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

static PyMethodDef methods[] = {
    {"open_block", open_block, METH_VARARGS,
     "open_block(path, flags, lock_offset) -> (fd, size, ino, mtime, uid, mode, nlink)"},
    {"identity", identity, METH_O, "identity(fd) -> (ino, dev, mode, nlink, size) or None"},
    {"close_if", close_if, METH_VARARGS, "close_if(fd, ino, dev) -> bool: close fd if it is still that file"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "shmem._platform._fastpath", "The system calls on shmem's attach path, in C.", -1,
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
