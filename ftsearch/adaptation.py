"""How a backbone is adapted for a trial's training, and how the adapted model is saved for serving.

Today's method is freeze depth: the embeddings (or an image backbone's stem) and the lowest ``k``
blocks (stages) are frozen, the rest and the new head train. For text, a frozen prefix is a fixed
function of the input, so its outputs can be computed once and cached (``FrozenPrefixCache``):
a trial then trains only the blocks above it. The cut is checked before anything is cached.

A new method (LoRA, BitFit, layer-wise learning rates) is a new ``Adaptation`` here: what it makes
trainable, whether the frozen-prefix cache still serves it, and what ``serving_model`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ftsearch.data.features import budget_bytes, budget_shortfall, feature_bytes, feature_loader, prefix_features
from ftsearch.data.tokens import TokenizedSplit, make_loader
from ftsearch.models import text as text_models
from ftsearch.models import vision as vision_models
from ftsearch.models.text import UpperBlocksClassifier, prefix_hidden_states, trainable_inputs_of_prefix

# Cached hidden states are stored in float16 (about 3 significant digits): logits from them must
# agree with the full forward's to this tolerance.
CACHE_RTOL, CACHE_ATOL = 1e-2, 1e-2


def trainable_count(model: nn.Module) -> int:
    """Parameters that will be trained."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _stay_in_eval(module: nn.Module, args) -> None:
    module.train(False)


def freeze_lowest_blocks(model: nn.Module, depth: int) -> int:
    """Freeze a text model's embeddings and lowest ``depth`` blocks (nothing when 0), and any
    parameter outside them that feeds them (DeBERTa's relative position embeddings, ELECTRA's
    embedding projection): the frozen part is then a fixed function of the input.

    Frozen modules also run without dropout, as a feature extractor would: that makes the frozen
    prefix's output cacheable without changing training. Returns the number of trainable
    parameters left.
    """
    if depth > 0:
        for module in text_models.frozen_prefix_modules(model, depth):
            module.requires_grad_(False)
            # model.train() switches every submodule back to training mode; this undoes it per call.
            module.register_forward_pre_hook(_stay_in_eval)
        probe = torch.arange(min(4, model.config.vocab_size)).unsqueeze(0)
        feeding = set(trainable_inputs_of_prefix(model, depth, probe, torch.ones_like(probe)))
        for name, param in model.named_parameters():
            if name in feeding:
                param.requires_grad_(False)
        model.train()
    return trainable_count(model)


def freeze_lowest_stages(model: vision_models.ImageClassifier, depth: int) -> int:
    """Freeze an image classifier's stem and lowest ``depth`` stages (nothing when 0); they stay
    in eval mode, so their batch-norm statistics keep their pretrained values. Returns the
    number of trainable parameters left."""
    if depth > 0:
        model.frozen = vision_models.frozen_prefix_modules(model.backbone, depth)
        for module in model.frozen:
            module.requires_grad_(False)
    return trainable_count(model)


class FreezeDepth:
    """The freeze-depth method: ``trial.freeze_depth`` lowest blocks frozen, for text and images."""

    def apply(self, model: nn.Module, depth: int) -> int:
        """Freeze ``model`` in place; returns its trainable parameter count."""
        if isinstance(model, vision_models.ImageClassifier):
            return freeze_lowest_stages(model, depth)
        return freeze_lowest_blocks(model, depth)

    @staticmethod
    def serving_model(model: nn.Module) -> nn.Module:
        """The model to save and serve: the full classifier, whether or not training ran from the
        frozen-prefix cache."""
        return text_models.unwrap(model)


@dataclass
class CachedTraining:
    """A trial that trains from cached hidden states: the wrapped model and its loaders."""

    model: UpperBlocksClassifier
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader


@dataclass
class FrozenPrefixCache:
    """Serves text trials that freeze blocks from cached hidden states, when that is exactly
    training the same model (see ``ftsearch/data/features.py`` for the cache itself)."""

    enabled: bool
    device: torch.device
    eval_batch_size: int
    _checked: dict[tuple[str, int], str] = field(default_factory=dict)  # (backbone, depth) -> problem or ''

    def train_from_cache(
        self, model: nn.Module, backbone: str, depth: int, tokens: dict[str, TokenizedSplit], *,
        max_length: int, pad_id: int, batch_size: int, seed: int, inputs_vary: str = "",
    ) -> tuple[CachedTraining | None, str]:
        """``(cached training, note)``, or ``(None, why not)``. ``tokens`` has the train and val
        splits; ``inputs_vary`` says why the inputs change every epoch (augmentation), if they do."""
        if not self.enabled:
            return None, "off (cache_frozen_prefix: false)"
        if depth == 0:
            return None, "off (nothing frozen)"
        if inputs_vary:
            return None, f"off ({inputs_vary})"
        key = (backbone, depth)
        if key not in self._checked:
            self._checked[key] = self._cut_problem(model, backbone, depth, tokens["val"], pad_id)
        if self._checked[key]:
            return None, f"off ({self._checked[key]})"
        needed = sum(feature_bytes(t, model.config.hidden_size) for t in tokens.values())
        if needed > budget_bytes():
            return None, f"off ({budget_shortfall(needed)})"
        features, notes = {}, []
        for split, split_tokens in tokens.items():
            features[split], how = prefix_features(model, depth, split_tokens, max_length, pad_id, self.device)
            if features[split] is None:
                return None, f"off ({split}: {how})"
            notes.append(f"{split} {how}")
        cuda = self.device.type == "cuda"
        train = feature_loader(features["train"], batch_size, shuffle=True, seed=seed, pin_memory=cuda)
        val = feature_loader(features["val"], self.eval_batch_size, shuffle=False, pin_memory=cuda)
        return CachedTraining(UpperBlocksClassifier(model, depth), train, val), f"depth {depth}: " + ", ".join(notes)

    def _cut_problem(self, model: nn.Module, backbone: str, depth: int, val: TokenizedSplit, pad_id: int) -> str:
        """Why training from cached hidden states would not be training this model ('' if nothing).

        Checked once per backbone and depth, on a few validation examples, before anything is
        cached: the cut must reproduce the full model's logits (float16 tolerance). A guard for
        architectures whose forward the cut does not fit (freezing already froze every parameter
        that feeds the frozen blocks).
        """
        batch = next(iter(make_loader(val, min(4, len(val.ids)), pad_id, shuffle=False)))
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        segments = {"token_type_ids": batch["token_type_ids"].to(self.device)} if "token_type_ids" in batch else {}
        model.to(self.device)
        try:
            # The same precision as training: bf16 autocast on a GPU.
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
                states = prefix_hidden_states(model, depth, ids, mask, segments.get("token_type_ids")).to(torch.float16)
                full = model(input_ids=ids, attention_mask=mask, **segments).logits.float()
                cached = UpperBlocksClassifier(model, depth).eval()(inputs_embeds=states, attention_mask=mask).logits.float()
        except Exception as err:  # noqa: BLE001 - an architecture the cut does not fit
            return f"{backbone} cannot be cut after block {depth}: {type(err).__name__}: {str(err)[:120]}"
        if not torch.allclose(cached, full, rtol=CACHE_RTOL, atol=CACHE_ATOL):
            difference = (cached - full).abs().max().item()
            return f"{backbone} cut after block {depth} changes the logits by up to {difference:.3g}"
        return ""
