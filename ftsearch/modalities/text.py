"""Text: checks the study's data, backbones and tokenizers, builds each trial's model and loaders."""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ftsearch.adaptation import FrozenPrefixCache, adapt, check_lora_targets
from ftsearch.augment import TokenAugment
from ftsearch.baseline import TfidfText, tfidf_features
from ftsearch.config import StudyConfig
from ftsearch.data.checks import DataChecks, class_balance, truncation, truncation_line
from ftsearch.data.text import TextSplits, fingerprint, load_text_splits, target_array
from ftsearch.data.tokens import TokenizedSplit, make_loader, tokenize_cached
from ftsearch.disk import writing
from ftsearch.errors import FtsearchError
from ftsearch.modalities.base import (
    EVAL_BATCH_SIZE,
    BaselineMember,
    LabelCheck,
    TrialSetup,
    check_classes,
    check_metric,
    count_params,
)
from ftsearch.models.text import load_classifier, load_tokenizer, resolve_backbone, set_head_bias, skeleton
from ftsearch.predictor import BASELINE_FILE, TextClassifier, read_meta, save_classifier, save_text_baseline
from ftsearch.problems.base import Evaluation, ProblemType
from ftsearch.space import TrialConfig, searched_lora_targets

ENTRY_FILE = Path(__file__).resolve().parent.parent / "pyfunc_entry.py"
# Sparse bigram features want weak regularisation.
BASELINE_FIT = {"inverse_regularisation": 4.0, "max_iter": 2000}
EXCERPT_CHARS = 300  # of a text listed as a likely label error: enough to judge the label by


