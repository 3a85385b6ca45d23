"""Keep glibc's ``malloc`` from handing memory back to the OS between Hessian-vector products.

A product on the CPU allocates and frees hundreds of MB of temporaries (a ResNet-20 product on
a batch of 128: activations of 8 MB each, dozens of them). With glibc's defaults, blocks over
the mmap threshold are mapped and unmapped every time, and freed heap memory above 128 KB is
trimmed, so every product page-faults its memory back in (zeroed by the kernel); the cost in
system time is measured by ``benchmarks/allocator.py`` (BENCHMARKS.md §4). glibc caps the mmap
threshold at 32 MiB, so a large model's buffers — a gradient-sized vector of a 124 M-parameter
model is 0.5 GB, its activations hundreds of MB — are mapped afresh whatever the threshold;
only forbidding ``mmap`` for ordinary allocations (``M_MMAP_MAX = 0``) puts them on the heap,
where the next product reuses them (BENCHMARKS.md §9). PyTorch's CPU performance guide
recommends jemalloc or tcmalloc for the same reason; these four ``mallopt`` settings get the
effect without a preloaded library.

The settings apply to the whole process, so the library never makes them by itself: the
``hesd`` command line calls :func:`tune_cpu_allocator` at start-up (``HESD_TUNE_ALLOCATOR=0``
turns that off), and a script can call it. The cost is memory that stays with the process
after it is freed, up to the peak of one product, instead of returning to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
import sys

import torch

__all__ = [
    "HUGE_PAGES",
    "RELEASE_BEFORE_BYTES",
    "basis_buffer",
    "environment",
    "host_available",
    "release_before",
    "release_free_memory",
    "release_when_low",
    "tune_cpu_allocator",
]

# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = -1  # never trim the heap by itself (mallopt(3): -1 disables trimming); release_free_memory does
TRIM_THRESHOLD_ENV = str(2**64 - 1)  # the same through the environment (SIZE_MAX: no free top is that large)
TOP_PAD = 512 * 2**20  # grow the heap in steps of this much
MMAP_MAX = 0  # no block is mmapped by malloc (glibc still maps where the heap cannot grow)
MMAP_MAX_DEFAULT = 65536  # glibc's own (DEFAULT_MMAP_MAX)

#: host allocations at least this large are preceded by :func:`release_free_memory` (:func:`release_before`),
#: or mapped on their own (:func:`basis_buffer`)
RELEASE_BEFORE_BYTES = 256 * 2**20

#: whether :func:`basis_buffer` asks for transparent huge pages by default (``HESD_HUGE_PAGES=1`` in the environment)
HUGE_PAGES = os.environ.get("HESD_HUGE_PAGES", "0") == "1"


def tune_cpu_allocator(reuse_large: bool = True) -> bool:
    """Set glibc's ``malloc`` to keep freed memory for the next Hessian-vector product.

    Sets ``M_MMAP_THRESHOLD`` to 32 MiB (blocks up to that size come from the heap, not from a
    fresh ``mmap`` each time), ``M_TRIM_THRESHOLD`` to -1 (glibc never trims the heap by itself:
    with a threshold of 2 GiB, the largest positive value ``mallopt`` takes, a 124 M-parameter
    product that freed more than that at the heap's top had it trimmed and faulted it back in
    on the next product — 7.8 M page faults and 58 s of system time in one 30-product top-1,
    BENCHMARKS.md §9), ``M_TOP_PAD`` to 512 MiB (the heap grows in large steps) and, with
    ``reuse_large``, ``M_MMAP_MAX`` to 0: no block, however large, gets a ``mmap`` of its own, so
    a large model's buffers are reused too (glibc still maps memory where the heap cannot grow,
    as for a thread's arena). ``reuse_large=False`` puts
    ``M_MMAP_MAX`` back to glibc's default. These are process-wide settings, equivalent to the
    environment variables of :func:`environment`. Freed memory then stays with the process, up
    to the peak of the analysis, and the heap can fragment: with large buffers reused, GPT-2
    small under a 10 GiB plan peaked 1.2 GiB higher in resident memory (BENCHMARKS.md §9), which
    is why the command line reuses large buffers only when no ``--max-memory`` is given.
    :func:`release_free_memory` hands freed memory back.

    Args:
        reuse_large: also serve blocks above 32 MiB from the heap (``M_MMAP_MAX = 0``).

    Returns:
        ``True`` if all four settings were accepted; ``False`` where there is no glibc
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
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_MMAP_MAX, MMAP_MAX if reuse_large else MMAP_MAX_DEFAULT),
                (_M_TOP_PAD, TOP_PAD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))  # fmt: skip
    ok = True
    for param, value in settings:
        ok = bool(mallopt(param, value)) and ok
    return ok


