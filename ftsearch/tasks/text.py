"""Text classification: checks the study's data and backbones, builds each trial's model and loaders."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ftsearch.augment import TokenAugment
from ftsearch.baseline import tfidf_logistic_regression
from ftsearch.config import StudyConfig
from ftsearch.data.features import budget_bytes, budget_shortfall, feature_bytes, feature_loader, prefix_features
from ftsearch.data.text import TextSplits, load_text_splits
from ftsearch.data.tokens import TokenizedSplit, make_loader, tokenize_cached
from ftsearch.errors import FtsearchError
from ftsearch.models.text import (
    UpperBlocksClassifier,
    freeze_lowest_blocks,
    load_classifier,
    load_tokenizer,
    prefix_hidden_states,
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
        key = (trial.backbone, depth)
        if key not in self._cache_checked:
            self._cache_checked[key] = self._cache_problem(model, trial)
        if self._cache_checked[key]:
            return None, f"off ({self._cache_checked[key]})"
        pad_id = self.tokenizers[trial.backbone].pad_token_id
        tokens = {split: self._tokenized(trial.backbone, split, trial.max_length) for split in ("train", "val")}
        needed = sum(feature_bytes(t, model.config.hidden_size) for t in tokens.values())
        if needed > budget_bytes():
            return None, f"off ({budget_shortfall(needed)})"
        features, notes = {}, []
        for split, split_tokens in tokens.items():
            features[split], how = prefix_features(model, depth, split_tokens, trial.max_length, pad_id, self.device)
            if features[split] is None:
                return None, f"off ({split}: {how})"
            notes.append(f"{split} {how}")
        cuda = self.device.type == "cuda"
        train = feature_loader(features["train"], trial.batch_size, shuffle=True, seed=trial.seed, pin_memory=cuda)
        val = feature_loader(features["val"], EVAL_BATCH_SIZE, shuffle=False, pin_memory=cuda)
        return (UpperBlocksClassifier(model, depth), train, val), f"depth {depth}: " + ", ".join(notes)

    def _cache_problem(self, model: torch.nn.Module, trial: TrialConfig) -> str:
        """Why training from cached hidden states would not be training this model ('' if nothing).

        Checked once per backbone and depth, on a few validation examples, before anything is
        cached: the cut must reproduce the full model's logits (float16 tolerance). A guard for
        architectures whose forward the cut does not fit (freezing already froze every parameter
        that feeds the frozen blocks).
        """
        depth = trial.freeze_depth
        tokens = self._tokenized(trial.backbone, "val", trial.max_length)
        batch = next(iter(make_loader(tokens, min(4, len(tokens.ids)), self.tokenizers[trial.backbone].pad_token_id,
                                      shuffle=False)))
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        model.to(self.device)
        try:
            # The same precision as training: bf16 autocast on a GPU.
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
                states = prefix_hidden_states(model, depth, ids, mask).to(torch.float16)
                full = model(input_ids=ids, attention_mask=mask).logits.float()
                cached = UpperBlocksClassifier(model, depth).eval()(inputs_embeds=states, attention_mask=mask).logits.float()
        except Exception as err:  # noqa: BLE001 - an architecture the cut does not fit
            return f"{trial.backbone} cannot be cut after block {depth}: {type(err).__name__}: {str(err)[:120]}"
        if not torch.allclose(cached, full, rtol=CACHE_RTOL, atol=CACHE_ATOL):
            difference = (cached - full).abs().max().item()
            return f"{trial.backbone} cut after block {depth} changes the logits by up to {difference:.3g}"
        return ""

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
