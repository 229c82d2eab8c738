"""NumPy arrays by name, in one process: creating, attaching, views, dtypes, pickling.

Other processes: ``test_array_processes.py``; hostile headers: ``test_array_header.py``.
"""

from __future__ import annotations

import copy
import gc
import os
import pickle
import subprocess
import sys
import textwrap
from typing import Any, List, Tuple

import pytest
from conftest import PYTHON, SHM_DIR, mapped_with_prefix

import shmem

np = pytest.importorskip("numpy")
arrays = pytest.importorskip("shmem._kinds.array")
array_mappings = pytest.importorskip("shmem._kinds.array_mappings")


# This process's mapping cache outlives a test by design: drop it before the leak guard looks.
pytestmark = pytest.mark.usefixtures("drop_cached_array_mappings")


def _exists(name: str) -> bool:
    return os.path.exists(f"{SHM_DIR}/{name}")


# ---------------------------------------------------------------- creating and attaching


def test_create_functions_return_shared_arrays_on_named_blocks(shm_name) -> None:
    made = [
        (shmem.zeros((3, 4)), np.zeros((3, 4))),
        (shmem.zeros(5, dtype=np.int32), np.zeros(5, dtype=np.int32)),
        (shmem.empty((2, 2), dtype="u1"), None),
        (shmem.full((2, 3), 7), np.full((2, 3), 7)),
        (shmem.full(4, 1.5, dtype=np.float32), np.full(4, 1.5, dtype=np.float32)),
        (shmem.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]])),
        (shmem.array(np.arange(6.0), dtype=np.int16), np.arange(6, dtype=np.int16)),
        (shmem.zeros(3, name=shm_name()), np.zeros(3)),
    ]
    for arr, expected in made:
        assert type(arr) is shmem.SharedArray and isinstance(arr, np.ndarray)
        assert _exists(arr.name)
        if expected is not None:
            assert arr.dtype == expected.dtype and arr.shape == expected.shape
            np.testing.assert_array_equal(arr, expected)
    assert made[-1][0].name.startswith(shm_name()[:-1])
    for arr, _ in made:
        arr.unlink()


def test_taken_name_raises_file_exists_and_keeps_the_block(shm_name) -> None:
    arr = shmem.full(3, 5.0, name=shm_name())
    with pytest.raises(FileExistsError):
        shmem.zeros(10, name=arr.name)
    assert list(shmem.attach_array(arr.name)) == [5.0, 5.0, 5.0]
    arr.unlink()


@pytest.mark.parametrize("order", ["C", "F"])
def test_attach_by_name_alone_gets_dtype_shape_and_order(order: str) -> None:
    source = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    arr = shmem.array(source, order=order)
    seen = shmem.attach_array(arr.name)
    assert (seen.dtype, seen.shape) == (source.dtype, source.shape)
    assert seen.flags.c_contiguous == (order == "C") and seen.flags.f_contiguous == (order == "F")
    np.testing.assert_array_equal(seen, source)
    seen[1, 2, 3] = -1  # the same memory
    assert arr[1, 2, 3] == -1
    arr.unlink()


def test_array_keeps_a_fortran_source_in_fortran_order() -> None:
    arr = shmem.array(np.asfortranarray(np.ones((3, 5))))
    assert arr.flags.f_contiguous and shmem.attach_array(arr.name).flags.f_contiguous
    arr.unlink()


def test_zero_size_array_has_a_one_byte_block() -> None:
    arr = shmem.zeros((0, 3), dtype=np.float64)
    assert arr.size == 0 and array_mappings.use_of(arr).mapping.size == 1
    assert shmem.attach_array(arr.name).shape == (0, 3)
    assert pickle.loads(pickle.dumps(arr[:, 1:])).shape == (0, 2)
    arr.unlink()


