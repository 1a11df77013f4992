"""Study files: loading, the CPU plan, ``--set`` overrides and validation into a typed StudyConfig.

A study file holds data only. Every key is checked: a typo or an out-of-range value is an error
naming the file, the key and what is allowed, never silently ignored.
"""

from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ftsearch.catalog import TASKS
from ftsearch.errors import FtsearchError
from ftsearch.problems import ProblemType, problem_type

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
STUDY_SUFFIXES = (".yaml", ".yml")
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatRange(_Strict):
    """A float searched between ``low`` and ``high`` (log-uniform when ``log``)."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class IntRange(_Strict):
    """An integer searched between ``low`` and ``high`` inclusive (log-uniform when ``log``)."""

    low: int = Field(ge=0)
    high: int = Field(ge=0)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low < 1:
            raise ValueError(f"a log range needs low >= 1, got {self.low}")
        return self


def _one_of(choices) -> str:
    """Pydantic's wording for a closed set of choices: 'a', 'b' or 'c'."""
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _validated_problem(info: ValidationInfo) -> ProblemType | None:
    """The problem type of the study's task, once ``task`` has passed its own validation."""
    task = TASKS.get(info.data.get("task", ""))
    return None if task is None else problem_type(task.problem)


def _check_within(value: FloatRange | IntRange | None, info: ValidationInfo, bounds: dict) -> Any:
    low, high = bounds[info.field_name]
    if value is not None and (value.low < low or value.high > high):
        raise ValueError(f"range must lie within [{low}, {high}]")
    return value


