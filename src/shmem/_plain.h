/* shmem's plain codec, in C: the small builtin objects most messages are made of, encoded without
 * pickle - several times faster both ways, and its decoder makes nothing but builtins, whatever the
 * bytes. src/shmem/_kinds/queue_plain.py draws the layout and is the pure-Python twin; the two give
 * the same bytes for the same object and the same object (or CorruptSegment) for the same bytes.
 *
 * Included by _queue.c only: the definitions are static. */
#ifndef SHMEM_PLAIN_H
#define SHMEM_PLAIN_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PLAIN_VERSION 1 /* queue_plain.VERSION: the format below; bump on any change */
#define P_NONE 0
#define P_FALSE 1
#define P_TRUE 2
#define P_INT 3   /* i64 */
#define P_FLOAT 4 /* f64 */
#define P_STR 5   /* u32 length, UTF-8 */
#define P_BYTES 6 /* u32 length, the bytes */
#define P_TUPLE 7 /* u32 count, the items */
#define P_LIST 8  /* u32 count, the items */
#define P_DICT 9  /* u32 count, key and value of each */
#define PLAIN_MAX_DEPTH 16
#define PLAIN_MAX_CONTAINERS 64 /* lists and dicts in one object; more: pickle it */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
    PyObject *seen[PLAIN_MAX_CONTAINERS]; /* the lists and dicts met so far: one met twice means
                                             sharing or a cycle, which pickle keeps and this does not */
    int nseen;
    char small[480];
} plain_out;

static void
plain_out_init(plain_out *o)
{
    o->data = o->small;
    o->len = 0;
    o->cap = (Py_ssize_t)sizeof o->small;
    o->nseen = 0;
}

static void
plain_out_free(plain_out *o)
{
    if (o->data != o->small)
        PyMem_Free(o->data);
}

static int
plain_put(plain_out *o, const void *p, Py_ssize_t n)
{
    if (o->len + n > o->cap) {
        if (o->len > PY_SSIZE_T_MAX / 2 - n) {
            PyErr_NoMemory();
            return -1;
        }
        Py_ssize_t cap = 2 * (o->len + n);
        char *bigger = PyMem_Malloc((size_t)cap);
        if (bigger == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(bigger, o->data, (size_t)o->len);
        plain_out_free(o);
        o->data = bigger;
        o->cap = cap;
    }
    memcpy(o->data + o->len, p, (size_t)n);
    o->len += n;
    return 0;
}

static int
plain_head(plain_out *o, unsigned char type, Py_ssize_t n)
{
    uint32_t count = (uint32_t)n;
    return plain_put(o, &type, 1) < 0 || plain_put(o, &count, 4) < 0 ? -1 : 0;
}

/* Append obj's encoding: 1 done, 0 outside the codec (the caller pickles it instead), -1 error. */
static int
plain_encode_into(plain_out *o, PyObject *obj, int depth)
{
    PyTypeObject *type = Py_TYPE(obj);
    unsigned char tag;
    if (obj == Py_None || obj == Py_False || obj == Py_True) {
        tag = obj == Py_None ? P_NONE : obj == Py_False ? P_FALSE : P_TRUE;
        return plain_put(o, &tag, 1) < 0 ? -1 : 1;
    }
    if (type == &PyLong_Type) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
        if (overflow)
            return 0;
        if (v == -1 && PyErr_Occurred())
            return -1;
        tag = P_INT;
        return plain_put(o, &tag, 1) < 0 || plain_put(o, &v, 8) < 0 ? -1 : 1;
    }
    if (type == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(obj);
        tag = P_FLOAT;
        return plain_put(o, &tag, 1) < 0 || plain_put(o, &d, 8) < 0 ? -1 : 1;
    }
    if (type == &PyUnicode_Type) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(obj, &n);
        if (s == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
                return -1;
            PyErr_Clear(); /* lone surrogates: pickle keeps them */
            return 0;
        }
        if ((uint64_t)n > UINT32_MAX)
            return 0;
        return plain_head(o, P_STR, n) < 0 || plain_put(o, s, n) < 0 ? -1 : 1;
    }
    if (type == &PyBytes_Type) {
        Py_ssize_t n = PyBytes_GET_SIZE(obj);
        if ((uint64_t)n > UINT32_MAX)
            return 0;
        return plain_head(o, P_BYTES, n) < 0 || plain_put(o, PyBytes_AS_STRING(obj), n) < 0 ? -1 : 1;
    }
    if (depth >= PLAIN_MAX_DEPTH)
        return 0;
    if (type == &PyTuple_Type) {
        Py_ssize_t n = PyTuple_GET_SIZE(obj);
        if ((uint64_t)n > UINT32_MAX || plain_head(o, P_TUPLE, n) < 0)
            return (uint64_t)n > UINT32_MAX ? 0 : -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            int rc = plain_encode_into(o, PyTuple_GET_ITEM(obj, i), depth + 1);
            if (rc <= 0)
                return rc;
        }
        return 1;
    }
    if (type != &PyList_Type && type != &PyDict_Type)
        return 0;
    for (int i = 0; i < o->nseen; i++)
        if (o->seen[i] == obj)
            return 0;
    if (o->nseen == PLAIN_MAX_CONTAINERS)
        return 0;
    o->seen[o->nseen++] = obj;
    /* Nothing below runs Python code (no __hash__, __eq__ or __del__ of anything but builtins of
     * exact types), so the list or dict cannot change while it is encoded. */
    if (type == &PyList_Type) {
        Py_ssize_t n = PyList_GET_SIZE(obj);
        if ((uint64_t)n > UINT32_MAX)
            return 0;
        if (plain_head(o, P_LIST, n) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            int rc = plain_encode_into(o, PyList_GET_ITEM(obj, i), depth + 1);
            if (rc <= 0)
                return rc;
        }
        return 1;
    }
    Py_ssize_t n = PyDict_GET_SIZE(obj), pos = 0;
    PyObject *key, *value;
    if ((uint64_t)n > UINT32_MAX)
        return 0;
    if (plain_head(o, P_DICT, n) < 0)
        return -1;
    while (PyDict_Next(obj, &pos, &key, &value)) {
        int rc = plain_encode_into(o, key, depth + 1);
        if (rc > 0)
            rc = plain_encode_into(o, value, depth + 1);
        if (rc <= 0)
            return rc;
    }
    return 1;
}

