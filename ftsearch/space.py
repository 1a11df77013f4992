"""The search space: the only place that calls ``trial.suggest_*``.

An Optuna trial goes in, a plain TrialConfig comes out; nothing downstream sees Optuna.
"""

from __future__ import annotations

import warnings

import optuna
from pydantic import BaseModel, ConfigDict

from ftsearch.config import FROZEN_PREFIX_METHODS, METHOD_KEYS, FloatRange, IntRange, StudyConfig
from ftsearch.generations import RETRY_OF_ATTR


class TrialConfig(BaseModel):
    """Everything one trial trains with, as sampled. Augmentations not searched keep their
    neutral default (off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str
    freeze_depth: int
    # How the backbone is adapted (ftsearch.adaptation); the defaults are each key's value when
    # the study does not search it.
    method: str = "freeze"
    lora_rank: int = 8
    lora_alpha_ratio: float = 2.0  # LoRA's alpha = this x its rank
    lora_dropout: float = 0.1
    lora_targets: str = "attention"
    lr_decay: float = 1.0
    head_lr_multiplier: float = 1.0
    head_warmup_epochs: int = 0
    lr: float
    batch_size: int
    weight_decay: float
    epochs: int
    warmup_ratio: float
    scheduler: str = "linear"
    seed: int = 0
    # text
    max_length: int = 0
    truncation: str = "head"
    token_mask: float = 0.0
    token_delete: float = 0.0
    # images
    crop_scale: float = 1.0
    hflip: float = 0.0
    color_jitter: float = 0.0
    auto_augment: str = "none"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


def searched_lora_targets(study: StudyConfig) -> list[str]:
    """The ``lora_targets`` a LoRA trial of ``study`` may use. Not searched: the attention
    projections for text, every linear layer and convolution for images (convolutional
    backbones have no attention)."""
    return study.search.lora_targets or ["all-linear" if study.modality == "image" else "attention"]


def _suggest(trial: optuna.Trial, name: str, rng: FloatRange | IntRange, high: int | None = None) -> float | int:
    """``rng`` sampled; an int range's ``high`` lowered to ``high`` where the trial allows less (its
    low with it, so the range stays a range)."""
    if isinstance(rng, IntRange):
        top = rng.high if high is None else min(rng.high, high)
        return trial.suggest_int(name, min(rng.low, top), top, log=rng.log and min(rng.low, top) >= 1)
    return trial.suggest_float(name, rng.low, rng.high, log=rng.log)


def _method(trial: optuna.Trial, study: StudyConfig, depth_limit: int) -> dict:
    """The adaptation method, and the freeze depth where the method has a frozen prefix."""
    space = study.search
    # A single method is not a choice: asking Optuna for it would only add a constant column.
    method = trial.suggest_categorical("method", space.method) if len(space.method) > 1 else space.method[0]
    # LoRA keeps at least one block above the frozen prefix to put its adapters in.
    top = depth_limit - 1 if method == "lora" else depth_limit
    depth = _suggest(trial, "freeze_depth", space.freeze_depth, high=top) if method in FROZEN_PREFIX_METHODS else 0
    return {"method": method, "freeze_depth": depth}


def _method_keys(trial: optuna.Trial, study: StudyConfig, method: str, epochs: int) -> dict:
    """The method's own keys that the study searches, and the head warm-up (any method)."""
    space = study.search
    values = {"lora_targets": searched_lora_targets(study)[0]} if method == "lora" else {}
    for key, methods in METHOD_KEYS.items():
        searched = getattr(space, key)
        if method in methods and searched is not None:
            values[key] = trial.suggest_categorical(key, searched) if isinstance(searched, list) else _suggest(trial, key, searched)
    if space.head_warmup_epochs is not None:
        # At least one epoch is left to the method itself.
        values["head_warmup_epochs"] = _suggest(trial, "head_warmup_epochs", space.head_warmup_epochs, high=epochs - 1)
    return values


