"""The public checks of the CPython tests that ``run_cpython_shm_tests.py`` skips.

``test_shared_memory_basics`` and ``test_shared_memory_name_with_embedded_null``
(``test._test_multiprocessing``) mix documented behaviour with the standard
library's internals (``_make_filename``, ``_name``, ``_flags``, ``_USE_POSIX``),
so the conformance runner cannot run them on shmem. Their documented parts
are here, in CPython's order, and run on both libraries: parity, not a defect.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import pytest
from test_defects import BOTH, stdlib_xfail_if

# gh-115886: the standard library truncated a name at its first NUL (fixed in 3.11.9, 3.12.3).
_NUL_TRUNCATED = sys.version_info < (3, 11, 9) or (3, 12) <= sys.version_info < (3, 12, 3)


@pytest.mark.parametrize("impl", BOTH)
def test_shared_memory_basics_public_part(impl: Any, shm_name: Callable[[], str]) -> None:
    name = shm_name()
    sms = impl.SharedMemory(name, create=True, size=512)
    try:
        assert sms.name == name
        assert sms.size >= 512 and len(sms.buf) >= sms.size
        assert sms.name in str(sms) and str(sms.size) in str(sms)

        sms.buf[0] = 42
        assert sms.buf[0] == 42
        also_sms = impl.SharedMemory(name)
        assert also_sms.buf[0] == 42
        also_sms.close()

        same_sms = impl.SharedMemory(name, size=20 * sms.size)  # size is ignored when attaching
        assert same_sms.size < 20 * sms.size
        same_sms.close()

        with pytest.raises(ValueError):
            impl.SharedMemory(create=True, size=-2)
        with pytest.raises(ValueError):
            impl.SharedMemory(create=False)  # attaching needs a name

        # POSIX shared memory is unlinked once: a second unlink raises FileNotFoundError.
        sms_uno = impl.SharedMemory(shm_name(), create=True, size=5000)
        with pytest.raises(FileNotFoundError):
            try:
                assert sms_uno.size >= 5000
                sms_duo = impl.SharedMemory(sms_uno.name)
                sms_duo.unlink()
                sms_duo.close()
                sms_uno.close()
            finally:
                sms_uno.unlink()

        with pytest.raises(FileExistsError):
            impl.SharedMemory(name, create=True, size=512)
        with pytest.raises(FileNotFoundError):
            impl.SharedMemory(shm_name())
    finally:
        sms.close()
        sms.unlink()

    for bad_size in (-1, 0):
        with pytest.raises(ValueError):
            impl.SharedMemory(create=True, size=bad_size)
    with pytest.raises(ValueError):
        impl.SharedMemory(create=True)  # no size


@pytest.mark.parametrize("impl", stdlib_xfail_if(_NUL_TRUNCATED, "gh-115886: a name is cut at its first NUL"))
def test_shared_memory_name_with_embedded_null_public_part(impl: Any, shm_name: Callable[[], str]) -> None:
    name = shm_name()
    sms = impl.SharedMemory(name, create=True, size=512)
    try:
        with pytest.raises(ValueError):
            impl.SharedMemory(name + "\0a", create=False, size=512)
    finally:
        sms.close()
        sms.unlink()
