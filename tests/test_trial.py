"""A trial's life: the settings it trains with and how its fit ends it (the rest runs end to end
in tests/test_study.py and tests/distributed/)."""

import torch

from ftsearch.config import load_study
from ftsearch.outcomes import Outcome
from ftsearch.space import TrialConfig
from ftsearch.train import EpochMetrics, FitResult
from ftsearch.trial import Prepared, fit_outcome, train_settings


def test_train_settings_take_the_sampled_values_and_the_studys_metric(write_study):
    config = load_study(str(write_study(metric="f1")))
    trial = TrialConfig(backbone="b", freeze_depth=1, lr=3e-4, batch_size=8, weight_decay=0.01, epochs=3,
                        warmup_ratio=0.1, scheduler="cosine", seed=7, max_length=32)
    settings = train_settings(trial, Prepared(config, torch.device("cpu"), modality=None, compile=True), grad_accumulation=2)
    assert (settings.lr, settings.epochs, settings.weight_decay, settings.warmup_ratio) == (3e-4, 3, 0.01, 0.1)
    assert (settings.scheduler, settings.seed, settings.grad_accumulation) == ("cosine", 7, 2)
    assert (settings.metric, settings.maximize, settings.device, settings.compile) == ("f1", True, "cpu", True)


def test_a_fit_ends_a_trial_completed_with_its_best_value_pruned_or_diverged(write_study):
    config = load_study(str(write_study(pruner={"name": "median"})))
    history = [EpochMetrics(1, 0.7, {"accuracy": 0.6, "f1": 0.5}), EpochMetrics(2, 0.5, {"accuracy": 0.8, "f1": 0.7})]
    completed = FitResult("completed", history=history, best_epoch=2)
    assert fit_outcome(completed, config) == Outcome("COMPLETE", value=0.8)
    stopped = FitResult("stopped", history=history[:1], best_epoch=1)
    assert fit_outcome(stopped, config) == Outcome("PRUNED", "pruned by the median pruner after epoch 1")
    diverged = FitResult("diverged", reason="non-finite loss (nan) at epoch 1, step 3")
    assert fit_outcome(diverged, config) == Outcome("PRUNED", "non-finite loss (nan) at epoch 1, step 3")


def test_a_trial_is_never_pruned_after_its_last_epoch():
    """The median pruner may say prune at any reported step; after the last epoch that would
    throw away a finished model, so the recorder only asks before it."""
    from types import SimpleNamespace

    from ftsearch.trial import _EpochRecorder

    reported = []
    trial = SimpleNamespace(report=lambda value, step: reported.append((step, value)), should_prune=lambda: True)
    run = SimpleNamespace(log_metrics=lambda metrics, step: None)
    reporter = SimpleNamespace(epoch_ended=lambda epoch, values: None)
    recorder = _EpochRecorder(trial, run, reporter, "accuracy", set(), last_epoch=2)
    assert recorder.on_epoch_end(EpochMetrics(1, 0.7, {"accuracy": 0.5})) is True
    assert recorder.on_epoch_end(EpochMetrics(2, 0.6, {"accuracy": 0.4})) is False
    assert reported == [(1, 0.5), (2, 0.4)]  # the last epoch is still reported to Optuna
