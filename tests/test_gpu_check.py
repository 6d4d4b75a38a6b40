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
    expected = ["environment", "cuda-tests", "train", "bench-auto", "bench-plain", "bench-amp", "bench-tf32",
                "bench-channels_last", "bench-fused", "bench-all", "bench-compile", "concurrent"]  # fmt: skip
    assert list(steps) == expected and all(s["status"] == "ok" for s in steps.values()), steps
    # The plan fits its budget: the end-to-end train step can never be the one left out.
    assert sum(s["limit_s"] for s in steps.values()) == summary["planned_s"] <= summary["budget_s"] == 480
    assert summary["ok"] and summary["dry_run"] and not summary["environment"]["cuda_available"]
    # The CUDA tests were collected and, with no GPU here, skipped: none failed.
    tests = steps["cuda-tests"]["counts"]
    assert tests["tests"] >= 3 and tests["failed"] == 0 and tests["skipped"] == tests["tests"]
    figures = summary["figures"]
    for name in expected[3:-1]:
        assert figures[name]["loop_images_per_s"] > 0 and figures[name]["step_images_per_s"] > 0, name
    # the per-image torchvision path and the data path are timed once, with the defaults
    assert figures["bench-auto"]["data_torchvision_images_per_s"] > 0
    assert all(figures[name]["data_images_per_s"] is None for name in expected[4:-1])
    assert figures["bench-compile"]["options"]["compile"] is True
    assert figures["bench-plain"]["options"]["channels_last"] is False
    assert figures["bench-plain"]["options"]["matmul_precision"] == "fp32"
    assert figures["fastest"] in figures
    assert [a["processes"] for a in figures["concurrent"]["arrangements"]] == [1, 2]
    trained = json.loads((out / "train" / "metrics.json").read_text())
    assert trained["epochs"] == 1 and 0 <= trained["probe"]["test_accuracy"] <= 1
    # without the CIFAR-10 subset beside the checkout, the summary says the train step used generated data
    subset = ROOT / ".shared" / "cifar10-subset.npz"
    assert (summary["data"]["missing"] is None) == subset.is_file()
    assert summary["data"]["train"] == (f"npz:{subset}" if subset.is_file() else "synthetic")
    assert "===== bench-all" in (out / "gpu-check.log").read_text()


def _gpu_check_module():
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader

    loader = SourceFileLoader("gpu_check", str(ROOT / "scripts" / "gpu-check"))
    module = module_from_spec(spec_from_loader("gpu_check", loader))
    loader.exec_module(module)
    return module


def test_gpu_check_records_a_step_that_times_out_and_goes_on(tmp_path, monkeypatch):
    gpu_check = _gpu_check_module()
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    quick = [sys.executable, "-c", "print('{\"after\": 1}')"]
    monkeypatch.setattr(gpu_check, "arrangements", lambda dry: [("slow", slow, 2), ("quick", quick, 20)])
    assert gpu_check.main(["--dry-run", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    slow_step, quick_step = summary["steps"]["slow"], summary["steps"]["quick"]
    assert slow_step["status"] == "timed out after 2 s" and slow_step["json"] is None
    assert quick_step["status"] == "ok" and quick_step["json"] == {"after": 1}
    assert "started" in (tmp_path / "gpu-check.log").read_text()


def test_gpu_check_refuses_a_plan_over_its_budget(tmp_path, capsys):
    gpu_check = _gpu_check_module()
    assert gpu_check.main(["--dry-run", "--budget", "100", str(tmp_path)]) == 2
    assert "over --budget 100 s" in capsys.readouterr().err
    assert sum(limit for _, _, limit in gpu_check.arrangements(False)) <= gpu_check.BUDGET_S


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu-check"), str(tmp_path / "x")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "no CUDA GPU" in proc.stderr
