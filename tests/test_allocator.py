"""hesd.tune_cpu_allocator: glibc's malloc settings, and where they cannot be made."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import hesd
from hesd import allocator as _allocator
from hesd.interfaces.cli import app

# In a fresh process (the settings are process-wide): four buffers of 64 MiB filled and freed
# together, five times, the last round's minor page faults printed. With glibc's defaults each
# buffer is mapped afresh every time (65 536 pages to fault in); tuned, the last round reuses the
# memory of the rounds before (a product allocates and frees its buffers the same way); tuned with
# reuse_large=False ("small"), buffers above 32 MiB are mapped afresh again.
_REFILL = """
import resource, sys, torch
import hesd
if sys.argv[1] != "defaults":
    assert hesd.tune_cpu_allocator() is True
    assert hesd.tune_cpu_allocator(reuse_large=sys.argv[1] == "tune") is True  # the last call decides
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.empty(2**24 + k * 1024).fill_(1.0) for k in range(4)]
    del xs
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_settings_are_accepted_and_large_buffers_are_reused_on_glibc():
    faults = {how: int(subprocess.run([sys.executable, "-c", _REFILL, how], capture_output=True, text=True,
                                      check=True).stdout.split()[-1])
              for how in ("defaults", "tune", "small")}  # fmt: skip
    pages = 2**26 * 4 // 4096
    assert faults["defaults"] >= pages // 2  # mapped afresh (huge pages would fault less)
    assert faults["tune"] < pages // 50, faults  # from the heap, already resident
    assert faults["small"] >= pages // 2, faults  # reuse_large=False: large buffers mapped afresh again
    assert _allocator.MMAP_THRESHOLD == 32 * 2**20 and _allocator.TRIM_THRESHOLD == -1
    assert _allocator.MMAP_MAX == 0


def test_no_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert hesd.tune_cpu_allocator() is False
    monkeypatch.setattr(sys, "platform", "linux")

    def no_libc(*args, **kwargs):
        raise OSError("no libc")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert hesd.tune_cpu_allocator() is False


def test_a_refused_setting_is_reported(monkeypatch):
    class Mallopt:  # stands in for libc.mallopt: refuses the mmap threshold
        def __init__(self):
            self.calls = []
            self.values = {}

        def __call__(self, param, value):
            self.calls.append(param)
            self.values[param] = value
            return 0 if param == _allocator._M_MMAP_THRESHOLD else 1

    class Libc:
        mallopt = Mallopt()

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc())
    assert hesd.tune_cpu_allocator() is False
    assert sorted(Libc.mallopt.calls) == sorted(
        [_allocator._M_MMAP_THRESHOLD, _allocator._M_MMAP_MAX, _allocator._M_TOP_PAD, _allocator._M_TRIM_THRESHOLD]
    )
    assert Libc.mallopt.values[_allocator._M_MMAP_MAX] == 0
    hesd.tune_cpu_allocator(reuse_large=False)
    assert Libc.mallopt.values[_allocator._M_MMAP_MAX] == _allocator.MMAP_MAX_DEFAULT


@pytest.mark.parametrize(("env", "expected"), [(None, 1), ("1", 1), ("0", 0), ("off", 0)])
def test_command_line_tunes_unless_told_not_to(monkeypatch, tmp_path, env, expected):
    calls = []
    monkeypatch.setattr(_allocator, "tune_cpu_allocator", lambda *a: calls.append(a) or True)
    if env is None:
        monkeypatch.delenv("HESD_TUNE_ALLOCATOR", raising=False)
    else:
        monkeypatch.setenv("HESD_TUNE_ALLOCATOR", env)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code != 0  # no results there: the command fails, after the start-up
    assert len(calls) == expected


