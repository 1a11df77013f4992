"""Cutting a text backbone after its frozen blocks, across encoder families: where the cut is
exact, the cached path reproduces the full forward; where it is not, ftsearch says so and trains
without the cache instead of training a different model."""

import shutil

import pytest
import torch
from transformers import AutoTokenizer

from ftsearch.adaptation import freeze_lowest_blocks
from ftsearch.config import load_study
from ftsearch.modalities.text import TextModality
from ftsearch.models.text import (
    UpperBlocksClassifier,
    load_classifier,
    prefix_hidden_states,
    trainable_inputs_of_prefix,
)
from ftsearch.space import TrialConfig

SMALL = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
         "max_position_embeddings": 64}


def _configs(vocab_size: int):
    from transformers import BertConfig, DebertaV2Config, DistilBertConfig, ElectraConfig, RobertaConfig

    return {
        "bert": BertConfig(vocab_size=vocab_size, **SMALL),
        "roberta": RobertaConfig(vocab_size=vocab_size, pad_token_id=0, **SMALL),
        "distilbert": DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=3, n_heads=2, hidden_dim=64,
                                       max_position_embeddings=64),
        # Relative position embeddings live outside DeBERTa's blocks and feed all of them.
        "deberta-v2": DebertaV2Config(vocab_size=vocab_size, relative_attention=True, position_buckets=8,
                                      max_relative_positions=16, pos_att_type=["p2c", "c2p"], **SMALL),
        # ELECTRA projects its (narrower) embeddings inside the base model, outside the embeddings.
        "electra": ElectraConfig(vocab_size=vocab_size, embedding_size=16, **SMALL),
    }


@pytest.fixture(scope="module")
def backbones(tiny_bert, tmp_path_factory):
    from transformers import AutoModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    folders = {}
    for family, config in _configs(len(tokenizer)).items():
        folder = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        AutoModel.from_config(config).save_pretrained(folder)
        for name in ("tokenizer_config.json", "vocab.txt", "tokenizer.json", "special_tokens_map.json"):
            if (tiny_bert / name).exists():
                shutil.copy(tiny_bert / name, folder / name)
        folders[family] = folder
    return folders


def _batch():
    ids = torch.tensor([[2, 10, 11, 20, 21, 3], [2, 12, 13, 3, 0, 0]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "deberta-v2"])
def test_exact_cut_reproduces_the_full_forward(backbones, family):
    model = load_classifier(backbones[family], ("neg", "pos"))
    freeze_lowest_blocks(model, 2)
    ids, mask = _batch()
    assert trainable_inputs_of_prefix(model, 2, ids, mask) == []
    model.eval()
    with torch.inference_mode():
        states = prefix_hidden_states(model, 2, ids, mask).to(torch.float16)
        full = model(input_ids=ids, attention_mask=mask).logits
        cached = UpperBlocksClassifier(model, 2)(inputs_embeds=states, attention_mask=mask).logits
    torch.testing.assert_close(cached, full, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("family, outside", [("deberta-v2", "rel_embeddings"), ("electra", "embeddings_project")])
def test_parameters_outside_the_blocks_that_feed_them_are_frozen_too(backbones, family, outside):
    model = load_classifier(backbones[family], ("neg", "pos"))
    frozen_outside = {n for n, p in model.named_parameters() if outside in n}
    assert frozen_outside and all(p.requires_grad for n, p in model.named_parameters() if n in frozen_outside)
    freeze_lowest_blocks(model, 2)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in frozen_outside)
    assert trainable_inputs_of_prefix(model, 2, *_batch()) == []


@pytest.mark.parametrize("family, reason", [("electra", "cannot be cut"), ("distilbert", None), ("deberta-v2", None)])
def test_a_trial_uses_the_cache_only_where_the_cut_is_exact(backbones, write_study, family, reason):
    path = write_study(backbones=[str(backbones[family])], **{"search.augment": {}})
    task = TextModality(load_study(str(path)), torch.device("cpu"))
    trial = TrialConfig(backbone=str(backbones[family]), freeze_depth=2, lr=1e-3, batch_size=16, weight_decay=0.0,
                        epochs=1, warmup_ratio=0.0, max_length=32)
    setup = task.build(trial)
    if reason is None:
        assert setup.feature_cache.startswith("depth 2: train written by the first epoch")
        assert isinstance(setup.model, UpperBlocksClassifier)
    else:
        assert setup.feature_cache.startswith("off (") and reason in setup.feature_cache
        assert not isinstance(setup.model, UpperBlocksClassifier)
        batch = next(iter(setup.train_loader))
        assert "input_ids" in batch  # trains from tokens, the whole model
