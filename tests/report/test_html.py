"""The self-contained HTML report: every section, nothing fetched from elsewhere, its copy on the
study's parent run, sentences where a half-run study has no data yet, the data checks' findings
(and no such section for a study run before they were logged), and escaped user text."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import optuna

from ftsearch import report
from ftsearch.cli import main
from ftsearch.config import load_study
from ftsearch.distributed.storage import open_storage
from ftsearch.report import Baseline, ModelSummary, TrialRow, render_html
from ftsearch.report.views import format_count, format_mib
from tests.helpers import optuna_study, store
from tests.report.samples import image_data_report, label_issues, per_label_rows, png, text_data_report


def without_scripts(page: str) -> str:
    """The page's markup with the contents of its inline scripts (plotly.js, figure data) removed."""
    return re.sub(r"(<script\b[^>]*>).*?</script>", r"\1</script>", page, flags=re.DOTALL | re.IGNORECASE)


def test_html_report_has_every_section_and_needs_no_network(in_reported):
    root, _, printed = in_reported
    path = root / "mlruns" / "reports" / "tiny.html"
    assert f"HTML report: {path}" in printed
    page = path.read_text(encoding="utf-8")
    markup = without_scripts(page)
    for anchor in ("summary", "champion", "data", "leaderboard", "methods", "learning-curves",
                   "optimization-history", "parallel-coordinates", "param-importances"):
        assert f'<section id="{anchor}">' in markup
    # Four plotly figures and one inline copy of plotly.js; nothing is fetched from elsewhere.
    assert page.count("Plotly.newPlot(") == 4
    assert page.count("plotly.js v") == 1
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", markup, re.IGNORECASE)
    assert not re.search(r"\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", markup, re.IGNORECASE)
    assert 'src="data:image/png;base64,' in markup  # the champion's test confusion matrix
    assert "<figcaption>Confusion matrix on the test split (<code>test_confusion_matrix.png</code>)</figcaption>" in markup

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


def test_a_study_of_one_method_shows_what_its_trials_cost(in_reported):
    """A new study records each trial's method and costs: the Methods section has them although
    the study tried a single method, and the leaderboard lists that method once."""
    page = without_scripts((in_reported[0] / "mlruns" / "reports" / "tiny.html").read_text(encoding="utf-8"))
    trials = optuna_study("tiny").trials
    best = optuna_study("tiny").best_trial
    seconds = sum(t.user_attrs["ftsearch.epoch_seconds"] for t in trials) / len(trials)
    peak = max(t.user_attrs["ftsearch.peak_memory_mb"] for t in trials)
    cells = [str(len(trials)), "2", "1", f"{best.value:.4f}", str(best.number), f"{seconds:.1f} s",
             format_count(best.user_attrs["ftsearch.trainable_params"]), format_mib(peak)]
    assert '<tr><td class="left">freeze</td>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in page
    assert "Same in every trial: method freeze, backbone" in page


def test_report_is_logged_on_the_study_parent_run(in_reported):
    root, _, _ = in_reported
    parent_id = optuna_study("tiny").user_attrs["mlflow_parent_run_id"]
    assert report.REPORT_ARTIFACT in {a.path for a in store().list_artifacts(parent_id)}
    logged = store().download_artifacts(parent_id, report.REPORT_ARTIFACT, str(root / "downloaded"))
    assert Path(logged).read_bytes() == (root / "mlruns" / "reports" / "tiny.html").read_bytes()


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


def test_every_test_metric_of_the_model_is_in_its_table_whatever_its_name(handmade):
    test = {"test_accuracy": 0.91, "test_f1": 0.87654, "test_pearson": 0.5}
    model = ModelSummary(name="tiny-sentiment", version="3", alias="champion", optuna_study="tiny",
                         trial_number="0", run_id="r", val=0.9, test=test)
    page = render_html(handmade(model=model))
    for name, value in {"val_accuracy": 0.9, **test}.items():
        assert f'<tr><td class="left">{name}</td><td>{value:.4f}</td></tr>' in page
    assert "test_accuracy 0.9100, test_f1 0.8765, test_pearson 0.5000" in page
    # A run without test artifacts: a sentence instead of figures, and no table.
    assert "The run of champion v3 has no test figures to show." in page
    assert "<figure" not in page and "<caption>" not in page


