"""Every problem type end to end on tiny generated data with the tiny BERT: search -> register ->
predict (texts, pairs, a file), with each type's metrics, baseline, figures and served outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ftsearch.cli import main
from ftsearch.problems import problem_type
from tests.helpers import make_pairs, make_tagged, optuna_study, runs, store

SEARCH = {
    "lr": {"low": 5.0e-3, "high": 1.0e-2, "log": True},
    "batch_size": [16],
    "epochs": {"low": 4, "high": 4},
    "warmup_ratio": {"low": 0.1, "high": 0.1},
    "max_length": [40],
}


def _pairs_files(root) -> dict[str, str]:
    paths = {}
    for split, (n, seed) in {"train": (240, 1), "val": (60, 2), "test": (60, 3)}.items():
        paths[split] = str(root / f"pairs_{split}.tsv")
        make_pairs(n, seed).to_csv(paths[split], sep="\t", index=False)
    return paths


def _tagged_files(root) -> dict[str, str]:
    paths = {}
    for split, (n, seed) in {"train": (300, 1), "test": (60, 3)}.items():
        paths[split] = str(root / f"tagged_{split}.jsonl")
        make_tagged(n, seed).to_json(paths[split], orient="records", lines=True)
    return paths


def study_of(kind: str, root, tiny_bert) -> dict:
    """A tiny study of one problem type (pairs: entailment-like classes; regression: a pair's
    score; multi-label: tags)."""
    common = {"backbones": [str(tiny_bert)], "pruner": {"name": "none"}, "n_trials": 2,
              "sampler": {"name": "tpe", "seed": 0, "startup_trials": 2}, "registered_model": f"tiny-{kind}"}
    if kind == "multilabel":
        files = _tagged_files(root)
        data = {"dataset": files["train"], "test_file": files["test"], "label_column": "tags",
                "labels": ["praise", "complaint", "plot"], "val_fraction": 0.2}
        return {**common, "task": "multi-label-classification", "data": data, "metric": "f1_macro",
                "search": {**SEARCH, "augment": {"token_mask": {"low": 0.0, "high": 0.1}}}}
    files = _pairs_files(root)
    data = {"dataset": files["train"], "val_file": files["val"], "test_file": files["test"],
            "text_column": "premise", "text_pair_column": "hypothesis"}
    if kind == "pairs":
        # Frozen lowest block and no augmentation: trained from the frozen-prefix cache, with segments.
        return {**common, "task": "text-pair-classification", "metric": "mcc",
                "data": {**data, "label_column": "judgement", "labels": ["agree", "disagree", "unrelated"]},
                "search": {**SEARCH, "epochs": {"low": 8, "high": 8}, "freeze_depth": {"low": 1, "high": 1}}}
    return {**common, "task": "text-regression", "metric": "rmse",
            "data": {**data, "label_column": "score", "target_range": [1.0, 5.0]},
            "search": {**SEARCH, "augment": {"token_delete": {"low": 0.0, "high": 0.1}}}}


TASK_PROBLEM = {"pairs": "single-label-classification", "regression": "regression", "multilabel": "multi-label-classification"}


@pytest.fixture(scope="module", params=["pairs", "regression", "multilabel"])
def searched(request, tmp_path_factory, tiny_bert):
    """One 2-trial search of each problem type (state kept in its own folder)."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    study_file = root / f"tiny-{kind}.yaml"
    study_file.write_text(yaml.safe_dump(study_of(kind, root, tiny_bert)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTSEARCH_STATE_DIR", str(root / "mlruns"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["search", str(study_file)]) == 0
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return kind, root, study_file


@pytest.fixture
def in_searched(searched, monkeypatch):
    kind, root, study_file = searched
    monkeypatch.setenv("FTSEARCH_STATE_DIR", str(root / "mlruns"))
    return kind, root, study_file


def test_every_metric_of_the_type_is_logged_each_epoch_and_the_baseline_scores_them(in_searched):
    kind, _, _ = in_searched
    metrics = problem_type(TASK_PROBLEM[kind]).metrics_for(3)
    parents, children = runs(f"tiny-{kind}")
    client = store()
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        if kind == "pairs":  # the frozen block's outputs, segments included, came from the cache
            assert child.data.tags["ftsearch.feature_cache"].startswith("depth 1: train ")
        for metric in metrics:
            epochs = list(range(1, int(child.data.params["epochs"]) + 1))
            assert [m.step for m in client.get_metric_history(child.info.run_id, f"val_{metric}")] == epochs
    baseline = parents[0].data
    assert {f"baseline_{split}_{m}" for split in ("val", "test") for m in metrics} <= set(baseline.metrics)
    assert baseline.tags["baseline"] == {
        "pairs": "TF-IDF (1-2 grams, both texts) + logistic regression",
        "regression": "TF-IDF (1-2 grams, both texts) + ridge regression",
        "multilabel": "TF-IDF (1-2 grams) + one-vs-rest logistic regression",
    }[kind]


def test_the_search_learns_each_task_in_the_metrics_direction(in_searched):
    kind, _, _ = in_searched
    study = optuna_study(f"tiny-{kind}")
    values = [t.value for t in study.trials]
    if kind == "regression":
        assert study.direction.name == "MINIMIZE" and min(values) < 0.8  # rmse on a 1-5 score (sd ~1.3)
    else:
        assert study.direction.name == "MAXIMIZE" and max(values) > 0.6


def test_registered_model_has_the_types_signature_test_metrics_and_figures(in_searched):
    from mlflow.models import get_model_info

    kind, _, _ = in_searched
    client = store()
    version = client.get_model_version_by_alias(f"tiny-{kind}", "candidate")
    metrics = problem_type(TASK_PROBLEM[kind]).metrics_for(3)
    assert {f"test_{m}" for m in metrics} <= set(version.tags)
    signature = get_model_info(version.source).signature
    inputs = {"pairs": ["text", "text_pair"], "regression": ["text", "text_pair"], "multilabel": ["text"]}[kind]
    assert signature.inputs.input_names() == inputs
    outputs = signature.outputs.input_names()
    expected = {"pairs": ["label", "prob_agree", "prob_disagree", "prob_unrelated"], "regression": ["prediction"],
                "multilabel": ["labels", "prob_praise", "prob_complaint", "prob_plot"]}[kind]
    assert outputs == expected
    artifacts = {a.path for a in client.list_artifacts(version.tags["run_id"])}
    figure = {"pairs": "test_confusion_matrix.png", "regression": "test_scatter.png", "multilabel": "test_per_label_f1.png"}
    assert figure[kind] in artifacts
    if kind == "multilabel":
        path = client.download_artifacts(version.tags["run_id"], "test_per_label.json")
        rows = json.loads(Path(path).read_text())
        assert [r["label"] for r in rows] == ["praise", "complaint", "plot"]
        assert all(0.0 < r["threshold"] < 1.0 for r in rows)


def _answer_and_top(line: str) -> tuple[str, str]:
    """A printed prediction's answer and the class listed first (the most probable)."""
    answer, probs, _ = line.split("\t")
    return answer, probs.strip("()").split(" ")[0]


def test_predict_answers_what_the_type_means(in_searched, capsys):
    kind, _, _ = in_searched
    uri = f"models:/tiny-{kind}@candidate"
    if kind == "multilabel":
        assert main(["predict", uri, "great superb loved film plot plot", "the movie was a story"]) == 0
        first, second = capsys.readouterr().out.strip().splitlines()
        tags = first.split("\t")[0].split(", ")
        assert "praise" in tags and set(tags) <= {"praise", "complaint", "plot"}
        return
    assert main(["predict", uri, "--pair", "the movie", "great superb loved film",
                 "--pair", "the movie", "awful dull hated plot"]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    if kind == "pairs":
        # A label and the probabilities behind it, most probable first.
        assert [_answer_and_top(line)[0] == _answer_and_top(line)[1] for line in (first, second)] == [True, True]
        assert _answer_and_top(second)[0] == "disagree"
    else:
        assert float(first.split("\t")[0]) > float(second.split("\t")[0])
        assert all(1.0 <= float(line.split("\t")[0]) <= 5.0 for line in (first, second))
    assert main(["predict", uri, "just one text"]) == 2
    assert "reads pairs of texts" in capsys.readouterr().err


def test_predict_a_whole_file_keeps_its_columns_and_adds_the_predictions(in_searched, tmp_path, capsys):
    kind, _, _ = in_searched
    uri = f"models:/tiny-{kind}@candidate"
    rows = (make_tagged if kind == "multilabel" else make_pairs)(1000, 9)
    source, target = tmp_path / "in.csv", tmp_path / "out.parquet"
    if kind == "multilabel":
        rows = rows.rename(columns={"text": "comment"}).drop(columns="tags")
        rows.to_csv(source, index=False)
        args = ["--text-column", "comment"]
    else:
        rows.to_csv(source, index=False)
        args = ["--text-column", "premise", "--pair-column", "hypothesis"]
    assert main(["predict", uri, "--input", str(source), "--output", str(target), *args]) == 0
    assert "wrote 1000 predictions" in capsys.readouterr().out
    out = pd.read_parquet(target)
    assert len(out) == 1000 and list(out.columns[: len(rows.columns)]) == list(rows.columns)
    assert {"pairs": "label", "regression": "prediction", "multilabel": "labels"}[kind] in out.columns
    assert main(["predict", uri, "--input", str(source), "--output", str(tmp_path / "x.csv")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()


SERVE_REQUESTS = {
    "pairs": ({"columns": ["text", "text_pair"], "data": [["the movie", "great superb loved film"]]}, "label"),
    "regression": ({"columns": ["text", "text_pair"], "data": [["the movie", "awful dull hated plot"]]}, "prediction"),
    "multilabel": ({"columns": ["text"], "data": [["great superb loved film plot plot"]]}, "labels"),
}


@pytest.mark.slow  # a model server starts per problem type
def test_mlflow_models_serve_answers_a_rest_call(in_searched, tmp_path):
    import subprocess
    import sys
    import time
    import urllib.request

    from ftsearch import settings
    from tests.helpers import free_port, stop

    kind, _, _ = in_searched
    port, log = free_port(), tmp_path / "serve.log"
    # The scoring server execs uvicorn by name: the environment's bin folder must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri(),
           "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(Path(sys.prefix) / "bin" / "mlflow"), "models", "serve", "-m", f"models:/tiny-{kind}@candidate",
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(1)
        body, column = SERVE_REQUESTS[kind]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps({"dataframe_split": body}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        stop(server)
    (row,) = answer["predictions"]
    assert column in row
    if kind == "regression":
        assert 1.0 <= row["prediction"] <= 5.0
    else:
        probs = [v for k, v in row.items() if k.startswith("prob_")]
        assert len(probs) == 3 and all(0.0 <= p <= 1.0 for p in probs)


BAD_PAIRS = {
    # (kind, how the file is spoiled, what the message must name)
    "non-numeric target": ("regression", lambda f: f.assign(score=f["score"].astype(object).where(f.index != 6, "high")),
                           ["row 7", "column 'score'", "'high'"]),
    "label not in the list": ("pairs", lambda f: f.assign(judgement=f["judgement"].where(f.index != 4, "maybe")),
                              ["row 5", "column 'judgement'", "'maybe'"]),
    "empty second text": ("pairs", lambda f: f.assign(hypothesis=f["hypothesis"].where(f.index != 2, " ")),
                          ["row 3", "column 'hypothesis'", "empty"]),
    "missing column": ("regression", lambda f: f.drop(columns="hypothesis"), ["hypothesis", "not found"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_a_bad_value_names_file_row_and_column_exits_2_and_creates_nothing(case, tmp_path, tiny_bert, state_dir, capsys):
    kind, spoil, expected = BAD_PAIRS[case]
    study = study_of(kind, tmp_path, tiny_bert)
    train = study["data"]["dataset"]
    spoil(pd.read_csv(train, sep="\t")).to_csv(train, sep="\t", index=False)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert train in err and all(part in err for part in expected), err
    assert not (state_dir / "optuna.journal").exists() and not (state_dir / "mlflow.db").exists()


def test_predict_a_file_without_a_header_row_and_to_tsv(in_searched, tmp_path, capsys):
    kind, _, _ = in_searched
    if kind != "multilabel":
        pytest.skip("one model is enough for the file-format paths")
    source, target = tmp_path / "in.tsv", tmp_path / "out.tsv"
    source.write_text('great "superb" film\t7\nawful dull plot\t8\n')
    uri = "models:/tiny-multilabel@candidate"
    assert main(["predict", uri, "--input", str(source), "--output", str(target), "--columns", "text", "id"]) == 0
    capsys.readouterr()
    lines = target.read_text().splitlines()
    # Written as ftsearch reads TSV: no quoting, so the text comes back as it was.
    assert lines[0].startswith("text\tid\tlabels\tprob_praise") and lines[1].startswith('great "superb" film\t7\t')