# In a fresh process with large buffers reused: 256 MiB filled and freed stay resident; release_before a
# large allocation gives them back, one below RELEASE_BEFORE_BYTES does not. Prints resident MiB after each.
_RELEASE = """
import sys, torch
import hesd
from hesd.allocator import RELEASE_BEFORE_BYTES, release_before
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
assert hesd.tune_cpu_allocator() is True
xs = [torch.empty(2**24).fill_(1.0) for _ in range(4)]
del xs
out = [rss()]
assert release_before(RELEASE_BEFORE_BYTES - 1, "cpu") is False
out.append(rss())
assert release_before(RELEASE_BEFORE_BYTES, "cpu") is True
out.append(rss())
print(*out)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux-only")
def test_release_before_a_large_allocation_hands_freed_memory_back():
    held, small, released = map(float, subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True,
                                                      text=True, check=True).stdout.split())  # fmt: skip
    assert small > held - 16  # a small allocation follows: nothing released
    assert released < held - 200, (held, small, released)  # the 256 MiB freed are no longer resident


def test_release_before_leaves_gpu_and_small_allocations_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(_allocator, "release_free_memory", lambda: calls.append(1) or True)
    assert _allocator.release_before(2**40, "meta") is False
    assert _allocator.release_before(_allocator.RELEASE_BEFORE_BYTES - 1, "cpu") is False
    assert calls == []
    assert _allocator.release_before(_allocator.RELEASE_BEFORE_BYTES, "cpu") is True and calls == [1]


@pytest.mark.parametrize("algorithm", ["eigenvalues", "slq"])
def test_krylov_bases_come_from_basis_buffer(monkeypatch, algorithm):
    """Both Lanczos methods take their basis from hesd.allocator.basis_buffer, with its shape and dtype."""
    import importlib

    eigen, basis = (importlib.import_module(f"hesd.algorithms.{m}") for m in ("eigen", "basis"))
    asked: list[tuple] = []

    def spy(shape, dtype, device):
        asked.append((tuple(shape), dtype))
        return _allocator.basis_buffer(shape, dtype, device)

    for module in (eigen, basis):
        monkeypatch.setattr(module, "basis_buffer", spy)
    A = torch.diag(torch.linspace(-1.0, 2.0, 50, dtype=torch.float64))
    if algorithm == "eigenvalues":
        r = hesd.eigenvalues(A, k=1, max_basis=8)
        assert asked == [((9, 50), torch.float64)]  # the basis and the next vector
        assert abs(float(r.eigenvalues[0]) - 2.0) < 1e-10
    else:
        hesd.slq(A, 10, 2, seed=0, lockstep=1)
        assert asked == [((1, 10, 50), torch.float64)] * 2  # one basis per probe


# In a fresh process with large buffers reused: a basis of RELEASE_BEFORE_BYTES first hands the heap's freed
# memory back, is not a block of malloc's heap (what malloc has handed out stays the same), is written and read
# like any tensor, and its memory leaves the process when it is freed; a smaller one is an ordinary tensor.
_BASIS = """
import ctypes, ctypes.util, torch
import hesd
from hesd.allocator import RELEASE_BEFORE_BYTES, basis_buffer
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
mallinfo2.restype = Info
def handed_out():
    m = mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