def test_every_test_figure_and_table_of_the_model_run_is_shown(handmade):
    figures = {"test_per_label_f1.png": png((255, 0, 0)), "test_scatter.png": png((0, 0, 255))}
    rows = per_label_rows(12)
    rows[1]["label"] = "<b>sports</b>"  # a label is the data's text: escaped like any other
    model = ModelSummary(name="tiny-tags", version="2", alias="candidate", optuna_study="tiny", trial_number="0",
                         run_id="r", val=0.9, test={}, figures=figures, tables={"test_per_label.json": rows})
    page = render_html(handmade(model=model))
    uris = [f'src="data:image/png;base64,{base64.b64encode(data).decode()}"' for data in figures.values()]
    assert all(uri in page for uri in uris) and page.index(uris[0]) < page.index(uris[1])  # in name order
    assert "<figcaption>Per label f1 on the test split (<code>test_per_label_f1.png</code>)</figcaption>" in page
    assert "<figcaption>Scatter on the test split (<code>test_scatter.png</code>)</figcaption>" in page
    assert "<caption>Per label on the test split (<code>test_per_label.json</code>)</caption>" in page
    assert ('<tr><th class="left">label</th><th>precision</th><th>recall</th><th>f1</th><th>support</th>'
            "<th>threshold</th></tr>") in page
    # Every row, in the order logged: floats to 3 decimals, counts as ints.
    assert '<tr><td class="left">label-0</td><td>0.900</td><td>0.800</td><td>0.857</td><td>12</td><td>0.500</td></tr>' in page
    assert '<td class="left">&lt;b&gt;sports&lt;/b&gt;</td>' in page and "<b>" not in page
    assert page.index("label-0") < page.index("label-11") and "<td>0.747</td>" in page  # label-11's f1
    assert "has no test figures to show" not in page


def test_a_minimize_study_ranks_lowest_first_and_compares_the_right_way(minimize_study, handmade):
    """rmse: the leaderboard goes lowest first, and the difference to the baseline is taken so
    that positive still means fine-tuning did better."""
    gathered = report.collect(minimize_study)
    gathered.baseline = Baseline("mean of the targets", 0.6, 0.7)
    gathered.best_test = {"test_rmse": 0.25}
    page = without_scripts(render_html(gathered))
    assert "objective: minimize validation rmse" in page
    assert "Completed trials by validation rmse, lowest first" in page
    numbers = [int(n) for n in re.findall(r'<tr class="(?:COMPLETE|PRUNED)[^"]*"><td>(\d+)</td>', page)]
    assert numbers == [1, 0, 2, 3]
    assert '<tr class="COMPLETE best"><td>1</td>' in page
    assert '<tr><td class="left">baseline − fine-tuned</td><td>+0.4000</td><td>+0.4500</td></tr>' in page
    maximize = handmade(baseline=Baseline("tf-idf", 0.6, 0.7), best=gathered.best, best_test={"test_accuracy": 0.8},
                        study=optuna.create_study(direction="maximize"))
    assert '<tr><td class="left">fine-tuned − baseline</td><td>-0.4000</td><td>+0.1000</td></tr>' in render_html(maximize)


def test_the_data_section_shows_sizes_duplicates_leaks_balance_and_truncation(handmade):
    page = render_html(handmade(data=text_data_report()))
    assert '<section id="data"><h2>Data</h2>' in page
    # Train has no earlier split to leak from; test's 123 rows are also in train or validation.
    assert ('<tr><td class="left">train</td><td>22500</td><td>79</td><td>—</td>'
            '<td class="left">negative</td><td>50.0%</td></tr>') in page
    assert '<tr><td class="left">test</td><td>25000</td><td>199</td><td>123</td>' in page
    assert "<th>truncated at 256</th><th>truncated at 512</th>" in page
    assert ('<tr><td class="left">train</td><td>233</td><td>620</td><td>2467</td>'
            "<td>44.0%</td><td>12.3%</td></tr>") in page
    assert "Token lengths by the minilm-l6 tokenizer" in page
    assert "were kept (data.dedupe: warn)" in page and "<th>dropped</th>" not in page