typedef struct {
    const unsigned char *p, *end;
    PyObject *corrupt; /* the exception type for bytes that do not add up */
} plain_in;

static PyObject *
plain_bad(plain_in *in, const char *what)
{
    PyErr_Format(in->corrupt, "queue ring is damaged: a plain record %s", what);
    return NULL;
}

static int
plain_count(plain_in *in, uint32_t *n, Py_ssize_t least_each)
{
    if (in->end - in->p < 4)
        return -1;
    memcpy(n, in->p, 4);
    in->p += 4;
    return (uint64_t)*n * (uint64_t)least_each > (uint64_t)(in->end - in->p) ? -1 : 0;
}

static PyObject *
plain_decode_from(plain_in *in, int depth)
{
    if (in->p >= in->end)
        return plain_bad(in, "is cut short");
    unsigned char tag = *in->p++;
    uint32_t n;
    switch (tag) {
    case P_NONE:
        Py_RETURN_NONE;
    case P_FALSE:
        Py_RETURN_FALSE;
    case P_TRUE:
        Py_RETURN_TRUE;
    case P_INT:
    case P_FLOAT: {
        if (in->end - in->p < 8)
            return plain_bad(in, "is cut short");
        long long v;
        double d;
        memcpy(&v, in->p, 8);
        memcpy(&d, in->p, 8);
        in->p += 8;
        return tag == P_INT ? PyLong_FromLongLong(v) : PyFloat_FromDouble(d);
    }
    case P_STR:
    case P_BYTES: {
        if (plain_count(in, &n, 1) < 0)
            return plain_bad(in, "has a length past its end");
        const char *s = (const char *)in->p;
        in->p += n;
        if (tag == P_BYTES)
            return PyBytes_FromStringAndSize(s, n);
        PyObject *str = PyUnicode_DecodeUTF8(s, n, "strict");
        if (str == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            return plain_bad(in, "has a string that is not UTF-8");
        }
        return str;
    }
    case P_TUPLE:
    case P_LIST:
    case P_DICT: {
        if (depth >= PLAIN_MAX_DEPTH)
            return plain_bad(in, "nests too deep");
        if (plain_count(in, &n, tag == P_DICT ? 2 : 1) < 0)
            return plain_bad(in, "has a count past its end");
        PyObject *out = tag == P_TUPLE ? PyTuple_New(n) : tag == P_LIST ? PyList_New(n) : PyDict_New();
        if (out == NULL)
            return NULL;
        for (uint32_t i = 0; i < n; i++) {
            PyObject *item = plain_decode_from(in, depth + 1);
            if (item == NULL) {
                Py_DECREF(out);
                return NULL;
            }
            if (tag == P_TUPLE)
                PyTuple_SET_ITEM(out, i, item);
            else if (tag == P_LIST)
                PyList_SET_ITEM(out, i, item);
            else {
                PyObject *value = plain_decode_from(in, depth + 1);
                /* Keys are builtins: hashing one runs no Python code; an unhashable one is damage. */
                int rc = value == NULL ? -1 : PyDict_SetItem(out, item, value);
                Py_DECREF(item);
                Py_XDECREF(value);
                if (rc < 0) {
                    Py_DECREF(out);
                    if (value != NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
                        PyErr_Clear();
                        return plain_bad(in, "has an unhashable dict key");
                    }
                    return NULL;
                }
            }
        }
        return out;
    }
    default:
        return plain_bad(in, "holds an unknown type");
    }
}

/* The object `data` encodes; NULL with `corrupt` (or MemoryError) when the bytes do not add up. */
static PyObject *
plain_decode(const char *data, Py_ssize_t len, PyObject *corrupt)
{
    plain_in in = {(const unsigned char *)data, (const unsigned char *)data + len, corrupt};
    PyObject *obj = plain_decode_from(&in, 0);
    if (obj != NULL && in.p != in.end) {
        Py_DECREF(obj);
        return plain_bad(&in, "has bytes past its end");
    }
    return obj;
}

#endif
