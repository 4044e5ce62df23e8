"""The reviewer's pages in a real browser: the demo's audit and correction reports, served by a real
`mlflow server` over the demo's store, opened in headless Chromium two ways, and checked for what
a reviewer sees (rendered, not just delivered): the verdict banner and its next command, the
flagged examples, one table row per suspect / candidate / gate with its pictures loaded, and,
inside MLflow's artifact viewer, no horizontal overflow. Screenshots go to build/screenshots/.

The two views:
- directly: the bytes of the server's artifact download route (`/get-artifact`). The route answers
  `Content-Disposition: attachment`, so a browser navigating to it saves the file instead of
  showing it; the test fetches it in a page of the server's origin and shows it as a top-level
  document from a blob URL with the content type the route sent (what MLflow's own viewer does,
  inside a frame).
- the artifact viewer: the run page `#/experiments/<id>/runs/<run>/artifacts/<path>`, which shows
  an HTML artifact in a sandboxed iframe; the test switches into it.

Whatever the demo's verdict on this machine (docs/architecture.md, "Reproducibility"), the
assertions follow it: a gates table only when a candidate passed selection, otherwise the verdict
says none did and the candidates table lists each one.
"""

from __future__ import annotations

import base64
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest

from tests.browser.conftest import record_screenshot
from tests.deploy.conftest import mlflow_server_process

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.xdist_group("demo")]  # see tests/e2e/test_demo.py

WAIT_S = 60
OVERFLOW_TOLERANCE_PX = 2
MAX_SCREENSHOT_PX = 16000  # Chromium's capture limit is 16384 px a side
GATE_NAMES = ("fix_rate", "heldout_accuracy", "class_recall", "canary_flips", "onnx_parity", "evaluation_table")
VIEWER_IFRAME = "iframe.mlflow-html-iframe, iframe[src^='blob:'], iframe[srcdoc]"
REPORTS = {"audit": "audit/report.html", "correction": "correction/report.html"}


@dataclass(frozen=True)
class Demo:
    """What the demo logged, as the reports must show it."""

    workdir: Path
    experiment_id: str
    audit_run_id: str
    correction_run_id: str
    n_flagged: int
    suspects: list[dict]  # train_id, action, current_label, proposed_label
    candidates: list[str]
    gated: bool  # a candidate passed selection and was gated
    registered: bool

    def run_id(self, report: str) -> str:
        return self.audit_run_id if report == "audit" else self.correction_run_id


@pytest.fixture(scope="module")
def demo(browser, request) -> Demo:
    """The demo pipeline (train, register, audit, correct) in a fresh workdir. Needs `browser`, and
    starts the (session-scoped) Prefect harness only after it: a machine without a browser skips
    before starting or training anything."""
    from mlflow.tracking import MlflowClient

    from registry_hooks import audit_log
    from registry_hooks.store import use_store

    started = time.monotonic()
    result = request.getfixturevalue("demo_run")  # shared with tests/e2e
    print(f"demo took {time.monotonic() - started:.0f} s (0 when another module ran it first)")
    use_store(result.workdir)
    correction = result.correction
    suspects = audit_log.load_table(result.audit.run_id, "correction_candidates", artifact_dir="audit")
    candidates = audit_log.load_table(correction.run_id, "candidates", artifact_dir="correction")
    return Demo(
        workdir=result.workdir,
        experiment_id=MlflowClient().get_run(result.audit.run_id).info.experiment_id,
        audit_run_id=result.audit.run_id, correction_run_id=correction.run_id, n_flagged=result.n_flagged,
        suspects=suspects[["train_id", "action", "current_label", "proposed_label"]].to_dict("records"),
        candidates=list(candidates["candidate"]), gated=correction.gates is not None,
        registered=correction.registered_version is not None)