def test_the_data_section_follows_what_the_study_checked(handmade):
    """Dropped rows get a column; multi-label balance is labels per example; an image study has
    no duplicates or token lengths but says how many files it skipped; regression has no balance."""
    dropped = text_data_report()
    dropped["duplicates"]["dropped"] = {"train": 79, "val": 16, "test": 130}
    tags = {"per_label": {"praise": 9, "plot": 3}, "labels_per_example": 1.5}
    dropped["class_balance"] = {"train": tags, "val": tags, "test": tags}
    page = render_html(handmade(data=dropped))
    assert '<tr><td class="left">test</td><td>25000</td><td>199</td><td>123</td><td>130</td><td>1.50</td></tr>' in page
    assert "<th>labels per example</th>" in page and "majority" not in page and "were kept" not in page

    image = render_html(handmade(data=image_data_report()))
    assert '<tr><td class="left">val</td><td>153</td><td class="left">ants</td><td>50.6%</td></tr>' in image
    assert "were not checked" in image and "2 unusable image file(s) were skipped" in image
    assert "Token lengths" not in image

    numbers = {k: v for k, v in text_data_report().items() if k != "class_balance"}
    assert "No class balance: the targets are numbers" in render_html(handmade(data=numbers))


def test_the_data_section_lists_the_likely_label_errors_and_shows_their_thumbnails(handmade):
    page = render_html(handmade(data={**text_data_report(), "label_issues": label_issues()}))
    assert "Likely label errors: 103 of 1600 train examples by confident learning (cleanlab)" in page
    assert "out of fold, it agrees with 84.3% of the given labels" in page
    assert ('<tr><td class="left">997</td><td class="left">negative</td><td class="left">positive</td>'
            '<td>0.134</td><td class="left">this is a great movie.</td></tr>') in page
    assert "&lt;b&gt;awful&lt;/b&gt;" in page and "101 more not listed." in page
    assert "label_issues.png" not in page  # a text study has no thumbnails

    grid = png((200, 30, 30))
    thumbnails = handmade(data=image_data_report(), data_figures={"label_issues.png": grid})
    assert f'src="data:image/png;base64,{base64.b64encode(grid).decode()}"' in render_html(thumbnails)


def test_a_study_without_a_data_report_has_no_data_section(handmade):
    page = render_html(handmade())
    assert 'id="data"' not in page and "Token lengths" not in page
    assert '<section id="leaderboard">' in page


def test_what_users_and_runs_wrote_is_escaped(handmade):
    row = TrialRow(number=0, state="FAIL", value=None, epochs=0, seconds=1.0, params={"backbone": "<b>bert</b>"},
                   run_id=None, method="<i>lora</i>", reason="boom <script>alert(1)</script>\nsecond line")
    page = render_html(handmade(rows=[row], counts={"FAIL": 1}, notes=["a note with <i>markup</i> & more"]))
    assert "<script>" not in page and "<b>" not in page and "<i>" not in page
    assert '<td class="left">boom &lt;script&gt;alert(1)&lt;/script&gt;</td>' in page and "second line" not in page
    assert "<td>&lt;b&gt;bert&lt;/b&gt;</td>" in page
    assert "<td>&lt;i&gt;lora&lt;/i&gt;</td>" in page and "Every trial used &lt;i&gt;lora&lt;/i&gt;" in page
    assert "<li>a note with &lt;i&gt;markup&lt;/i&gt; &amp; more</li>" in page
    assert "1 fail; objective: maximize validation accuracy" in page


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
            assert page.locator("img.test-figure").evaluate_all(
                "imgs => imgs.length > 0 && imgs.every(img => img.complete && img.naturalWidth > 0)")
        finally:
            browser.close()
    assert fetched == [] and errors == []
