"""How a backbone is adapted: freeze depth for text and image models, and what is served."""

import pytest
import torch

from ftsearch.adaptation import FreezeDepth, freeze_lowest_blocks
from ftsearch.models.text import UpperBlocksClassifier, load_classifier, transformer_blocks


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


def test_freeze_depth_is_one_method_for_text_and_images_and_serves_the_whole_model(tiny_bert, tiny_cnn):
    from ftsearch.models.vision import build_classifier, resolve_vision_backbone

    method = FreezeDepth()
    text = load_classifier(tiny_bert, ("neg", "pos"))
    assert method.apply(text, 1) == freeze_lowest_blocks(load_classifier(tiny_bert, ("neg", "pos")), 1)
    assert method.serving_model(UpperBlocksClassifier(text, 1)) is text and method.serving_model(text) is text
    image = build_classifier(resolve_vision_backbone(str(tiny_cnn)), 2)
    total = sum(p.numel() for p in image.parameters())
    assert method.apply(image, 1) < total and image.frozen
    image.train()
    assert all(not m.training for m in image.frozen)  # frozen stages keep their batch-norm statistics
    assert all(p.requires_grad for p in image.backbone.get_classifier().parameters())
    with torch.inference_mode():
        assert image.eval()(torch.rand(1, 3, 48, 48)).logits.shape == (1, 2)