def environment(reuse_large: bool = True) -> dict[str, str]:
    """The environment variables that give :func:`tune_cpu_allocator`'s settings to a process from its start.

    For processes that hesd does not start itself (a benchmark's other tools, a job script).

    Args:
        reuse_large: as for :func:`tune_cpu_allocator`.

    Examples:
        >>> from hesd.allocator import environment
        >>> environment()["MALLOC_MMAP_MAX_"]
        '0'
    """
    mmap_max = MMAP_MAX if reuse_large else MMAP_MAX_DEFAULT
    return {"MALLOC_MMAP_MAX_": str(mmap_max), "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
            "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD_ENV, "MALLOC_TOP_PAD_": str(TOP_PAD)}  # fmt: skip


def release_free_memory() -> bool:
    """Hand memory that ``malloc`` holds but no tensor uses back to the OS (glibc ``malloc_trim(0)``).

    The memory planner calls it after its one-batch probe (:mod:`hesd.operators.footprint`), so
    that the probe's freed buffers do not stay resident beside the analysis that follows, the
    Lanczos algorithms before they map a large basis (:func:`basis_buffer`), and
    :class:`hesd.HessianOperator` when the host runs low (:func:`release_when_low`).

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


def release_before(nbytes: int, device: torch.device | str) -> bool:
    """:func:`release_free_memory` before allocating ``nbytes`` on the host, if that is a large block.

    With large buffers reused (:func:`tune_cpu_allocator`), the memory a phase of an analysis
    freed — the products and first-order passes before it — stays resident, cut into the blocks
    that phase used. A large block allocated next from the heap rarely fits those holes, so it is
    placed above them and resident memory grows by the whole block on top of the last phase's
    peak: GPT-2 small's top-1 after the other measurements went from 7.29 to 14.22 GiB under an
    8.5 GiB plan when its basis came from the heap (BENCHMARKS.md §9; hesd's bases now come from
    :func:`basis_buffer`, which releases first too). Handing the freed memory back first costs
    one page fault per page that later allocations touch again. Allocations below
    :data:`RELEASE_BEFORE_BYTES`, and any on a GPU, are left alone.

    Args:
        nbytes: the size of the allocation that follows.
        device: where it is made.

    Returns:
        whether memory was released.

    Examples:
        >>> from hesd.allocator import release_before
        >>> release_before(1024, "cpu")  # small: nothing done
        False
    """
    if not _large_on_host(nbytes, device):
        return False
    return release_free_memory()


def _large_on_host(nbytes: int, device: torch.device | str) -> bool:
    """Whether an allocation of ``nbytes`` is on the CPU and at least :data:`RELEASE_BEFORE_BYTES`."""
    return torch.device(device).type == "cpu" and nbytes >= RELEASE_BEFORE_BYTES


def host_available() -> int | None:
    """Bytes the host can still give (``MemAvailable`` in ``/proc/meminfo``, as ``free`` counts), or ``None``."""
    try:
        with open("/proc/meminfo") as f:  # Linux: MemAvailable counts reclaimable caches
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        pass
    return None


def release_when_low(reserve: int | None) -> bool:
    """:func:`release_free_memory` if the host has less than ``reserve`` bytes available.

    :class:`hesd.HessianOperator` calls it before each product with its ``host_reserve``, which a
    memory plan sets to one product's transient peak (before the first product, plus the graphs
    the operator may keep): the product must find that much. With
    large buffers reused (:func:`tune_cpu_allocator`), freed blocks stay resident and the heap
    fragments (a small allocation cut from a freed vector-sized block leaves the rest too small
    for the next vector, which is then placed above it): at 40 M parameters resident memory grew
    20 % beyond a plan that PyTorch's allocations matched, and at 124 M, under a plan for the
    memory the machine had free, until less than 0.5 GiB was left (BENCHMARKS.md §9). Handing the
    free blocks back costs faulting in again what the next product reuses, so it is done only
    when memory runs low, not to hold a budget (the command line maps large buffers afresh when
    a budget is given).

    Args:
        reserve: bytes that must stay available (``None``: nothing done).

    Returns:
        whether memory was released.

    Examples:
        >>> from hesd.allocator import release_when_low
        >>> release_when_low(None), release_when_low(0)
        (False, False)
    """
    if reserve is None:
        return False
    available = host_available()
    if available is None or available >= reserve:
        return False
    return release_free_memory()


def basis_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, *, huge_pages: bool | None = None
) -> torch.Tensor:
    """An uninitialised tensor for a Krylov basis: on the host, if large, in memory mapped for it alone.

    A basis lives through a whole algorithm while the products beside it allocate and free their
    buffers. On glibc's heap, with large buffers reused (:func:`tune_cpu_allocator`), it rarely
    fits the holes the previous phase left, so it was placed above them and resident memory grew
    by the whole basis on top of that phase's peak. Here the freed heap memory is handed back
    first (:func:`release_free_memory`: the holes of earlier phases do not stay resident beside
    the basis; the next products fault in again what they reuse), and the basis is mapped on its
    own (anonymous ``mmap``): it cannot split the heap's holes, and its memory leaves the process
    with the tensor. GPT-2 small's top eigenvalue after the other measurements: BENCHMARKS.md §9.

    Transparent huge pages (``MADV_HUGEPAGE``) are asked for only with ``huge_pages`` (default
    :data:`HUGE_PAGES`: off, ``HESD_HUGE_PAGES=1`` turns it on). They make a first touch fault
    once per 2 MiB instead of once per 4 KiB, but each fault must find a free 2 MiB block, and
    where the kernel has none at hand it compacts memory (or a VM's host backs the block) on the
    spot, which cost GPT-2 small's top eigenvalue more time than the faults saved (BENCHMARKS.md
    §9). The vectors are streamed, not gathered, so their passes gained nothing from the larger
    pages there.

    Blocks under :data:`RELEASE_BEFORE_BYTES`, any device but the CPU, and systems without
    anonymous ``mmap`` get :func:`torch.empty` (and nothing is released), as does a mapping the
    kernel refuses.

    Args:
        shape: the tensor's shape.
        dtype: its dtype.
        device: its device.
        huge_pages: ask for transparent huge pages (``None``: :data:`HUGE_PAGES`).

    Returns:
        a contiguous tensor whose entries are not initialised (pages are zero until written).

    Examples:
        >>> import torch
        >>> from hesd.allocator import basis_buffer
        >>> basis_buffer((3, 4), torch.float32, "cpu").shape
        torch.Size([3, 4])
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if not _large_on_host(nbytes, device) or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(shape, dtype=dtype, device=device)
    release_free_memory()
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # refused by the kernel: PyTorch's allocator tries, and says so in its own words if it fails
        return torch.empty(shape, dtype=dtype, device=device)
    if (HUGE_PAGES if huge_pages is None else huge_pages) and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # pragma: no cover - a kernel without transparent huge pages
            pass
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor holds the mapping; freed with it
