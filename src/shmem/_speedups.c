/* shmem._speedups: the hot path of ShareableList, optional.
 *
 * ListCore is the base class of shmem.ShareableList when this module builds.
 * It reads and writes int and float items - the common case - in C, under
 * the item's sequence lock with real acquire/release ordering (which pure
 * Python cannot express). Everything else (str, bytes, bool, None, slices,
 * damaged items, a writer in progress) goes to the Python methods
 * _getitem_slow / _setitem_slow, which define the behaviour; this file only
 * makes the same answers faster. The layout is drawn in _kinds/list_layout.py.
 *
 * Memory is the list's SharedMemory buffer, held through a Py_buffer while
 * bound; every offset read from it is checked before use, exactly as the
 * Python code checks it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* 8-byte format fields read as little-endian int64: "q" and "d". */
#define INT_WORD ((int64_t)'q')
#define FLOAT_WORD ((int64_t)'d')

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int bound;
    char *base;
    Py_ssize_t n;        /* items */
    Py_ssize_t data;     /* byte offset of the data area */
    Py_ssize_t fmts;     /* byte offset of the format fields */
    Py_ssize_t codes;    /* byte offset of the type codes */
    Py_ssize_t ext;      /* byte offset of shmem's per-item words (sequence in the low 16 bits), or -1 */
    Py_ssize_t fixed_max;/* largest slot offset an 8-byte item may have */
} ListCore;

static inline int64_t load_relaxed(const char *p) { return __atomic_load_n((const int64_t *)p, __ATOMIC_RELAXED); }
static inline void store_relaxed(char *p, int64_t v) { __atomic_store_n((int64_t *)p, v, __ATOMIC_RELAXED); }

static void
core_release_view(ListCore *self)
{
    if (self->bound) {
        self->bound = 0;
        self->base = NULL;
        PyBuffer_Release(&self->view);
    }
}

static void
core_dealloc(ListCore *self)
{
    core_release_view(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _bind_core(buf, n, data_len, ext): the Python side has validated the layout. */
static PyObject *
core_bind(ListCore *self, PyObject *args)
{
    PyObject *buf;
    Py_ssize_t n, data_len, ext;
    if (!PyArg_ParseTuple(args, "Onnn", &buf, &n, &data_len, &ext))
        return NULL;
    core_release_view(self);
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t data = (n + 2) * 8;
    Py_ssize_t end = ext >= 0 ? ext + 8 * n : data + data_len + 9 * n;
    if (n < 0 || data_len < 0 || end > self->view.len || ((uintptr_t)self->view.buf & 7)) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "ShareableList layout does not fit its buffer");
        return NULL;
    }
    self->bound = 1;
    self->base = (char *)self->view.buf;
    self->n = n;
    self->data = data;
    self->fmts = data + data_len;
    self->codes = self->fmts + 8 * n;
    self->ext = ext;
    self->fixed_max = data_len - 8;
    Py_RETURN_NONE;
}

static PyObject *
core_release(ListCore *self, PyObject *Py_UNUSED(ignored))
{
    core_release_view(self);
    Py_RETURN_NONE;
}

static Py_ssize_t
core_length(ListCore *self)
{
    return self->n;
}

/* The byte offset of item i's 8-byte slot, or -1 if the layout says otherwise. */
static inline Py_ssize_t
fixed_slot(ListCore *self, Py_ssize_t i)
{
    int64_t off = load_relaxed(self->base + 8 * (1 + i));
    if (off < 0 || off > self->fixed_max || (off & 7))
        return -1;
    return self->data + (Py_ssize_t)off;
}

/* Item i (0 <= i < n) if it is an int or float read whole under its sequence
 * lock; NULL without an exception set when the slow path must answer. */
