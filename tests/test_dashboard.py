"""The MLflow UI in a real browser: two runs logged by the tracker are comparable there.

Headless Chromium (Debian's `chromium` + `chromium-driver`, installed by tests/browser_deps.sh)
driven by Selenium opens the experiment, finds both runs, adds a metric column, selects the two
runs, opens MLflow's compare view, then the runs' Chart view (both runs' curves on each metric's
chart), and saves screenshots under test-artifacts/. The Chart view's is also the README's
picture, docs/img/mlflow-compare.png: `ORCH_UPDATE_README_PICTURE=1 pytest tests/test_dashboard.py`
rewrites it (otherwise the test writes its copy under test-artifacts/).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.spec import JobSpec, apply_overrides
from orchestrator.stack import Stack
from orchestrator.tracking.runs import WORKFLOW_PARAM, experiment_runs_view
from orchestrator.tracking.tracker import MlflowTracker
from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "test-artifacts"
README_PICTURE = ROOT / "docs" / "img" / "mlflow-compare.png"  # what a user sees comparing runs
METRIC = "val/top1_err"
TIMEOUT_S = 90  # the UI's first load on a busy 2-core machine


def log_demo_run(experiment: str, job: str, seed: int) -> str:
    """A short run through the tracker: the loop's metric names, a learning-curve shape."""
    overrides = ["model.name=cifar_resnet20", f"seed={seed}", "optim.lr=0.1", "data.url="]
    spec = apply_overrides(JobSpec(name=job), [f"tracking.experiment={experiment}", *overrides])
    tracker = MlflowTracker(spec, {"model": "cifar_resnet20"}, system_metrics_interval_s=None)
    tau = 12 + 6 * seed
    for step in range(2, 41, 2):
        metrics = {
            "train/loss": 2.3 * math.exp(-step / tau),
            "train/top1_err": 0.9 * math.exp(-step / (2 * tau)),
            "train/lr": 0.1,
            "system/images_per_s": 900.0 + 10 * seed,
        }
        if step % 10 == 0:
            metrics[METRIC] = 0.88 * math.exp(-step / (2.4 * tau))
        tracker.log_metrics(metrics, step)
    tracker.finish("FINISHED")
    return tracker.run_id


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One headless Chromium for the file's tests (its start-up is seconds on a busy machine);
    a fresh profile: the first test sees what a new user sees."""
    tmp_path = tmp_path_factory.mktemp("chromium")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            f"{CHROMIUM} / {CHROMEDRIVER} missing: "
            "run `bash tests/browser_deps.sh` (make test does)"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="pip install selenium (the dev extra)"
    )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1600,1000",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def log_in(driver: object, stack: Stack) -> None:
    """Send the stack's MLflow credentials with every request the browser makes, as a user's
    browser does once its basic-auth prompt is answered (headless Chromium shows none)."""
    import base64

    env = stack.env()
    user, password = env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
    )


def wait_for(
    driver: object, what: str, cond: Callable[[], object], timeout: float = TIMEOUT_S
) -> object:
    """Poll `cond` until truthy; on timeout fail with a screenshot and the page's text."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception:  # noqa: BLE001, S110 (elements come and go while React renders)
            pass
        if time.monotonic() > deadline:
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "mlflow-ui-failure.png"
            driver.save_screenshot(str(shot))
            text = driver.find_element("tag name", "body").text[:2000]
            pytest.fail(
                f"MLflow UI: no {what} within {timeout:.0f} s "
                f"(screenshot {shot}); page text:\n{text}"
            )
        time.sleep(0.5)


def click_when_shown(driver: object, what: str, xpath: str) -> None:
    """Click the first displayed element matching `xpath`, retrying until it takes the click
    (the artifact tree renders a row before it can be clicked, and keeps hidden copies)."""

    def click() -> bool:
        shown = [e for e in driver.find_elements("xpath", xpath) if e.is_displayed()]
        shown[0].click()  # IndexError or not-interactable: wait_for polls again
        return True

    wait_for(driver, what, click)


