"""A study started by the amdim of before ``amdim/harness/study/`` (a single ``study.py``, Ray's
``OptunaSearch`` subclassed) resumes on the current code.

Its ``tuner.pkl`` names the searcher, scheduler and callback by the old module paths; the current
code loads them from ``amdim/harness/study_search.py`` and carries on with the same Optuna study.
The old code runs from a git worktree of the commit before the move, with the same environment,
and its driver is killed mid-study; the current code then runs the same command to the end.

Slow (about a minute and a half on 2 cores); skipped outside a git checkout with that commit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import optuna
import pytest
import yaml
from subprocess_env import ROOT, clean_env, run_amdim
from test_study import RESUME_SPEC, _checkpoint_saved, _children, _optuna, _wait_for

pytestmark = pytest.mark.slow
BEFORE_THE_MOVE = "07b7ff3f101a40da26fceac42afee5d33d460f9c"


@pytest.fixture
def old_code(tmp_path):
    tree = tmp_path / "before"
    added = subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), BEFORE_THE_MOVE],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if added.returncode != 0:
        pytest.skip(f"no git worktree of {BEFORE_THE_MOVE[:7]}: {added.stderr.strip()[:200]}")
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)


def test_a_study_started_before_the_move_resumes_on_the_current_code(tmp_path, old_code):
    runs = tmp_path / "runs"
    spec = json.loads(json.dumps(RESUME_SPEC))
    spec["name"] = "old-study"
    spec["points"] = spec["points"][:2]  # two ordinary settings, then a sampled one
    spec["search"]["optim.lr"]["high"] = 1e-3  # no diverging trial here
    spec["budget"].update(trials=3, epochs=4)
    spec["base"]["set"]["train.max_steps_per_epoch"] = 10
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    old = subprocess.Popen(
        [sys.executable, "-m", "amdim.cli", "study", "run", str(spec_path)],
        cwd=old_code,  # `python -m` imports amdim from here: the old code
        env={**clean_env(runs), "TUNE_GLOBAL_CHECKPOINT_S": "2", "PYTHONPATH": str(old_code)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    sdir = runs / "studies" / "old-study"
    try:

        def one_done_and_another_checkpointed() -> bool:
            try:
                trials = _optuna(runs, "old-study").trials
            except Exception:
                return False
            running = [t.user_attrs.get("tune_trial_id") for t in trials if t.state.name == "RUNNING"]
            return any(t.state.name == "COMPLETE" for t in trials) and any(
                tid and _checkpoint_saved(sdir, "tune", tid) for tid in running
            )

        _wait_for(one_done_and_another_checkpointed, 300, old)
    finally:
        os.killpg(old.pid, signal.SIGKILL)
        old.wait()
    assert (sdir / "tune" / "search" / "tuner.pkl").is_file()
    assert b"amdim.harness.study_search" in (sdir / "tune" / "search" / "tuner.pkl").read_bytes()
    before = {t.number: t.state.name for t in _optuna(runs, "old-study").trials}

    again = run_amdim(runs, "study", "run", str(spec_path))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the search stage" in again.stdout and "Traceback" not in again.stdout + again.stderr
    after = _optuna(runs, "old-study").trials
    assert len(after) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in after)
    for number, state in before.items():  # what the old driver finished stays as it was
        if state == "COMPLETE":
            assert after[number].state.name == "COMPLETE"
    _, _, children = _children(runs, "old-study")
    ids = [r.data.tags["tune_trial_id"] for r in children]
    assert len(ids) == len(set(ids)) == 3  # no duplicate run
    assert all(r.data.tags["state"] == "complete" and r.info.status == "FINISHED" for r in children)
    by_id = {r.data.tags["tune_trial_id"]: r for r in children}
    for t in after:  # Optuna's ranking value is each trial's own probe
        assert by_id[t.user_attrs["tune_trial_id"]].data.metrics["probe_val_accuracy"] == pytest.approx(
            t.value
        )