static PyObject *
fast_read(ListCore *self, Py_ssize_t i)
{
    char *seqp = self->ext >= 0 ? self->base + self->ext + 8 * i : NULL;
    int64_t before = 0;
    if (seqp) {
        before = __atomic_load_n((int64_t *)seqp, __ATOMIC_ACQUIRE);
        if (before & 1)
            return NULL;  /* a writer is at work: the slow path waits */
    }
    int64_t fmt = load_relaxed(self->base + self->fmts + 8 * i);
    if (fmt != INT_WORD && fmt != FLOAT_WORD)
        return NULL;
    if (__atomic_load_n((int8_t *)(self->base + self->codes + i), __ATOMIC_RELAXED) != 0)
        return NULL;  /* the type code disagrees: the slow path judges */
    Py_ssize_t at = fixed_slot(self, i);
    if (at < 0)
        return NULL;  /* damaged: the slow path raises CorruptSegment */
    int64_t raw = load_relaxed(self->base + at);
    if (seqp) {
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (load_relaxed(seqp) != before)
            return NULL;
    }
    if (fmt == INT_WORD)
        return PyLong_FromLongLong(raw);
    double d;
    memcpy(&d, &raw, sizeof d);
    return PyFloat_FromDouble(d);
}

/* The item an exact-int key designates (negative keys count from the end), or
 * -1 when the Python side must answer: another key type, out of range (it
 * words the IndexError), or an unbound list. */
static Py_ssize_t
item_index(ListCore *self, PyObject *key)
{
    if (!self->bound || !PyLong_CheckExact(key))
        return -1;
    Py_ssize_t i = PyLong_AsSsize_t(key);
    if (i == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (i < 0)
        i += self->n;
    return (i < 0 || i >= self->n) ? -1 : i;
}

static PyObject *
core_getitem(ListCore *self, PyObject *key)
{
    Py_ssize_t i = item_index(self, key);
    if (i >= 0) {
        PyObject *v = fast_read(self, i);
        if (v != NULL || PyErr_Occurred())
            return v;
    }
    return PyObject_CallMethod((PyObject *)self, "_getitem_slow", "O", key);
}

/* _snapshot_core(): every item, in C where it can, through _getitem_slow where not. */
static PyObject *
core_snapshot(ListCore *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->bound) {
        PyErr_SetString(PyExc_ValueError, "the ShareableList is closed");
        return NULL;
    }
    Py_ssize_t n = self->n;
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = self->bound ? fast_read(self, i) : NULL;
        if (v == NULL) {
            if (PyErr_Occurred())
                goto fail;
            v = PyObject_CallMethod((PyObject *)self, "_getitem_slow", "n", i);
            if (v == NULL)
                goto fail;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static int
core_setitem(ListCore *self, PyObject *key, PyObject *value)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "ShareableList items cannot be deleted (its length is fixed)");
        return -1;
    }
    Py_ssize_t i = (PyLong_CheckExact(value) || PyFloat_CheckExact(value)) ? item_index(self, key) : -1;
    if (i >= 0) {
        int64_t raw, fmt;
        if (PyLong_CheckExact(value)) {
            int overflow = 0;
            long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
            if (overflow || (v == -1 && PyErr_Occurred())) {
                PyErr_Clear();
                goto slow;  /* the Python side raises OverflowError */
            }
            raw = (int64_t)v;
            fmt = INT_WORD;
        } else {
            double d = PyFloat_AS_DOUBLE(value);
            memcpy(&raw, &d, sizeof raw);
            fmt = FLOAT_WORD;
        }
        Py_ssize_t at = fixed_slot(self, i);
        if (at < 0)
            goto slow;
        char *seqp = self->ext >= 0 ? self->base + self->ext + 8 * i : NULL;
        int64_t writing = 0;
        if (seqp) {
            writing = load_relaxed(seqp) | 1;
            store_relaxed(seqp, writing);          /* odd: readers wait */
            __atomic_thread_fence(__ATOMIC_RELEASE);
        }
        store_relaxed(self->base + at, raw);
        store_relaxed(self->base + self->fmts + 8 * i, fmt);
        __atomic_store_n((int8_t *)(self->base + self->codes + i), 0, __ATOMIC_RELAXED);
        if (seqp) {
            /* even again, length 0 (not text): the item is whole */
            __atomic_store_n((int64_t *)seqp, ((writing & 0xFFFF) + 1) & 0xFFFF, __ATOMIC_RELEASE);
        }
        return 0;
    }
