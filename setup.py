"""Build configuration beyond pyproject.toml: the optional C fast path.

``optional=True``: where no C compiler is available the package installs
without ``shmem._speedups`` and ShareableList uses its pure-Python path, which
behaves the same, only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("shmem._speedups", ["src/shmem/_speedups.c"], optional=True, extra_compile_args=["-O2"]),
    ],
)
