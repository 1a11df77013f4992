"""The training loop on the tiny BERT: it learns, keeps the best epoch, stops when asked."""

from functools import partial

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from ftsearch.data.tokens import make_loader, tokenize_cached
from ftsearch.problems import problem_type
from ftsearch.train import TrainSettings, evaluate, make_scheduler
from ftsearch.train import fit as train_fit
from tests.helpers import labelled_reviews, review_loaders, seeded_classifier

CLASSIFICATION = problem_type("single-label-classification")
fit = partial(train_fit, scoring=CLASSIFICATION)  # every fit here trains a two-class classifier


@pytest.fixture(scope="module")
def loaders(tiny_bert, tmp_path_factory):
    return review_loaders(tiny_bert, tmp_path_factory.mktemp("tokens"), 240, 80, 64)


def model(tiny_bert):
    return seeded_classifier(tiny_bert)


def test_fit_learns_and_keeps_the_best_epoch(tiny_bert, loaders):
    steps = []
    settings = TrainSettings(lr=8e-3, epochs=4, warmup_ratio=0.1)
    result = fit(model(tiny_bert), *loaders, settings, on_step=lambda step, total: steps.append((step, total)))
    assert result.status == "completed" and len(result.history) == 4
    # Every optimiser step is reported, counted across epochs, with the run's total.
    total = 4 * len(loaders[0])
    assert steps == [(step, total) for step in range(1, total + 1)]
    accuracies = [m.value("accuracy") for m in result.history]
    assert max(accuracies) >= 0.9
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.best_epoch == int(np.argmax(accuracies)) + 1
    assert result.best_eval.metrics["accuracy"] == max(accuracies)
    assert all(t.device.type == "cpu" for t in result.best_state.values())


def test_best_state_is_the_best_epoch_not_the_last(tiny_bert, loaders):
    m = model(tiny_bert)

    def spoil_after_epoch_3(metrics):
        # From epoch 4 on the model is ruined, so the best epoch must be an earlier one.
        if metrics.epoch == 3:
            with torch.no_grad():
                m.classifier.weight.neg_()
                m.classifier.bias.neg_()
        return False

    result = fit(m, *loaders, TrainSettings(lr=8e-3, epochs=4, warmup_ratio=0.1), spoil_after_epoch_3)
    assert result.history[2].value("accuracy") >= 0.9 and result.history[3].value("accuracy") < 0.5
    assert result.best_epoch in (1, 2, 3)
    m.load_state_dict(result.best_state)
    assert evaluate(m, loaders[1], torch.device("cpu"), CLASSIFICATION).metrics["accuracy"] == result.best_eval.metrics["accuracy"] >= 0.9


def test_callback_can_stop_training(tiny_bert, loaders):
    steps = []
    stop_after_2 = lambda m: m.epoch == 2
    result = fit(model(tiny_bert), *loaders, TrainSettings(lr=8e-3, epochs=4), stop_after_2, lambda s, t: steps.append(s))
    assert result.status == "stopped" and len(result.history) == 2
    assert steps == list(range(1, 2 * len(loaders[0]) + 1))  # no step after the stop


def test_non_finite_loss_is_reported_not_trained_on(tiny_bert, loaders):
    m = model(tiny_bert)
    with torch.no_grad():
        m.classifier.weight.fill_(float("inf"))
    result = fit(m, *loaders, TrainSettings(lr=1e-3, epochs=2))
    assert result.status == "diverged" and "non-finite loss" in result.reason
    assert result.history == []


@pytest.mark.parametrize("name, expected", [
    # transformers.get_scheduler's schedules: warm-up from 0, then the decay.
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466]),
    ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
])
def test_warmup_then_the_schedule(name, expected):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(name, opt, warmup=2, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)


@pytest.mark.slow
def test_compiled_training_learns_the_same_and_keeps_plain_state_dict_keys(tiny_bert, loaders):
    settings = TrainSettings(lr=8e-3, epochs=2, warmup_ratio=0.1)
    eager = fit(model(tiny_bert), *loaders, settings)
    compiled_model = model(tiny_bert)
    compiled = fit(compiled_model, *loaders, TrainSettings(lr=8e-3, epochs=2, warmup_ratio=0.1, compile=True))
    assert [m.train_loss for m in compiled.history] == pytest.approx([m.train_loss for m in eager.history], rel=0.05)
    assert set(compiled.best_state) == set(eager.best_state)  # no "_orig_mod." prefix: it saves as usual


def augmented_loaders(tiny_bert, tmp_path, batch_size=16):
    from ftsearch.augment import TokenAugment

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train = tokenize_cached(tokenizer, labelled_reviews(160, 1), 32, tmp_path)
    val = tokenize_cached(tokenizer, labelled_reviews(60, 3), 32, tmp_path)
    augment = TokenAugment(mask_prob=0.1, delete_prob=0.05, mask_id=tokenizer.mask_token_id)
    return (make_loader(train, batch_size, 0, shuffle=True, seed=7, augment=augment),
            make_loader(val, 64, 0, shuffle=False))


