"""How a backbone is adapted for a trial's training, and how the adapted model is saved for serving.

A trial's ``method`` (``ftsearch.config.METHODS``) says what trains:

- ``full``: every parameter; ``freeze``: all but the embeddings (an image stem) and the lowest
  ``freeze_depth`` blocks (stages). Both take a layer-wise learning-rate decay (block i from the
  top at ``lr * lr_decay**i``, what sits below the blocks one step further) and a multiplier on
  the new head's learning rate.
- ``lora``: low-rank adapters (Hugging Face ``peft``) on the linear layers of the blocks above the
  frozen prefix, and the head; saved merged into plain weights, so serving needs no ``peft``.
- ``bitfit``: the biases and normalisation parameters above the frozen prefix, and the head.

Any method may start with ``head_warmup_epochs`` of the head alone (LP-FT, in the training loop).
A frozen prefix is a fixed function of the input, so for text its outputs can be computed once and
cached (``FrozenPrefixCache``): the trial then trains only what sits above it, whatever the method.
The cut is checked before anything is cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ftsearch.data.features import (
    FeatureFill,
    PrefixStates,
    budget_bytes,
    budget_shortfall,
    feature_bytes,
    feature_loader,
    open_entry,
)
from ftsearch.data.tokens import LengthGroupedBatches, TokenizedSplit, make_loader
from ftsearch.errors import FtsearchError
from ftsearch.models import Layers
from ftsearch.models import text as text_models
from ftsearch.models import vision as vision_models
from ftsearch.models.text import UpperBlocksClassifier, prefix_hidden_states, trainable_inputs_of_prefix
from ftsearch.space import TrialConfig
from ftsearch.train import ParamGroup

# Cached hidden states are stored in float16 (about 3 significant digits): logits from them must
# agree with the full forward's to this tolerance.
CACHE_RTOL, CACHE_ATOL = 1e-2, 1e-2
# The attention projections ``lora_targets: attention`` adapts, by their names in transformers
# (BERT / RoBERTa / ELECTRA, DistilBERT, DeBERTa, most decoders) and timm (ViT's fused qkv).
ATTENTION_PROJECTIONS = {"query", "value", "q_lin", "v_lin", "query_proj", "value_proj", "q_proj", "v_proj", "qkv"}
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


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


@dataclass
class Adapted:
    """A model made ready for its trial's method: the parameter groups the training loop takes
    (learning-rate scale, head or not), and the plain model to save from the trained one."""

    model: nn.Module
    groups: list[ParamGroup]
    serving: Callable[[nn.Module], nn.Module]

    @property
    def trainable(self) -> int:
        return trainable_count(self.model)


def adapt(model: nn.Module, trial: TrialConfig) -> Adapted:
    """Adapt a freshly built classifier (text or image) in place for ``trial``'s method.

    Raises FtsearchError when the method has nothing to train in this backbone (LoRA targets it
    does not have)."""
    image = isinstance(model, vision_models.ImageClassifier)
    layers = vision_models.layers(model) if image else text_models.layers(model)
    merge = None
    if trial.method == "lora":
        merge = _inject_lora(model, layers, trial)
    elif trial.method == "bitfit":
        _bias_and_norms_only(model)
    if trial.method in ("lora", "bitfit"):
        for module in layers.head:
            module.requires_grad_(True)
    # The frozen prefix last: it must end up frozen whatever the method unfroze.
    if image:
        freeze_lowest_stages(model, trial.freeze_depth)
    else:
        freeze_lowest_blocks(model, trial.freeze_depth)
    groups = _groups(model, layers, trial)

    def serving(trained: nn.Module) -> nn.Module:
        plain = text_models.unwrap(trained)
        return plain if merge is None else merge()

    return Adapted(model, groups, serving)


def lora_targets(model: nn.Module, blocks: list[nn.Module], targets: str, backbone: str, depth: int = 0) -> list[str]:
    """The names of the layers LoRA adapts in ``blocks[depth:]``: the attention projections
    (``attention``) or every linear layer (``all-linear``; in an image backbone also every
    convolution peft can adapt). Raises FtsearchError, naming the backbone, when there are none."""
    image = isinstance(model, vision_models.ImageClassifier)
    kinds = (nn.Linear, nn.Conv2d) if image and targets == "all-linear" else (nn.Linear,)
    names = {id(m): n for n, m in model.named_modules()}
    found = [
        names[id(module)]
        for block in blocks[depth:]
        for module in block.modules()
        if isinstance(module, kinds) and getattr(module, "groups", 1) == 1  # peft adapts no grouped convolution
        and (targets == "all-linear" or names[id(module)].rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS)
    ]
    if not found:
        wanted = "linear layers" if targets == "all-linear" else f"attention projections ({', '.join(sorted(ATTENTION_PROJECTIONS))})"
        raise FtsearchError(f"lora_targets {targets!r}: backbone {backbone!r} has no {wanted} in its blocks above "
                            f"freeze depth {depth}; search the other lora_targets, or another method")
    return found


def check_lora_targets(model: nn.Module, choices: list[str], backbone: str, source: str) -> None:
    """Before the search: every searched ``lora_targets`` choice finds layers in ``backbone``
    (``model`` may be a weightless skeleton). Raises FtsearchError naming the study file."""
    blocks = (vision_models.layers(model) if isinstance(model, vision_models.ImageClassifier) else text_models.layers(model)).blocks
    for targets in choices:
        try:
            lora_targets(model, blocks, targets, backbone)
        except FtsearchError as err:
            raise FtsearchError(f"{source}: search.method has lora, but {err}") from None


def _inject_lora(model: nn.Module, layers: Layers, trial: TrialConfig) -> Callable[[], nn.Module]:
    """LoRA adapters (peft) on the target layers of the blocks above the frozen prefix; every
    other parameter frozen. Returns the function that merges them into plain weights."""
    from peft import LoraConfig, LoraModel

    targets = lora_targets(model, layers.blocks, trial.lora_targets, trial.backbone, trial.freeze_depth)
    config = LoraConfig(r=trial.lora_rank, lora_alpha=trial.lora_alpha_ratio * trial.lora_rank,
                        lora_dropout=trial.lora_dropout, target_modules=targets)
    # LoraModel adapts ``model`` in place (its classes and the paths to its blocks stay), so the
    # frozen-prefix cut and the saved layout work as for any other method.
    tuner = LoraModel(model, config, "default")
    return tuner.merge_and_unload


def _bias_and_norms_only(model: nn.Module) -> None:
    """BitFit: every parameter frozen but the biases and the normalisation layers' parameters."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, _NORMS):
            module.requires_grad_(True)
        elif isinstance(getattr(module, "bias", None), nn.Parameter):
            module.bias.requires_grad_(True)


