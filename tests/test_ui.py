"""The MLflow UI started by ``ticketsearch ui`` shows a job's experiment and its runs, in a
real headless browser (Playwright driving the system's Chromium).

Needs the ``playwright`` Python package and a Chromium at ``/usr/bin/chromium`` (or at
``$TICKETSEARCH_CHROMIUM``); skipped when either is missing. A full-page screenshot is saved
to ``$TICKETSEARCH_TEST_ARTIFACTS/mlflow-ui.png`` (default ``test-artifacts/``).
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest
from conftest import tiny_job_dict
from servers import free_port, server_env, start_process, stop_process_group, wait_for_health

import ticketsearch
from ticketsearch.local import run_job_locally
from ticketsearch.spec import parse_job

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("TICKETSEARCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
INSTALL_HINT = ("install them with `pip install playwright` (part of `pip install -e .[dev]`) "
                "and `apt-get install chromium` (Debian's package; `playwright install` is not "
                "needed)")
VIEWPORT = {"width": 1600, "height": 1000}
RENDER_TIMEOUT_MS = 60_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sync_playwright():
    """Playwright's entry point; skips (before any job runs) naming how to install what is
    missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"the playwright package is not importable; {INSTALL_HINT}")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}; {INSTALL_HINT}")
    return sync_playwright


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("TICKETSEARCH_TEST_ARTIFACTS", "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header; AssertionError if it is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def ui_job(tmp_path_factory):
    """A tiny dense + CS + IMP job run locally into a fresh storage folder (SQLite store)."""
    storage = tmp_path_factory.mktemp("ui") / "runs"
    data = tiny_job_dict(dense={}, cs={"rounds": 2}, imp={"rounds": 2})
    data["name"] = "ui-job"
    data["train"] |= {"epochs_per_round": 3, "lr_milestones": [2]}
    job = parse_job(data)
    with pytest.MonkeyPatch.context() as patch:  # the store under storage, whatever the env
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = run_job_locally(job, storage=storage, echo=lambda _: None)
    assert summary["tracking"]["uri"].startswith("sqlite:///")
    return job, summary, storage


def start_ui(storage: Path, log: Path):
    """``ticketsearch ui`` on ``storage`` and a free loopback port, in its own process
    group: (process, base url), once it answers."""
    port = free_port()
    env = server_env()
    source_root = str(Path(ticketsearch.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    process = start_process([sys.executable, "-m", "ticketsearch.cli", "ui", "--storage",
                             str(storage), "--port", str(port)], log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process, log)
    except RuntimeError:
        stop_process_group(process)
        raise
    return process, url


@pytest.fixture(scope="module")
def ui_url(ui_job, tmp_path_factory):
    """``ticketsearch ui`` on the job's storage: (base url, the link it printed); stopped
    after."""
    _, _, storage = ui_job
    log = tmp_path_factory.mktemp("ui-log") / "ui.log"
    process, url = start_ui(storage, log)
    try:
        lines = log.read_text().splitlines()
        (line,) = [x for x in lines if x.startswith("MLflow UI: ")]
        (tickets,) = [x for x in lines if x.startswith("tickets: ")]
        yield url, line.split("MLflow UI: ", 1)[1].strip(), tickets.split(": ", 1)[1].strip()
    finally:
        stop_process_group(process)


def show_trial_runs(page, parent_name: str, trial_names: list[str]) -> str:
    """In the experiment's runs table, expand the job's parent run, wait until every trial
    run's name has rendered; return the page's visible text."""
    parent = page.locator('[role=gridcell][col-id*="Run Name"]', has_text=parent_name)
    parent.wait_for()
    parent.locator("button").first.click()  # the expander of the parent's child runs
    for name in trial_names:
        page.get_by_text(name, exact=True).first.wait_for()
    close_assistant(page)
    return page.inner_text("body")


def close_assistant(page) -> None:
    """Close MLflow 3's assistant side panel, which hides part of the table, if it is open."""
    button = page.get_by_role("button", name="Close", exact=True)
    if button.count():
        button.first.click()


def test_the_mlflow_ui_shows_the_job_and_its_runs(sync_playwright, ui_job, ui_url):
    """The link `ticketsearch ui` prints opens the job's runs table in MLflow's
    model-training view, not on the GenAI overview."""
    job, summary, _ = ui_job
    base, link, _ = ui_url
    experiment_id = summary["tracking"]["experiment_id"]
    assert link == f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    parent_name = f"{job.name} {job.spec_hash()}"
    trial_names = [t.name for t in job.trials()]
    assert [t.method for t in job.trials()] == ["dense", "cs", "imp"]
    screenshot = artifacts_dir() / "mlflow-ui.png"
    text = open_in_browser(sync_playwright, link, screenshot,
                           lambda page: show_trial_runs(page, parent_name, trial_names))
    assert job.name in text and parent_name in text
    assert "Model registry" in text and "Judges" not in text  # model training, not GenAI
    for name in trial_names:
        assert name in text
    assert "cs s0=0 λ=1e-08 β=200 seed=0" in text
    assert screenshot.stat().st_size > 10_000
    width, height = png_size(screenshot)
    assert width == VIEWPORT["width"] and height >= VIEWPORT["height"]


def open_in_browser(sync_playwright, url: str, screenshot: Path, show):
    """Open ``url`` in headless Chromium, run ``show(page)`` and return what it returns; the
    page is saved to ``screenshot`` also when ``show`` fails."""
    screenshot.unlink(missing_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(RENDER_TIMEOUT_MS)
            page.goto(url)
            try:
                return show(page)
            finally:  # also when rendering failed: the screenshot shows how far it got
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()


def test_the_tickets_link_shows_one_row_per_ticket_with_its_metrics(sync_playwright, ui_job,
                                                                     ui_url):
    """The tickets link `ticketsearch ui` prints: the job's ticket runs, flat, sparsest
    first, with sparsity and test accuracy columns and each ticket's logged model."""
    from mlflow.tracking import MlflowClient

    job, summary, _ = ui_job
    _, _, tickets = ui_url
    assert "viewStateShareKey=tickets-" in tickets and "workflowType=machine_learning" in tickets
    client = MlflowClient(summary["tracking"]["uri"])
    runs = client.search_runs([summary["tracking"]["experiment_id"]],
                              "tags.`ticketsearch.kind` = 'ticket'")
    assert sorted(r.data.tags["ticket"] for r in runs) == ["final", "round-01", "round-02"]

    def rows(page):
        page.get_by_text("matching runs").first.wait_for()
        close_assistant(page)
        header = page.locator('[role=columnheader]')
        for name in ("sparsity", "test_acc", "Models"):
            header.filter(has_text=name).first.wait_for()
        found = {}
        for run in runs:
            row = page.locator("[role=row]", has_text=run.info.run_name)
            row.first.wait_for()
            index = row.first.get_attribute("row-index")  # the grid splits a row in parts
            parts = page.locator(f'[role=row][row-index="{index}"]').all_inner_texts()
            found[run.info.run_id] = row.count(), " ".join(parts)
        return found, page.inner_text("body")

    found, text = open_in_browser(sync_playwright, tickets,
                                  artifacts_dir() / "mlflow-tickets.png", rows)
    assert "3 matching runs" in text
    for run in runs:
        count, row = found[run.info.run_id]
        assert count == 1, run.info.run_name
        metrics = run.data.metrics
        for key in ("sparsity", "test_acc"):
            assert str(metrics[key])[:6] in row, (key, row)
        assert "model" in row  # the Models column links the ticket's logged model
    assert "dense seed=0" not in text  # trials are not rows of the tickets view


def test_ui_refuses_a_port_that_is_taken(ui_job, capsys):
    import socket

    from ticketsearch.cli import main

    _, _, storage = ui_job
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--storage", str(storage), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "taken" in err


def test_sigterm_stops_the_ui_and_its_server(ui_job, tmp_path):
    import signal
    import time

    from servers import group_alive, is_healthy

    _, _, storage = ui_job
    process, url = start_ui(storage, tmp_path / "ui.log")
    try:
        process.send_signal(signal.SIGTERM)  # to `ticketsearch ui` alone, as a service manager
        assert process.wait(timeout=30) == 0
        deadline = time.monotonic() + 15
        while is_healthy(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not is_healthy(url)
    finally:
        stop_process_group(process)
    assert not group_alive(process.pid)