def test_scalar_array_shape_is_empty() -> None:
    arr = shmem.full((), 2.5)
    seen = shmem.attach_array(arr.name)
    assert seen.shape == () and seen[()] == 2.5 and type(seen[()]) is np.float64
    seen[()] = 4.0
    assert arr[()] == 4.0 and pickle.loads(pickle.dumps(arr))[()] == 4.0
    arr.unlink()


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: shmem.zeros(-1), ValueError),
        (lambda: shmem.zeros((2, -3)), ValueError),
        (lambda: shmem.zeros((1,) * 65), ValueError),
        (lambda: shmem.zeros(3, order="K"), ValueError),
        (lambda: shmem.zeros(3, name="a/b"), shmem.InvalidName),
        (lambda: shmem.zeros(2.5), TypeError),
        (lambda: shmem.full(3, "not a number", dtype=float), ValueError),
        (lambda: shmem.array([1, "a", None]), TypeError),
    ],
    ids=["negative", "negative-2d", "too-many-dims", "order", "name", "float-shape", "fill-value", "objects"],
)
def test_bad_arguments_raise_and_leave_nothing(call, error) -> None:
    with pytest.raises(error):
        call()
    # the leak guard checks that no block was left behind


def test_attach_unknown_name_raises_file_not_found(shm_name) -> None:
    name = shm_name()
    with pytest.raises(FileNotFoundError, match=name):
        shmem.attach_array(name)


# ---------------------------------------------------------------- views, results, copies


def test_slices_and_views_are_shared_arrays_on_the_same_block() -> None:
    arr = shmem.zeros((6, 8))
    rec = shmem.zeros(4, dtype=[("x", "<f8"), ("y", "<i4")])
    views = [
        arr[1:3],
        arr[:, ::2],
        arr.T,
        arr[::-1, ::-3],
        arr.reshape(48),
        arr.ravel(),
        arr.diagonal(),
        arr.view(np.uint8),
        arr[2],
        arr.astype(np.float64, copy=False),
        arr[..., None],
        arr.squeeze(),
        np.transpose(arr),
        np.split(arr, 2)[1],
        rec["y"],
        rec[1:],
    ]
    for view in views:
        assert type(view) is shmem.SharedArray, view
        assert view.name in (arr.name, rec.name)
    arr.T[7, 5] = 3.0  # writes through a view land in the block
    assert shmem.attach_array(arr.name)[5, 7] == 3.0
    rec["y"][2] = 9
    assert shmem.attach_array(rec.name)[2]["y"] == 9
    arr.unlink()
    rec.unlink()


def test_arithmetic_reductions_and_copies_are_plain_ndarrays() -> None:
    arr = shmem.full((4, 5), 2.0)
    results = [
        arr + 1,
        arr * arr,
        -arr,
        np.sqrt(arr),
        arr == 2,
        arr @ arr.T,
        abs(arr),
        arr.sum(axis=0),
        np.concatenate([arr, arr]),
        np.sort(arr, axis=None),
        np.mean(arr, axis=1),
        arr.copy(),
        copy.copy(arr),
        copy.deepcopy(arr),
        arr.astype(np.int8),
        arr.flatten(),
        np.copy(arr),
        np.cumsum(arr),
        arr.clip(0, 1),
        arr.dot(arr.T),
        arr.take([1, 0]),
        arr.repeat(2),
        arr.argsort(axis=0),
        arr.argmax(axis=1),
        arr.T.reshape(20),
        arr.T.ravel(),
        np.linalg.pinv(arr),
        np.where(arr > 1, arr, 0),
        arr.round(),
        arr.byteswap(),
        np.linalg.inv(arr[:, :4] + np.eye(4)),  # numpy.linalg calls __array_wrap__ from Python
        np.linalg.solve(arr[:, :4] + np.eye(4), arr[:, 0]),
    ]
    for result in results:
        assert type(result) is np.ndarray, result
    for scalar in (arr.sum(), arr.mean(), arr.max(), np.median(arr), arr[1, 2]):
        assert type(scalar) is np.float64
    assert arr.name is not None
    arr.unlink()