slow:;
    PyObject *r = PyObject_CallMethod((PyObject *)self, "_setitem_slow", "OO", key, value);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyMethodDef core_methods[] = {
    {"_bind_core", (PyCFunction)core_bind, METH_VARARGS, "Bind to a validated list buffer."},
    {"_release_core", (PyCFunction)core_release, METH_NOARGS, "Release the list buffer."},
    {"_snapshot_core", (PyCFunction)core_snapshot, METH_NOARGS, "Every item, as a list."},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods core_as_mapping = {
    (lenfunc)core_length,
    (binaryfunc)core_getitem,
    (objobjargproc)core_setitem,
};

static PyTypeObject ListCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmem._speedups.ListCore",
    .tp_basicsize = sizeof(ListCore),
    .tp_dealloc = (destructor)core_dealloc,
    .tp_as_mapping = &core_as_mapping,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "C fast path of shmem.ShareableList (int and float items).",
    .tp_methods = core_methods,
    .tp_new = PyType_GenericNew,
};

/* pack_numbers(seq): (data, kind) when every item of the list, tuple or range is
 * exactly an int that fits int64 ("q") or exactly a float ("d"); None otherwise
 * (mixed kinds, bools, subclasses, huge ints: the Python path decides). */
static PyObject *
pack_numbers(PyObject *module, PyObject *seq)
{
    if (PyRange_Check(seq)) {
        PyObject *start = PyObject_GetAttrString(seq, "start");
        PyObject *step = PyObject_GetAttrString(seq, "step");
        Py_ssize_t n = PyObject_Length(seq);
        int overflow1 = 0, overflow2 = 0;
        long long a = start ? PyLong_AsLongLongAndOverflow(start, &overflow1) : 0;
        long long d = step ? PyLong_AsLongLongAndOverflow(step, &overflow2) : 0;
        Py_XDECREF(start);
        Py_XDECREF(step);
        if (n < 0 || PyErr_Occurred()) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        /* every element must fit: check both ends in 128-bit arithmetic */
        __int128 last = (__int128)a + (__int128)d * (n > 0 ? n - 1 : 0);
        if (overflow1 || overflow2 || last > INT64_MAX || last < INT64_MIN)
            Py_RETURN_NONE;
        PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
        if (out == NULL)
            return NULL;
        int64_t *w = (int64_t *)PyBytes_AS_STRING(out);
        for (Py_ssize_t i = 0; i < n; i++)
            w[i] = (int64_t)(a + d * (long long)i);
        return Py_BuildValue("(Ns)", out, "q");
    }
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq))
        Py_RETURN_NONE;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (n == 0)
        Py_RETURN_NONE;
    int ints = PyLong_CheckExact(items[0]);
    if (!ints && !PyFloat_CheckExact(items[0]))
        Py_RETURN_NONE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (out == NULL)
        return NULL;
    char *w = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = items[i];
        if (ints) {
            int overflow = 0;
            if (!PyLong_CheckExact(v))
                goto not_homogeneous;
            long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (overflow || (x == -1 && PyErr_Occurred()))
                goto not_homogeneous;
            int64_t x64 = (int64_t)x;
            memcpy(w + 8 * i, &x64, 8);
        } else {
            if (!PyFloat_CheckExact(v))
                goto not_homogeneous;
            double x = PyFloat_AS_DOUBLE(v);
            memcpy(w + 8 * i, &x, 8);
        }
    }
    return Py_BuildValue("(Ns)", out, ints ? "q" : "d");
not_homogeneous:
    PyErr_Clear();
    Py_DECREF(out);
    Py_RETURN_NONE;
}

/* fixed_offsets(n): the offsets area of n 8-byte items, 0, 8, ..., 8n, as bytes. */
static PyObject *
fixed_offsets(PyObject *module, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "negative count");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (n + 1) * 8);
    if (out == NULL)
        return NULL;
    int64_t *w = (int64_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i <= n; i++)
        w[i] = 8 * (int64_t)i;
    return out;
}

static PyMethodDef module_methods[] = {
    {"pack_numbers", (PyCFunction)pack_numbers, METH_O, "Pack a homogeneous int or float sequence."},
    {"fixed_offsets", (PyCFunction)fixed_offsets, METH_O, "Offsets of n 8-byte items."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "shmem._speedups", "Optional C fast paths for shmem.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&ListCoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ListCoreType);
    if (PyModule_AddObject(m, "ListCore", (PyObject *)&ListCoreType) < 0) {
        Py_DECREF(&ListCoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