def show_chart_view(driver: object, view: str, jobs: list[str], picture: bool = True) -> Path:
    """The runs' Chart view, as a user opens it (the chart toggle above the runs table): every
    metric a chart, one curve per run. Saves its screenshot, and the README's picture."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    d = driver
    d.get(view)
    body = lambda: d.find_element(By.TAG_NAME, "body").text
    wait_for(d, "run names", lambda: all(job in body() for job in jobs))
    toggle = wait_for(
        d,
        "the Chart view toggle",
        lambda: d.find_element(By.CSS_SELECTOR, "input[name='runs-view-mode'][value='CHART']"),
    )
    # clicked through the page's script: a popover left open under the pointer cannot take the
    # click (one run timed out here with the search box's syntax help on screen)
    d.execute_script("arguments[0].click();", toggle)
    charts = lambda: [
        c for c in d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot") if c.is_displayed()
    ]
    # a chart's legend names each run with its metric: both runs drawn on the same chart
    wait_for(
        d,
        "both runs' curves on the train/loss chart",
        lambda: all(f"{job} (train/loss)" in body() for job in jobs) and len(charts()) >= 2,
    )
    for sidebar in d.find_elements(By.CSS_SELECTOR, "button[aria-label='Toggle sidebar']"):
        sidebar.click()  # the navigation sidebar folds away: more room for the charts
    d.set_window_size(1600, 1250)  # tall enough for the val/ group's chart below train/'s
    time.sleep(1.5)  # let the charts redraw at their new size
    shot = ARTIFACTS / ("mlflow-charts.png" if picture else "mlflow-first-charts.png")
    d.save_screenshot(str(shot))
    if not picture:
        return shot
    assert shot.stat().st_size > 20_000, f"{shot} is (nearly) blank"
    # a UI screenshot keeps its look in 256 colours, at a third of the bytes; the README's copy
    # is rewritten only when asked, so that a test run leaves the checkout clean
    picture = (
        README_PICTURE
        if os.environ.get("ORCH_UPDATE_README_PICTURE")
        else ARTIFACTS / README_PICTURE.name
    )
    picture.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(shot) as image:
        image.convert("RGB").quantize(colors=256).save(picture, optimize=True)
    return shot


SECTIONS = ("achieved", "gap", "paper", "train", "val", "Model metrics", "System metrics")


def first_chart_section(text: str) -> str | None:
    """The first chart group's name in the chart view's text (each group's name is a line)."""
    lines = [line.strip() for line in text.splitlines()]
    return next((line for line in lines if line in SECTIONS), None)


def test_first_chart_section_is_read_from_the_page_text() -> None:
    assert first_chart_section("Runs\nachieved\ntop1_err\ntrain\nloss") == "achieved"
    assert first_chart_section("Charts\ntrain\nloss\nval\nSystem metrics") == "train"
    assert first_chart_section("no charts") is None


def test_a_new_user_opens_the_experiment_on_training(stack: Stack, browser: object) -> None:
    """What a user sees first, in a browser that has never opened MLflow: the experiment's runs
    (its address without the mode, as typed by hand) in Model training mode, no assistant
    panel, the chart view led by train/ and val/ (the paper comparison is a table), and
    Settings' telemetry off."""
    from selenium.webdriver.common.by import By

    from orchestrator.tracking.run_report import log_paper_report

    d = browser
    log_in(d, stack)
    experiment = f"first-look-{uuid.uuid4().hex[:6]}"
    jobs = [f"{experiment}-seed{seed}" for seed in (0, 1)]
    run_ids = [log_demo_run(experiment, job, seed) for seed, job in enumerate(jobs)]
    spec = apply_overrides(JobSpec(name=jobs[0]), ["model.name=cifar_resnet20", "data.url="])
    assert log_paper_report(MlflowClient(), run_ids[0], spec)["paper/top1_err"] == 8.75
    exp_id = MlflowClient().get_experiment_by_name(experiment).experiment_id
    body = lambda: d.find_element(By.TAG_NAME, "body").text
    mlflow_url = stack.urls()["mlflow"]

    d.get(f"{mlflow_url}/#/experiments/{exp_id}/runs")
    wait_for(d, "run names", lambda: all(job in body() for job in jobs))
    mode = d.execute_script("return window.localStorage.getItem('mlflow.workflowType_v1')")
    if mode is None:
        pytest.fail(
            "the test stack's MLflow serves no UI defaults: it was started by older code; "
            "stop it (python -m orchestrator.stack down --state-dir .stack-test) and rerun"
        )
    time.sleep(2)  # the assistant's panel opens a moment after the page
    text = body()
    ARTIFACTS.mkdir(exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "mlflow-first-look.png"))
    # Model training's sidebar (Runs, Models, Model registry), not GenAI's (Judges, Prompts)
    assert "Model registry" in text and "Judges" not in text and "Prompts & versions" not in text
    assert "MLflow Assistant" not in text, "the assistant's panel opened by itself"

    show_chart_view(d, f"{mlflow_url}/#/experiments/{exp_id}/runs", jobs, picture=False)
    assert first_chart_section(body()) == "train", body()[:1500]
    assert mode == '"machine_learning"'

    d.get(f"{mlflow_url}/#/settings")
    wait_for(d, "Settings' telemetry switch", lambda: "Enable telemetry" in body())
    after = body().split("Enable telemetry", 1)[1]
    assert re.search(r"\n(On|Off)\n", after) and re.search(r"\n(On|Off)\n", after)[1] == "Off"


