"""Smoke runs of the benchmark scripts (so they cannot rot); not timing assertions."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str) -> str:
    # Smoke runs, not timings: the limit only catches a hang (the quick runs take seconds to a few minutes on an
    # idle 2-core machine; under 3x oversubscription hvp.py --quick once exceeded 600 s).
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_compare_quick_hesd_only():
    out = _run(str(BENCH / "compare.py"), "--quick", "--tools", "hesd")
    for section in ("one Hessian-vector product", "top-5 eigenvalues", "trace", "HESD verdict"):
        assert section in out
    assert "error" not in out.lower()


def test_transformer_families_quick():
    out = _run(str(BENCH / "transformer_families.py"), "--quick")
    for family in ("gpt2", "llama", "bert-mlm", "bert-cls", "gpt2-lora"):
        assert f"\n{family} " in out
    assert "naive/hesd" in out


def test_hvp_benchmark_quick():
    out = _run(str(BENCH / "hvp.py"), "--quick")
    assert "ResNet-20" in out and "double_backward" in out and "gradient" in out
    assert "BatchNorm native" in out  # ResNet-20 has BatchNorm: hesd's affine form against PyTorch's kernel


def test_profile_overhead_quick():
    out = _run(str(BENCH / "profile_hesd.py"), "--task", "overhead", "--model", "mlp", "--rounds", "2")
    assert "hesd op @ v" in out and "fixed-step SLQ per step / one op @ v" in out


def test_profile_lanczos_step_quick():
    out = _run(str(BENCH / "profile_hesd.py"), "--task", "lanczos", "--model", "mlp", "--rounds", "2")
    assert "3466 parameters" in out and "reorth='full'" in out and "reorth='none'" in out


def test_batchnorm_benchmark_quick():
    out = _run(str(BENCH / "batchnorm.py"), "--quick")
    assert "one layer" in out and "native / affine" in out and "double_backward" in out


def test_columns_benchmark_quick():
    out = _run(str(BENCH / "columns.py"), "--quick")
    assert "batch_columns=None" in out and "width used" in out and "6 batches" in out


def test_compare_rounds_keep_the_fastest_run():
    out = _run(str(BENCH / "compare.py"), "--quick", "--tools", "hesd", "--tasks", "hvp,top5", "--rounds", "2")
    assert "fastest of 2 rounds" in out and "top-5 eigenvalues" in out and "error" not in out.lower()


def test_compare_hesd_tol_sweep_stops_at_the_first_inaccurate_tol(tmp_path):
    out = _run(str(BENCH / "compare.py"), "--quick", "--tools", "hesd", "--tasks", "top5", "--hesd-tol-sweep",
               "--json", str(tmp_path / "sweep.json"))  # fmt: skip
    assert "top-5 eigenvalues" in out and "error" not in out.lower()
    runs = json.loads((tmp_path / "sweep.json").read_text())["mlp"]["results"]["hesd"]["top5"]["runs"]
    tols = [run["tol"] for run in runs]
    assert tols[0] == 1e-3 and all(b / a == pytest.approx(10**0.5) for a, b in itertools.pairwise(tols))
    assert all(run["error"] <= 1e-3 for run in runs[:-1])  # it went on only while accurate enough
    assert runs[-1]["error"] > 1e-3 or runs[-1]["tol"] * 10**0.5 > 0.1


def test_allocator_benchmark_quick():
    out = _run(str(BENCH / "allocator.py"), "--quick", "--tune")
    assert "tune_cpu_allocator:" in out and "run 2:" in out and "system" in out


def test_finite_difference_benchmark_quick():
    out = _run(str(BENCH / "finite_difference.py"), "--quick")
    for model in ("MLP tanh", "CNN GELU", "CNN ReLU"):
        assert f"\n{model} " in out
    assert "fd/exact" in out


def test_scale_benchmark_quick():
    out = _run(str(BENCH / "scale.py"), "--quick", "--float64", "--tune-allocator")
    assert "\n1M    hesd" in out and "memory plan:" in out and "resident growth" in out
    assert "glibc malloc tuned" in out and "float64: top 3 [" in out and "converged True" in out
    alone = out.split("product seconds: alone ")[1].split(" (after the SLQ | before | after the top-1)")[0]
    assert [len(side.split(", ")) for side in alone.split(" | ")] == [3, 3, 3]  # after the SLQ, beside the top-1
    ratios = out.split("timed beside the loop: SLQ ")[1].split(" products × ")[0].split()
    assert float(ratios[0]) > 1 and "the median of 3 before and 3 after it" in out  # (a finite ratio, not nan)


def test_gpt2_hesd_benchmark_smoke(tmp_path):
    out = _run(str(BENCH / "gpt2_hesd.py"), "--device", "cpu", "--size", "1M", "--tokens", "1024", "--rows", "4",
               "--steps", "6", "--probes", "2", "--precision", "bf16", "--out", str(tmp_path / "r.json"))  # fmt: skip
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["SLQ products"] == 12 and r["type"] in ("MP", "MN") and r["lambda_max"] > r["lambda_min"]
    assert 0 < r["bf16 product error"] < 0.1 and "memory plan:" in out


def test_top1_tolerance_benchmark_smoke():
    out = _run(str(BENCH / "top1_tolerance.py"), "--size", "1M", "--reference", "7.0", "--tols", "1e-1", "3e-1",
               "--tools", "hesd", "--hesd-steps", "3", "--seeds", "0", "1")  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.startswith("hesd ")]
    settings = [["tol", "0.1", "0"], ["tol", "0.3", "0"], ["3", "steps", "0"], ["3", "steps", "1"]]  # and seeds
    assert [r[1:4] for r in rows] == settings
    assert "failed" not in out and [r[4] for r in rows[2:]] == ["3", "3"]  # fixed steps: exactly that many products
    assert all(float(r[7]) < 1 and int(r[4]) >= 1 for r in rows)  # a relative error, from at least one product


def test_vector_work_benchmark_smoke():
    out = _run(str(BENCH / "vector_work.py"), "--size", "200000", "--rounds", "1")
    rows = [line.split() for line in out.splitlines() if line.startswith("HESD_FUSED=")]
    paths = {"HESD_FUSED=1", "HESD_FUSED=0"} if "compiled step available" in out else {"HESD_FUSED=0"}
    assert {(r[0], r[1]) for r in rows} == {(p, t) for p in paths for t in ("slq", "top1-window", "top1-restart6",
                                                                               "top5-restart12")}  # fmt: skip
    for r in rows:  # the largest eigenvalue, 30, found by every task on either path (the first value printed)
        assert abs(float(r[r.index("λ") + 1]) - 30.0) < 1e-3
    assert out.count("rest (median)") == 4
