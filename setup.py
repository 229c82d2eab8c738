"""Build configuration beyond pyproject.toml: the optional C fast paths.

``optional=True``: where no C compiler is available the package installs
without ``shmem._speedups`` (ShareableList), ``shmem._sync`` (Lock, RLock and
the other primitives), ``shmem._queue`` (the queues' ring) and
``shmem._platform._fastpath`` (the create and attach system calls), and they use
their pure-Python paths, which behave the same, only slower.
``SHMEM_REQUIRE_SPEEDUPS=1`` (CI sets it) makes a failed build fail the
installation, and - at run time - a missing or stale build an ImportError
(``shmem._kinds.list_layout``, ``lock_layout``, ``queue_ring``, and
``shmem._platform._linux``).
"""

import os

from setuptools import Extension, setup

REQUIRED = os.environ.get("SHMEM_REQUIRE_SPEEDUPS", "") not in ("", "0")

setup(
    ext_modules=[
        Extension(
            "shmem._speedups",
            ["src/shmem/_speedups.c"],
            optional=not REQUIRED,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
        ),
        Extension(
            "shmem._platform._fastpath",
            ["src/shmem/_platform/_fastpath.c"],
            optional=not REQUIRED,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
        ),
        Extension(
            "shmem._queue",
            ["src/shmem/_queue.c"],
            depends=["src/shmem/_plain.h"],
            optional=not REQUIRED,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
        ),
        Extension(
            "shmem._sync",
            ["src/shmem/_sync.c"],
            optional=not REQUIRED,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
        ),
    ],
)
