"""hesd.tune_cpu_allocator: glibc's malloc settings, and where they cannot be made."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
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
    assert _allocator.MMAP_THRESHOLD == 32 * 2**20 and _allocator.TRIM_THRESHOLD < 2**31
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