class DataConfig(_Strict):
    """Which data set, its columns and labels, and how it is split and subsampled."""

    dataset: str = Field(
        description="catalog name (imdb, hymenoptera), a .csv/.tsv/.jsonl/.parquet file (text), or an image folder"
    )
    test_file: str | None = Field(None, description="held-out test file for a local text data set")
    format: Literal["csv", "tsv", "jsonl", "json", "parquet"] | None = Field(
        None, description="how the data files are read (left out: from their suffix; needed for e.g. .txt files)"
    )
    val_file: str | None = Field(None, description="validation file: used instead of carving one from train")
    columns: list[str] | None = Field(
        None, min_length=1, description="column names of files without a header row (.csv / .tsv), in order"
    )
    text_column: str = "text"
    text_pair_column: str | None = Field(None, description="second text of a sentence pair (tokenised as a pair)")
    label_column: str = "label"
    labels: list[str] | None = Field(
        None, min_length=2, description="class names, label i is labels[i] (images: the class folders)"
    )
    labels_file: str | None = Field(None, description="a text file of the class names, one a line, in id order")
    label_separator: str | None = Field(
        None, min_length=1, description="multi-label: the separator of several labels in one string cell (e.g. ',')"
    )
    target_range: tuple[float, float] | None = Field(
        None, description="regression: [low, high], predictions are clipped into it"
    )
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    split_seed: int = 0
    train_size: int | None = Field(None, ge=10, description="subsample of train (null: all)")
    val_size: int | None = Field(None, ge=10, description="subsample of validation (null: all)")
    test_size: int | None = Field(None, ge=10, description="subsample of test (null: all)")
    dedupe: Literal["off", "warn", "drop"] = Field(
        "warn", description="examples repeated within a split or leaked across splits: off (not checked), warn "
        "(reported), drop (train's repeats, then validation / test rows also in an earlier split, removed)"
    )
    placeholder_share: float | None = Field(
        0.9, gt=0, le=1, description="images whose most common colour covers at least this share of their "
        "pixels are skipped as placeholder graphics (null: keep all)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.labels is not None and self.labels_file is not None:
            raise ValueError("give the class names as data.labels or as data.labels_file, not both")
        if self.target_range is not None and self.target_range[0] >= self.target_range[1]:
            raise ValueError(f"target_range: low ({self.target_range[0]}) must be below high ({self.target_range[1]})")
        if self.text_pair_column is not None and self.text_pair_column == self.text_column:
            raise ValueError(f"text_pair_column: {self.text_pair_column!r} is the text_column too; name the second text's column")
        return self


TEXT_AUGMENT_BOUNDS = {"token_mask": (0.0, 0.5), "token_delete": (0.0, 0.5)}
IMAGE_AUGMENT_BOUNDS = {
    "crop_scale": (0.05, 1.0),
    "hflip": (0.0, 1.0),
    "color_jitter": (0.0, 0.5),
    "randaugment_ops": (1, 4),
    "randaugment_magnitude": (0, 30),
    "random_erasing": (0.0, 1.0),
    "mixup_alpha": (0.0, 2.0),
    "cutmix_alpha": (0.0, 2.0),
}
TEXT_ONLY_DATA = {"test_file", "format", "val_file", "columns", "text_column", "text_pair_column", "label_column",
                  "val_fraction", "labels_file", "label_separator", "target_range"}
IMAGE_ONLY_DATA = {"placeholder_share"}
_AUGMENTS = {False: set(TEXT_AUGMENT_BOUNDS), True: {*IMAGE_AUGMENT_BOUNDS, "auto_augment"}}  # keyed by "is image"


class AugmentSpace(_Strict):
    """Augmentations and their searched strengths; a missing entry is not applied.

    Text: ``token_mask`` / ``token_delete``, the probability per token. Images:
    ``crop_scale`` (smallest area kept by a random resized crop), ``hflip`` (probability),
    ``color_jitter`` (strength), ``auto_augment`` (choices among none, trivial, randaugment, with
    ``randaugment_ops`` and ``randaugment_magnitude``), ``random_erasing`` (probability),
    ``mixup_alpha`` / ``cutmix_alpha`` (applied on the batch; 0 turns one off).
    """

    token_mask: FloatRange | None = None
    token_delete: FloatRange | None = None
    crop_scale: FloatRange | None = None
    hflip: FloatRange | None = None
    color_jitter: FloatRange | None = None
    auto_augment: list[Literal["none", "trivial", "randaugment"]] | None = Field(None, min_length=1)
    randaugment_ops: IntRange | None = None
    randaugment_magnitude: IntRange | None = None
    random_erasing: FloatRange | None = None
    mixup_alpha: FloatRange | None = None
    cutmix_alpha: FloatRange | None = None

    @field_validator(*TEXT_AUGMENT_BOUNDS, *IMAGE_AUGMENT_BOUNDS)
    @classmethod
    def _within(cls, value: FloatRange | IntRange | None, info: ValidationInfo) -> FloatRange | IntRange | None:
        return _check_within(value, info, {**TEXT_AUGMENT_BOUNDS, **IMAGE_AUGMENT_BOUNDS})

    def used(self) -> set[str]:
        return {name for name in type(self).model_fields if getattr(self, name) is not None}


_SEARCH_BOUNDS = {
    "lr": (1e-7, 1.0),
    "weight_decay": (0.0, 1.0),
    "epochs": (1, 100),
    "warmup_ratio": (0.0, 0.5),
    "freeze_depth": (0, 1000),
    "lora_rank": (1, 1024),
    "lora_alpha_ratio": (0.0625, 16.0),
    "lora_dropout": (0.0, 0.5),
    "lr_decay": (0.05, 1.0),
    "head_lr_multiplier": (0.01, 1000.0),
    "head_warmup_epochs": (0, 100),
}
METHODS = ("full", "freeze", "lora", "bitfit")
FROZEN_PREFIX_METHODS = ("freeze", "lora", "bitfit")  # those that sample freeze_depth (full trains every block)
# The methods each method's own key applies to: it is sampled only in a trial of one of them, and
# setting it while none of them is searched is an error.
METHOD_KEYS = {
    "lora_rank": ("lora",),
    "lora_alpha_ratio": ("lora",),
    "lora_dropout": ("lora",),
    "lora_targets": ("lora",),
    "lr_decay": ("full", "freeze"),
    "head_lr_multiplier": ("full", "freeze"),
}


class SearchSpace(_Strict):
    """The ranges a trial samples from."""

    lr: FloatRange
    batch_size: list[int] = Field(min_length=1)
    freeze_depth: IntRange = IntRange(low=0, high=0)
    weight_decay: FloatRange = FloatRange(low=0.0, high=0.0)
    epochs: IntRange = IntRange(low=1, high=1)
    warmup_ratio: FloatRange = FloatRange(low=0.0, high=0.0)
    max_length: list[int] = Field([128], min_length=1)
    truncation: list[Literal["head", "tail", "head_tail"]] = Field(
        ["head"], min_length=1,
        description="how a text longer than max_length is read: its first tokens, its last, or a quarter from its "
                    "start and the rest from its end",
    )
    scheduler: list[Literal["linear", "cosine", "constant_with_warmup"]] | None = Field(
        None, min_length=1, description="learning-rate schedules to search among (left out: linear, not searched)"
    )
    augment: AugmentSpace = AugmentSpace()
    method: list[Literal["full", "freeze", "lora", "bitfit"]] = Field(
        ["freeze"], min_length=1,
        description="how a trial adapts its backbone, searched among these (docs/study-files.md#methods)",
    )
    # Left out, a method's key is not searched: its trials use the value in ftsearch.space.TrialConfig.
    lora_rank: IntRange | None = None
    lora_alpha_ratio: FloatRange | None = Field(None, description="LoRA's alpha as a multiple of its rank")
    lora_dropout: FloatRange | None = None
    lora_targets: list[Literal["attention", "all-linear"]] | None = Field(None, min_length=1)
    lr_decay: FloatRange | None = Field(None, description="layer-wise: block i from the top trains at lr * decay**i")
    head_lr_multiplier: FloatRange | None = Field(None, description="the new head trains at lr times this")
    head_warmup_epochs: IntRange | None = Field(
        None, description="epochs that train the head alone before the method's parameters join (LP-FT)"
    )

    @field_validator(*_SEARCH_BOUNDS)
    @classmethod
    def _within(cls, value: FloatRange | IntRange, info: ValidationInfo) -> FloatRange | IntRange:
        return _check_within(value, info, _SEARCH_BOUNDS)

    @field_validator("method")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each method at most once")
        return value

    @model_validator(mode="after")
    def _keys_fit_methods(self) -> SearchSpace:
        for key, methods in METHOD_KEYS.items():
            if getattr(self, key) is not None and not set(methods) & set(self.method):
                raise ValueError(f"search.{key} applies to the method(s) {', '.join(methods)}, and search.method is "
                                 f"{self.method}: add one of them to search.method or remove search.{key}")
        return self

    @field_validator("batch_size", "max_length")
    @classmethod
    def _choices(cls, value: list[int], info: ValidationInfo) -> list[int]:
        low, high = {"batch_size": (1, 4096), "max_length": (8, 8192)}[info.field_name]
        if any(not low <= choice <= high for choice in value):
            raise ValueError(f"choices must lie within [{low}, {high}]")
        return value


class SamplerConfig(_Strict):
    """``startup_trials``: trials sampled at random before TPE starts modelling the results."""

    name: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    startup_trials: int = Field(5, ge=1)


class PrunerConfig(_Strict):
    """``min_epochs``: epochs every trial runs before it may be pruned (the minimum resource of
    successive halving and hyperband); ``startup_trials``: trials the median pruner never prunes."""

    name: Literal["median", "successive_halving", "hyperband", "none"] = "median"
    min_epochs: int = Field(1, ge=1)
    startup_trials: int = Field(1, ge=0)


class StopConfig(_Strict):
    """End the study once none of the last ``patience`` finished trials beat the best before them
    by more than ``min_delta`` (in the metric's units); see ftsearch.stopping."""

    patience: int = Field(ge=1)
    min_delta: float = Field(0.0, ge=0)


# What ftsearch.cost measures for every completed trial, and a study file's constraints can bound.
CostName = Literal["latency_ms", "latency_ms_b32", "params_m", "size_mb"]


class Bound(_Strict):
    """The most a measured cost may be, for a trial to be feasible."""

    max: float = Field(gt=0)


class SelectConfig(_Strict):
    """How the model to register is chosen from the Pareto front of a study with several
    ``objectives`` (ftsearch.objectives.choose)."""

    rule: Literal["best", "within", "knee"] = Field(
        "best", description="best: the best metric on the front; within: the best second objective among the front's "
        "trials whose metric is within tolerance of the best; knee: nearest the ideal point, objectives scaled to [0, 1]"
    )
    tolerance: float = Field(0.01, ge=0, description="within: how far below the best metric a trial may be, in its units")

    @model_validator(mode="after")
    def _tolerance_fits_rule(self) -> SelectConfig:
        # By value, not by the keys given: a resolved study (config.json) must validate again.
        if self.tolerance != type(self).model_fields["tolerance"].default and self.rule != "within":
            raise ValueError(f"select.tolerance applies to rule 'within' only (rule is {self.rule!r})")
        return self


class SelectionConfig(_Strict):
    """How the registered model is chosen among the top trials: their configurations trained again
    with other seeds (the best mean wins; ftsearch.reevaluation), and which combinations are
    candidates beside the single best (judged on validation; one is registered only if it beats
    the single best; ftsearch.selection)."""

    top_k: int = Field(3, ge=1, le=10, description="trials whose weights are kept for the ensemble")
    seeds: int = Field(
        1, ge=1, le=10, description="times each top_k configuration is trained in all, the trial included (1: off)"
    )
    soup: bool = Field(True, description="the weights of top_k trials of one backbone averaged, greedily")
    ensemble: bool = Field(True, description="the top_k trials' predictions averaged")
    blend_baseline: bool = Field(True, description="the best trial averaged with the classical baseline")


class StudyConfig(_Strict):
    """A validated study: what to search, on which data, how, and where to register the winner."""

    name: str
    task: str = Field("text-classification", description="a name in ftsearch.catalog.TASKS")
    data: DataConfig
    metric: str = Field("accuracy", description="the validation metric the search optimises (the task's metrics)")
    direction: Literal["maximize", "minimize"] = Field(
        "maximize", description="follows the metric when left out; if given it must agree with it"
    )
    thresholds: Literal["per_label", "global"] = Field(
        "per_label", description="multi-label: one decision threshold per label, or one for all (tuned on validation)"
    )
    backbones: list[str] = Field(min_length=1)
    search: SearchSpace
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    stop: StopConfig | None = Field(None, description="stop early once the best value stops improving")
    selection: SelectionConfig = Field(SelectionConfig(), description="ensembles and blends as candidates")
    enqueue: list[dict[str, str | int | float]] = Field(
        [], description="configurations (trial parameter -> value) to try first, before the sampler's own"
    )
    objectives: list[str] | None = Field(
        None, min_length=2, description="several objectives, the metric among them: validation metrics of the task and "
        "measured costs (latency_ms, latency_ms_b32, params_m, size_mb); Optuna keeps their Pareto front"
    )
    select: SelectConfig = Field(SelectConfig(), description="with objectives: how the model is chosen from the front")
    constraints: dict[CostName, Bound] = Field(
        {}, description="measured costs (ftsearch.cost) the registered model must stay within, e.g. latency_ms: {max: 20}"
    )
    serve_device: str = Field(
        "cpu", pattern=r"^(cpu|cuda(:[0-9]+)?)$", description="where each trial's latency is measured: cpu, cuda or cuda:N"
    )
    system_metrics: bool = Field(
        True, description="log CPU, memory, disk and GPU use on each trial's run (MLflow's system metrics); "
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING overrides it on a machine"
    )
    n_trials: int = Field(10, ge=1)
    timeout: float | None = Field(None, gt=0, description="seconds after which no new trial starts")
    registered_model: str = Field(min_length=1)
    trust_remote_code: bool = False
    cache_frozen_prefix: bool = Field(
        True, description="train trials that freeze blocks (and do not augment text) from cached hidden states"
    )
    cpu_plan: dict[str, Any] = Field(
        default_factory=dict, description="overrides applied when training on the CPU"
    )
    source: str = Field("", description="the file the study was loaded from")

    @model_validator(mode="after")
    def _fits_task(self) -> StudyConfig:
        # A key that the task would ignore is an error, like an unknown key.
        image = self.modality == "image"
        other_task = [f"search.augment.{k}" for k in sorted(self.search.augment.used() & _AUGMENTS[not image])]
        if image:
            other_task += [f"data.{k}" for k in sorted(self.data.model_fields_set & TEXT_ONLY_DATA)]
            other_task += [f"search.{k}" for k in ("max_length", "truncation") if k in self.search.model_fields_set]
        else:
            other_task += [f"data.{k}" for k in sorted(self.data.model_fields_set & IMAGE_ONLY_DATA)]
        if other_task:
            allowed = ", ".join(sorted(_AUGMENTS[image]))
            raise ValueError(f"{other_task[0]} does not apply to {self.task} (augmentations for it: {allowed})")
        augment = self.search.augment
        if (augment.randaugment_ops or augment.randaugment_magnitude) and "randaugment" not in (augment.auto_augment or []):
            raise ValueError("search.augment.randaugment_ops / _magnitude need 'randaugment' in search.augment.auto_augment")
        if "thresholds" in self.model_fields_set and self.problem.target_kind != "classes":
            raise ValueError(f"thresholds does not apply to {self.task} (it is the multi-label decision rule)")
        if not image:
            self._fits_targets()
        if self.search.truncation != ["head"] and self.data.text_pair_column is not None:
            raise ValueError(f"search.truncation {self.search.truncation} does not apply to pairs of texts "
                             "(data.text_pair_column): a pair is cut longest first, the longer text losing its last "
                             "tokens; leave search.truncation out")
        return self

    @model_validator(mode="after")
    def _fits_objectives(self) -> StudyConfig:
        if self.objectives is None:
            if self.select != SelectConfig():
                raise ValueError("select applies to a study with several objectives: add objectives, e.g. "
                                 f"[{self.metric}, latency_ms], or remove select")
            return self
        n_labels = None if self.data.labels is None else len(self.data.labels)
        allowed = [*self.problem.metrics_for(n_labels), *typing.get_args(CostName)]
        for name in self.objectives:
            if name not in allowed:
                raise ValueError(f"objectives: {name!r} is not a metric of {self.task} nor a measured cost; "
                                 f"use {_one_of(allowed)}")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError("objectives: each at most once")
        if self.metric not in self.objectives:
            raise ValueError(f"objectives must include the study's metric {self.metric!r} (it orders the leaderboard "
                             "and is scored on test), or leave metric out to use the first metric among them")
        return self

    @property
    def objective_names(self) -> list[str]:
        """What the Optuna study optimises, the metric first (ftsearch.objectives.primary)."""
        return [self.metric, *(name for name in self.objectives or () if name != self.metric)]

    @property
    def objective_directions(self) -> list[str]:
        """Each objective's direction: a metric's own, a cost's ``minimize``."""
        return [self.problem.direction(name) if name in self.problem.metrics else "minimize"
                for name in self.objective_names]

    def pruning_note(self) -> str | None:
        """Why this study prunes no trial although its pruner would, or None."""
        if self.objectives and self.pruner.name != "none":
            return (f"pruning: off, the {self.pruner.name} pruner unused: Optuna prunes single-objective studies only, "
                    f"and this one has objectives {', '.join(self.objective_names)}; every trial runs all its epochs")
        return None

    def _fits_targets(self) -> None:
        """The data keys that say what a text task's targets are must fit its problem type."""
        data, kind, pair = self.data, self.problem.target_kind, TASKS[self.task].pair
        named = data.labels is not None or data.labels_file is not None
        if pair == "required" and data.text_pair_column is None:
            raise ValueError(f"data.text_pair_column: required for {self.task} (the column of the second text)")
        only = {"label_separator": "classes", "target_range": "number"}
        for key, needs in only.items():
            if getattr(data, key) is not None and kind != needs:
                raise ValueError(f"data.{key} does not apply to {self.task}")
        if kind == "number" and named:
            raise ValueError(f"data.labels / data.labels_file do not apply to {self.task}: its target is a number")
        if kind != "number" and not named:
            raise ValueError(f"data.labels: required for {self.task} (the class names, in label order), "
                             "or data.labels_file (one name a line)")
        n_labels = None if data.labels is None else len(data.labels)
        if self.metric not in self.problem.metrics_for(n_labels):
            raise ValueError(f"metric {self.metric!r} needs 2 classes ({self.task} here has {n_labels}); "
                             f"use one of {', '.join(self.problem.metrics_for(n_labels))}")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # The name becomes an MLflow experiment, an Optuna study, a registry tag and folder names.
        if not _STUDY_NAME.fullmatch(value) or ".." in value:
            raise ValueError(f"{value!r} is not a valid study name: use letters, digits, '-', '_' and '.', "
                             "no path separators or '..'")
        if re.search(r"\.\d+$", value):
            # `--fresh` names generations name.2, name.3, ...: such a name would be read as one.
            raise ValueError(f"{value!r} is not a valid study name: it must not end in '.<number>'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_task(cls, raw: Any) -> Any:
        # Left out, the metric is the task's first and the direction the metric's own; given, they
        # are checked against the task below.
        if not isinstance(raw, dict):
            return raw
        task = raw.get("task", cls.model_fields["task"].default)
        spec = TASKS.get(task) if isinstance(task, str) else None  # a bad task is reported by its validator
        metrics = problem_type(spec.problem).metrics if spec is not None else {}
        if "metric" not in raw and metrics:
            # With several objectives, the first metric among them; else the task's first.
            named = [o for o in raw.get("objectives") or () if isinstance(o, str) and o in metrics] \
                if isinstance(raw.get("objectives"), list) else []
            raw = {**raw, "metric": named[0] if named else next(iter(metrics))}
        metric = raw.get("metric", cls.model_fields["metric"].default)
        if "direction" not in raw and isinstance(metric, str) and metric in metrics:
            raw = {**raw, "direction": "maximize" if metrics[metric] else "minimize"}
        return raw

    @field_validator("task")
    @classmethod
    def _registered_task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(f"Input should be {_one_of(TASKS)}")
        return value

    @field_validator("metric")
    @classmethod
    def _metric_fits_task(cls, value: str, info: ValidationInfo) -> str:
        problem = _validated_problem(info)
        if problem is not None and value not in problem.metrics:
            raise ValueError(f"Input should be {_one_of(problem.metrics)} (the metrics of {info.data['task']})")
        return value

    @field_validator("direction")
    @classmethod
    def _direction_fits_metric(cls, value: str, info: ValidationInfo) -> str:
        problem, metric = _validated_problem(info), info.data.get("metric")
        if problem is None or metric is None:
            return value
        expected = problem.direction(metric)
        if value != expected:
            better = "higher" if expected == "maximize" else "lower"
            raise ValueError(f"metric {metric!r} is {better}-is-better: use {expected!r} or leave direction out")
        return value

    @property
    def problem(self) -> ProblemType:
        """The task's problem type: head, loss, metrics, baseline, figures, predictions."""
        return problem_type(TASKS[self.task].problem)

    @property
    def modality(self) -> str:
        """``text`` or ``image``: which data, backbones and model builders the task uses."""
        return TASKS[self.task].modality

    def plan_summary(self) -> str:
        """One line telling the user what this (possibly CPU-planned) study will do."""
        d, s = self.data, self.search
        size = lambda n: "all" if n is None else str(n)
        length = f"max length {s.max_length}, " if self.modality == "text" else ""
        return (
            f"{', '.join(self.backbones)}; data: train {size(d.train_size)} / val {size(d.val_size)} / "
            f"test {size(d.test_size)}, {length}epochs {s.epochs.low}-{s.epochs.high}, "
            f"methods {', '.join(s.method)}, freeze depth {s.freeze_depth.low}-{s.freeze_depth.high}, "
            f"{self.n_trials} trials, timeout {self.timeout or 'none'} s"
        )

    def search_identity(self) -> dict[str, Any]:
        """The fields that define the search; resuming a study with other values is refused.

        Defaults are left out, so that a field added to ftsearch later does not block resuming."""
        # What is recorded beside the trials (``system_metrics``), chosen after them (``selection``,
        # ``select``) and tried first (``enqueue``, once per configuration) may change on a resume.
        return self.model_dump(exclude={"n_trials", "timeout", "cpu_plan", "source", "selection", "select", "enqueue",
                                        "system_metrics"},
                               exclude_defaults=True)


def resolve_study_path(study: str) -> Path:
    """A study name under ``studies/`` or a path to a study file."""
    path = Path(study)
    if path.suffix in STUDY_SUFFIXES or path.exists():
        if not path.is_file():
            raise FtsearchError(f"study file {study!r} does not exist")
        return path
    if not _STUDY_NAME.fullmatch(study) or ".." in study:
        raise FtsearchError(
            f"study name {study!r} is not valid: use a name from studies/ (letters, digits, '-', '_') "
            "or a path to a .yaml file"
        )
    for suffix in STUDY_SUFFIXES:
        candidate = STUDIES_DIR / f"{study}{suffix}"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in STUDIES_DIR.rglob("*") if p.suffix in STUDY_SUFFIXES)
    raise FtsearchError(
        f"unknown study {study!r}: known studies are {', '.join(known) or 'none'}; "
        "or pass a path to a .yaml study file"
    )


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["search.lr.high=1e-3", ...]`` -> a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise FtsearchError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set n_trials=4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise FtsearchError(f"--set {pair!r}: value is not valid YAML ({err})") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FtsearchError(f"--set {pair!r}: {part!r} is set twice as value and as table")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` merged in, tables recursively, other values replaced."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_study(study: str, overrides: list[str] = (), cpu: bool = False) -> StudyConfig:
    """Load and validate a study file, apply its CPU plan when ``cpu``, then ``--set`` overrides.

    Raises FtsearchError naming the file, the key and what is allowed on any problem.
    """
    path = resolve_study_path(study)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise FtsearchError(f"{path}: not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FtsearchError(f"{path}: cannot be read: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FtsearchError(f"{path}: a study file must be a YAML mapping of keys to values")
    raw = {"name": path.stem, **raw, "source": str(path)}
    set_values = parse_overrides(list(overrides))
    # Validating checks the CPU plan too, even where it is not applied, so a typo in it is caught
    # on a GPU machine as well.
    config = validate(deep_merge(raw, set_values), path)
    if cpu and config.cpu_plan:
        config = validate(deep_merge(deep_merge(raw, config.cpu_plan), set_values), path)
    return config


def validate(raw: dict[str, Any], path: Path) -> StudyConfig:
    """Validate a study mapping; the error lists every bad key with what is allowed."""
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise FtsearchError(f"{path}: invalid study file:\n{_describe(err)}") from None
    if config.cpu_plan:
        try:
            StudyConfig.model_validate(deep_merge(raw, config.cpu_plan))
        except ValidationError as err:
            detail = _describe(err, prefix="cpu_plan.")
            raise FtsearchError(f"{path}: invalid study file:\n{detail}") from None
    return config


def _describe(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in err.errors():
        key = prefix + ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            parent = key.removeprefix(prefix).rpartition(".")[0]
            allowed = _allowed_keys(parent)
            lines.append(f"  {key}: unknown key; allowed here: {', '.join(allowed)}")
        elif item["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            got = repr(item.get("input"))
            lines.append(f"  {key + ': ' if key else ''}{msg}" + (f" (got {got})" if len(got) <= 80 else ""))
    return "\n".join(lines)


def _allowed_keys(dotted_parent: str) -> list[str]:
    model: Any = StudyConfig
    for part in [p for p in dotted_parent.split(".") if p]:
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return [name for name in model.model_fields if name != "source"]
