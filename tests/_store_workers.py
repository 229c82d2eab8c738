"""Top-level functions for test_store's child processes (spawn and forkserver import them)."""

from __future__ import annotations

import time
from typing import Any

import shmem


def total(ref: Any) -> float:
    return float(shmem.get(ref).sum())


def put_into(store: Any, value: float) -> Any:
    """A worker that puts into a store it received by pickle, and reads the object back."""
    import numpy as np

    ref = store.put(np.full(1000, value))
    return shmem.get(ref).sum()


def hold_view(ref: Any, ready: Any, stop: Any) -> None:
    view = shmem.get(ref)
    ready.put(float(view.sum()))
    stop.wait(60)
    ready.put(float(view.sum()))


def hold_forever(ref_text: str, ready: Any) -> None:
    view = shmem.get(ref_text)
    ready.put(float(view.sum()))
    time.sleep(120)


def fulfil_later(ref: Any, value: float, delay: float) -> None:
    import numpy as np

    time.sleep(delay)
    shmem.fulfil(ref, np.full(1000, value))