def test_in_place_operations_keep_the_shared_array() -> None:
    arr = shmem.zeros(5)
    same = arr
    arr += 1
    assert arr is same and type(arr) is shmem.SharedArray
    out = np.multiply(arr, 3, out=arr)
    assert out is arr and list(shmem.attach_array(arr.name)) == [3.0] * 5
    np.add(arr[:2], 1, out=arr[3:])
    assert list(arr) == [3.0, 3.0, 3.0, 4.0, 4.0]
    assert arr.astype(np.float64, copy=False) is arr
    arr.unlink()


def test_an_array_that_is_not_on_the_block_has_no_name_and_pickles_as_data() -> None:
    """Whatever NumPy path still makes a SharedArray with memory of its own
    (fancy indexing, which NumPy types as the array indexed; ndarray's own
    methods called past the subclass) gives one that is not shared: no name,
    and it pickles as the data it holds."""
    arr = shmem.array(np.arange(12.0).reshape(3, 4))
    others = (
        arr[[0, 2]],
        arr[arr > 1],
        arr[:, [True, False, True, False]],
        np.ndarray.copy(arr),
        np.ndarray.take(arr, [2, 0]),
        np.ndarray.argsort(arr, axis=0),
    )
    for other in others:
        assert type(other) is shmem.SharedArray and other.name is None
        back = pickle.loads(pickle.dumps(other))
        assert type(back) is np.ndarray
        np.testing.assert_array_equal(back, other)
        with pytest.raises(ValueError, match="not on a shared memory block"):
            other.unlink()
    arr.unlink()


def test_shared_array_cannot_be_constructed_directly() -> None:
    with pytest.raises(TypeError, match="shmem.zeros"):
        shmem.SharedArray((3,))


# ---------------------------------------------------------------- dtypes

FIXED_SIZE_DTYPES = [
    "?",
    "i1",
    "u1",
    "i2",
    "u2",
    "i4",
    "u4",
    "i8",
    "u8",
    ">i8",
    "f2",
    "f4",
    "f8",
    ">f8",
    "g",
    "c8",
    "c16",
    "G",
    "M8[ns]",
    "M8[D]",
    "M8",
    "m8[us]",
    "M8[25s]",
    "S7",
    "U5",
    ">U3",
    "V6",
    [("x", "<f8"), ("y", "<i2"), ("name", "U4")],
    [("when", "M8[ms]"), ("grid", "<f4", (2, 3)), ("inner", [("a", "u1"), ("b", ">c8")])],
    np.dtype([("a", "u1"), ("b", "<f8")], align=True),
    np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [0, 0], "itemsize": 12}),  # a union
    np.dtype([(("the title", "t"), "<f4")]),
]


def _sample(dtype: np.dtype, n: int = 6) -> np.ndarray:
    raw = np.frombuffer(os.urandom(dtype.itemsize * n), dtype=np.uint8).view(dtype)
    clean = np.zeros(n, dtype)  # padding between fields is not copied: keep it zero, as in a new block
    np.copyto(clean, raw)
    return clean


@pytest.mark.parametrize("dtype", FIXED_SIZE_DTYPES, ids=str)
def test_every_fixed_size_dtype_round_trips(dtype) -> None:
    dtype = np.dtype(dtype)
    source = _sample(dtype)
    arr = shmem.array(source)
    seen = shmem.attach_array(arr.name)
    unpickled = pickle.loads(pickle.dumps(arr[::2]))
    assert seen.dtype == arr.dtype == source.dtype
    assert seen.tobytes() == source.tobytes()
    view = arr[::2]  # in this process: the very same memory, same layout
    assert unpickled.__array_interface__ == view.__array_interface__ and unpickled.dtype == view.dtype
    arr.unlink()


