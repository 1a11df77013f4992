"""The frozen-prefix feature cache: same outputs as the full forward, keyed, bounded, reused."""

import gc
from functools import partial

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from ftsearch.adaptation import FrozenPrefixCache, freeze_lowest_blocks
from ftsearch.data.features import PrefixStates, cache_root, feature_loader
from ftsearch.data.tokens import LengthGroupedBatches, make_loader, tokenize_cached
from ftsearch.models.text import UpperBlocksClassifier, load_classifier, transformer_blocks
from ftsearch.problems import problem_type
from ftsearch.train import TrainSettings
from ftsearch.train import fit as train_fit
from tests.helpers import cached_features, labelled_reviews

CPU = torch.device("cpu")
fit = partial(train_fit, scoring=problem_type("single-label-classification"))




@pytest.fixture(scope="module")
def tokens(tiny_bert, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    cache = tmp_path_factory.mktemp("tokens")
    return {
        "train": tokenize_cached(tokenizer, labelled_reviews(160, 1), 32, cache),
        "val": tokenize_cached(tokenizer, labelled_reviews(64, 3), 32, cache),
        "other": tokenize_cached(tokenizer, labelled_reviews(64, 4), 32, cache),
    }


def _frozen(tiny_bert, depth):
    torch.manual_seed(0)
    model = load_classifier(tiny_bert, ("neg", "pos"))
    freeze_lowest_blocks(model, depth)
    return model


@pytest.mark.parametrize("depth", [1, 2])
def test_cached_forward_matches_the_full_forward(tiny_bert, tokens, depth):
    model = _frozen(tiny_bert, depth).eval()
    features, how = cached_features(model, depth, tokens["val"])
    assert how == "written by the first epoch"
    wrapped = UpperBlocksClassifier(model, depth).eval()
    full_batches = make_loader(tokens["val"], 16, 0, shuffle=False)
    cached_batches = feature_loader(features, 16, shuffle=False)
    with torch.inference_mode():
        for full_in, cached_in in zip(full_batches, cached_batches, strict=True):
            assert torch.equal(full_in["labels"], cached_in["labels"])
            full = model(**full_in)
            cached = wrapped(**cached_in)
            # float16 storage of the hidden states is the only difference.
            torch.testing.assert_close(cached.logits, full.logits, rtol=1e-2, atol=1e-3)
            torch.testing.assert_close(cached.loss, full.loss, rtol=1e-2, atol=1e-3)


def test_training_from_the_cache_follows_training_without_it(tiny_bert, tokens):
    # Same seed, same batches (length grouping depends only on lengths), no dropout in the frozen
    # prefix either way: the two runs differ only by the float16 rounding of the cached states.
    settings = TrainSettings(lr=3e-3, epochs=3, warmup_ratio=0.1, seed=0)
    plain = fit(_frozen(tiny_bert, 1), make_loader(tokens["train"], 16, 0, shuffle=True, seed=0),
                make_loader(tokens["val"], 64, 0, shuffle=False), settings)
    model = _frozen(tiny_bert, 1)
    train, _ = cached_features(model, 1, tokens["train"])
    val, _ = cached_features(model, 1, tokens["val"])
    cached = fit(UpperBlocksClassifier(model, 1), feature_loader(train, 16, shuffle=True, seed=0),
                 feature_loader(val, 64, shuffle=False), settings)
    assert [m.value("accuracy") for m in cached.history] == pytest.approx([m.value("accuracy") for m in plain.history], abs=0.02)
    assert [m.train_loss for m in cached.history] == pytest.approx([m.train_loss for m in plain.history], rel=0.02)
    # The full model's weights (not only the upper blocks') are what a checkpoint holds.
    assert set(cached.best_state) == {f"model.{k}" for k in model.state_dict()}


def _cached_training(model, tokens):
    # Without dropout: each DataLoader iterator draws its seed from torch's global stream, which
    # the first epoch's token pass does not, so dropout masks would differ between the runs.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return FrozenPrefixCache(True, CPU, 64).train_from_cache(
        model, "tiny", 1, {"train": tokens["train"], "val": tokens["val"]}, max_length=32, pad_id=0, batch_size=16, seed=0)


