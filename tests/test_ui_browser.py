"""The user's view: a real browser on the MLflow UI over the store a search and a promote left.

A tiny 2-trial study runs, its candidate is promoted to champion, then `ftsearch ui` serves that
store (as `make ui` does) and headless Chromium, driven by Playwright, checks what a user looks
for: the study's experiment, the link `ftsearch ui` prints opening on its runs with their datasets
and models, its trial runs nested under the study run, a trial's artifacts, and the registered
model with its `champion` alias. A screenshot of every page goes to
$FTSEARCH_TEST_ARTIFACTS (default: test-artifacts/ in the repository).

Needs Debian's chromium (/usr/bin/chromium; .ci/run installs it). Without it the tests skip,
unless FTSEARCH_REQUIRE_BROWSER is set (as in CI), where they fail instead.

The UI polls the server for as long as a page is open, so pages are awaited with `load` and a
selector or text, never `networkidle`.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port, stop, tiny_study

pytestmark = pytest.mark.slow  # about a minute: a search, a server start and a browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SERVER_START_TIMEOUT = 60.0
PAGE_TIMEOUT_MS = 30_000
PARENT = "mlflow.parentRunId"


@dataclass(frozen=True)
class Store:
    """What the search and the promote left in the MLflow store."""

    state: Path
    experiment: str
    experiment_id: str
    parent_run: str
    trial_runs: dict[str, str]  # run name -> run id
    model: str


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("FTSEARCH_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def store(chromium, tmp_path_factory, tiny_bert, tiny_reviews) -> Store:
    """A finished 2-trial search whose registered model has been promoted to champion."""
    from mlflow import MlflowClient

    from ftsearch import settings
    from ftsearch.config import load_study
    from ftsearch.publish import promote
    from ftsearch.study import SearchOptions, run_search

    root = tmp_path_factory.mktemp("ui-store")
    study_file = root / "tiny.yaml"
    study_file.write_text(yaml.safe_dump(tiny_study(tiny_bert, tiny_reviews)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(settings.STATE_DIR_ENV, str(root / "mlruns"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            summary = run_search(SearchOptions(study=str(study_file), device="cpu", quiet=True))
            config = load_study(str(study_file))
            said = promote(config.registered_model, config.metric, config.direction == "maximize")
            assert said.startswith(f"promoted {config.registered_model} v"), said

            uri = settings.tracking_uri()
            client = MlflowClient(uri, registry_uri=uri)
            experiment = client.get_experiment_by_name(config.name)
            runs = client.search_runs([experiment.experiment_id])
            state = settings.state_dir()
        finally:
            # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; it must not outlive the search.
            os.environ.pop("MLFLOW_TRACKING_URI", None)
    trials = {r.info.run_name: r.info.run_id for r in runs if r.data.tags.get(PARENT) == summary.parent_run_id}
    assert len(trials) == 2, [r.info.run_name for r in runs]
    return Store(state, config.name, experiment.experiment_id, summary.parent_run_id, trials, config.registered_model)


@dataclass(frozen=True)
class Ui:
    """The running UI: its base URL and the link `ftsearch ui` printed for each study."""

    base: str
    links: dict[str, str]


@pytest.fixture(scope="module")
def ui(store, tmp_path_factory, request) -> Ui:
    """`ftsearch ui` over the store, as `make ui` starts it; always stopped after."""
    folder = tmp_path_factory.mktemp("mlflow-ui")
    port = free_port()
    log = folder / "server.log"
    command = [str(Path(sys.prefix) / "bin" / "ftsearch"), "ui", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]  # MLflow's default 4 only slow the start down here
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # The store the search left; no telemetry (there is no network); no job runner: it only serves
    # GenAI scorers, and it slows both the start and the stop.
    env.update(FTSEARCH_STATE_DIR=str(store.state), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with log.open("wb") as out:
        # Its own session, so that the finalizer can end its whole process group.
        server = subprocess.Popen(
            command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    request.addfinalizer(lambda: stop(server))

    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    deadline = started + SERVER_START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    print(f"mlflow ui answered on {base} after {time.monotonic() - started:.1f} s")
                    break
        except (urllib.error.URLError, OSError):
            pass
        exited = server.poll()
        if exited is not None or time.monotonic() > deadline:
            what = (
                f"exited with code {exited}" if exited is not None
                else f"did not answer within {SERVER_START_TIMEOUT:.0f} s"
            )
            output = log.read_text(errors="replace")[-6000:]
            pytest.fail(f"ftsearch ui on {base} {what}\ncommand: {' '.join(command)}\n--- its output ---\n{output}")
        time.sleep(0.5)
    printed = log.read_text(errors="replace")
    links = dict(re.findall(r"^  study (\S+): (\S+)$", printed, flags=re.MULTILINE))
    assert printed.startswith(f"MLflow UI: {base}\n") and set(links) == {store.experiment}, printed[:2000]
    return Ui(base, links)


@pytest.fixture(scope="module")
def browser(chromium, ui):
    """Headless Chromium; it depends on the server so that it closes before the server stops."""
    from playwright.sync_api import expect, sync_playwright

    # expect() waits 5 s by default: too little for a first page load on a busy machine.
    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, ui, request):
    """A fresh page on the UI; on failure, a screenshot of where it stood."""
    context = browser.new_context(base_url=ui.base, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    failed_before = request.session.testsfailed
    yield page
    # The call phase is reported before fixtures are torn down: a new failure is this test's.
    if request.session.testsfailed > failed_before:
        with contextlib.suppress(Exception):
            page.screenshot(path=artifacts_dir() / f"ui-{request.node.name}-FAILED.png", full_page=True)
    context.close()


def shoot(page, name: str) -> None:
    path = artifacts_dir() / f"ui-{name}.png"
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")


def test_the_study_experiment_is_listed(page, store):
    from playwright.sync_api import expect

    page.goto("/#/experiments", wait_until="load")
    link = page.get_by_role("link", name=store.experiment, exact=True)
    expect(link).to_be_visible()
    assert link.get_attribute("href").endswith(f"/experiments/{store.experiment_id}")
    shoot(page, "experiments")


def test_the_printed_link_opens_the_study_on_its_runs_their_datasets_and_their_models(page, store, ui):
    from playwright.sync_api import expect

    # Not MLflow's GenAI overview (traces, token usage: all empty), where the experiment opens by default.
    page.goto(ui.links[store.experiment], wait_until="load")
    expect(page.get_by_text("3 matching runs")).to_be_visible()
    expect(page.get_by_text(f"study-{store.experiment}", exact=True)).to_be_visible()
    expect(page.get_by_text("Token Usage")).to_have_count(0)
    # The study run's datasets: the three splits, each with its content digest.
    for split in ("train", "val", "test"):
        expect(page.get_by_text(re.compile(rf"^{store.experiment}-{split} \([0-9a-f]{{16}}\)$"))).to_be_visible()
    shoot(page, "study-landing")
    # Its models: each trial's LoggedModel, the registered one with its version (a column the grid
    # draws only when it is in view: wide enough for it).
    page.set_viewport_size({"width": 2400, "height": 900})
    page.get_by_role("link", name="Models", exact=True).first.click()
    for name in store.trial_runs:
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    registered = page.get_by_role("row").filter(has=page.get_by_text("trial-", exact=False)).filter(
        has_text=re.compile(rf"{re.escape(store.model)}\s*v1"))
    expect(registered).to_have_count(1)
    # The registered trial's model holds its test metrics too, measured on the test split's dataset.
    expect(registered).to_contain_text(re.compile(rf"{store.experiment}-test"))
    shoot(page, "study-models")


def test_trial_runs_are_children_of_the_study_run(page, store, ui):
    from playwright.sync_api import expect

    page.goto(ui.links[store.experiment], wait_until="load")
    parent_name = f"study-{store.experiment}"
    run_names = page.locator('[col-id="attributes.`Run Name`"]')
    parent_cell = run_names.filter(has=page.get_by_text(parent_name, exact=True))
    expect(parent_cell).to_be_visible()
    expect(page.get_by_text("3 matching runs")).to_be_visible()
    # Children are collapsed under their parent until its expander is clicked (their models,
    # named as they are, show in the Models column meanwhile).
    for name in store.trial_runs:
        expect(run_names.get_by_text(name, exact=True)).to_have_count(0)
    parent_cell.get_by_role("button").click()
    for name, run_id in store.trial_runs.items():
        link = run_names.get_by_role("link", name=name, exact=True)
        expect(link).to_be_visible()
        assert link.get_attribute("href").endswith(f"/runs/{run_id}")
    shoot(page, "runs")

    # The study run's own page lists them as its child runs.
    page.goto(f"/#/experiments/{store.experiment_id}/runs/{store.parent_run}", wait_until="load")
    expect(page.get_by_text("Child runs", exact=True)).to_be_visible()
    for name in store.trial_runs:
        expect(page.get_by_role("link", name=re.compile(rf"^{re.escape(name)},?$"))).to_be_visible()
    shoot(page, "study-run")


def test_a_trial_runs_artifacts_are_served(page, store):
    from playwright.sync_api import expect

    name, run_id = min(store.trial_runs.items())
    page.goto(f"/#/experiments/{store.experiment_id}/runs/{run_id}/artifacts", wait_until="load")
    expect(page.get_by_text(name, exact=True).first).to_be_visible()
    # The file's content comes from the server: the artifacts are served, not just listed.
    page.get_by_text("trial_config.json", exact=True).click()
    expect(page.get_by_text('"warmup_ratio"')).to_be_visible()
    page.get_by_text("confusion_matrix.png", exact=True).click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('img[src^=\"blob:\"]')].some(i => i.complete && i.naturalWidth > 0)"
    )
    shoot(page, "trial-artifacts")


def test_the_registered_model_has_the_champion_alias(page, store):
    from playwright.sync_api import expect

    # A fresh browser gets a one-off dialog over the model list, advertising the registry UI
    # (aliases): closed whenever it shows before an action or an assertion.
    dialog = page.get_by_role("dialog")
    page.add_locator_handler(dialog, lambda found: found.get_by_role("button", name="Close").click())
    page.goto("/#/models", wait_until="load")
    link = page.get_by_role("link", name=store.model, exact=True)
    expect(link).to_be_visible()
    listed = page.get_by_role("row").filter(has=link)
    expect(listed).to_contain_text(re.compile(r"@\s*champion\s*:\s*Version 1"))
    expect(dialog).to_have_count(0)
    shoot(page, "models")

    link.click()
    page.wait_for_url(re.compile(rf"#/models/{re.escape(store.model)}$"))
    version = page.get_by_role("row").filter(has_text="Version 1")
    expect(version.locator('[role="status"][title="champion"]')).to_be_visible()
    expect(version.locator('[role="status"][title="candidate"]')).to_be_visible()
    shoot(page, "model")

