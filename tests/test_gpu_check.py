"""scripts/gpu-check --dry-run: every step of the GPU check runs on the CPU at tiny sizes, so the
script cannot rot before a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from subprocess_env import ROOT

TORCH_ONLY = ("ray", "mlflow", "optuna", "optuna_dashboard", "playwright")


def test_gpu_check_dry_run_writes_its_summary_with_torch_alone(tmp_path):
    """As on the GPU machine: Ray, MLflow and Optuna cannot be imported (stand-in packages that
    fail to import come first on the path), and every step still runs."""
    absent = tmp_path / "absent"
    for name in TORCH_ONLY:
        (absent / name).mkdir(parents=True)
        (absent / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('no {name} on this machine')\n"
        )
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu-check"), "--dry-run", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(absent)},
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0, proc.stdout[-2000:] + (out / "gpu-check.log").read_text()[-4000:]
    steps = summary["steps"]
    expected = {"environment", "cuda-tests", "bench-plain", "bench-amp", "bench-channels_last", "bench-fused",
                "bench-compile", "bench-all", "concurrent", "train"}  # fmt: skip
    assert set(steps) == expected and all(s["status"] == "ok" for s in steps.values()), steps
    assert summary["ok"] and summary["dry_run"] and not summary["environment"]["cuda_available"]
    # The CUDA tests were collected and, with no GPU here, skipped: none failed.
    tests = steps["cuda-tests"]["counts"]
    assert tests["tests"] >= 3 and tests["failed"] == 0 and tests["skipped"] == tests["tests"]
    figures = summary["figures"]
    for name in (
        "bench-plain",
        "bench-amp",
        "bench-channels_last",
        "bench-fused",
        "bench-compile",
        "bench-all",
    ):
        assert figures[name]["step_images_per_s"] > 0, name
    assert figures["bench-compile"]["options"]["compile"] is True
    assert figures["bench-plain"]["options"]["channels_last"] is False
    assert figures["fastest"] in figures
    assert [a["processes"] for a in figures["concurrent"]["arrangements"]] == [1, 2]
    trained = json.loads((out / "train" / "metrics.json").read_text())
    assert trained["epochs"] == 1 and 0 <= trained["probe"]["test_accuracy"] <= 1
    assert "===== bench-all" in (out / "gpu-check.log").read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu-check"), str(tmp_path / "x")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "no CUDA GPU" in proc.stderr