def sample_trial(trial: optuna.Trial, study: StudyConfig, blocks: dict[str, int]) -> TrialConfig:
    """Sample a TrialConfig; freeze depth is conditional on the method and the chosen backbone's
    block count, each method's keys on that method, RandAugment's settings on RandAugment."""
    space = study.search
    backbone = trial.suggest_categorical("backbone", study.backbones)
    values = {
        "backbone": backbone,
        **_method(trial, study, blocks[backbone]),
        "lr": _suggest(trial, "lr", space.lr),
        "batch_size": trial.suggest_categorical("batch_size", space.batch_size),
        "weight_decay": _suggest(trial, "weight_decay", space.weight_decay),
        "epochs": _suggest(trial, "epochs", space.epochs),
        "warmup_ratio": _suggest(trial, "warmup_ratio", space.warmup_ratio),
        # A retry keeps the seed of the trial it repeats (it resumes that trial's checkpoint).
        "seed": study.sampler.seed + int(trial.user_attrs.get(RETRY_OF_ATTR, trial.number)),
    }
    values |= _method_keys(trial, study, values["method"], values["epochs"])
    if space.scheduler is not None:
        values["scheduler"] = trial.suggest_categorical("scheduler", space.scheduler)
    if study.modality == "text":
        values["max_length"] = trial.suggest_categorical("max_length", space.max_length)
        # One way of reading long texts is not a choice (as with one method).
        values["truncation"] = (trial.suggest_categorical("truncation", space.truncation) if len(space.truncation) > 1
                                else space.truncation[0])
    augment = space.augment
    if augment.auto_augment is not None:
        values["auto_augment"] = trial.suggest_categorical("auto_augment", augment.auto_augment)
    for name in sorted(augment.used() - {"auto_augment"}):  # a fixed order keeps seeded samples stable
        if name.startswith("randaugment_") and values.get("auto_augment") != "randaugment":
            continue
        values[name] = _suggest(trial, name, getattr(augment, name))
    return TrialConfig(**values)


def misfits(params: dict, study: StudyConfig, blocks: dict[str, int]) -> list[str]:
    """Why the configuration ``params`` (trial parameter -> value, as Optuna records them) does not
    fit ``study``'s space: a parameter the study does not sample, or a value outside what it
    samples (for the backbone the configuration names). Empty when it fits; parameters it leaves
    out are sampled as usual. Found by sampling a throwaway in-memory trial with ``params`` fixed,
    so conditional parameters (a method's keys, a backbone's freeze depths) are judged as a real
    trial would meet them."""
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    probe.enqueue_trial(params)
    trial = _Probe(probe.ask(), params)
    try:
        with warnings.catch_warnings():
            # Optuna warns of a fixed value outside its distribution and keeps it: said below instead.
            warnings.simplefilter("ignore")
            sampled = sample_trial(trial, study, blocks)
    except (ValueError, TypeError) as err:  # a value of the wrong type (a word for a number)
        return [f"{', '.join(f'{k} {v!r}' for k, v in params.items())}: {err}"]
    problems = list(trial.problems)
    for key, value in params.items():
        distribution = trial.distributions.get(key)
        if key in trial.refused:
            continue
        if distribution is None:
            # Not a choice in this study (one method, one backbone...): fits only as its fixed value.
            if getattr(sampled, key, object()) != value:
                problems.append(f"{key}: not searched by this study (it samples {', '.join(sorted(trial.distributions))})")
        elif not _contains(distribution, value):
            problems.append(f"{key} {value!r}: outside {_describe(distribution)}")
    return problems


class _Probe:
    """An Optuna trial that answers a fixed categorical value outside its choices with a problem
    (and the first choice, so that sampling goes on) instead of Optuna's ValueError."""

    def __init__(self, trial: optuna.Trial, params: dict):
        self._trial, self._params = trial, params
        self.problems: list[str] = []
        self.refused: set[str] = set()

    def suggest_categorical(self, name: str, choices):
        if name in self._params and self._params[name] not in choices:
            self.refused.add(name)
            self.problems.append(f"{name} {self._params[name]!r}: outside "
                                 f"{_describe(optuna.distributions.CategoricalDistribution(choices))}")
            return choices[0]
        return self._trial.suggest_categorical(name, choices)

    def __getattr__(self, name: str):
        return getattr(self._trial, name)


def _contains(distribution: optuna.distributions.BaseDistribution, value) -> bool:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return value in distribution.choices
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(distribution, optuna.distributions.IntDistribution) and value != int(value):
        return False
    step = getattr(distribution, "step", None)
    on_step = step is None or abs((value - distribution.low) / step - round((value - distribution.low) / step)) < 1e-9
    return distribution.low <= value <= distribution.high and on_step


def _describe(distribution: optuna.distributions.BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return f"the choices {', '.join(map(repr, distribution.choices))}"
    return f"[{distribution.low:g}, {distribution.high:g}]"