class TextModality:
    """Everything the search needs that depends on the data being text."""

    entry_file = ENTRY_FILE

    @property
    def baseline_name(self) -> str:
        estimator = {"class": "logistic regression", "classes": "one-vs-rest logistic regression",
                     "number": "ridge regression"}[self.problem.target_kind]
        return f"TF-IDF (1-2 grams{', both texts' if self.pair else ''}) + {estimator}"

    def __init__(self, config: StudyConfig, device: torch.device):
        """Resolve backbones and tokenizers and load the data; raises FtsearchError, creates nothing."""
        self.config, self.device = config, device
        self.pair = config.data.text_pair_column is not None
        self.prefix_cache = FrozenPrefixCache(config.cache_frozen_prefix, device, EVAL_BATCH_SIZE)
        self.backbones = {name: resolve_backbone(name, config.trust_remote_code) for name in config.backbones}
        longest = max(config.search.max_length)
        for backbone in self.backbones.values():
            if backbone.max_positions is not None and longest > backbone.max_positions:
                raise FtsearchError(
                    f"{config.source}: search.max_length {longest} exceeds backbone {backbone.name!r}'s "
                    f"{backbone.max_positions} positions; lower search.max_length"
                )
        if "lora" in config.search.method:
            for name, backbone in self.backbones.items():
                check_lora_targets(skeleton(backbone, config.trust_remote_code), searched_lora_targets(config), name,
                                   config.source)
        self.tokenizers = {name: load_tokenizer(b, config.trust_remote_code) for name, b in self.backbones.items()}
        self.splits: TextSplits = load_text_splits(config.data, Path(config.source).parent, config.problem.target_kind)
        self.labels = self.splits.labels
        check_metric(config, self.labels)
        check_classes(config, self.labels, target_array(self.splits.train))
        # What the problem type learns from the training targets (a regression target's scale).
        self.problem = config.problem.fitted(
            target_array(self.splits.train), target_range=config.data.target_range, thresholds=config.thresholds,
            metric=config.metric,
        )
        self.blocks = {name: b.num_blocks for name, b in self.backbones.items()}
        self._tokens: dict[tuple[str, int, str], TokenizedSplit] = {}
        self.checks = self._check_data()

    def describe(self) -> str:
        names = ", ".join(f"{b.name} ({b.num_blocks} blocks)" for b in self.backbones.values())
        return f"data: {self.splits.sizes()}; backbones: {names}"

    def build(self, trial: TrialConfig) -> TrialSetup:
        """The trial's adapted model (``ftsearch.adaptation``) and its train / validation loaders.

        When the frozen prefix's outputs can be cached (see ``ftsearch.adaptation``), the model is
        wrapped to train from them and the loaders yield cached hidden states instead of tokens.
        """
        tokenizer = self.tokenizers[trial.backbone]
        augment = TokenAugment(trial.token_mask, trial.token_delete, tokenizer.mask_token_id,
                               tuple(tokenizer.all_special_ids))
        model = load_classifier(self.backbones[trial.backbone].source, self.labels, self.config.trust_remote_code,
                                num_outputs=self.problem.head_size(self.labels))
        if (bias := self.problem.head_bias()) is not None:
            set_head_bias(model, bias)
        adapted = adapt(model, trial)
        tokens = {split: self._tokenized(trial.backbone, split, trial.max_length, trial.truncation)
                  for split in ("train", "val")}
        cached, note = self.prefix_cache.train_from_cache(
            model, trial.backbone, trial.freeze_depth, tokens, max_length=trial.max_length,
            pad_id=tokenizer.pad_token_id, batch_size=trial.batch_size, seed=trial.seed,
            inputs_vary="token augmentation changes the inputs every epoch" if augment.active else "",
        )
        if cached is not None:
            return TrialSetup(cached.model, cached.train_loader, cached.val_loader, adapted, count_params(model), note)
        cuda = self.device.type == "cuda"
        train = make_loader(tokens["train"], trial.batch_size, tokenizer.pad_token_id, shuffle=True, seed=trial.seed,
                            augment=augment, pin_memory=cuda)
        val = make_loader(tokens["val"], EVAL_BATCH_SIZE, tokenizer.pad_token_id, shuffle=False, pin_memory=cuda)
        return TrialSetup(model, train, val, adapted, count_params(model), note)

    def save(self, model: torch.nn.Module, trial: TrialConfig, folder: Path, problem: ProblemType) -> None:
        with writing(folder):
            save_classifier(model, self.tokenizers[trial.backbone], folder, trial.max_length, self.labels,
                            problem.meta(), pair=self.pair, truncation=trial.truncation)

    def eval_setup(self, folder: Path, split: str) -> tuple[torch.nn.Module, torch.utils.data.DataLoader]:
        """The saved model and a loader over ``split``, tokenised as it was trained."""
        from transformers import AutoTokenizer

        meta = read_meta(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokens = tokenize_cached(tokenizer, getattr(self.splits, split), int(meta["max_length"]),
                                 truncation=meta.get("truncation", "head"))
        model = load_classifier(folder, self.labels, num_outputs=self.problem.head_size(self.labels))
        return model, make_loader(tokens, EVAL_BATCH_SIZE, tokenizer.pad_token_id, shuffle=False)

    @cached_property
    def _tfidf(self) -> tuple[TfidfText, dict[str, tuple]]:
        return tfidf_features({"train": self.splits.train, "val": self.splits.val, "test": self.splits.test})

    @property
    def _baseline_features(self) -> dict[str, tuple]:
        return self._tfidf[1]

    def baseline(self) -> dict[str, float]:
        return self.problem.baseline(self._baseline_features, **BASELINE_FIT)

    def baseline_member(self, folder: Path) -> BaselineMember:
        """The TF-IDF baseline refitted on train, saved with skops in ``folder``
        (``predictor.TextBaseline``)."""
        tfidf, features = self._tfidf
        estimator = self.problem.fit_baseline(*features["train"], **BASELINE_FIT)
        n_outputs = self.problem.head_size(self.labels)
        start = time.perf_counter()  # as served: the texts' features, then the estimator
        outputs = {"val": self.problem.baseline_outputs(estimator, tfidf.frame(self.splits.val), n_outputs)}
        seconds = (time.perf_counter() - start) / max(1, len(self.splits.val))
        outputs["test"] = self.problem.baseline_outputs(estimator, features["test"][0], n_outputs)
        path = folder / BASELINE_FILE
        with writing(path):
            folder.mkdir(parents=True, exist_ok=True)
            save_text_baseline(tfidf, estimator, path)
        return BaselineMember(outputs, path, seconds)

    def label_issues(self) -> LabelCheck | None:
        found = self.problem.label_issues(*self._baseline_features["train"], self.labels, **BASELINE_FIT)
        if found is None:
            return None
        train = self.splits.train
        columns = [c for c in ("text", "text_pair") if c in train.columns]
        rows = [{**row, **{c: _excerpt(train[c].iloc[row["index"]]) for c in columns}} for row in found.rows]
        return LabelCheck({**found.as_dict(), "rows": rows}, {})

    def parent_artifacts(self) -> dict[str, object]:
        return {"data_report.json": self.checks.report}

    def _sources(self) -> dict[str, str]:
        data = self.config.data
        return {"train": data.dataset, "val": data.val_file or data.dataset, "test": data.test_file or data.dataset}

    def _check_data(self) -> DataChecks:
        splits = {"train": self.splits.train, "val": self.splits.val, "test": self.splits.test}
        checks = DataChecks({"sizes": {split: len(frame) for split, frame in splits.items()},
                             "digests": {split: fingerprint(frame) for split, frame in splits.items()},
                             "sources": self._sources()})
        if self.splits.duplicates is not None:
            checks.report["duplicates"] = self.splits.duplicates.as_dict()
            checks.warnings += self.splits.duplicates.lines()
        if self.labels:
            targets = {split: target_array(frame) for split, frame in splits.items()}
            checks.report["class_balance"], warnings = class_balance(targets, self.labels, self.config.metric)
            checks.warnings += warnings
        # Lengths by the first backbone's tokenizer, untruncated: how much each max_length keeps.
        backbone = self.config.backbones[0]
        train = self.splits.train
        pairs = train["text_pair"].tolist() if self.pair else None
        encoded = self.tokenizers[backbone](train["text"].tolist(), pairs, verbose=False)["input_ids"]
        cut = truncation(np.array([len(ids) for ids in encoded]), self.config.search.max_length)
        checks.report["truncation"] = {"backbone": backbone, "split": "train", **cut}
        checks.notes.append(truncation_line(cut, "train"))
        return checks

    def example_figures(self, evaluation: Evaluation) -> dict[str, object]:
        """Nothing to draw for text; the problem type's figures say it."""
        return {}

    def served(self, folder: Path, device: str) -> tuple[TextClassifier, tuple[list[str], ...]]:
        columns = ["text", "text_pair"] if self.pair else ["text"]
        return TextClassifier(folder, device), tuple(self.splits.val[c].astype(str).tolist() for c in columns)

    def input_example(self) -> pd.DataFrame:
        columns = ["text", "text_pair"] if self.pair else ["text"]
        return pd.DataFrame({c: self.splits.test[c].head(2).str.slice(0, 500).tolist() for c in columns})

    def input_schema(self):
        from mlflow.types import ColSpec, Schema

        return Schema([ColSpec("string", "text"), *([ColSpec("string", "text_pair")] if self.pair else [])])

    def _tokenized(self, backbone: str, split: str, max_length: int, truncation: str) -> TokenizedSplit:
        key = (backbone, max_length, truncation, split)
        if key not in self._tokens:
            self._tokens[key] = tokenize_cached(self.tokenizers[backbone], getattr(self.splits, split), max_length,
                                                truncation=truncation)
        return self._tokens[key]


def _excerpt(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS].rstrip() + "..."
