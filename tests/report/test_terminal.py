"""`ftsearch report` in the terminal: the leaderboard, the baseline next to the best trial, and the
registered model with every test metric it carries."""

from __future__ import annotations

import io
import math
import re

import optuna
from rich.console import Console

from ftsearch import report
from ftsearch.cli import main
from ftsearch.formatting import format_value
from ftsearch.report import TABLE_ROWS, ModelSummary, print_report
from tests.helpers import optuna_study, store
from tests.report.samples import per_label_rows, png

ROW = re.compile(r"^\s*(\d+)\s+(COMPLETE|PRUNED(?: at epoch \d+)?|FAIL|RUNNING)\s+(\S+)\s+(\d+)\s+(.*)$")


def expected_value(trial: optuna.trial.FrozenTrial) -> float:
    """The leaderboard's value: the objective, or for a pruned trial its best epoch."""
    if trial.state == optuna.trial.TrialState.COMPLETE:
        return trial.value
    return max(v for v in trial.intermediate_values.values() if not math.isnan(v))


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
        assert format_value(trial.params["lr"]) in match.group(5)
        assert format_value(trial.params["token_mask"]) in match.group(5)
    assert "Top 3 of 3 trials by validation accuracy" in printed
    # Every trial recorded the study's one method: it is shared, and there is no table by method.
    assert "same in every trial shown: method freeze, backbone" in printed and "batch_size 16" in printed
    assert {t.user_attrs["ftsearch.method"] for t in trials} == {"freeze"} and "By adaptation method" not in printed


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


def test_output_and_top_options(in_reported, tmp_path, capsys):
    _, study_file, _ = in_reported
    target = tmp_path / "out" / "mine.html"
    assert main(["report", str(study_file), "--top", "1", "--output", str(target)]) == 0
    printed = capsys.readouterr().out
    assert target.is_file() and f"HTML report: {target}" in printed
    assert "Top 1 of 3 trials" in printed
    assert [int(m.group(1)) for m in (ROW.match(line) for line in printed.splitlines()) if m] == [0]


def test_every_test_metric_of_the_model_is_printed_whatever_its_name(handmade):
    """The problem type decides which test metrics exist; the report shows whatever is tagged."""
    test = {"test_accuracy": 0.91, "test_f1": 0.87654, "test_pearson": 0.5}
    model = ModelSummary(name="tiny-sentiment", version="3", alias="champion", optuna_study="tiny",
                         trial_number="0", run_id="r", val=0.9, test=test)
    out = io.StringIO()
    print_report(handmade(model=model), console=Console(file=out, width=160))
    assert "champion: tiny-sentiment v3 from trial 0 of study tiny: " \
           "test_accuracy 0.9100, test_f1 0.8765, test_pearson 0.5000" in out.getvalue()


def test_the_model_runs_tables_are_printed_ten_rows_each(handmade):
    """After the model's sentence, each test table: its first rows in the order logged, and how
    many it leaves out (the figures are for the HTML report)."""
    model = ModelSummary(name="tiny-tags", version="2", alias="candidate", optuna_study="tiny", trial_number="0",
                         run_id="r", val=0.9, test={"test_f1_micro": 0.8}, figures={"test_per_label_f1.png": png((1, 2, 3))},
                         tables={"test_per_label.json": per_label_rows(TABLE_ROWS + 2)})
    out = io.StringIO()
    print_report(handmade(model=model), console=Console(file=out, width=160))
    printed = out.getvalue()
    after = printed[printed.index("candidate: tiny-tags v2"):]
    assert "Per label on the test split (test_per_label.json)" in after
    assert re.search(r"label\s+precision\s+recall\s+f1\s+support\s+threshold", after)
    rows = [line.split() for line in after.splitlines() if line.strip().startswith("label-")]
    assert rows[0] == ["label-0", "0.900", "0.800", "0.857", "12", "0.500"]
    assert [row[0] for row in rows] == [f"label-{i}" for i in range(TABLE_ROWS)]
    assert "2 more rows of test_per_label.json not shown (the HTML report has all 12)" in after


