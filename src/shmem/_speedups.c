/* shmem._speedups: the hot path of ShareableList, optional.
 *
 * ListCore is the base class of shmem.ShareableList when this module builds.
 * It reads and writes int and float items - the common case - in C, under
 * the item's sequence lock with real acquire/release ordering (which pure
 * Python cannot express). Everything else (str, bytes, bool, None, slices,
 * damaged items, a writer in progress) goes to the Python methods
 * _getitem_slow / _setitem_slow, which define the behaviour; this file only
 * makes the same answers faster. fence() gives those Python methods the
 * barriers they need on CPUs that reorder memory accesses. The layout is
 * drawn in _kinds/list_layout.py; LAYOUT_VERSION is the version drawn there,
 * so that a stale build of another layout is never used.
 *
 * Memory is the list's SharedMemory buffer, held through a Py_buffer while
 * bound; every offset read from it is checked before use, exactly as the
 * Python code checks it. Every size is computed with overflow checks
 * (__builtin_*_overflow) and refused with the exception the pure-Python
 * twins in list_layout.py raise: OverflowError for a size that cannot be
 * represented, MemoryError for one that cannot be allocated, ValueError for
 * a layout that does not fit its buffer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the ShareableList layout is little-endian: this machine uses the pure-Python path"
#endif

#define LAYOUT_VERSION 2

/* 8-byte format fields read as little-endian int64: "q" and "d". */
#define INT_WORD ((int64_t)'q')
#define FLOAT_WORD ((int64_t)'d')

/* Items packed between two looks for signals (Ctrl-C) while packing a range. */
#define SIGNAL_STEP ((Py_ssize_t)1 << 16)

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int bound;
    char *base;
    Py_ssize_t n;        /* items */
    Py_ssize_t data;     /* byte offset of the data area */
    Py_ssize_t fmts;     /* byte offset of the format fields */
    Py_ssize_t codes;    /* byte offset of the type codes */
    Py_ssize_t ext;      /* byte offset of shmem's sequence numbers (one word per item, then as
                            many records, which only the Python side reads), or -1 */
    Py_ssize_t fixed_max;/* largest slot offset an 8-byte item may have */
} ListCore;

static inline int64_t load_relaxed(const char *p) { return __atomic_load_n((const int64_t *)p, __ATOMIC_RELAXED); }
static inline void store_relaxed(char *p, int64_t v) { __atomic_store_n((int64_t *)p, v, __ATOMIC_RELAXED); }

/* The sequence number that ends a write begun with `writing` (odd): 63 bits, wrapping to 0. */
static inline int64_t settled(int64_t writing) { return (int64_t)(((uint64_t)writing + 1) & (uint64_t)INT64_MAX); }

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

static PyObject *
layout_error(void)
{
    PyErr_SetString(PyExc_ValueError, "ShareableList layout does not fit its buffer");
    return NULL;
}

/* _bind_core(buf, n, data_len, ext): the Python side has validated the layout;
 * it is checked again here, every sum overflow-checked, before any of it is kept. */
static PyObject *
core_bind(ListCore *self, PyObject *args)
{
    PyObject *buf;
    Py_ssize_t n, data_len, ext;
    if (!PyArg_ParseTuple(args, "Onnn", &buf, &n, &data_len, &ext))
        return NULL;
    if (n < 0 || data_len < 0 || ext < -1)
        return layout_error();
    Py_ssize_t data, fmts, codes, codes_end, end, ext_len;
    if (__builtin_add_overflow(n, 2, &data) || __builtin_mul_overflow(data, 8, &data)
        || __builtin_add_overflow(data, data_len, &fmts)
        || __builtin_mul_overflow(n, 8, &codes) || __builtin_add_overflow(fmts, codes, &codes)
        || __builtin_add_overflow(codes, n, &codes_end))
        return layout_error();
    end = codes_end;
    if (ext >= 0) {
        if ((ext & 7) || ext < codes_end || __builtin_mul_overflow(n, 16, &ext_len)
            || __builtin_add_overflow(ext, ext_len, &end))
            return layout_error();
    }
    core_release_view(self);
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return NULL;
    if (end > self->view.len || ((uintptr_t)self->view.buf & 7)) {
        PyBuffer_Release(&self->view);
        return layout_error();
    }
    self->bound = 1;
    self->base = (char *)self->view.buf;
    self->n = n;
    self->data = data;
    self->fmts = fmts;
    self->codes = codes;
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
        i += self->n;  /* no overflow: i >= PY_SSIZE_T_MIN + 1 and n >= 0 */
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
        /* bound again each time: the slow path runs Python code, which may close the list */
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
        /* As for the Python class (and the standard library's), which define no __delitem__. */
        PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute '__delitem__'",
                     Py_TYPE(self)->tp_name);
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
        if (seqp)  /* even again: the item is whole (a number leaves the record alone, as in Python) */
            __atomic_store_n((int64_t *)seqp, settled(writing), __ATOMIC_RELEASE);
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

/* A bytes object of n words: OverflowError if 8n cannot be represented, MemoryError if
 * it cannot be allocated (list_layout._words raises the same). */
static PyObject *
new_words(Py_ssize_t n)
{
    if (n > PY_SSIZE_T_MAX / 8) {
        PyErr_Format(PyExc_OverflowError, "%zd items: more than this machine can address", n);
        return NULL;
    }
    return PyBytes_FromStringAndSize(NULL, n * 8);
}