@pytest.mark.parametrize(
    "dtype",
    [object, [("a", "<f8"), ("b", object)], [("outer", [("inner", "O")])], ("O", (2,))]
    + ([np.dtypes.StringDType()] if hasattr(np, "dtypes") and hasattr(np.dtypes, "StringDType") else []),
    ids=str,
)
def test_object_dtypes_are_refused_on_create(dtype) -> None:
    for call in (
        lambda: shmem.zeros(3, dtype=dtype),
        lambda: shmem.empty(3, dtype=dtype),
        lambda: shmem.full(3, 0, dtype=dtype),
        lambda: shmem.array(np.zeros(3, dtype=dtype)),
    ):
        with pytest.raises(TypeError) as info:
            call()
        assert isinstance(info.value, shmem.ShmemError)
    # nothing was created: the leak guard checks


def test_unsized_dtype_is_refused_with_advice() -> None:
    with pytest.raises(TypeError, match="give one"):
        shmem.zeros(3, dtype="S")


# ---------------------------------------------------------------- pickling


def test_pickle_is_a_small_handle_whatever_the_size() -> None:
    arr = shmem.zeros((4096, 2048))  # 64 MiB
    rec = shmem.zeros((100,), dtype=[("x", "<f8"), ("y", "U8")])
    for view in (arr, arr[::-1], arr[10:20, ::7], arr.T, arr[3], arr[3, 4:4], rec["y"], rec[5:]):
        data = pickle.dumps(view, protocol=pickle.HIGHEST_PROTOCOL)
        assert len(data) < 1024, (len(data), view.shape)
    arr.unlink()
    rec.unlink()


def test_pickle_round_trips_any_view_onto_the_same_memory() -> None:
    arr = shmem.array(np.arange(60.0).reshape(6, 10))
    rec = shmem.array(np.zeros(5, dtype=[("x", "<f8"), ("y", "<i2")]))
    views = [
        arr,
        arr[::-1],
        arr[:, ::-3],
        arr[1:5:2, 8:1:-2],
        arr.T,
        arr.T[::-1],
        arr[4],
        arr[2, 3:3],
        arr.view(np.uint8)[:, 5:40],
        arr.reshape(3, 20)[1],
        rec["y"],
        rec[::-2],
    ]
    for view in views:
        back = pickle.loads(pickle.dumps(view))
        assert type(back) is shmem.SharedArray and back.name == view.name
        assert (back.shape, back.strides, back.dtype) == (view.shape, view.strides, view.dtype)
        np.testing.assert_array_equal(back, view)
        if back.size:
            assert np.shares_memory(back, view)
    back = pickle.loads(pickle.dumps(arr[:, ::-3]))
    back[0, 0] = -5.0  # arr[0, 9]
    assert arr[0, 9] == -5.0
    arr.unlink()
    rec.unlink()


def test_unpickling_a_removed_block_raises_file_not_found_naming_it() -> None:
    arr = shmem.zeros(10)
    data = pickle.dumps(arr[2:5])
    arr.unlink()
    with pytest.raises(FileNotFoundError, match=arr.name):
        pickle.loads(data)
    arr[0] = 1.0  # the arrays already mapped keep working


def test_unpickling_when_the_name_belongs_to_another_block_raises(shm_name) -> None:
    name = shm_name()
    old = shmem.zeros(10, name=name)
    data = pickle.dumps(old)
    old.unlink()
    new = shmem.zeros(10, name=name)
    with pytest.raises(FileNotFoundError, match="another block"):
        pickle.loads(data)
    new.unlink()