def test_a_run_resumed_from_its_checkpoint_ends_exactly_like_an_uninterrupted_one(tiny_bert, tmp_path):
    # Dropout, shuffling and token augmentation all draw random numbers: every stream must be
    # restored for the resumed run to match bit for bit.
    settings = TrainSettings(lr=5e-3, epochs=3, warmup_ratio=0.2, seed=3)
    whole = fit(model(tiny_bert), *augmented_loaders(tiny_bert, tmp_path), settings)

    checkpoint = tmp_path / "resume" / "trial-0.pt"

    def killed_after_epoch_2(metrics):
        if metrics.epoch == 2:
            raise KeyboardInterrupt  # the process dies after the epoch's checkpoint was written
        return False

    with pytest.raises(KeyboardInterrupt):
        fit(model(tiny_bert), *augmented_loaders(tiny_bert, tmp_path), settings, killed_after_epoch_2, checkpoint=checkpoint)
    assert checkpoint.is_file() and not list(checkpoint.parent.glob(".*partial*"))

    restored = []
    # A new process: a freshly built model and loaders (epoch counters at 0), the same seed.
    resumed = fit(
        model(tiny_bert), *augmented_loaders(tiny_bert, tmp_path), settings,
        checkpoint=checkpoint, on_resume=restored.extend,
    )
    assert resumed.resumed_from_epoch == 2 and [m.epoch for m in restored] == [1, 2]
    assert resumed.history == whole.history
    assert resumed.best_epoch == whole.best_epoch
    for key, value in whole.best_state.items():
        assert torch.equal(value, resumed.best_state[key]), key
    assert np.array_equal(resumed.best_eval.outputs, whole.best_eval.outputs)


def test_a_checkpoint_of_the_previous_version_still_resumes(tiny_bert, tmp_path):
    # Written before problem types: accuracy and F1 as fields, predicted classes instead of outputs.
    settings = TrainSettings(lr=5e-3, epochs=3, seed=3)
    whole = fit(model(tiny_bert), *augmented_loaders(tiny_bert, tmp_path), settings)
    checkpoint = tmp_path / "trial-0.pt"

    def killed_after_epoch_2(metrics):
        if metrics.epoch == 2:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        fit(model(tiny_bert), *augmented_loaders(tiny_bert, tmp_path), settings, killed_after_epoch_2, checkpoint=checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    state["history"] = [{"epoch": m["epoch"], "train_loss": m["train_loss"], "val_accuracy": m["metrics"]["accuracy"],
                         "val_f1": m["metrics"]["f1"]} for m in state["history"]]
    best = state["best_eval"]
    state["best_eval"] = {"accuracy": best["metrics"]["accuracy"], "f1": best["metrics"]["f1"], "y_true": best["y_true"],
                          "y_pred": best["outputs"].argmax(-1)}
    torch.save(state, checkpoint)
    resumed = fit(model(tiny_bert), *augmented_loaders(tiny_bert, tmp_path), settings, checkpoint=checkpoint)
    # The old epochs carry the metrics of their day; the epoch trained after resuming carries them all.
    old = [{k: m.metrics[k] for k in ("accuracy", "f1")} for m in resumed.history]
    assert resumed.resumed_from_epoch == 2 and old == [{k: m.metrics[k] for k in ("accuracy", "f1")} for m in whole.history]
    assert resumed.history[-1] == whole.history[-1]


def test_a_corrupt_checkpoint_is_an_error_that_says_what_to_do(tiny_bert, loaders, tmp_path):
    from ftsearch.errors import FtsearchError

    broken = tmp_path / "trial-0.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(FtsearchError, match="delete it to start the trial over"):
        fit(model(tiny_bert), *loaders, TrainSettings(lr=5e-3, epochs=1), checkpoint=broken)


def test_gradient_accumulation_takes_one_step_per_group_of_batches(tiny_bert, tmp_path):
    # Half the batch, twice the accumulation: the optimiser steps as often as at the full batch.
    steps = {}
    for batch_size, accumulation in ((16, 1), (8, 2)):
        seen = []
        settings = TrainSettings(lr=8e-3, epochs=4, warmup_ratio=0.1, seed=3, grad_accumulation=accumulation)
        train, val = augmented_loaders(tiny_bert, tmp_path, batch_size)
        result = fit(model(tiny_bert), train, val, settings, on_step=lambda s, t, seen=seen: seen.append(t))
        steps[batch_size] = (len(seen), seen[-1])
        assert max(m.value("accuracy") for m in result.history) >= 0.8  # it learns either way
    assert steps[16] == steps[8] == (40, 40)