assert hesd.tune_cpu_allocator() is True
xs = [torch.empty(2**24).fill_(1.0) for _ in range(4)]
del xs  # 256 MiB freed, resident in the heap
a0, r0 = handed_out(), rss()
Q = basis_buffer((2, RELEASE_BEFORE_BYTES // 8), torch.float32, "cpu")
a1, r01 = handed_out(), rss()
g = torch.Generator().manual_seed(0)
x = torch.randn(RELEASE_BEFORE_BYTES // 8, generator=g)
Q[0] = x
Q[1] = 2 * x
ok = bool(torch.equal(Q[1], 2 * Q[0])) and Q.is_contiguous() and Q.shape == (2, RELEASE_BEFORE_BYTES // 8)
r1 = rss()
del Q
r2 = rss()
small = basis_buffer((4, 1000), torch.float32, "cpu")
print(a1 - a0, int(ok), r1 - r2, small.shape == (4, 1000), r0 - r01)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous mmap and glibc's mallinfo2: Linux")
def test_a_large_basis_releases_the_heap_is_mapped_on_its_own_and_leaves_with_its_tensor():
    out = subprocess.run([sys.executable, "-c", _BASIS], capture_output=True, text=True, check=True).stdout.split()
    grown, ok, released, small, trimmed = float(out[0]), out[1], float(out[2]), out[3], float(out[4])
    assert trimmed > 200, out  # the 256 MiB freed before no longer resident
    assert grown < 1, out  # 256 MiB, none of it from malloc
    assert ok == "1" and small == "True"
    assert released > 200, out  # the written 256 MiB left the process with the tensor


def _vm_flags(t: torch.Tensor) -> list[str]:
    """The kernel's flags of the mapping that starts at ``t``'s first byte (``/proc/self/smaps``)."""
    start, flags, inside = f"{t.data_ptr():x}", None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                inside = head.split("-")[0].lstrip("0") == start.lstrip("0")
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
    assert flags is not None, "the basis is not a mapping of its own"
    return flags


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="no transparent huge pages")
@pytest.mark.parametrize(("huge_pages", "advised"), [(None, False), (False, False), (True, True)])
def test_huge_pages_are_asked_for_only_when_wanted(monkeypatch, huge_pages, advised):
    """``MADV_HUGEPAGE`` (the mapping's ``hg`` flag) only with ``huge_pages=True`` or ``HUGE_PAGES`` set."""
    monkeypatch.setattr(_allocator, "release_free_memory", lambda: False)  # the heap is not this test's
    Q = _allocator.basis_buffer((2, _allocator.RELEASE_BEFORE_BYTES // 8), torch.float32, "cpu", huge_pages=huge_pages)
    assert ("hg" in _vm_flags(Q)) is advised
    del Q
    monkeypatch.setattr(_allocator, "HUGE_PAGES", True)  # the module's default, as HESD_HUGE_PAGES=1 sets it
    Q = _allocator.basis_buffer((2, _allocator.RELEASE_BEFORE_BYTES // 8), torch.float32, "cpu", huge_pages=huge_pages)
    assert ("hg" in _vm_flags(Q)) is (huge_pages is not False)


def test_a_mapping_the_kernel_refuses_falls_back_to_pytorchs_allocator(monkeypatch):
    import mmap

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(_allocator, "release_free_memory", lambda: True)
    monkeypatch.setattr(mmap, "mmap", refuse)
    t = _allocator.basis_buffer((2, _allocator.RELEASE_BEFORE_BYTES // 8), torch.float32, "cpu")
    assert t.shape == (2, _allocator.RELEASE_BEFORE_BYTES // 8)
    t[1, -1] = 3.0
    assert float(t[1, -1]) == 3.0


def test_basis_buffer_leaves_small_and_non_cpu_allocations_to_torch():
    t = _allocator.basis_buffer((3, 5), torch.float64, "cpu")
    assert t.shape == (3, 5) and t.dtype == torch.float64
    m = _allocator.basis_buffer((2**20, 2**10), torch.float32, "meta")  # 4 GiB on the meta device: no memory
    assert m.device.type == "meta" and m.shape == (2**20, 2**10)


def test_host_available_reads_what_the_host_can_give():
    available = _allocator.host_available()
    if sys.platform.startswith("linux"):
        assert available is not None and 0 < available
    else:  # pragma: no cover - not Linux
        assert available is None


@pytest.mark.parametrize(("available", "reserve", "released"), [
    (2**30, None, False),  # no reserve: nothing done
    (2**30, 2**30, False),  # exactly the reserve left
    (2**30 - 1, 2**30, True),
    (None, 2**30, False),  # nothing known of the host
])  # fmt: skip
def test_release_when_low_hands_memory_back_only_below_the_reserve(monkeypatch, available, reserve, released):
    calls: list[int] = []
    monkeypatch.setattr(_allocator, "host_available", lambda: available)
    monkeypatch.setattr(_allocator, "release_free_memory", lambda: calls.append(1) or True)
    assert _allocator.release_when_low(reserve) is released
    assert calls == ([1] if released else [])


@pytest.mark.parametrize(("reserve", "available", "calls"), [
    (None, 0, []),
    (0, 2**31, []),
    (2**20, 2**31, []),  # room for the graphs and every product
    (2**20, 2**20 + 2**29, [0]),  # room for a product, not for the graphs too: only before the first
    (2**20, 2**20 - 1, [0, 1, 2]),  # no room for a product: before each (a block of columns is one)
])  # fmt: skip
def test_the_operator_hands_freed_memory_back_before_a_product_that_would_not_find_its_reserve(
    monkeypatch, reserve, available, calls
):
    counted: list[int] = []
    monkeypatch.setattr(_allocator, "host_available", lambda: available)
    monkeypatch.setattr(_allocator, "release_free_memory", lambda: counted.append(len(done)) or True)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    data = [(torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))]
    loss = torch.nn.functional.cross_entropy
    op = hesd.HessianOperator(model, loss, data, host_reserve=reserve, memory_budget=2**30)
    ref = hesd.HessianOperator(model, loss, data)
    V = torch.randn(op.shape[0], 2, generator=g, dtype=torch.float64)
    done: list[torch.Tensor] = []
    for x in (V[:, 0], V[:, 1], V):
        done.append(op @ x)
    assert counted == calls  # the index of each product that released first
    for got, want in zip(done, [ref @ V[:, 0], ref @ V[:, 1], ref @ V], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [-1, True, "8G"])
def test_host_reserve_must_be_bytes(bad):
    model = torch.nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randn(4, 2))]
    with pytest.raises(hesd.HesdValueError, match=r"HessianOperator: host_reserve must be a non-negative number of "
                       r"bytes, got"):  # fmt: skip
        hesd.HessianOperator(model, torch.nn.functional.mse_loss, data, host_reserve=bad)


def test_a_host_plan_keeps_one_products_transient_peak_available():
    from hesd.analysis.memory_plan import plan_memory

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    data = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(2)]
    plan = plan_memory(model, torch.nn.functional.cross_entropy, data, num_steps=10, max_memory=2**30)
    assert plan.host_reserve == int(plan.parts["product"]) > 0
    assert plan.operator_kwargs()["host_reserve"] == plan.host_reserve
