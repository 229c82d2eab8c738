"""Helpers the benchmark scripts share: sizes, units, summaries, cleanup of their own blocks."""

from __future__ import annotations

import os
import statistics
import sys
from typing import Dict, List

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SHM_DIR = "/dev/shm"


def size_label(size: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def parse_size(text: str) -> int:
    """'4096', '4K', '256M', '1G' (binary units)."""
    text, units = text.strip().upper(), {"K": KiB, "M": MiB, "G": GiB}
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)


def fmt_ns(ns: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.0f} ns"


def summarize(samples: List[int]) -> Dict[str, float]:
    """Median, p25, p75 and count of a list of samples."""
    p25, median, p75 = statistics.quantiles(samples * 2 if len(samples) == 1 else samples, n=4, method="inclusive")
    return {"median": median, "p25": p25, "p75": p75, "n": len(samples)}


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def remove_prefixed(prefix: str) -> None:
    """Unlink whatever a run left in /dev/shm: only names with the run's own prefix."""
    for entry in os.listdir(SHM_DIR):
        if entry.startswith(prefix):
            os.unlink(os.path.join(SHM_DIR, entry))
            print(f"cleanup: removed leftover {entry}", file=sys.stderr)
