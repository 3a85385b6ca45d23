"""Keep glibc's ``malloc`` from handing memory back to the OS between Hessian-vector products.

A product on the CPU allocates and frees hundreds of MB of temporaries (a ResNet-20 product on
a batch of 128: activations of 8 MB each, dozens of them). With glibc's defaults, blocks over
the mmap threshold are mapped and unmapped every time, and freed heap memory above 128 KB is
trimmed, so every product page-faults its memory back in (zeroed by the kernel); the cost in
system time is measured by ``benchmarks/allocator.py`` (BENCHMARKS.md §4). PyTorch's CPU
performance guide recommends jemalloc or tcmalloc for the same reason; these three ``mallopt``
settings get the effect without a preloaded library.

The settings apply to the whole process, so the library never makes them by itself: the
``hesd`` command line calls :func:`tune_cpu_allocator` at start-up (``HESD_TUNE_ALLOCATOR=0``
turns that off), and a script can call it. The cost is memory that stays with the process
after it is freed, up to the peak of one product, instead of returning to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["release_free_memory", "tune_cpu_allocator"]

# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # trim the heap only when this much is free at its top (mallopt's largest int)
TOP_PAD = 512 * 2**20  # grow the heap in steps of this much


def tune_cpu_allocator() -> bool:
    """Set glibc's ``malloc`` to keep freed memory for the next Hessian-vector product.

    Sets ``M_MMAP_THRESHOLD`` to 32 MiB (blocks up to that size come from the heap, not from a
    fresh ``mmap`` each time), ``M_TRIM_THRESHOLD`` to 2 GiB (the largest ``mallopt`` takes)
    and ``M_TOP_PAD`` to 512 MiB (the heap is not trimmed after each product and grows in
    large steps). These are process-wide settings, equivalent to the environment variables
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647
    MALLOC_TOP_PAD_=536870912``.

    Returns:
        ``True`` if all three settings were accepted; ``False`` where there is no glibc
        (macOS, Windows, musl), where nothing is changed.

    Examples:
        >>> import hesd
        >>> isinstance(hesd.tune_cpu_allocator(), bool)
        True
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TOP_PAD, TOP_PAD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    ok = True
    for param, value in settings:
        ok = bool(mallopt(param, value)) and ok
    return ok


def release_free_memory() -> bool:
    """Hand memory that ``malloc`` holds but no tensor uses back to the OS (glibc ``malloc_trim(0)``).

    The memory planner calls it after its one-batch probe (:mod:`hesd.operators.footprint`), so
    that the probe's freed buffers do not stay resident beside the analysis that follows.

    Returns:
        ``True`` if memory was released; ``False`` where there is no glibc or nothing to release.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