def test_experiment_runs_compare_in_chromium(stack: Stack, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    (ARTIFACTS / "mlflow-ui-failure.png").unlink(missing_ok=True)  # from an earlier failure
    log_in(d, stack)
    experiment = f"dashboard-{uuid.uuid4().hex[:6]}"
    jobs = [f"{experiment}-seed{seed}" for seed in (0, 1)]
    run_ids = [log_demo_run(experiment, job, seed) for seed, job in enumerate(jobs)]
    client = MlflowClient()
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    assert [client.get_run(r).info.status for r in run_ids] == ["FINISHED", "FINISHED"]
    body = lambda: d.find_element(By.TAG_NAME, "body").text

    # the experiment: its runs table (the "Model training" view of MLflow 3's UI)
    # the address a job prints at its end: the runs table, thanks to the experiment's kind
    view = experiment_runs_view(experiment)
    assert view == f"{stack.urls()['mlflow']}/#/experiments/{exp_id}/runs?{WORKFLOW_PARAM}"
    d.get(view)
    wait_for(d, "run names", lambda: all(job in body() for job in jobs))
    for close in d.find_elements(
        By.CSS_SELECTOR, "button[aria-label=Close]"
    ):  # the assistant panel
        close.click()

    # a metric column, chosen the way a user does: Columns -> search -> tick the metric
    d.find_element(By.XPATH, "//button[normalize-space()='Columns']").click()
    search = wait_for(
        d,
        "column search box",
        lambda: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']"),
    )
    search.send_keys(METRIC)
    click_when_shown(
        d,
        f"{METRIC} in the column chooser",
        f"//*[@role='dialog']//*[normalize-space(text())='{METRIC}']",
    )
    search.send_keys(Keys.ESCAPE)
    headers = lambda: [
        h.text.strip() for h in d.find_elements(By.CSS_SELECTOR, "[role=columnheader]")
    ]
    wait_for(d, f"a {METRIC} column", lambda: METRIC in headers())
    final = [client.get_run(r).data.metrics[METRIC] for r in run_ids]
    # each run's last value appears in the table (the UI prints it at full precision)
    wait_for(
        d,
        "both runs' metric values",
        lambda: all(repr(v)[:6] in body() or f"{v:.3f}" in body() for v in final),
    )
    ARTIFACTS.mkdir(exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "mlflow-experiment.png"))

    # select both runs, then Compare
    for job in jobs:
        row = d.find_element(By.XPATH, f"//div[@role='row'][.//a[normalize-space()='{job}']]")
        row_index = row.get_attribute("row-index")
        d.find_element(
            By.CSS_SELECTOR, f"div[role=row][row-index='{row_index}'] input[type=checkbox]"
        ).click()
    click_when_shown(d, "the Compare button", "//button[normalize-space()='Compare']")
    wait_for(d, "the compare view", lambda: "Comparing 2 Runs" in body())
    wait_for(d, "both runs in the compare view", lambda: all(r in body() for r in run_ids))
    assert "compare-runs" in d.current_url
    for run_id in run_ids:
        assert run_id in d.current_url
    # params and metrics side by side, with each run's last validation error (3 significant digits)
    wait_for(
        d,
        "params and metrics in the compare view",
        lambda: all(
            k in body()
            for k in ("Parameters", "Metrics", "train/loss", "seed", *(f"{v:.3g}" for v in final))
        ),
    )
    time.sleep(1)  # let the plot finish drawing
    shots = [ARTIFACTS / "mlflow-compare.png", ARTIFACTS / "mlflow-compare-metrics.png"]
    d.save_screenshot(str(shots[0]))
    # the side-by-side metrics table, lower on the same page
    heading = d.find_element(
        By.XPATH, "//*[normalize-space(text())='Metrics' and not(ancestor::*[@role='dialog'])]"
    )
    d.execute_script("arguments[0].scrollIntoView({block: 'start'});", heading)
    time.sleep(0.5)
    d.save_screenshot(str(shots[1]))
    for shot in shots:
        assert shot.stat().st_size > 20_000, f"{shot} is (nearly) blank"

    # back to the experiment: the Chart view, each metric's curves of both runs together
    show_chart_view(d, view, jobs)