@pytest.fixture(scope="module")
def mlflow_ui(demo, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 over the demo's store: its sqlite database, artifacts under
    <workdir>/mlruns (what `ui_command` prints). Yields the server URL."""
    from registry_hooks.store import tracking_uri

    log_path = tmp_path_factory.mktemp("mlflow-ui") / "server.log"
    with mlflow_server_process(tracking_uri(demo.workdir), (demo.workdir / "mlruns").as_uri(), log_path) as url:
        yield url


# ---------------------------------------------------------------------------------------------
# Opening a report


def _wait(driver, condition, what: str, timeout_s: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (at {driver.current_url})") from None


_LOADED = "return document.readyState === 'complete' && !!document.body && !!document.querySelector('h1')"


def open_directly(driver, server: str, run_id: str, path: str) -> None:
    """The report as the download route serves it, shown as a top-level page of the server's origin."""
    driver.get(f"{server}/health")
    route = f"/get-artifact?path={quote(path)}&run_uuid={run_id}"
    response = driver.execute_async_script("""
        const [route, done] = arguments;
        fetch(route).then(async (r) => {
            const type = r.headers.get('content-type') || '';
            const body = await r.blob();
            done({status: r.status, type, href: URL.createObjectURL(new Blob([body], {type}))});
        }).catch((e) => done({status: 0, type: String(e), href: null}));""", route)
    assert response["status"] == 200, f"{route}: HTTP {response['status']} {response['type']}"
    assert response["type"].startswith("text/html"), f"{route} is served as {response['type']!r}, not HTML"
    driver.get(response["href"])
    _wait(driver, lambda d: d.execute_script(_LOADED), f"{path} to load")


def open_in_viewer(driver, server: str, experiment_id: str, run_id: str, path: str):
    """The run page's artifact viewer showing `path`; returns its iframe, with the driver inside it."""
    from selenium.webdriver.common.by import By

    driver.get("about:blank")
    driver.get(f"{server}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}")

    def shown_frame(d):
        frames = [f for f in d.find_elements(By.CSS_SELECTOR, VIEWER_IFRAME) if f.is_displayed()]
        return frames[0] if frames and frames[0].size["width"] > 0 and frames[0].size["height"] > 0 else None

    frame = _wait(driver, shown_frame, f"MLflow's artifact viewer to show {path} in an iframe")
    driver.switch_to.frame(frame)
    _wait(driver, lambda d: d.execute_script(_LOADED), f"{path} to load inside the viewer's iframe")
    return frame


def expand_and_load(driver) -> None:
    """Open every collapsed <details> as a reviewer would (click its summary), then wait until
    every image has finished loading (or failed)."""
    from selenium.webdriver.common.by import By

    for _ in range(10):  # nested <details> show up once their parent is open
        closed = [s for s in driver.find_elements(By.CSS_SELECTOR, "details:not([open]) > summary") if s.is_displayed()]
        if not closed:
            break
        for summary in closed:
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", summary)
            summary.click()
    driver.execute_script("window.scrollTo(0, 0)")
    _wait(driver, lambda d: d.execute_script("return [...document.images].every((i) => i.complete)"),
          "every image to load")


# ---------------------------------------------------------------------------------------------
# Screenshots


def _png(driver, path: Path, clip: dict | None = None) -> Path:
    params = {"format": "png", "captureBeyondViewport": clip is not None}
    if clip is not None:
        params["clip"] = {**clip, "x": 0, "y": 0, "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", params)
    path.write_bytes(base64.b64decode(shot["data"]))
    record_screenshot(path)
    return path


def screenshot_viewport(driver, path: Path) -> Path:
    return _png(driver, path)


def screenshot_full_page(driver, path: Path) -> Path:
    """The whole top-level document, beyond the window."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"width": math.ceil(size["width"]), "height": min(math.ceil(size["height"]), MAX_SCREENSHOT_PX)}
    return _png(driver, path, clip)


def screenshot_viewer_full(driver, frame, path: Path) -> Path:
    """The run page with its viewer tall enough to show the whole report (the window made taller
    by the report's hidden height; its width, hence the report's layout, unchanged)."""
    content = driver.execute_script("return document.documentElement.scrollHeight")
    driver.switch_to.default_content()
    shown = frame.rect["height"]
    width, height = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    target = min(height + max(0, content - shown), MAX_SCREENSHOT_PX)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": target, "deviceScaleFactor": 1, "mobile": False})
    try:
        try:
            _wait(driver, lambda d: frame.rect["height"] >= shown + (target - height) - 4, "the viewer to grow", 5)
        except AssertionError:
            pass  # the viewer keeps its height on this MLflow version: the screenshot shows what it shows
        return _png(driver, path)
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        driver.switch_to.frame(frame)


# ---------------------------------------------------------------------------------------------
# What the report shows (read in the report's document, checked in Python)

_STATE = r"""
const tolerance = arguments[0];
const html = document.documentElement;
const box = (e) => e.getBoundingClientRect();
const image = (i) => ({loaded: i.complete && i.naturalWidth > 0, shown: box(i).width > 0 && box(i).height > 0,
                       thumb: i.classList.contains('thumb'), alt: i.alt.slice(0, 60)});
const rowsOf = (t) => t.tHead ? [...t.tBodies].flatMap((b) => [...b.rows]) : [...t.rows].slice(1);
const table = (css) => {
  const t = document.querySelector(css);
  return t && rowsOf(t).map((r) => ({cells: [...r.cells].map((c) => c.innerText.trim()),
                                     thumbs: [...r.querySelectorAll('img.thumb')].map(image)}));
};
const describe = (e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
  (e.classList.length ? '.' + [...e.classList].join('.') : '') +
  ` (right edge ${Math.round(box(e).right + window.scrollX)} px)`;
const sticksOut = (e) => box(e).right + window.scrollX > html.clientWidth + tolerance;
const verdict = document.getElementById('verdict');
const flagged = document.querySelector('section#flagged');
return {
  verdict: verdict && {classes: [...verdict.classList], text: verdict.innerText, shown: box(verdict).height > 0,
                       command: verdict.querySelector('code.next-command')?.innerText.trim() ?? null},
  sections: [...document.querySelectorAll('section[id]')].map((s) => s.id),
  flagged: flagged && [...flagged.querySelectorAll('img')].map(image),
  suspects: table('section#suspects table.suspects'),
  candidates: table('section#candidates table.candidates'),
  gates: table('section#gates table.gates'),
  edits_section: !!document.querySelector('section#edits'),
  edits: table('section#edits table.edits'),
  images: [...document.images].map(image),
  scroll_width: html.scrollWidth, client_width: html.clientWidth,
  overflowing: [...document.body.querySelectorAll('*')]
    .filter((e) => sticksOut(e) && !(e.parentElement && sticksOut(e.parentElement))).slice(0, 8).map(describe),
};
"""


def report_state(driver) -> dict:
    return driver.execute_script(_STATE, OVERFLOW_TOLERANCE_PX)


def _broken(images: list[dict]) -> list[str]:
    return [f"{i['alt'] or 'img'} ({'not loaded' if not i['loaded'] else 'not rendered'})"
            for i in images if not (i["loaded"] and i["shown"])]


def verdict_problems(state: dict, demo: Demo, report: str) -> list[str]:
    verdict = state["verdict"]
    if verdict is None:
        return ['no verdict banner (<div id="verdict" class="verdict passed|failed">)']
    problems = []
    outcome = {"passed", "failed"} & set(verdict["classes"])
    if "verdict" not in verdict["classes"] or len(outcome) != 1:
        problems.append(f"verdict banner classes {verdict['classes']}: want verdict and one of passed / failed")
    if not verdict["shown"]:
        problems.append("the verdict banner is not rendered")
    if report == "correction" and outcome and outcome != {"passed" if demo.registered else "failed"}:
        did = "registered" if demo.registered else "did not register"
        problems.append(f"verdict {outcome} but the correction {did} a challenger")
    command = verdict["command"]
    if not command:
        return [*problems, 'no <code class="next-command"> in the verdict banner']
    words = shlex.split(command)
    if words[0] != "model-audit":
        problems.append(f"next command {command!r} is not a model-audit command")
    if str(demo.workdir) not in words:
        problems.append(f"next command {command!r} does not name the workdir {demo.workdir}")
    if report == "audit" and words[1:3] != ["correct", demo.audit_run_id]:
        problems.append(f"the audit's next command {command!r} is not `model-audit correct {demo.audit_run_id} ...`")
    if report == "correction" and demo.registered and words[1:2] != ["promote"]:
        problems.append(f"a challenger was registered, but the next command {command!r} does not promote it")
    return problems


def audit_problems(state: dict, demo: Demo) -> list[str]:
    problems = []
    flagged = state["flagged"]
    if flagged is None:
        problems.append('no <section id="flagged">')
    else:
        if len(flagged) < demo.n_flagged:
            problems.append(f"{len(flagged)} images in the flagged section for {demo.n_flagged} flagged examples")
        problems += [f"flagged section: {b}" for b in _broken(flagged)]
    rows = state["suspects"]
    if rows is None:
        if demo.suspects:
            problems.append(f'no <table class="suspects"> in <section id="suspects"> ({len(demo.suspects)} suspects)')
        return problems
    if len(rows) != len(demo.suspects):
        problems.append(f"{len(rows)} rows in the suspects table for {len(demo.suspects)} suspects")
    by_id = {str(s["train_id"]): s for s in demo.suspects}
    for n, row in enumerate(rows, 1):
        cells = row["cells"]
        ids = [c for c in cells if c in by_id]
        if not ids:
            problems.append(f"suspects row {n} names no suspect's train id: {cells}")
            continue
        suspect = by_id[ids[0]]
        wanted = [suspect["action"], str(int(suspect["current_label"]))]
        if not pd.isna(suspect["proposed_label"]):
            wanted.append(str(int(suspect["proposed_label"])))
        missing = [w for w in wanted if w not in cells]
        if missing:
            problems.append(f"suspects row {n} ({ids[0]}) lacks {missing} (action, current, proposed label): {cells}")
        if len(row["thumbs"]) != 1:
            problems.append(f"suspects row {n} ({ids[0]}) has {len(row['thumbs'])} img.thumb, want 1")
        problems += [f"suspects row {n} ({ids[0]}): {b}" for b in _broken(row["thumbs"])]
    return problems


def correction_problems(state: dict, demo: Demo) -> list[str]:
    problems = []
    rows = state["candidates"]
    if rows is None:
        problems.append('no <table class="candidates"> in <section id="candidates">')
    else:
        if len(rows) != len(demo.candidates):
            problems.append(f"{len(rows)} rows in the candidates table for {len(demo.candidates)} candidates tried")
        for name in demo.candidates:
            if not any(row["cells"] and (name in row["cells"] or row["cells"][0].startswith(name)) for row in rows):
                problems.append(f"candidate {name!r} has no row in the candidates table")
    gates = state["gates"]
    if demo.gated:
        if gates is None:
            problems.append('a candidate was gated, but there is no <table class="gates"> in <section id="gates">')
        else:
            names = [row["cells"][0] if row["cells"] else "" for row in gates]
            if sorted(names) != sorted(GATE_NAMES):
                problems.append(f"gates table rows start with {names}, want one row per gate {list(GATE_NAMES)}")
    else:
        if gates:
            problems.append(f"no candidate passed selection, yet a gates table with {len(gates)} rows")
        verdict = (state["verdict"] or {}).get("text", "")
        if "no repair candidate passed" not in verdict.lower():
            problems.append(f"no candidate passed selection, but the verdict does not say so: {verdict[:200]!r}")
    if not state["edits_section"]:
        problems.append('no <section id="edits">')
    for n, row in enumerate(state["edits"] or [], 1):
        if not row["thumbs"]:
            problems.append(f"edits row {n} has no img.thumb: {row['cells']}")
        problems += [f"edits row {n}: {b}" for b in _broken(row["thumbs"])]
    return problems


def content_problems(state: dict, demo: Demo, report: str) -> list[str]:
    problems = verdict_problems(state, demo, report)
    problems += audit_problems(state, demo) if report == "audit" else correction_problems(state, demo)
    problems += [f"image {b}" for b in _broken(state["images"])]
    return problems


def overflow_problems(state: dict) -> list[str]:
    if state["scroll_width"] <= state["client_width"] + OVERFLOW_TOLERANCE_PX:
        return []
    return [f"the report overflows the viewer's frame horizontally: scrollWidth {state['scroll_width']} px > "
            f"clientWidth {state['client_width']} px; sticking out: {', '.join(state['overflowing']) or '?'}"]


def describe(state: dict, report: str, view: str) -> str:
    """One line of what the browser showed (printed, so a passing run says what it checked)."""
    verdict = state["verdict"] or {"classes": ["(none)"]}
    counts = {name: len(state[name]) for name in ("flagged", "suspects", "candidates", "gates", "edits")
              if state[name] is not None}
    loaded = sum(i["loaded"] and i["shown"] for i in state["images"])
    return (f"{report} report, {view}: verdict {' '.join(verdict['classes'])}; "
            f"sections {', '.join(state['sections'])}; "
            f"table rows / flagged images {counts}; {loaded} of {len(state['images'])} images rendered; "
            f"width {state['scroll_width']} of {state['client_width']} px")


def _failure(problems: list[str], report: str, view: str) -> str:
    return f"{report} report ({view}), {len(problems)} problems:\n- " + "\n- ".join(problems)


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("report", list(REPORTS))
def test_report_renders_when_opened_directly(browser, demo, mlflow_ui, screenshots, report):
    open_directly(browser, mlflow_ui, demo.run_id(report), REPORTS[report])
    expand_and_load(browser)
    screenshot_full_page(browser, screenshots / f"{report}-direct.png")
    state = report_state(browser)
    print(describe(state, report, "direct"))
    problems = content_problems(state, demo, report)
    assert not problems, _failure(problems, report, "direct")


@pytest.mark.parametrize("report", list(REPORTS))
def test_report_renders_in_the_mlflow_artifact_viewer(browser, demo, mlflow_ui, screenshots, report):
    frame = open_in_viewer(browser, mlflow_ui, demo.experiment_id, demo.run_id(report), REPORTS[report])
    browser.switch_to.default_content()
    screenshot_viewport(browser, screenshots / f"{report}-viewer.png")
    browser.switch_to.frame(frame)
    expand_and_load(browser)
    state = report_state(browser)
    print(describe(state, report, "artifact viewer"))
    screenshot_viewer_full(browser, frame, screenshots / f"{report}-viewer-full.png")
    browser.switch_to.default_content()
    problems = content_problems(state, demo, report) + overflow_problems(state)
    assert not problems, _failure(problems, report, "artifact viewer")
