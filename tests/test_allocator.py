"""hesd.tune_cpu_allocator: glibc's malloc settings, and where they cannot be made."""

from __future__ import annotations

import ctypes
import sys

import pytest
from typer.testing import CliRunner

import hesd
from hesd import allocator as _allocator
from hesd.interfaces.cli import app


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_settings_are_accepted_on_glibc():
    assert hesd.tune_cpu_allocator() is True
    assert hesd.tune_cpu_allocator() is True  # idempotent
    assert _allocator.MMAP_THRESHOLD == 32 * 2**20 and _allocator.TRIM_THRESHOLD < 2**31


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

        def __call__(self, param, value):
            self.calls.append(param)
            return 0 if param == _allocator._M_MMAP_THRESHOLD else 1

    class Libc:
        mallopt = Mallopt()

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc())
    assert hesd.tune_cpu_allocator() is False
    assert sorted(Libc.mallopt.calls) == sorted(
        [_allocator._M_MMAP_THRESHOLD, _allocator._M_TOP_PAD, _allocator._M_TRIM_THRESHOLD]
    )


@pytest.mark.parametrize(("env", "expected"), [(None, 1), ("1", 1), ("0", 0), ("off", 0)])
def test_command_line_tunes_unless_told_not_to(monkeypatch, tmp_path, env, expected):
    calls = []
    monkeypatch.setattr(_allocator, "tune_cpu_allocator", lambda: calls.append(1) or True)
    if env is None:
        monkeypatch.delenv("HESD_TUNE_ALLOCATOR", raising=False)
    else:
        monkeypatch.setenv("HESD_TUNE_ALLOCATOR", env)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code != 0  # no results there: the command fails, after the start-up
    assert len(calls) == expected
