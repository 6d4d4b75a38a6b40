"""The study in the real MLflow UI: the shipped smoke study runs in a fresh runs folder, the MLflow UI
serves its store on 127.0.0.1, and headless Chromium screenshots the runs list (the parent run
expanded to its nested trials, parameters and metrics as columns) and the compare view of the
trials into docs/img/ for the README. The served REST API must list the parent and its nested
children with their parameters and metrics.

Slow (about 3 minutes on 2 cores) and needs Debian's ``chromium``:
``.venv/bin/python -m pytest tests/test_mlflow_ui.py -m slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from subprocess_env import ROOT, start_amdim

SMOKE = ROOT / "studies" / "smoke.yaml"
IMG = ROOT / "docs" / "img"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)"
    ),
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """`amdim study run studies/smoke.yaml` in a fresh runs folder: (runs folder, parent run id).

    The study runs in its own process group, killed whole if it overruns, so that no Ray process
    outlives the test. Another local Ray instance on the machine (a second study at the same time)
    can make Ray Train's placement-group cleaner fail ("Found multiple active Ray instances").
    """
    runs = tmp_path_factory.mktemp("ui") / "runs"
    proc = start_amdim(runs, "study", "run", str(SMOKE))
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the smoke study did not finish in 600 s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-6000:]
    state = json.loads((runs / "studies" / "smoke" / "state.json").read_text())
    return runs, state["parent_run_id"]


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}{path}", timeout=30) as r:
        return json.loads(r.read())


def _kv(items: list[dict] | None) -> dict[str, str]:
    return {i["key"]: i["value"] for i in items or []}


def assert_real_screenshot(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 20_000, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= 1600 and im.height >= 900, im.size
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None  # more than a million colours: not blank either
    assert len(colours) > 100, f"{path.name}: only {len(colours)} colours"
    top = max(n for n, _ in colours)
    assert top < 0.9 * rgb.width * rgb.height, f"{path.name} is nearly one colour"


@pytest.mark.timeout(900)
def test_study_in_the_mlflow_ui(study):
    from analysis.ui_screens import COMPARE_PNG, RUNS_PNG, capture, serve

    runs, parent_id = study
    db = runs / "mlflow.db"
    spec = yaml.safe_load(SMOKE.read_text())
    searched = set(spec["search"])

    # The REST API behind the UI: one study parent run, its trials nested under it.
    with serve(db) as base:
        exp = _get(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=smoke")["experiment"]
        found = _post(
            base,
            "/api/2.0/mlflow/runs/search",
            {"experiment_ids": [exp["experiment_id"]], "max_results": 1000},
        )
        listed = found["runs"]
    by_id = {r["info"]["run_id"]: r for r in listed}
    parent = by_id[parent_id]
    assert _kv(parent["data"].get("tags"))["kind"] == "study"
    assert set(_kv(parent["data"].get("params"))["study.searched"].split(",")) == searched
    children = [r for r in listed if _kv(r["data"].get("tags")).get("mlflow.parentRunId") == parent_id]
    assert len(children) == len(listed) - 1 == spec["budget"]["trials"]
    states = set()
    for run in children:
        params, tags = _kv(run["data"].get("params")), _kv(run["data"].get("tags"))
        metrics = {m["key"] for m in run["data"].get("metrics", [])}
        assert searched <= set(params), run["info"]["run_name"]
        assert spec["objective"]["online"] in metrics
        states.add(tags["state"])
        if tags["state"] == "complete":
            assert {spec["objective"]["rank"], "probe_test_accuracy"} <= metrics
    assert "complete" in states

    # The UI itself, in a real browser.
    t0 = time.perf_counter()
    shots = capture(db, "smoke", IMG)
    wall = time.perf_counter() - t0
    assert [p.name for p in shots] == [RUNS_PNG, COMPARE_PNG]
    for path in shots:
        assert_real_screenshot(path)
    print(f"\nscreenshots took {wall:.0f} s")  # a figure for the log, not a pass mark
