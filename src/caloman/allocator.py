"""Keep freed memory inside the process, so that generation reuses its large temporaries.

Generating 10,000 dataset-1 showers makes about a hundred temporary arrays of 1.5 to 30 MB
per call (voxel noise, readout). glibc's malloc hands blocks that large back to the system
when they are freed (``mmap`` above a threshold, and trimming of the heap's top), so the
next call faults every page in again: on the development machine that was a quarter of the
sampler's time at batch 10,000 (docs/caloman-model.md, "Speed design"). Raising both
thresholds keeps the freed blocks for reuse; the process's peak memory is unchanged, but
its resident memory no longer shrinks after the peak. This is a tuning of the C library,
which no Python package exposes, hence a few lines of ``ctypes`` here; jemalloc or tcmalloc
(``LD_PRELOAD``) do the same for a whole program.

The generating commands (``generate``, ``benchmark``, ``demo``, ``refine``) call
:func:`keep_freed_memory` at start; a library user can call it too. Set
``CALOMAN_KEEP_FREED_MEMORY=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["KEPT_BLOCK_BYTES", "keep_freed_memory", "allocator_setting"]

#: Blocks up to this size come from (and return to) the heap, and the heap is trimmed only
#: when this much is free at its top (glibc's own defaults: at most 32 MiB and dynamic).
KEPT_BLOCK_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_applied = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`KEPT_BLOCK_BYTES` (once per
    process). Returns whether the setting is in force: False on other C libraries and
    platforms, or with ``CALOMAN_KEEP_FREED_MEMORY=0``."""
    global _applied
    if _applied:
        return True
    if os.environ.get("CALOMAN_KEEP_FREED_MEMORY", "1") == "0" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                   KEPT_BLOCK_BYTES))
    return _applied


def allocator_setting() -> str:
    """For reports: how this process's allocator was set up."""
    if _applied:
        return f"glibc malloc, freed blocks kept (mmap and trim thresholds {KEPT_BLOCK_BYTES} bytes)"
    return "default"