def _groups(model: nn.Module, layers: Layers, trial: TrialConfig) -> list[ParamGroup]:
    """The trainable parameters by learning-rate scale: block i from the top at ``lr_decay**i``,
    what sits below the blocks at ``lr_decay**len(blocks)``, the head at ``head_lr_multiplier``
    (and marked, for the head warm-up), anything else (a pooler) at 1."""
    scale: dict[int, float] = {}
    count = len(layers.blocks)
    for power, modules in [(count, layers.below), *((count - 1 - i, [b]) for i, b in enumerate(layers.blocks))]:
        for module in modules:
            for param in module.parameters():
                scale[id(param)] = trial.lr_decay ** power
    head = {id(p) for module in layers.head for p in module.parameters()}
    grouped: dict[tuple[float, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (trial.head_lr_multiplier, True) if id(param) in head else (scale.get(id(param), 1.0), False)
            grouped.setdefault(key, []).append((name, param))
    return [ParamGroup(params, lr_scale=lr_scale, head=is_head) for (lr_scale, is_head), params in grouped.items()]


@dataclass
class CachedTraining:
    """A trial that trains from cached hidden states: the wrapped model and its loaders (each a
    ``PrefixStates`` while its split's entry is yet to be written by the first epoch)."""

    model: UpperBlocksClassifier
    train_loader: torch.utils.data.DataLoader | PrefixStates
    val_loader: torch.utils.data.DataLoader | PrefixStates


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
        entries, notes = {}, []
        for split, split_tokens in tokens.items():
            entries[split], how = open_entry(model, depth, split_tokens, max_length, self.device)
            if entries[split] is None:
                for opened in entries.values():
                    if isinstance(opened, FeatureFill):
                        opened.abandon()
                return None, f"off ({split}: {how})"
            notes.append(f"{split} {how}")
        cuda = self.device.type == "cuda"
        loaders = {}
        for split, entry in entries.items():
            size, shuffle = (batch_size, True) if split == "train" else (self.eval_batch_size, False)
            features = partial(feature_loader, batch_size=size, shuffle=shuffle, seed=seed, pin_memory=cuda)
            if isinstance(entry, FeatureFill):
                sampler = LengthGroupedBatches(tokens[split].lengths(), size, shuffle=shuffle, seed=seed)
                loaders[split] = PrefixStates(entry, tokens[split], pad_id, model, depth, self.device, features, sampler)
            else:
                loaders[split] = features(entry)
        return (CachedTraining(UpperBlocksClassifier(model, depth), loaders["train"], loaders["val"]),
                f"depth {depth}: " + ", ".join(notes))

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
        model.to(self.device).eval()  # without dropout, both ways (training sets its own mode)
        try:
            # The same precision as training: bf16 autocast on a GPU.
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
                states = prefix_hidden_states(model, depth, ids, mask, segments.get("token_type_ids")).to(torch.float16)
                full = model(input_ids=ids, attention_mask=mask, **segments).logits.float()
                cached = UpperBlocksClassifier(model, depth)(inputs_embeds=states, attention_mask=mask).logits.float()
        except Exception as err:  # noqa: BLE001 - an architecture the cut does not fit
            return f"{backbone} cannot be cut after block {depth}: {type(err).__name__}: {str(err)[:120]}"
        if not torch.allclose(cached, full, rtol=CACHE_RTOL, atol=CACHE_ATOL):
            difference = (cached - full).abs().max().item()
            return f"{backbone} cut after block {depth} changes the logits by up to {difference:.3g}"
        return ""
