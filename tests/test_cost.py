"""What a trained model costs where it is served (ftsearch.cost): latency that ranks models by
their real cost, parameters and the size of the saved weights."""

from __future__ import annotations

import typing

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from ftsearch.cli import main
from ftsearch.config import CostName
from ftsearch.cost import Cost, measure
from ftsearch.models.text import load_classifier
from ftsearch.predictor import TextClassifier, save_classifier
from tests.helpers import NEUTRAL, build_tiny_bert, make_reviews, optuna_study, runs, store, tiny_study


def saved_model(tmp_path, blocks: int):
    """A text classifier of ``blocks`` blocks (hidden 128) saved as a trial saves one, 96 tokens long."""
    backbone = build_tiny_bert(tmp_path / f"bert-{blocks}", blocks=blocks, hidden=128, positions=128)
    folder = tmp_path / f"saved-{blocks}"
    save_classifier(load_classifier(backbone, ("neg", "pos")), AutoTokenizer.from_pretrained(backbone), folder, 96,
                    ("neg", "pos"), {"problem": "single-label-classification"})
    return folder


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("FTSEARCH_LATENCY_SECONDS", "1")  # the default: the ranking needs it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_latency_ranks_a_6_block_model_above_a_2_block_one_and_size_is_the_saved_weights(tmp_path, one_thread):
    # Validation-like inputs: the tiny reviews, padded out with words so each is cut at 96 tokens.
    texts = [f"{text} {' '.join(NEUTRAL * 8)}" for text in make_reviews(40, seed=3)["review"]]
    folders = {blocks: saved_model(tmp_path, blocks) for blocks in (2, 6)}
    predictors = {blocks: TextClassifier(folder) for blocks, folder in folders.items()}
    # Measured in turns, three times each, while the other tests load this machine's cores: the
    # ranking must hold in every turn, not on average. One thread, as a server process per core
    # would use: two processes of two threads each on two cores time their own waits.
    for _ in range(3):
        small, large = (measure(predictors[b], (texts,), folders[b], "cpu") for b in (2, 6))
        assert large.latency_ms > small.latency_ms
        assert large.latency_ms_b32 > small.latency_ms_b32
        # Batching amortises the per-call work: an example costs less in a batch of 32 than alone.
        assert small.latency_ms_b32 < small.latency_ms
    for blocks, cost in ((2, small), (6, large)):
        assert cost.size_mb == sum(f.stat().st_size for f in folders[blocks].glob("*.safetensors")) / 1e6
    # Four more blocks of 128 x 128 attention and 128 x 256 feed-forward weights, biases and norms.
    assert round((large.params_m - small.params_m) * 1e6) == 4 * (4 * (128 * 128 + 128) + 2 * 128 * 256 + 256 + 128
                                                                  + 4 * 128)
    assert large.size_mb > small.size_mb


def test_the_costs_measured_are_the_ones_a_study_can_constrain():
    assert set(Cost.__dataclass_fields__) == set(typing.get_args(CostName))


def test_a_constrained_study_registers_the_best_feasible_trial_not_a_better_one_over_its_bound(
    tmp_path, tiny_bert, tiny_reviews, capsys
):
    # A 4-block backbone (about 0.6 MB) trained well, the 2-block one (0.1 MB) hardly at all: only the
    # small one is within size_mb 0.3, and it is the one registered.
    big = build_tiny_bert(tmp_path / "big", blocks=4, hidden=64)
    study = tiny_study(tiny_bert, tiny_reviews, backbones=[str(tiny_bert), str(big)], n_trials=2,
                       constraints={"size_mb": {"max": 0.3}},
                       enqueue=[{"backbone": str(big), "lr": 3e-3}, {"backbone": str(tiny_bert), "lr": 1e-6}],
                       **{"search.lr": {"low": 1e-6, "high": 1e-2, "log": True}})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    assert "constraints: the ensemble and the blend with the baseline are not candidates" in out
    trials = optuna_study("tiny").get_trials()
    infeasible, feasible_trial = trials
    assert infeasible.params["backbone"] == str(big) and infeasible.value > feasible_trial.value
    assert infeasible.constraints["size_mb"] > 0 >= feasible_trial.constraints["size_mb"]
    assert infeasible.user_attrs["ftsearch.cost"]["size_mb"] > 0.3 >= feasible_trial.user_attrs["ftsearch.cost"]["size_mb"]
    version = store().get_model_version_by_alias("tiny-sentiment", "candidate")
    assert version.tags["trial_number"] == "1"
    assert float(version.tags["size_mb"]) <= 0.3 and float(version.tags["latency_ms"]) > 0
    # Every completed trial's run has its cost; the report ranks the infeasible trial last and says why.
    for trial in trials:
        metrics = store().get_run(trial.user_attrs["mlflow_run_id"]).data.metrics
        assert {"latency_ms", "latency_ms_b32", "params_m", "size_mb"} <= set(metrics)
    assert main(["report", str(path)]) == 0
    report = capsys.readouterr().out
    assert "COMPLETE, over size_mb" in report and "ms / example" in report
    rows = [line.split() for line in report.splitlines() if "COMPLETE" in line]
    assert [row[0] for row in rows] == ["1", "0"] and rows[1][1:4] == ["COMPLETE,", "over", "size_mb"]


def test_a_study_none_of_whose_trials_meets_its_constraints_registers_nothing_and_says_why(write_study, capsys):
    path = write_study(n_trials=1, constraints={"latency_ms": {"max": 1e-4}}, **{"search.epochs": {"low": 1, "high": 1}})
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert (f"{path}: none of the 1 completed trials meets the constraints, so nothing is registered; the nearest, "
            "trial 0, measured latency_ms ") in err and "(max 0.0001) on cpu" in err
    assert store().search_registered_models() == []
    parents, children = runs("tiny")
    assert parents[0].info.status != "RUNNING" and children[0].info.status == "FINISHED"


def test_constraints_and_the_serve_device_are_checked_as_the_study_file_is_read(write_study, capsys):
    path = write_study(constraints={"latency": {"max": 20}})
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "constraints.latency" in err and "'latency_ms'" in err and "'size_mb'" in err
    path = write_study(constraints={"size_mb": {"max": 0}})
    assert main(["search", str(path)]) == 2
    assert "constraints.size_mb.max" in capsys.readouterr().err
    path = write_study(serve_device="cuda:0")
    assert main(["search", str(path)]) == 2
    assert f"{path}: serve_device 'cuda:0': this machine has no CUDA GPUs; use serve_device: cpu" in capsys.readouterr().err


def test_a_bad_latency_budget_is_an_error_naming_the_variable(monkeypatch):
    from ftsearch import settings
    from ftsearch.errors import FtsearchError

    for value in ("0", "-1", "soon", "601"):
        monkeypatch.setenv("FTSEARCH_LATENCY_SECONDS", value)
        with pytest.raises(FtsearchError, match=rf"FTSEARCH_LATENCY_SECONDS='{value}': must be a number of seconds in \(0, 600\]"):
            settings.latency_seconds()
    monkeypatch.delenv("FTSEARCH_LATENCY_SECONDS")
    assert settings.latency_seconds() == 1.0
