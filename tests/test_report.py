"""`ftsearch report` on a real tiny study: the leaderboard, the self-contained HTML, its MLflow copy,
and the sentences that stand in for what a half-run study does not have yet."""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from tests.helpers import optuna_study, tiny_study
from mlflow import MlflowClient

from ftsearch import report, settings
from ftsearch.cli import main
from ftsearch.config import load_study
from ftsearch.distributed.storage import open_storage

ROW = re.compile(r"^\s*(\d+)\s+(COMPLETE|PRUNED(?: at epoch \d+)?|FAIL|RUNNING)\s+(\S+)\s+(\d+)\s+(.*)$")


def store() -> MlflowClient:
    uri = settings.tracking_uri()
    return MlflowClient(uri, registry_uri=uri)


def without_scripts(page: str) -> str:
    """The page's markup with the contents of its inline scripts (plotly.js, figure data) removed."""
    return re.sub(r"(<script\b[^>]*>).*?</script>", r"\1</script>", page, flags=re.DOTALL | re.IGNORECASE)


@pytest.fixture(scope="module")
def reported(tmp_path_factory, tiny_bert, tiny_reviews):
    """A 3-trial study (two completed, one pruned), promoted, then reported once with the defaults.

    Returns (state root, study file, terminal output)."""
    root = tmp_path_factory.mktemp("reported")
    study_file = root / "tiny.yaml"
    pruned = {"name": "median", "min_epochs": 1, "startup_trials": 2}  # trials 0 and 1 are never pruned
    study_file.write_text(yaml.safe_dump(tiny_study(tiny_bert, tiny_reviews, n_trials=3, pruner=pruned)))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the enqueued lr 0.9 is outside the searched range
        mp.setenv("FTSEARCH_STATE_DIR", str(root / "mlruns"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        from ftsearch.study import open_study

        study = open_study(load_study(str(study_file), cpu=True), open_storage(), fresh=False)
        for lr in (8e-3, 5e-3, 0.9):  # 0.9 cannot learn: the median pruner stops it (or its loss blows up)
            study.enqueue_trial({"lr": lr})
        assert main(["search", str(study_file), "--quiet"]) == 0
        assert main(["promote", str(study_file)]) == 0
        with contextlib.redirect_stdout(out):
            assert main(["report", str(study_file)]) == 0
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return root, study_file, out.getvalue()


@pytest.fixture
def in_reported(reported, monkeypatch):
    monkeypatch.setenv("FTSEARCH_STATE_DIR", str(reported[0] / "mlruns"))
    return reported


def expected_value(trial: optuna.trial.FrozenTrial) -> float:
    """The leaderboard's value: the objective, or for a pruned trial its best epoch."""
    if trial.state == optuna.trial.TrialState.COMPLETE:
        return trial.value
    return max(v for v in trial.intermediate_values.values() if not math.isnan(v))


def test_the_search_produced_what_the_report_is_about(in_reported):
    states = [t.state.name for t in optuna_study("tiny").trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]


def test_leaderboard_lists_every_trial_with_the_studys_values(in_reported):
    _, _, printed = in_reported
    trials = optuna_study("tiny").trials
    ranked = sorted(trials, key=lambda t: (t.state.name != "COMPLETE", -expected_value(t), t.number))
    lines = [m for m in (ROW.match(line) for line in printed.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [t.number for t in ranked]
    for match, trial in zip(lines, ranked, strict=True):
        assert match.group(2).startswith(trial.state.name)
        assert match.group(3) == f"{expected_value(trial):.4f}"
        assert int(match.group(4)) == len(trial.intermediate_values)
        # lr and token_mask differ between the trials, so they are columns of the table.
        assert report.format_value(trial.params["lr"]) in match.group(5)
        assert report.format_value(trial.params["token_mask"]) in match.group(5)
    assert "Top 3 of 3 trials by validation accuracy" in printed
    assert "same in every trial shown: backbone" in printed and "batch_size 16" in printed

    rows = report.collect(load_study(str(in_reported[1]))).rows
    for row, trial in zip(rows, ranked, strict=True):
        assert (row.number, row.state, row.params) == (trial.number, trial.state.name, trial.params)
        assert row.value == pytest.approx(expected_value(trial))
        assert row.epochs == len(trial.intermediate_values)
        assert row.seconds == pytest.approx(trial.duration.total_seconds())


def test_terminal_shows_baseline_next_to_the_best_trial_and_the_champion(in_reported):
    _, _, printed = in_reported
    client = store()
    study = optuna_study("tiny")
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    champion = client.get_model_version_by_alias("tiny-sentiment", "champion")
    baseline_line = next(line for line in printed.splitlines() if "classical baseline: TF-IDF" in line)
    assert f"{parent.data.metrics['baseline_val_accuracy']:.4f}" in baseline_line
    assert f"{parent.data.metrics['baseline_test_accuracy']:.4f}" in baseline_line
    best_line = next(line for line in printed.splitlines() if "best fine-tuned trial" in line)
    assert f"({study.best_trial.number})" in best_line and f"{study.best_value:.4f}" in best_line
    assert f"{float(champion.tags['test_accuracy']):.4f}" in best_line
    assert f"champion: tiny-sentiment v{champion.version} from trial {champion.tags['trial_number']} of study tiny" in printed
    assert f"test_f1 {float(champion.tags['test_f1']):.4f}" in printed


def test_html_report_has_every_section_and_needs_no_network(in_reported):
    root, _, printed = in_reported
    path = root / "mlruns" / "reports" / "tiny.html"
    assert f"HTML report: {path}" in printed
    page = path.read_text(encoding="utf-8")
    markup = without_scripts(page)
    for anchor in ("summary", "champion", "leaderboard", "learning-curves", "optimization-history",
                   "parallel-coordinates", "param-importances"):
        assert f'<section id="{anchor}">' in markup
    # Four plotly figures and one inline copy of plotly.js; nothing is fetched from elsewhere.
    assert page.count("Plotly.newPlot(") == 4
    assert page.count("plotly.js v") == 1
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", markup, re.IGNORECASE)
    assert not re.search(r"\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", markup, re.IGNORECASE)
    assert 'src="data:image/png;base64,' in markup  # the champion's test confusion matrix

    study = optuna_study("tiny")
    parent = store().get_run(study.user_attrs["mlflow_parent_run_id"])
    champion = store().get_model_version_by_alias("tiny-sentiment", "champion")
    assert "TF-IDF (1-2 grams) + logistic regression" in markup
    assert f"{parent.data.metrics['baseline_test_accuracy']:.4f}" in markup
    assert f"<td>{float(champion.tags['test_f1']):.4f}</td>" in markup
    assert "champion: tiny-sentiment v1" in markup
    # The pruned trial's curve is labelled as cut short.
    assert re.search(r'"name":\s*"trial 2 \(pruned at epoch \d+\)"', page)
    for trial in study.trials:
        assert f"<td>{trial.number}</td>" in markup


def test_report_is_logged_on_the_study_parent_run(in_reported):
    root, _, _ = in_reported
    parent_id = optuna_study("tiny").user_attrs["mlflow_parent_run_id"]
    assert report.REPORT_ARTIFACT in {a.path for a in store().list_artifacts(parent_id)}
    logged = store().download_artifacts(parent_id, report.REPORT_ARTIFACT, str(root / "downloaded"))
    assert Path(logged).read_bytes() == (root / "mlruns" / "reports" / "tiny.html").read_bytes()


def test_output_and_top_options(in_reported, tmp_path, capsys):
    _, study_file, _ = in_reported
    target = tmp_path / "out" / "mine.html"
    assert main(["report", str(study_file), "--top", "1", "--output", str(target)]) == 0
    printed = capsys.readouterr().out
    assert target.is_file() and f"HTML report: {target}" in printed
    assert "Top 1 of 3 trials" in printed
    assert [int(m.group(1)) for m in (ROW.match(line) for line in printed.splitlines()) if m] == [0]


def test_unknown_study_names_the_studies_that_exist(in_reported, write_study, capsys):
    path = write_study("other")
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no study 'other' in the Optuna storage")
    assert "studies there: tiny" in err and f"run `ftsearch search {path}` first" in err
    assert "Traceback" not in err


def test_report_before_any_search_creates_nothing(write_study, state_dir, capsys):
    assert main(["report", str(write_study())]) == 2
    assert "studies there: none" in capsys.readouterr().err
    assert not (state_dir / "optuna.journal").exists()


def test_a_study_without_trials_is_reported_in_sentences(write_study, state_dir, capsys):
    from ftsearch.study import open_study

    path = write_study()
    open_study(load_study(str(path), cpu=True), open_storage(), fresh=False)  # created, never run
    assert main(["report", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "No trial has run yet" in printed and "no registered model 'tiny-sentiment'" in printed
    page = (state_dir / "reports" / "tiny.html").read_text(encoding="utf-8")
    assert "plotly.js v" not in page  # no figure, so no 4.8 MB of plotly.js either
    for sentence in ("No trial has run yet.", "Needs at least 1 completed trial; this study has 0.",
                     "Needs at least 2 completed trials", "No classical baseline was logged",
                     "no registered model", "No trial has logged a validation epoch"):
        assert sentence in page


def test_html_report_renders_offline_in_a_browser(in_reported, chromium):
    """Headless Chromium with every non-file request refused: the plots still draw, nothing is fetched."""
    from playwright.sync_api import sync_playwright

    path = in_reported[0] / "mlruns" / "reports" / "tiny.html"
    fetched, errors = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda err: errors.append(str(err)))

            def refuse_the_network(route):
                if route.request.url.startswith(("file:", "data:")):
                    return route.continue_()
                fetched.append(route.request.url)
                return route.abort()

            page.route("**/*", refuse_the_network)
            page.goto(path.as_uri(), wait_until="load")
            # Every figure has drawn its SVG: plotly.js ran from the page itself.
            page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length >= 4")
            assert page.locator("img.cm").evaluate("img => img.complete && img.naturalWidth > 0")
        finally:
            browser.close()
    assert fetched == [] and errors == []
