"""Screenshots of a study in the MLflow UI, taken with headless Chromium (for the README).

``capture(tracking_db, experiment, out_dir)`` serves the MLflow UI for a SQLite tracking store on
127.0.0.1, opens it in headless Chromium and saves two screenshots into ``out_dir``:

* ``mlflow-runs.png``: the experiment's runs list, the study's parent run expanded to show its
  nested trial runs, with the searched parameters, the objective metrics and the trial state as
  columns;
* ``mlflow-compare.png``: the UI's compare view of the trial runs.

Chromium is driven with Playwright for Python (the ``playwright`` package, whose own driver talks
to the browser over a pipe), launching the system's Chromium (Debian's ``chromium``): no browser
is downloaded, so ``playwright install`` is never needed. Before the runs list loads, the UI's own
``localStorage`` state is seeded on the same origin (its ``/health`` page) so that the "Model
training" view is shown, the assistant panel stays closed, the parent run is expanded and the
chosen columns are selected. The page is then polled until the runs are rendered, so a blank or
still-loading page fails instead of giving an empty picture. The server runs in its own process
group and Chromium gets a fresh temporary profile; both are always stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, sync_playwright

from amdim.errors import UserError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (  # as root on a closed network: no sandbox, and no traffic of Chromium's own
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--mute-audio",
)
WIDTH, HEIGHT = 1600, 900
RUNS_PNG = "mlflow-runs.png"
COMPARE_PNG = "mlflow-compare.png"
SERVER_START_S = 90.0
BROWSER_START_S = 30.0
RENDER_S = 60.0
SETTLE_S = 1.5
CLICK_S = 5.0  # a control of the compare view not clickable by then is left as it is
ACTION_S = 0.3
MAX_COMPARE = 8  # a bigger study compares its best trials (by the rank metric, then the online one)
MAX_WAIT_ROWS = 12  # the runs list must show every trial by name when it has no more than this


@dataclass
class StudyRuns:
    """The ids and column keys the screenshots need, read with ``MlflowClient``."""

    experiment_id: str
    parent_id: str
    parent_name: str
    children: dict[str, str]  # run id -> run name, oldest first
    params: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    plot_metrics: list[str] = field(default_factory=list)  # the metrics every compared trial logged
    compare: list[str] = field(default_factory=list)  # the run ids the compare view shows


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise UserError(
        "chromium is not installed (apt-get install chromium): it is needed for MLflow UI screenshots"
    )


def study_runs(uri: str, experiment: str) -> StudyRuns:
    """The experiment's latest study parent run (tag ``kind=study``) and its nested trial runs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no MLflow experiment {experiment!r} in {uri}")
    runs = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    if not parents:
        raise UserError(f"experiment {experiment!r} has no study parent run (tag kind=study)")
    parent = parents[-1]
    pid = parent.info.run_id
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
    if not kids:
        raise UserError(f"the study run {pid} of experiment {experiment!r} has no nested trial runs")

    searched = [k for k in parent.data.params.get("study.searched", "").split(",") if k]
    for r in kids:
        searched += [k for k in r.data.tags.get("sampled_keys", "").split(",") if k and k not in searched]
    logged_params = {k for r in kids for k in r.data.params}
    logged_metrics = {k for r in kids for k in r.data.metrics}
    objective = [parent.data.params.get(f"study.objective.{k}", "") for k in ("rank", "online")]
    metrics = [
        m for m in dict.fromkeys([objective[0], "probe_test_accuracy", objective[1]]) if m in logged_metrics
    ]

    def best_first(r) -> tuple[float, ...]:
        return tuple(-r.data.metrics.get(m, float("-inf")) for m in metrics)

    best = {r.info.run_id for r in sorted(kids, key=best_first)[:MAX_COMPARE]}
    compare = [r for r in kids if r.info.run_id in best]  # in start order
    return StudyRuns(
        experiment_id=exp.experiment_id,
        parent_id=pid,
        parent_name=parent.info.run_name or pid,
        children={r.info.run_id: r.info.run_name or r.info.run_id for r in kids},
        params=[k for k in searched if k in logged_params],
        metrics=metrics,
        tags=["state"],
        plot_metrics=[m for m in metrics if all(m in r.data.metrics for r in compare)],
        compare=[r.info.run_id for r in compare],
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with everything it started."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    else:  # the leader is gone; its workers may not be
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, n: int = 1500) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


