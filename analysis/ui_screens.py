"""Screenshots of a study in the MLflow UI, taken with headless Chromium (for the README).

``capture(tracking_db, experiment, out_dir)`` serves the MLflow UI for a SQLite tracking store on
127.0.0.1, opens it in headless Chromium and saves two screenshots into ``out_dir``:

* ``mlflow-runs.png``: the experiment's runs list, the study's parent run expanded to show its
  nested trial runs, with the searched parameters, the objective metrics and the trial state as
  columns;
* ``mlflow-compare.png``: the UI's compare view of the trial runs.

Chromium is driven over the DevTools protocol (``aiohttp``'s websocket client, already installed
with MLflow and Ray): before the page loads, the UI's own ``localStorage`` state is seeded so that
the "Model training" view is shown, the assistant panel stays closed, the parent run is expanded
and the chosen columns are selected. The page is then polled until the runs are rendered, so a
blank or still-loading page fails instead of giving an empty picture. The server and the browser
run in their own process groups and are always stopped; the browser gets a fresh temporary profile.
"""

from __future__ import annotations

import asyncio
import base64
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

from amdim.errors import UserError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
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
def browser(chromium: str | None = None) -> Iterator[int]:
    """Headless Chromium with a fresh temporary profile; yields its DevTools port."""
    chromium = chromium or find_chromium()
    with tempfile.TemporaryDirectory(prefix="amdim-chromium-") as profile:
        active = Path(profile) / "DevToolsActivePort"
        log = Path(profile).with_suffix(".log")
        cmd = [
            chromium, *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}", "--remote-debugging-port=0",
            f"--window-size={WIDTH},{HEIGHT}", "about:blank",
        ]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + BROWSER_START_S
            while not (active.is_file() and active.read_text().strip()):
                if proc.poll() is not None:
                    raise UserError(f"chromium exited with {proc.returncode}: {_tail(log)}")
                if time.monotonic() > deadline:
                    raise UserError(f"chromium did not open its DevTools port in {BROWSER_START_S:.0f}s")
                time.sleep(0.2)
            yield int(active.read_text().split()[0])
        finally:
            _stop(proc)
            log.unlink(missing_ok=True)


class _Page:
    """The few DevTools protocol calls the screenshots need, on one page target."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.n = 0

    async def call(self, method: str, **params) -> dict:
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=RENDER_S)
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def wait_for_text(self, texts: list[str], what: str) -> None:
        """Poll until the page's visible text has every one of ``texts``, then let it settle."""
        probe = f"(() => {{ const t = document.body ? document.body.innerText : ''; return {json.dumps(texts)}.filter(s => !t.includes(s)); }})()"
        deadline = time.monotonic() + RENDER_S
        missing = texts
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                missing = await self.eval(probe)
                if not missing:
                    await asyncio.sleep(SETTLE_S)
                    return
            await asyncio.sleep(0.25)
        seen = Path(tempfile.gettempdir()) / f"amdim-mlflow-ui-{abs(hash(what)):x}.png"
        with contextlib.suppress(Exception):
            await self.screenshot(seen)
        raise UserError(
            f"the MLflow UI did not render {what} in {RENDER_S:.0f}s (missing: {', '.join(missing[:5])}; page: {seen})"
        )

    async def click(self, js_element: str) -> bool:
        """Click (real mouse events) the element the JS expression gives; False if there is none."""
        center = await self.eval(
            f"""(() => {{ const e = {js_element}; if (!e) return null; e.scrollIntoView({{block: 'center'}});
                const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"""
        )
        if not center:
            return False
        x, y = center
        await self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        await asyncio.sleep(0.3)
        return True

    async def type(self, text: str) -> None:
        await self.call("Input.insertText", text=text)
        await asyncio.sleep(0.3)

    async def key(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.call(
                "Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code
            )
        await asyncio.sleep(0.3)

    async def screenshot(self, path: Path, height: int | None = None) -> Path:
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=height or HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )
        if height:
            await asyncio.sleep(SETTLE_S)
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.write_bytes(base64.b64decode(shot["data"]))
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


async def _tidy_compare(page: _Page, study: StudyRuns) -> None:
    """Plot the objective metrics in the parallel coordinates, show only the values that differ.

    The parallel coordinates get the metrics every trial logged (a trial stopped early has no
    offline probe). The Artifacts section is collapsed: MLflow 3.17.2's compare view fails on it
    now and then ("Something went wrong with this section") when some runs have artifacts and some
    none, as early-stopped trials do. Cosmetic: a control that is not found is left as it is.
    """
    remove = f"({_METRICS_SELECT})?.querySelector('.du-bois-light-select-selection-item-remove')"
    for _ in range(20):  # the UI preselects one metric; drop whatever is selected
        if not await page.click(remove):
            break
    for metric in study.plot_metrics:
        if await page.click(f"({_METRICS_SELECT})?.querySelector('.du-bois-light-select-selector')"):
            await page.type(metric)
            await page.key("Enter", 13)
    await page.key("Escape", 27)
    for section in ("Parameters", "Metrics", "Tags"):
        await page.click(
            f"document.querySelector('[role=switch][aria-label=\"{section} - Show diff only\"]')"
        )
    await page.click(
        "[...document.querySelectorAll('[role=button][aria-expanded=true]')].find(h => h.innerText.trim() === 'Artifacts')"
    )
    await page.eval("window.scrollTo(0, 0); document.querySelector('main')?.scrollTo(0, 0)")
    await asyncio.sleep(SETTLE_S)


async def _page_height(page: _Page, most: int = 4000) -> int:
    """The height that shows the whole page, whose content scrolls inside ``<main>``."""
    h = await page.eval(
        """(() => { const m = document.querySelector('main'); if (!m) return document.body.scrollHeight;
            return m.getBoundingClientRect().top + m.scrollHeight + 24; })()"""
    )
    return int(min(max(h or HEIGHT, HEIGHT), most))


async def _drive(devtools_port: int, base: str, study: StudyRuns, out_dir: Path) -> list[Path]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{devtools_port}/json/list") as r:
            targets = await r.json(content_type=None)
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
        async with http.ws_connect(ws_url, max_msg_size=0) as ws:
            page = _Page(ws)
            await page.call(
                "Emulation.setDeviceMetricsOverride",
                width=WIDTH,
                height=HEIGHT,
                deviceScaleFactor=1,
                mobile=False,
            )
            await page.goto(f"{base}/health")  # same origin: seed the UI's persisted state
            await page.wait_for_text(["OK"], "the health page")
            await page.eval(
                f"(() => {{ for (const [k, v] of Object.entries({json.dumps(ui_state(study))})) localStorage.setItem(k, v); }})()"
            )

            await page.goto(runs_url(base, study))
            names = list(study.children.values()) if len(study.children) <= MAX_WAIT_ROWS else []
            await page.wait_for_text(
                [study.parent_name, *names, *study.params, *study.metrics], "the study's runs list"
            )
            shots = [await page.screenshot(out_dir / RUNS_PNG)]

            await page.goto(compare_url(base, study))
            compared = [study.children[i] for i in study.compare]
            await page.wait_for_text([*compared, *study.params], "the compare view")
            await _tidy_compare(page, study)
            shots.append(await page.screenshot(out_dir / COMPARE_PNG, height=await _page_height(page)))
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
    with serve(tracking_db, port) as base, browser(chromium) as devtools_port:
        return asyncio.run(_drive(devtools_port, base, study, out_dir))


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