def test_a_minimize_study_is_printed_lowest_first(minimize_study):
    out = io.StringIO()
    print_report(report.collect(minimize_study), console=Console(file=out, width=160))
    printed = out.getvalue()
    assert "Top 4 of 4 trials by validation rmse, lowest first" in printed
    lines = [m for m in (ROW.match(line) for line in printed.splitlines()) if m]
    assert [(int(m.group(1)), m.group(3)) for m in lines] == [(1, "0.2000"), (0, "0.5000"), (2, "0.9000"), (3, "0.1000")]


def test_the_candidates_judged_on_validation_stand_beside_the_baseline(handmade, tmp_path):
    from ftsearch import selection
    from ftsearch.report.collect import Baseline, TrialRow, _candidates
    from ftsearch.report.views import comparison_rows

    # candidates.json as the search logs it, read back from a run.
    best = selection.Candidate("best", [2], [1.0], None, {"accuracy": 0.83}, 0.004)
    ensemble = selection.Candidate("ensemble", [2, 0, 1], [1 / 3] * 3, None, {"accuracy": 0.845}, 0.012)
    blend = selection.Candidate("blend", [2], [0.6, 0.4], None, {"accuracy": 0.86}, 0.0042)
    client = store()
    run_id = client.create_run(client.create_experiment("candidates")).info.run_id
    client.log_dict(run_id, selection.report([best, ensemble, blend], blend, "accuracy", {"test_accuracy": 0.855}),
                    "candidates.json")
    notes: list[str] = []
    rows = _candidates(client, run_id, "accuracy", notes)["candidates"]
    assert notes == [] and [r.kind for r in rows] == ["best", "ensemble", "blend"]
    assert [r.test for r in rows] == [None, None, 0.855] and rows[2].chosen and rows[1].models == 3

    trial = TrialRow(2, "COMPLETE", 0.83, 2, 60.0, {}, None, "freeze")
    shown = comparison_rows(handmade(candidates=rows, baseline=Baseline("TF-IDF", 0.84, 0.848), best=trial))
    assert ("ensemble of trials 2, 0, 1 (3 models, 12.00 ms per example)", "0.8450", "—") in shown
    assert ("trial 2 + baseline (weight 0.40) (2 models, 4.20 ms per example) - registered", "0.8600", "0.8550") in shown
    assert shown[-1] == ("registered − baseline", "+0.0200", "+0.0070")

    # Re-evaluated over seeds: each configuration's mean +- std, and the registered model, another
    # configuration's best seed, in a row of its own.
    from ftsearch.reevaluation import Configuration, SeedRun

    steady = selection.Candidate("best", [0], [1.0], None, {"accuracy": 0.835}, 0.004, seed=10_000)
    configurations = [Configuration(0, [SeedRun(0, 0.82, "a"), SeedRun(10_000, 0.835, "b")]),
                      Configuration(2, [SeedRun(2, 0.83, "c"), SeedRun(10_002, None, "d", "PRUNED")])]
    run_id = client.create_run(client.get_experiment_by_name("candidates").experiment_id).info.run_id
    client.log_dict(run_id, selection.report([steady], steady, "accuracy", {"test_accuracy": 0.85},
                                             [c.as_dict("accuracy") for c in configurations]), "candidates.json")
    shown = comparison_rows(handmade(**_candidates(client, run_id, "accuracy", notes), baseline=Baseline("TF-IDF", 0.84, 0.848),
                                     best=trial))
    assert ("trial 0's configuration (2 seeds): mean ± std", "0.8275 ± 0.0106", "") in shown
    assert ("trial 2's configuration (2 seeds, 1 failed): mean ± std", "0.8300 ± 0.0000", "") in shown
    assert ("trial 0 (its configuration with seed 10000) (1 model, 4.00 ms per example) - registered", "0.8350",
            "0.8500") in shown
    assert shown[-1] == ("registered − baseline", "-0.0050", "+0.0020")