@contextlib.contextmanager
def serve(tracking_db: Path, port: int | None = None) -> Iterator[str]:
    """Serve the MLflow UI for ``tracking_db`` on 127.0.0.1; yields its base URL."""
    port = port or _free_port()
    with tempfile.TemporaryDirectory(prefix="amdim-mlflow-ui-") as tmp:
        log = Path(tmp) / "server.log"
        cmd = [
            sys.executable, "-m", "mlflow", "ui",
            "--backend-store-uri", f"sqlite:///{Path(tracking_db).resolve()}",
            "--artifacts-destination", str(Path(tmp) / "mlartifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + SERVER_START_S
            while True:
                if proc.poll() is not None:
                    raise UserError(f"mlflow ui exited with {proc.returncode}: {_tail(log)}")
                with (
                    contextlib.suppress(OSError, urllib.error.URLError),
                    urllib.request.urlopen(f"{base}/health", timeout=2) as r,
                ):
                    if r.status == 200:
                        break
                if time.monotonic() > deadline:
                    raise UserError(f"mlflow ui did not answer on {base}/health in {SERVER_START_S:.0f}s")
                time.sleep(0.5)
            yield base
        finally:
            _stop(proc)


@contextlib.contextmanager
def browser(chromium: str | None = None) -> Iterator[Page]:
    """Headless Chromium with a fresh temporary profile, driven by Playwright; yields its page."""
    chromium = chromium or find_chromium()
    with tempfile.TemporaryDirectory(prefix="amdim-chromium-") as profile, sync_playwright() as pw:
        try:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=chromium,
                headless=True,
                args=[*CHROMIUM_FLAGS, f"--window-size={WIDTH},{HEIGHT}"],
                viewport={"width": WIDTH, "height": HEIGHT},
                device_scale_factor=1,
                timeout=BROWSER_START_S * 1000,
            )
        except PlaywrightError as e:
            raise UserError(f"chromium ({chromium}) did not start: {_first_line(e)}") from e
        try:
            context.set_default_timeout(RENDER_S * 1000)
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            with contextlib.suppress(PlaywrightError):
                context.close()


def _first_line(e: PlaywrightError) -> str:
    return (e.message or str(e)).strip().splitlines()[0]


_MISSING = "texts => { const t = document.body ? document.body.innerText : ''; return texts.filter(s => !t.includes(s)); }"


def _wait_for_text(page: Page, texts: list[str], what: str) -> None:
    """Poll until the page's visible text has every one of ``texts``, then let it settle."""
    try:
        page.wait_for_function(
            f"texts => ({_MISSING})(texts).length === 0", arg=texts, polling=250, timeout=RENDER_S * 1000
        )
    except PlaywrightError:
        missing = texts
        with contextlib.suppress(PlaywrightError):
            missing = page.evaluate(_MISSING, texts)
        seen = Path(tempfile.gettempdir()) / f"amdim-mlflow-ui-{abs(hash(what)):x}.png"
        with contextlib.suppress(Exception):
            _screenshot(page, seen)
        raise UserError(
            f"the MLflow UI did not render {what} in {RENDER_S:.0f}s (missing: {', '.join(missing[:5])}; page: {seen})"
        ) from None
    page.wait_for_timeout(SETTLE_S * 1000)


def _click(page: Page, js_element: str) -> bool:
    """Click (real mouse events) the element the JS expression gives; False if there is none."""
    handle = page.evaluate_handle(f"() => ({js_element})")
    element = handle.as_element()
    if element is None:
        handle.dispose()
        return False
    try:
        element.click(timeout=CLICK_S * 1000)  # scrolled into view, once visible and stable
    except PlaywrightError:  # gone from the page, or never clickable: left as it is
        return False
    finally:
        element.dispose()
    page.wait_for_timeout(ACTION_S * 1000)
    return True


def _type(page: Page, text: str) -> None:
    page.keyboard.insert_text(text)
    page.wait_for_timeout(ACTION_S * 1000)


def _key(page: Page, key: str) -> None:
    page.keyboard.press(key)
    page.wait_for_timeout(ACTION_S * 1000)


def _screenshot(page: Page, path: Path, height: int | None = None) -> Path:
    """The viewport, ``WIDTH`` wide and ``height`` (else ``HEIGHT``) tall, as a PNG."""
    size = {"width": WIDTH, "height": height or HEIGHT}
    if page.viewport_size != size:
        page.set_viewport_size(size)
        page.wait_for_timeout(SETTLE_S * 1000)
    page.screenshot(path=path, type="png")
    return path


def _col(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the UI's canonical column key, e.g. params.`loss.tclip`


def ui_state(study: StudyRuns) -> dict[str, str]:
    """``localStorage`` entries the MLflow 3 UI reads its (persisted) view state from."""
    columns = [
        *(_col("params", k) for k in study.params),
        *(_col("metrics", k) for k in study.metrics),
        *(_col("tags", k) for k in study.tags),
        _col("attributes", "Duration"),
    ]
    page = {"selectedColumns": columns, "runsExpanded": {study.parent_id: True}}
    # the page's state is keyed by the JSON list of its experiment ids, as JSON.stringify writes it
    ids = json.dumps([study.experiment_id], separators=(",", ":"))
    return {
        "mlflow.workflowType_v1": json.dumps("machine_learning"),
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        "mlflow.detectIssues.guidanceShown_v1": "true",
        "mlflow.flagForReview.guidanceShown_v1": "true",
        f"MLflowLocalStorage-1.1-ExperimentPage-{ids}-ReactComponentState": json.dumps(page),
    }


def runs_url(base: str, study: StudyRuns) -> str:
    return f"{base}/#/experiments/{study.experiment_id}/runs?workflowType=machine_learning"


def compare_url(base: str, study: StudyRuns) -> str:
    q = urllib.parse.urlencode(
        {"runs": json.dumps(study.compare), "experiments": json.dumps([study.experiment_id])}
    )
    return f"{base}/#/compare-runs?{q}"


_METRICS_SELECT = """[...document.querySelectorAll('div')].find(e => e.childElementCount === 0
    && e.textContent.trim() === 'Metrics:')?.nextElementSibling"""


def _tidy_compare(page: Page, study: StudyRuns) -> None:
    """Plot the objective metrics in the parallel coordinates, show only the values that differ.

    The parallel coordinates get the metrics every trial logged (a trial stopped early has no
    offline probe). The Artifacts section is collapsed: MLflow 3.17.2's compare view fails on it
    now and then ("Something went wrong with this section") when some runs have artifacts and some
    none, as early-stopped trials do. Cosmetic: a control that is not found is left as it is.
    """
    remove = f"({_METRICS_SELECT})?.querySelector('.du-bois-light-select-selection-item-remove')"
    for _ in range(20):  # the UI preselects one metric; drop whatever is selected
        if not _click(page, remove):
            break
    for metric in study.plot_metrics:
        if _click(page, f"({_METRICS_SELECT})?.querySelector('.du-bois-light-select-selector')"):
            _type(page, metric)
            _key(page, "Enter")
    _key(page, "Escape")
    for section in ("Parameters", "Metrics", "Tags"):
        _click(page, f"document.querySelector('[role=switch][aria-label=\"{section} - Show diff only\"]')")
    _click(
        page,
        "[...document.querySelectorAll('[role=button][aria-expanded=true]')].find(h => h.innerText.trim() === 'Artifacts')",
    )
    page.evaluate("() => { window.scrollTo(0, 0); document.querySelector('main')?.scrollTo(0, 0); }")
    page.wait_for_timeout(SETTLE_S * 1000)


def _page_height(page: Page, most: int = 4000) -> int:
    """The height that shows the whole page, whose content scrolls inside ``<main>``."""
    h = page.evaluate(
        """() => { const m = document.querySelector('main'); if (!m) return document.body.scrollHeight;
            return m.getBoundingClientRect().top + m.scrollHeight + 24; }"""
    )
    return int(min(max(h or HEIGHT, HEIGHT), most))


def _drive(page: Page, base: str, study: StudyRuns, out_dir: Path) -> list[Path]:
    page.goto(f"{base}/health", wait_until="commit")  # same origin: seed the UI's persisted state
    _wait_for_text(page, ["OK"], "the health page")
    page.evaluate(
        "state => { for (const [k, v] of Object.entries(state)) localStorage.setItem(k, v); }",
        ui_state(study),
    )

    page.goto(runs_url(base, study), wait_until="commit")
    names = list(study.children.values()) if len(study.children) <= MAX_WAIT_ROWS else []
    _wait_for_text(page, [study.parent_name, *names, *study.params, *study.metrics], "the study's runs list")
    shots = [_screenshot(page, out_dir / RUNS_PNG)]

    page.goto(compare_url(base, study), wait_until="commit")
    compared = [study.children[i] for i in study.compare]
    _wait_for_text(page, [*compared, *study.params], "the compare view")
    _tidy_compare(page, study)
    shots.append(_screenshot(page, out_dir / COMPARE_PNG, height=_page_height(page)))
    return shots


def capture(tracking_db: Path, experiment: str, out_dir: Path, port: int | None = None) -> list[Path]:
    """Serve the MLflow UI for ``tracking_db`` and screenshot the study ``experiment`` into ``out_dir``.

    Returns the paths of ``mlflow-runs.png`` and ``mlflow-compare.png``.
    """
    chromium = find_chromium()
    tracking_db = Path(tracking_db)
    if not tracking_db.is_file():
        raise UserError(f"no MLflow tracking database at {tracking_db}")
    study = study_runs(f"sqlite:///{tracking_db.resolve()}", experiment)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with serve(tracking_db, port) as base, browser(chromium) as page:
        return _drive(page, base, study, out_dir)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tracking_db", type=Path, help="the study's mlflow.db (runs/mlflow.db)")
    p.add_argument("experiment", help="the study's MLflow experiment (the study name)")
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    p.add_argument("--port", type=int, default=None)
    a = p.parse_args(argv)
    try:
        for path in capture(a.tracking_db, a.experiment, a.out, a.port):
            print(path)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
