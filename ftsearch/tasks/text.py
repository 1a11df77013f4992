"""Text classification: checks the study's data and backbones, builds each trial's model and loaders."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ftsearch.augment import TokenAugment
from ftsearch.baseline import tfidf_logistic_regression
from ftsearch.config import StudyConfig
from ftsearch.data.text import TextSplits, load_text_splits
from ftsearch.data.tokens import TokenizedSplit, make_loader, tokenize_cached
from ftsearch.errors import FtsearchError
from ftsearch.models.text import freeze_lowest_blocks, load_classifier, load_tokenizer, resolve_backbone
from ftsearch.predictor import META_FILE, save_classifier
from ftsearch.space import TrialConfig
from ftsearch.tasks.base import EVAL_BATCH_SIZE, TrialSetup, count_params

ENTRY_FILE = Path(__file__).resolve().parent.parent / "pyfunc_entry.py"


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

    def describe(self) -> str:
        names = ", ".join(f"{b.name} ({b.num_blocks} blocks)" for b in self.backbones.values())
        return f"data: {self.splits.sizes()}; backbones: {names}"

    def build(self, trial: TrialConfig) -> TrialSetup:
        """The trial's classifier (lowest blocks frozen) and its train / validation loaders."""
        tokenizer = self.tokenizers[trial.backbone]
        cuda = self.device.type == "cuda"
        augment = TokenAugment(trial.token_mask, trial.token_delete, tokenizer.mask_token_id)
        train = make_loader(
            self._tokenized(trial.backbone, "train", trial.max_length), trial.batch_size, tokenizer.pad_token_id,
            shuffle=True, seed=trial.seed, augment=augment, pin_memory=cuda,
        )
        val = make_loader(
            self._tokenized(trial.backbone, "val", trial.max_length), EVAL_BATCH_SIZE, tokenizer.pad_token_id,
            shuffle=False, pin_memory=cuda,
        )
        model = load_classifier(self.backbones[trial.backbone].source, self.labels, self.config.trust_remote_code)
        trainable = freeze_lowest_blocks(model, trial.freeze_depth)
        return TrialSetup(model, train, val, trainable, count_params(model))

    def save(self, model: torch.nn.Module, trial: TrialConfig, folder: Path) -> None:
        save_classifier(model, self.tokenizers[trial.backbone], folder, trial.max_length, self.labels)

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
