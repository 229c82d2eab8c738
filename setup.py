"""Build configuration beyond pyproject.toml: the optional C fast path.

``optional=True``: where no C compiler is available the package installs
without ``shmem._speedups`` and ShareableList uses its pure-Python path, which
behaves the same, only slower. ``SHMEM_REQUIRE_SPEEDUPS=1`` (CI sets it) makes
a failed build fail the installation, and - at run time - a missing or stale
build an ImportError (``shmem._kinds.list_layout``).
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
    ],
)
