"""The training loop on the tiny BERT: it learns, keeps the best epoch, stops when asked."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_reviews
from transformers import AutoTokenizer

from ftsearch.data.tokens import make_loader, tokenize_cached
from ftsearch.models.text import load_classifier
from ftsearch.train import TrainSettings, evaluate, fit, linear_warmup_decay


@pytest.fixture(scope="module")
def loaders(tiny_bert, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    cache = tmp_path_factory.mktemp("tokens")

    def frame(n, seed):
        data = make_reviews(n, seed)
        return pd.DataFrame({"text": data["review"], "label": (data["sentiment"] == "pos").astype(int)})

    train = tokenize_cached(tokenizer, frame(240, 1), 32, cache)
    val = tokenize_cached(tokenizer, frame(80, 3), 32, cache)
    return make_loader(train, 16, 0, shuffle=True), make_loader(val, 64, 0, shuffle=False)


def model(tiny_bert):
    torch.manual_seed(0)
    return load_classifier(tiny_bert, ("neg", "pos"))


def test_fit_learns_and_keeps_the_best_epoch(tiny_bert, loaders):
    steps = []
    settings = TrainSettings(lr=8e-3, epochs=4, warmup_ratio=0.1)
    result = fit(model(tiny_bert), *loaders, settings, on_step=lambda step, total: steps.append((step, total)))
    assert result.status == "completed" and len(result.history) == 4
    # Every optimiser step is reported, counted across epochs, with the run's total.
    total = 4 * len(loaders[0])
    assert steps == [(step, total) for step in range(1, total + 1)]
    accuracies = [m.val_accuracy for m in result.history]
    assert max(accuracies) >= 0.9
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.best_epoch == int(np.argmax(accuracies)) + 1
    assert result.best_eval.accuracy == max(accuracies)
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
    assert result.history[2].val_accuracy >= 0.9 and result.history[3].val_accuracy < 0.5
    assert result.best_epoch in (1, 2, 3)
    m.load_state_dict(result.best_state)
    assert evaluate(m, loaders[1], torch.device("cpu")).accuracy == result.best_eval.accuracy >= 0.9


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


def test_linear_warmup_then_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_warmup_decay(opt, warmup=2, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


@pytest.mark.slow
def test_compiled_training_learns_the_same_and_keeps_plain_state_dict_keys(tiny_bert, loaders):
    settings = TrainSettings(lr=8e-3, epochs=2, warmup_ratio=0.1)
    eager = fit(model(tiny_bert), *loaders, settings)
    compiled_model = model(tiny_bert)
    compiled = fit(compiled_model, *loaders, TrainSettings(lr=8e-3, epochs=2, warmup_ratio=0.1, compile=True))
    assert [m.train_loss for m in compiled.history] == pytest.approx([m.train_loss for m in eager.history], rel=0.05)
    assert set(compiled.best_state) == set(eager.best_state)  # no "_orig_mod." prefix: it saves as usual
