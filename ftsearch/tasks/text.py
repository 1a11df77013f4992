"""Text classification: checks the study's data and backbones, builds each trial's model and loaders."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ftsearch.augment import TokenAugment
from ftsearch.baseline import tfidf_logistic_regression
from ftsearch.config import StudyConfig
from ftsearch.data.features import FeatureSplit, feature_loader, prefix_features
from ftsearch.data.text import TextSplits, load_text_splits
from ftsearch.data.tokens import TokenizedSplit, make_loader, tokenize_cached
from ftsearch.errors import FtsearchError
from ftsearch.models.text import (
    UpperBlocksClassifier,
    freeze_lowest_blocks,
    load_classifier,
    load_tokenizer,
    resolve_backbone,
    unwrap,
)
from ftsearch.predictor import META_FILE, save_classifier
from ftsearch.space import TrialConfig
from ftsearch.tasks.base import EVAL_BATCH_SIZE, TrialSetup, count_params

ENTRY_FILE = Path(__file__).resolve().parent.parent / "pyfunc_entry.py"
# Cached hidden states are stored in float16 (about 3 significant digits): logits from them must
# agree with the full forward's to this tolerance.
CACHE_RTOL, CACHE_ATOL = 1e-2, 1e-2


class TextTask:
    """Everything the search needs that depends on the data being text."""

    entry_file = ENTRY_FILE
    baseline_name = "TF-IDF (1-2 grams) + logistic regression"

    def __init__(self, config: StudyConfig, device: torch.device):
        """Resolve backbones and tokenizers and load the data; raises FtsearchError, creates nothing."""
        self.config, self.device = config, device
        self.backbones = {name: resolve_backbone(name, config.trust_remote_code) for name in config.backbones}
        longest = max(config.search.max_length)
        for backbone in self.backbones.values():
            if backbone.max_positions is not None and longest > backbone.max_positions:
                raise FtsearchError(
                    f"{config.source}: search.max_length {longest} exceeds backbone {backbone.name!r}'s "
                    f"{backbone.max_positions} positions; lower search.max_length"
                )
        self.tokenizers = {name: load_tokenizer(b, config.trust_remote_code) for name, b in self.backbones.items()}
        self.splits: TextSplits = load_text_splits(config.data, Path(config.source).parent)
        self.labels = self.splits.labels
        self.blocks = {name: b.num_blocks for name, b in self.backbones.items()}
        self._tokens: dict[tuple[str, int, str], TokenizedSplit] = {}
        self._cache_checked: dict[tuple[str, int], str] = {}

    def describe(self) -> str:
        names = ", ".join(f"{b.name} ({b.num_blocks} blocks)" for b in self.backbones.values())
        return f"data: {self.splits.sizes()}; backbones: {names}"

    def build(self, trial: TrialConfig) -> TrialSetup:
        """The trial's classifier (lowest blocks frozen) and its train / validation loaders.

        When the frozen prefix's outputs can be cached (see ``data/features.py``), the model is
        wrapped to train from them and the loaders yield cached hidden states instead of tokens.
        """
        tokenizer = self.tokenizers[trial.backbone]
        augment = TokenAugment(trial.token_mask, trial.token_delete, tokenizer.mask_token_id)
        model = load_classifier(self.backbones[trial.backbone].source, self.labels, self.config.trust_remote_code)
        trainable = freeze_lowest_blocks(model, trial.freeze_depth)
        cached, note = self._from_cache(model, trial, augment)
        if cached is not None:
            return TrialSetup(cached[0], cached[1], cached[2], trainable, count_params(model), note)
        cuda = self.device.type == "cuda"
        train = make_loader(
            self._tokenized(trial.backbone, "train", trial.max_length), trial.batch_size, tokenizer.pad_token_id,
            shuffle=True, seed=trial.seed, augment=augment, pin_memory=cuda,
        )
        val = make_loader(
            self._tokenized(trial.backbone, "val", trial.max_length), EVAL_BATCH_SIZE, tokenizer.pad_token_id,
            shuffle=False, pin_memory=cuda,
        )
        return TrialSetup(model, train, val, trainable, count_params(model), note)

    def _from_cache(self, model: torch.nn.Module, trial: TrialConfig, augment: TokenAugment):
        """``((wrapped model, train loader, val loader), note)``, or ``(None, why not)``."""
        depth = trial.freeze_depth
        if not self.config.cache_frozen_prefix:
            return None, "off (cache_frozen_prefix: false)"
        if depth == 0:
            return None, "off (nothing frozen)"
        if augment.active:
            return None, "off (token augmentation changes the inputs every epoch)"
        pad_id = self.tokenizers[trial.backbone].pad_token_id
        features, notes = {}, []
        for split in ("train", "val"):
            tokens = self._tokenized(trial.backbone, split, trial.max_length)
            features[split], how = prefix_features(model, depth, tokens, trial.max_length, pad_id, self.device)
            if features[split] is None:
                return None, f"off ({split}: {how})"
            notes.append(f"{split} {how}")
        wrapped = UpperBlocksClassifier(model, depth)
        key = (trial.backbone, depth)
        if key not in self._cache_checked:
            self._cache_checked[key] = self._matches_full_forward(model, wrapped, trial, features["val"])
        if self._cache_checked[key]:
            return None, f"off ({trial.backbone} at depth {depth}: cached outputs differ from the full forward)"
        cuda = self.device.type == "cuda"
        train = feature_loader(features["train"], trial.batch_size, shuffle=True, seed=trial.seed, pin_memory=cuda)
        val = feature_loader(features["val"], EVAL_BATCH_SIZE, shuffle=False, pin_memory=cuda)
        return (wrapped, train, val), f"depth {depth}: " + ", ".join(notes)

    def _matches_full_forward(self, model, wrapped, trial: TrialConfig, val: FeatureSplit) -> str:
        """'' when the cached path reproduces the full model's logits on a few examples, else the
        difference: a guard for architectures whose forward the split does not fit."""
        tokens = self._tokenized(trial.backbone, "val", trial.max_length)
        count = min(4, len(val))
        full_batch = make_loader(tokens, count, self.tokenizers[trial.backbone].pad_token_id, shuffle=False)
        cached_batch = feature_loader(val, count, shuffle=False)
        full_in, cached_in = next(iter(full_batch)), next(iter(cached_batch))
        model.to(self.device).eval()
        with torch.inference_mode():
            full = model(**{k: v.to(self.device) for k, v in full_in.items() if k != "labels"}).logits.float()
            cached = wrapped(**{k: v.to(self.device) for k, v in cached_in.items() if k != "labels"}).logits.float()
        if torch.allclose(cached, full, rtol=CACHE_RTOL, atol=CACHE_ATOL):
            return ""
        return f"max logit difference {(cached - full).abs().max().item():.3g}"

    def save(self, model: torch.nn.Module, trial: TrialConfig, folder: Path) -> None:
        save_classifier(unwrap(model), self.tokenizers[trial.backbone], folder, trial.max_length, self.labels)

    def test_setup(self, folder: Path) -> tuple[torch.nn.Module, torch.utils.data.DataLoader]:
        """The saved model and a loader over the held-out test split, tokenised as it was trained."""
        import json

        from transformers import AutoTokenizer

        max_length = int(json.loads((folder / META_FILE).read_text())["max_length"])
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokens = tokenize_cached(tokenizer, self.splits.test, max_length)
        return load_classifier(folder, self.labels), make_loader(tokens, EVAL_BATCH_SIZE, tokenizer.pad_token_id, shuffle=False)

    def baseline(self) -> dict[str, float]:
        return tfidf_logistic_regression(self.splits.train, self.splits.val, self.splits.test)

    def parent_artifacts(self) -> dict[str, object]:
        return {}

    def log_misclassified(self, run, y_true, y_pred, path: str) -> None:
        """Nothing to draw for text; the confusion matrix says it."""

    def input_example(self) -> pd.DataFrame:
        return pd.DataFrame({"text": self.splits.test["text"].head(2).str.slice(0, 500).tolist()})

    def _tokenized(self, backbone: str, split: str, max_length: int) -> TokenizedSplit:
        key = (backbone, max_length, split)
        if key not in self._tokens:
            self._tokens[key] = tokenize_cached(self.tokenizers[backbone], getattr(self.splits, split), max_length)
        return self._tokens[key]