def test_a_study_parent_run_shows_its_table_and_nested_runs(
    stack: Stack, browser: object, small_study: dict
) -> None:
    """The small study's parent run in Chromium: its Child runs are its 4 trials, and its
    artifacts hold the study table (opened, its rows on screen)."""
    from selenium.webdriver.common.by import By

    from orchestrator.tracking.tags import ROLE_TAG, STUDY_TAG

    d = browser
    log_in(d, stack)
    client = MlflowClient()
    exp = client.get_experiment_by_name(small_study["experiment"])
    found = client.search_runs(
        [exp.experiment_id],
        f"tags.`{STUDY_TAG}` = '{small_study['name']}' and tags.`{ROLE_TAG}` = 'study'",
    )
    assert len(found) == 1
    parent = found[0].info.run_id
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=50
    )
    names = sorted(c.info.run_name for c in children)
    assert len(names) == 4
    body = lambda: d.find_element(By.TAG_NAME, "body").text
    base = f"{stack.urls()['mlflow']}/#/experiments/{exp.experiment_id}"

    # the runs table: the parent, its children under it once expanded
    d.get(f"{base}/runs")
    wait_for(d, "the study's parent run", lambda: small_study["name"] in body())
    for close in d.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        close.click()
    # the parent's expander, the small button before its name (a click through the page's
    # script: the design system keeps the button's box empty until the row is hovered)
    cell = wait_for(
        d,
        "the parent's Run Name cell",
        lambda: d.find_element(
            By.XPATH,
            f"//a[normalize-space()='{small_study['name']}']"
            "/ancestor::*[contains(@class, 'ag-cell')][1]",
        ),
    )
    buttons = cell.find_elements(By.CSS_SELECTOR, "button[data-component-id*='runnamecell']")
    for button in buttons or cell.find_elements(By.TAG_NAME, "button"):
        d.execute_script("arguments[0].click();", button)
        time.sleep(1.0)
        if all(n in body() for n in names):
            break
    if not all(n in body() for n in names):  # else the parent's own page lists its child runs
        d.get(f"{base}/runs/{parent}")
    wait_for(d, "the trials nested under the parent", lambda: all(n in body() for n in names))
    ARTIFACTS.mkdir(exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "mlflow-study-runs.png"))

    # the parent's artifacts: study/table.md, opened
    d.get(f"{base}/runs/{parent}/artifacts")
    click_when_shown(d, "the study folder", "//*[text()='study']")
    click_when_shown(d, "the table artifact", "//*[text()='table.md']")
    wait_for(
        d,
        "the study table's rows",
        lambda: all(cell in body() for cell in ("cifar_resnet20", "cifar_plain32", "±", "8.75")),
    )
    shot = ARTIFACTS / "mlflow-study-table.png"
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000, f"{shot} is (nearly) blank"