def test_forged_handles_are_refused() -> None:
    arr = shmem.zeros(10)
    rebuild, (name, block_id, *_) = arr.__reduce_ex__(pickle.HIGHEST_PROTOCOL)  # what pickle would call
    with pytest.raises(TypeError):  # objects from shared memory
        rebuild(name, block_id, 0, (2,), (8,), np.dtype(object), False, True)
    with pytest.raises(shmem.CorruptSegment, match="outside the block"):
        rebuild(name, block_id, 64, (4,), (8,), np.dtype("f8"), False, True)
    with pytest.raises(shmem.CorruptSegment, match="outside the block"):
        rebuild(name, block_id, 0, (4,), (-8,), np.dtype("f8"), False, True)
    with pytest.raises(shmem.CorruptSegment, match="NumPy refuses"):  # NumPy: "array is too big"
        rebuild(name, block_id, 0, (0, 1 << 40, 1 << 40), (8, 8, 8), np.dtype("f8"), False, True)
    arr.unlink()


# ---------------------------------------------------------------- read-only, unlink, lifetime


def test_readonly_attach_maps_read_only() -> None:
    arr = shmem.zeros(4)
    seen = shmem.attach_array(arr.name, readonly=True)
    assert not seen.flags.writeable
    with pytest.raises(ValueError):
        seen[0] = 1.0
    with pytest.raises(ValueError):
        seen.flags.writeable = True
    with pytest.raises(ValueError):
        seen[1:] += 1
    back = pickle.loads(pickle.dumps(seen[1:]))  # stays read-only when passed on
    assert not back.flags.writeable
    arr[0] = 2.0
    assert seen[0] == 2.0
    arr.unlink()


def test_unlink_from_any_view_removes_the_name_once() -> None:
    arr = shmem.zeros(4)
    name = arr.name
    arr[1:3].unlink()
    assert not _exists(name)
    with pytest.raises(FileNotFoundError):
        arr.unlink()
    with pytest.raises(FileNotFoundError):
        shmem.attach_array(name)
    arr[:] = 1.0  # still mapped
    assert arr.sum() == 4.0


def test_mapping_is_released_with_the_last_view(shm_prefix: str) -> None:
    arr = shmem.zeros(1000)
    view = arr[10:20]
    name = arr.name
    del arr
    gc.collect()
    view[:] = 3.0
    assert mapped_with_prefix(shm_prefix)
    assert list(shmem.attach_array(name, readonly=True)[10:12]) == [3.0, 3.0]
    view.unlink()
    del view
    array_mappings.drop_cached_mappings()
    gc.collect()
    assert mapped_with_prefix(shm_prefix) == []


VIEWS_OUTLIVE_HANDLES = textwrap.dedent(
    r"""
    import gc, json, sys
    import numpy as np
    import shmem
    from shmem._kinds import array_mappings

    def mapped(name):
        with open("/proc/self/maps") as f:
            return sum(line.rstrip().endswith("/dev/shm/" + name) for line in f)

    arr = shmem.zeros((100, 100))
    name = arr.name
    keep = [arr[5:10], arr.T[::-3], np.asarray(arr)[7], arr.view(np.uint8)[100:200], arr.view(np.ndarray)]
    other = shmem.attach_array(name)
    keep.append(other[::-1])
    del arr, other
    array_mappings.drop_cached_mappings()
    for _ in range(3):
        gc.collect()
    for i, view in enumerate(keep):      # every view still reads and writes the block
        view[...] = i
        assert (view == i).all()
    shm = shmem.SharedMemory(name)       # and the writes are in the block
    shm.close()
    out = {"mapped_while_views": mapped(name)}
    shmem.attach_array(name).unlink()
    del keep, view
    array_mappings.drop_cached_mappings()
    gc.collect()
    out["mapped_after"] = mapped(name)
    print(json.dumps(out))
    """
)