def test_the_first_epoch_writes_the_cache_that_later_epochs_and_trials_read(tiny_bert, tokens, monkeypatch):
    settings = TrainSettings(lr=3e-3, epochs=3, warmup_ratio=0.1, seed=0)
    writing, note = _cached_training(_frozen(tiny_bert, 1), tokens)
    assert note == "depth 1: train written by the first epoch, val written by the first epoch"
    computed, real = [], PrefixStates._states
    monkeypatch.setattr(PrefixStates, "_states", lambda self, batch: computed.append(1) or real(self, batch))
    first = fit(writing.model, writing.train_loader, writing.val_loader, settings)
    # Epoch 1 computed the states of each train and val batch once; epochs 2 and 3 read them.
    assert len(computed) == len(writing.train_loader) + len(writing.val_loader)
    assert sorted(p.name.startswith(".") for p in cache_root().iterdir()) == [False, False]  # published, no partial

    reading, note = _cached_training(_frozen(tiny_bert, 1), tokens)
    assert note == "depth 1: train hit, val hit"
    again = fit(reading.model, reading.train_loader, reading.val_loader, settings)
    # The same batches in the same order from the same float16 states: the same training.
    assert [m.train_loss for m in again.history] == pytest.approx([m.train_loss for m in first.history], rel=1e-4)
    assert [m.value("roc_auc") for m in again.history] == pytest.approx([m.value("roc_auc") for m in first.history], rel=1e-4)
    assert len({m.value("roc_auc") for m in first.history}) == 3  # and it trained


def test_a_first_epoch_cut_short_leaves_no_entry(tiny_bert, tokens):
    cut, _ = _cached_training(_frozen(tiny_bert, 1), tokens)
    next(iter(cut.train_loader))  # one batch of the first epoch, then the trial ends
    del cut
    gc.collect()
    assert list(cache_root().iterdir()) == []
    assert _cached_training(_frozen(tiny_bert, 1), tokens)[1].startswith("depth 1: train written")


def test_frozen_blocks_run_without_dropout_in_training_mode(tiny_bert):
    model = _frozen(tiny_bert, 1).train()
    ids = torch.tensor([[2, 10, 11, 3]])
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    blocks = transformer_blocks(model)
    assert not blocks[0].training and blocks[1].training


def test_second_use_hits_and_any_key_change_misses(tiny_bert, tokens):
    model = _frozen(tiny_bert, 1)
    first, how = cached_features(model, 1, tokens["val"])
    again, how_again = cached_features(_frozen(tiny_bert, 1), 1, tokens["val"])
    assert how.startswith("written") and how_again == "hit"
    np.testing.assert_array_equal(np.asarray(first.features), np.asarray(again.features))
    assert cached_features(model, 2, tokens["val"])[1].startswith("written")  # depth
    assert cached_features(model, 1, tokens["val"], 31)[1].startswith("written")  # max length
    assert cached_features(model, 1, tokens["other"])[1].startswith("written")  # data
    with torch.no_grad():
        transformer_blocks(model)[0].output.dense.weight.add_(0.01)  # frozen weights
    assert cached_features(model, 1, tokens["val"])[1].startswith("written")
    assert len(list(cache_root().iterdir())) == 5


def test_budget_evicts_the_least_recently_used_and_refuses_what_cannot_fit(tiny_bert, tokens, monkeypatch):
    model = _frozen(tiny_bert, 1)
    one_entry = sum(len(ids) for ids in tokens["val"].ids) * 32 * 2
    monkeypatch.setenv("FTSEARCH_FEATURE_CACHE_GB", str(1.5 * one_entry / 1024**3))
    cached_features(model, 1, tokens["val"])
    cached_features(model, 1, tokens["other"])
    entries = list(cache_root().iterdir())
    assert len(entries) == 1 and cached_features(model, 1, tokens["other"])[1] == "hit"
    features, why = cached_features(model, 1, tokens["train"])
    assert features is None and "FTSEARCH_FEATURE_CACHE_GB" in why


def test_length_grouped_batches_cover_every_example_once_and_pad_little():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=1000)
    sampler = LengthGroupedBatches(lengths, 16, shuffle=True, seed=3, group=10)
    epochs = [list(sampler), list(sampler)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert all(len(b) <= 16 for b in batches)
    assert epochs[0] != epochs[1]
    assert list(LengthGroupedBatches(lengths, 16, shuffle=True, seed=3, group=10)) == epochs[0]

    def padding(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)

    random_batches = [list(rng.permutation(1000)[i : i + 16]) for i in range(0, 1000, 16)]
    assert padding(epochs[0]) < 0.2 * padding(random_batches)