/* pack_numbers for a range: every item an int64 (its two ends are), or None. */
static PyObject *
pack_range(PyObject *seq)
{
    Py_ssize_t n = PyObject_Length(seq);  /* OverflowError beyond PY_SSIZE_T_MAX items */
    if (n < 0)
        return NULL;
    if (n == 0)
        Py_RETURN_NONE;
    PyObject *first = PySequence_GetItem(seq, 0);
    PyObject *last = first ? PySequence_GetItem(seq, n - 1) : NULL;
    PyObject *step = last ? PyObject_GetAttrString(seq, "step") : NULL;
    int overflow_first = 0, overflow_last = 0;
    long long a = 0;
    unsigned long long d = 0;
    if (step) {
        a = PyLong_AsLongLongAndOverflow(first, &overflow_first);
        if (!PyErr_Occurred())
            (void)PyLong_AsLongLongAndOverflow(last, &overflow_last);
        if (!PyErr_Occurred())
            d = PyLong_AsUnsignedLongLongMask(step);  /* the step modulo 2**64 */
    }
    Py_XDECREF(first);
    Py_XDECREF(last);
    Py_XDECREF(step);
    if (PyErr_Occurred())
        return NULL;
    if (overflow_first || overflow_last)
        Py_RETURN_NONE;  /* an end beyond int64: the item-by-item path raises OverflowError */
    PyObject *out = new_words(n);
    if (out == NULL)
        return NULL;
    int64_t *w = (int64_t *)PyBytes_AS_STRING(out);
    /* Modulo 2**64 every item comes out exact: each one lies between the two ends. */
    uint64_t v = (uint64_t)a;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i % SIGNAL_STEP == SIGNAL_STEP - 1 && PyErr_CheckSignals() < 0) {
            Py_DECREF(out);
            return NULL;
        }
        w[i] = (int64_t)v;
        v += d;
    }
    return Py_BuildValue("(Ns)", out, "q");
}

/* pack_numbers(seq): (data, kind) when seq is exactly a list, tuple or range, not
 * empty, and every item is exactly an int that fits int64 ("q") or exactly a float
 * ("d"); None otherwise (mixed kinds, bools, subclasses, huge ints: the Python path
 * decides). list_layout.pack_numbers_py is its twin. A list or tuple is packed
 * without running any Python code, so it cannot change meanwhile. */
static PyObject *
pack_numbers(PyObject *module, PyObject *seq)
{
    if (PyRange_Check(seq))
        return pack_range(seq);
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq))
        Py_RETURN_NONE;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (n == 0)
        Py_RETURN_NONE;
    int ints = PyLong_CheckExact(items[0]);
    if (!ints && !PyFloat_CheckExact(items[0]))
        Py_RETURN_NONE;
    for (Py_ssize_t i = 1; i < n; i++) {
        if (ints ? !PyLong_CheckExact(items[i]) : !PyFloat_CheckExact(items[i]))
            Py_RETURN_NONE;
    }
    PyObject *out = new_words(n);
    if (out == NULL)
        return NULL;
    char *w = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (ints) {
            int overflow = 0;
            long long x = PyLong_AsLongLongAndOverflow(items[i], &overflow);
            if (overflow || (x == -1 && PyErr_Occurred())) {
                PyErr_Clear();
                Py_DECREF(out);
                Py_RETURN_NONE;  /* beyond int64: the item-by-item path names it */
            }
            int64_t x64 = (int64_t)x;
            memcpy(w + 8 * i, &x64, 8);
        } else {
            double x = PyFloat_AS_DOUBLE(items[i]);
            memcpy(w + 8 * i, &x, 8);
        }
    }
    return Py_BuildValue("(Ns)", out, ints ? "q" : "d");
}

/* fixed_offsets(n): the offsets area of n 8-byte items, 0, 8, ..., 8n, as bytes. */
static PyObject *
fixed_offsets(PyObject *module, PyObject *arg)
{
    PyObject *index = PyNumber_Index(arg);
    if (index == NULL)
        return NULL;
    int overflow = 0;
    long long count = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    if (overflow < 0 || (!overflow && count < 0)) {  /* negative, however large: as the twin */
        PyErr_SetString(PyExc_ValueError, "negative count");
        return NULL;
    }
    if (overflow > 0 || count >= PY_SSIZE_T_MAX / 8) {
        PyErr_SetString(PyExc_OverflowError, "more items than this machine can address");
        return NULL;
    }
    Py_ssize_t n = (Py_ssize_t)count;
    PyObject *out = new_words(n + 1);
    if (out == NULL)
        return NULL;
    int64_t *w = (int64_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (i % SIGNAL_STEP == SIGNAL_STEP - 1 && PyErr_CheckSignals() < 0) {
            Py_DECREF(out);
            return NULL;
        }
        w[i] = 8 * (int64_t)i;
    }
    return out;
}

/* fence(): a full memory barrier, for the Python slow path on CPUs that reorder
 * memory accesses (list_layout.FENCE). */
static PyObject *
fence(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"pack_numbers", (PyCFunction)pack_numbers, METH_O, "Pack a homogeneous int or float sequence."},
    {"fixed_offsets", (PyCFunction)fixed_offsets, METH_O, "Offsets of n 8-byte items."},
    {"fence", (PyCFunction)fence, METH_NOARGS, "A full memory barrier."},
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
    if (PyModule_AddIntConstant(m, "LAYOUT_VERSION", LAYOUT_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ListCoreType);
    if (PyModule_AddObject(m, "ListCore", (PyObject *)&ListCoreType) < 0) {
        Py_DECREF(&ListCoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