def test_views_outliving_every_handle_never_crash() -> None:
    """No BufferError, no segfault: the mapping lives as long as any view, in a
    separate interpreter so that a crash shows as a returncode."""
    run = subprocess.run([PYTHON, "-c", VIEWS_OUTLIVE_HANDLES], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = __import__("json").loads(run.stdout)
    assert out["mapped_while_views"] >= 1 and out["mapped_after"] == 0


WITHOUT_NUMPY = textwrap.dedent(
    """
    import sys
    sys.modules["numpy"] = None          # as if NumPy were not installed
    import shmem
    shm = shmem.SharedMemory(create=True, size=10)
    shm.close(); shm.unlink()
    for attempt in ("shmem.zeros(3)", "shmem.SharedArray", "shmem.attach_array('x')"):
        try:
            eval(attempt)
        except ImportError as err:
            assert "pip install numpy" in str(err), err
        else:
            raise AssertionError(attempt + " worked without NumPy")
    from shmem import SharedMemory       # the core never needs it
    print("ok")
    """
)


def test_without_numpy_import_works_and_arrays_say_how_to_install() -> None:
    run = subprocess.run([PYTHON, "-c", WITHOUT_NUMPY], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_numpy_is_imported_only_by_the_array_module() -> None:
    code = "import sys, shmem; shmem.SharedMemory; print('numpy' in sys.modules)"
    run = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.strip() == "False"
    assert sys.modules.get("shmem._kinds.array") is not None


def test_import_shmem_leaves_out_the_slow_standard_modules() -> None:
    """`import shmem` is most of a fresh process's first put (issue 14: <= 10 ms, import
    included). These were imported for one call each and cost about a third of it:
    dataclasses (and inspect) for GcReport, platform for machine(), ctypes.util (and
    subprocess, tempfile, shutil) for the pure-Python path only, random for one number; and
    every kind's layout (sync_wait and lock_layout among them) for `shmem ls` alone."""
    slow = ("dataclasses", "inspect", "platform", "ctypes.util", "subprocess", "random", "shmem._kinds.sync_wait")
    code = f"import sys, shmem; print(sorted(m for m in {slow!r} if m in sys.modules))"
    run = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.strip() == "[]"
    # shmem.put takes the plain codec from queue_plain, not the queue (a third of a first put).
    code = "import sys, shmem; r = shmem.put({'a': [1, 2.0]}); print('shmem._kinds.queue_ring' in sys.modules)"
    run = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.strip() == "False"


def test_threads_unpickling_at_once_share_one_mapping() -> None:
    import threading

    arr = shmem.zeros((64, 16), track=False)
    data = [pickle.dumps(arr[i]) for i in range(64)]
    received = []
    array_mappings.drop_cached_mappings()  # so that the threads race to attach (the creator's own mapping aside)

    def receive() -> None:
        received.extend(pickle.loads(d) for d in data)

    threads = [threading.Thread(target=receive) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(received) == 8 * 64
    uses = [array_mappings.use_of(r) for r in received]
    assert len({id(u.mapping) for u in uses}) == 1
    assert all(u.lease is None for u in uses)  # track=False travels with the handle
    arr.unlink()


@pytest.mark.parametrize("make", ["full", "array"])
@pytest.mark.usefixtures("python_platform")  # os.pwrite is called, not bypassed in C
def test_contents_are_written_before_the_block_is_published(make: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """full() and array() fill the block before it gets its name: an attacher that
    knows the name never sees the array half filled."""
    from shmem import _platform

    events: List[Tuple[str, int]] = []
    real_write, real_publish = os.pwrite, _platform.publish

    def recording_write(fd: int, data: Any, offset: int) -> int:
        events.append(("write", offset))
        return real_write(fd, data, offset)

    def recording_publish(fd: int, name: str) -> None:
        events.append(("publish", 0))
        real_publish(fd, name)

    monkeypatch.setattr(os, "pwrite", recording_write)
    monkeypatch.setattr(_platform, "publish", recording_publish)
    arr = shmem.full((1000,), 3.0) if make == "full" else shmem.array(np.arange(1000.0))
    try:
        published_at = events.index(("publish", 0))
        data_writes = [i for i, (what, offset) in enumerate(events) if what == "write" and offset < arr.nbytes]
        assert data_writes and max(data_writes) < published_at
    finally:
        arr.unlink()
