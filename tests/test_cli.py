"""Bad input through the CLI: a short message, exit code 2, and no study or run created."""

from __future__ import annotations

import pandas as pd
import pytest

from ftsearch.cli import main


def assert_nothing_created(state_dir):
    assert not (state_dir / "optuna.journal").exists()
    assert not (state_dir / "mlflow.db").exists()


def run_bad(argv, capsys, state_dir, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for text in expected:
        assert text in err
    assert "Traceback" not in err
    assert_nothing_created(state_dir)
    return err


def test_unknown_study(capsys, state_dir):
    run_bad(["search", "no-such-study"], capsys, state_dir, "unknown study 'no-such-study'", "imdb")


def test_study_name_with_path_separators(capsys, state_dir):
    run_bad(["search", "../imdb"], capsys, state_dir, "not valid")


def test_malformed_yaml(tmp_path, capsys, state_dir):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    run_bad(["search", str(path)], capsys, state_dir, "bad.yaml: not valid YAML")


def test_unknown_key(write_study, capsys, state_dir):
    run_bad(["search", str(write_study(lrr=1))], capsys, state_dir, "tiny.yaml", "lrr: unknown key")


def test_low_above_high(write_study, capsys, state_dir):
    path = write_study(**{"search.lr": {"low": 0.1, "high": 0.01}})
    run_bad(["search", str(path)], capsys, state_dir, "search.lr: low (0.1) is above high (0.01)")


def test_bad_set_override(write_study, capsys, state_dir):
    run_bad(["search", str(write_study()), "--set", "n_trials=0"], capsys, state_dir, "n_trials", "greater than or equal to 1")


def test_unknown_backbone(write_study, capsys, state_dir):
    path = write_study(backbones=["no-such-backbone-xyz"])
    run_bad(["search", str(path)], capsys, state_dir, "backbone 'no-such-backbone-xyz' is not in the catalog", "minilm-l6")


def test_missing_data_directory(write_study, tmp_path, monkeypatch, capsys, state_dir):
    monkeypatch.setenv("FTSEARCH_DATA_DIR", str(tmp_path / "nowhere"))
    path = write_study(**{"data.dataset": "imdb", "data.test_file": None})
    run_bad(["search", str(path)], capsys, state_dir, "nowhere/imdb", "FTSEARCH_DATA_DIR")


def test_missing_data_file(write_study, capsys, state_dir):
    path = write_study(**{"data.dataset": "absent.csv"})
    run_bad(["search", str(path)], capsys, state_dir, "'absent.csv' is neither a catalog name")


def test_missing_label_column(write_study, capsys, state_dir):
    path = write_study(**{"data.label_column": "stars"})
    run_bad(["search", str(path)], capsys, state_dir, "column(s) stars not found", "review, sentiment")


def _data_with(tmp_path, rows) -> str:
    path = tmp_path / "odd.csv"
    pd.DataFrame(rows, columns=["review", "sentiment"]).to_csv(path, index=False)
    return str(path)


def test_labels_outside_declared_classes(write_study, tmp_path, capsys, state_dir):
    data = _data_with(tmp_path, [["good film", "pos"], ["bad film", "meh"]] * 10)
    path = write_study(**{"data.dataset": data, "data.test_file": None})
    run_bad(["search", str(path)], capsys, state_dir, "'meh'", "not among the declared classes ['neg', 'pos']")


def test_empty_texts(write_study, tmp_path, capsys, state_dir):
    data = _data_with(tmp_path, [["good film", "pos"], ["   ", "neg"], [None, "pos"]] * 5)
    path = write_study(**{"data.dataset": data, "data.test_file": None})
    run_bad(["search", str(path)], capsys, state_dir, "10 empty text(s) in column 'review'")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_without_a_gpu(write_study, capsys, state_dir):
    run_bad(["search", str(write_study()), "--device", "cuda"], capsys, state_dir, "no CUDA GPU is visible")


def test_promote_before_any_search(capsys, state_dir):
    assert main(["promote", "imdb"]) == 2
    assert "has no 'candidate' version: run the search first" in capsys.readouterr().err


def test_predict_unknown_model(capsys, state_dir):
    assert main(["predict", "models:/nothing-here@champion", "text"]) == 2
    assert "cannot load model 'models:/nothing-here@champion'" in capsys.readouterr().err
