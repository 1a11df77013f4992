"""The training loop: fine-tune a model, evaluate each epoch, keep the best epoch's weights.

It knows nothing of Optuna, MLflow or the terminal: it reports each epoch to a callback, which
may ask it to stop (that is how pruning reaches it), and each optimiser step to another (that is
how a progress display follows it). Nor does it know what is predicted: the problem type
(``ftsearch.problems``) gives it the loss and the metrics, and the settings say which metric
picks the best epoch.
"""

from __future__ import annotations

import gc
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_scheduler, set_seed

from ftsearch.disk import replacing
from ftsearch.errors import FtsearchError
from ftsearch.problems.base import Evaluation
from ftsearch.settings import gpu_memory_share


class Scoring(Protocol):
    """What the loop needs of a problem type (``ftsearch.problems.ProblemType`` is one)."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def evaluation(self, y_true: np.ndarray, outputs: np.ndarray) -> Evaluation: ...


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of one fine-tuning run."""

    lr: float
    epochs: int
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    scheduler: str = "linear"  # a transformers.get_scheduler name, with warm-up
    metric: str = "accuracy"  # the validation metric that picks the best epoch
    maximize: bool = True
    device: str = "cpu"
    compile: bool = False  # torch.compile the model's forward (dynamic shapes: batches vary in length)
    grad_accumulation: int = 1  # batches per optimiser step (the batch that fits times this = the effective batch)
    head_warmup_epochs: int = 0  # epochs that train only the ``head`` parameter groups (linear probe, then fine-tune)


@dataclass(frozen=True)
class ParamGroup:
    """Named parameters trained at ``lr_scale`` times the learning rate. ``head`` groups train from
    the first epoch; the others join after ``TrainSettings.head_warmup_epochs``."""

    params: list[tuple[str, nn.Parameter]]
    lr_scale: float = 1.0
    head: bool = False


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch produced: its mean training loss, every validation metric, and the seconds
    it took (training and validation)."""

    epoch: int
    train_loss: float
    metrics: dict[str, float]
    seconds: float = field(default=0.0, compare=False)  # a rerun that trains the same takes other seconds

    def value(self, metric: str) -> float:
        return self.metrics[metric]


@dataclass
class FitResult:
    """How training ended, its per-epoch history and the best epoch's weights (on the CPU).

    ``reason`` says why for ``diverged``."""

    status: Literal["completed", "stopped", "diverged"]
    history: list[EpochMetrics] = field(default_factory=list)
    reason: str = ""
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_eval: Evaluation | None = None
    resumed_from_epoch: int | None = None

    def best_value(self, metric: str) -> float | None:
        if self.best_epoch is None:
            return None
        return self.history[self.best_epoch - 1].value(metric)


EpochCallback = Callable[[EpochMetrics], bool]
"""Called after each epoch; returning True stops training (for example when pruned)."""

ResumeCallback = Callable[[list[EpochMetrics]], None]
"""Called once when training resumes from a checkpoint, with the epochs it had already finished."""

StepCallback = Callable[[int, int], None]
"""Called after each optimiser step with (step, total_steps): steps count from 1 across all epochs,
so ``step == total_steps`` after the last batch of the last epoch. Called every step, so it must be
cheap (updating a counter, not drawing)."""


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a user error. A worker that
    shares its GPU with others (``--trials-per-gpu``) is held to its share of the GPU's memory."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise FtsearchError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or cpu")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested)
    if device.type == "cuda" and (share := gpu_memory_share()) is not None:
        torch.cuda.set_per_process_memory_fraction(share)
    return device


def free_memory() -> None:
    """Return what a finished (or failed) fit held to the allocator, and CUDA's cache to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this fit could have used, in MiB: on a GPU, what torch allocated since the
    last ``reset_peak_memory(device)``; on the CPU, the process's peak resident set so far (the
    operating system keeps one high-water mark per process, so it covers earlier fits too)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a new GPU high-water mark for ``peak_memory_mb`` (the CPU's cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _autocast(device: torch.device):
    # bf16 autocast needs no loss scaling; on the CPU it is slower than fp32, so CUDA only.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_optimizer(groups: list[ParamGroup], settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over ``groups``, each at ``settings.lr * lr_scale`` and split into decayed weights and
    undecayed biases and normalisation weights (BERT's recipe); each AdamW group keeps its
    ParamGroup's ``head`` mark for the schedule."""
    split = []
    for group in groups:
        decay, no_decay = [], []
        for name, param in group.params:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        for params, weight_decay in ((decay, settings.weight_decay), (no_decay, 0.0)):
            if params:
                split.append({"params": params, "weight_decay": weight_decay, "lr": settings.lr * group.lr_scale,
                              "head": group.head})
    return torch.optim.AdamW(split, lr=settings.lr, fused=settings.device.startswith("cuda"))


def default_groups(model: nn.Module) -> list[ParamGroup]:
    """Every trainable parameter at the learning rate itself, all training from the first epoch."""
    return [ParamGroup([(n, p) for n, p in model.named_parameters() if p.requires_grad], head=True)]


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int, delayed: int = 0):
    """``transformers.get_scheduler``'s ``name`` schedule (linear, cosine, constant_with_warmup):
    ``warmup`` steps rising from 0, then the schedule's decay over the rest of ``total``.

    With ``delayed`` steps, the groups not marked ``head`` stay at 0 for those steps and then run
    the same schedule (its warm-up scaled) over the steps left: a linear probe, then fine-tuning.
    """
    if not delayed:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    # transformers builds its schedules as LambdaLR; one built on a throwaway optimiser gives the
    # step -> factor function of each phase, so both keep transformers' exact shapes.
    def shape(warmup_steps: int, steps: int):
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        return get_scheduler(name, probe, num_warmup_steps=warmup_steps, num_training_steps=steps).lr_lambdas[0]

    head = shape(warmup, total)
    rest = total - delayed
    body = shape(round(warmup * rest / total), rest)
    lambdas = [head if group.get("head", True) else (lambda step: 0.0 if step < delayed else body(step - delayed))
               for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, scoring: Scoring) -> Evaluation:
    """``model``'s outputs over ``loader``, judged by the problem type's metrics."""
    model.eval()
    y_true, outputs = [], []
    for batch in loader:
        batch = _to(batch, device)
        labels = batch.pop("labels")
        with _autocast(device):
            logits = model(**batch).logits
        y_true.append(labels.cpu().numpy())
        outputs.append(logits.float().cpu().numpy())
    return scoring.evaluation(np.concatenate(y_true), np.concatenate(outputs))


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    settings: TrainSettings,
    on_epoch_end: EpochCallback | None = None,
    on_step: StepCallback | None = None,
    checkpoint: Path | None = None,
    on_resume: ResumeCallback | None = None,
    *,
    scoring: Scoring,
    groups: list[ParamGroup] | None = None,
) -> FitResult:
    """Fine-tune ``model`` with AdamW, a warm-up + decay schedule, gradient clipping; the loss and
    the validation metrics are ``scoring``'s (the problem type's).

    Stops early when ``on_epoch_end`` returns True, and with status ``diverged`` on a non-finite
    loss. The best epoch (by ``settings.metric``) is kept, not the last. ``on_step`` hears of every
    optimiser step (see ``StepCallback``).

    With ``checkpoint``, everything needed to go on (weights, optimiser, scheduler, every random
    stream, the history and the best epoch) is written there after each epoch; a call that finds
    that file resumes after its epoch, as if never interrupted (``result.resumed_from_epoch``,
    ``on_resume`` hears of the restored epochs). The caller deletes the file when it is done. A
    full disk raises ``DiskFull`` naming the file, which still holds the previous epoch's state.

    ``groups`` (default: every trainable parameter at ``settings.lr``) set a learning rate per
    group (layer-wise decay, a head multiplier) and which train during the head warm-up.
    """
    set_seed(settings.seed)
    device = torch.device(settings.device)
    model.to(device)
    if settings.compile:
        # In place, so the state dict keeps its keys; dynamic, so each new batch length does not
        # trigger a recompilation.
        model.compile(dynamic=True)
    steps = _Steps.start(model, groups or default_groups(model), settings, len(train_loader), scoring, on_step)
    result = FitResult(status="completed")
    first_epoch = 1
    if checkpoint is not None and checkpoint.is_file():
        first_epoch = _restore(checkpoint, model, steps.optimizer, steps.scheduler, train_loader, result) + 1
        result.resumed_from_epoch = first_epoch - 1
        if on_resume is not None:
            on_resume(list(result.history))
    steps.done = (first_epoch - 1) * steps.per_epoch

    for epoch in range(first_epoch, settings.epochs + 1):
        started = time.perf_counter()
        train_loss, result.reason = steps.train_epoch(model, train_loader, epoch)
        if result.reason:
            result.status = "diverged"
            return result
        evaluation = evaluate(model, val_loader, device, scoring)
        metrics = EpochMetrics(epoch, train_loss, evaluation.metrics, time.perf_counter() - started)
        result.history.append(metrics)
        if _improves(metrics.value(settings.metric), result.best_value(settings.metric), settings.maximize):
            result.best_epoch = epoch
            result.best_eval = evaluation
            result.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if checkpoint is not None:
            _save(checkpoint, epoch, model, steps.optimizer, steps.scheduler, train_loader, result)
        if on_epoch_end is not None and on_epoch_end(metrics):
            result.status = "stopped"
            return result
    return result


@dataclass
class _Steps:
    """The optimiser side of a fit: AdamW, the schedule, gradient accumulation and clipping, and
    the count of optimiser steps taken (across epochs, for ``on_step``)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable: list[nn.Parameter]
    later: list[nn.Parameter]  # the parameters that wait for the head warm-up to end
    settings: TrainSettings
    scoring: Scoring
    on_step: StepCallback | None
    per_epoch: int
    total: int
    head_epochs: int = 0  # the head warm-up, at most every epoch but the last
    done: int = 0

    @classmethod
    def start(cls, model: nn.Module, groups: list[ParamGroup], settings: TrainSettings, batches: int,
              scoring: Scoring, on_step: StepCallback | None) -> _Steps:
        optimizer = make_optimizer(groups, settings)
        per_epoch = math.ceil(batches / max(1, settings.grad_accumulation))
        total = settings.epochs * per_epoch
        head_epochs = max(0, min(settings.head_warmup_epochs, settings.epochs - 1))
        scheduler = make_scheduler(settings.scheduler, optimizer, int(settings.warmup_ratio * total), total,
                                   head_epochs * per_epoch)
        trainable = [p for p in model.parameters() if p.requires_grad]
        later = [p for g in groups if not g.head for _, p in g.params] if head_epochs else []
        return cls(optimizer, scheduler, trainable, later, settings, scoring, on_step, per_epoch, total, head_epochs)

    def train_epoch(self, model: nn.Module, loader: DataLoader, epoch: int) -> tuple[float, str]:
        """One pass over ``loader``: ``(mean training loss, '')``, or ``(nan, why)`` when the loss
        stopped being finite (nothing is trained on it)."""
        device, accumulation = torch.device(self.settings.device), max(1, self.settings.grad_accumulation)
        # During the head warm-up the other parameters take no gradient at all: nothing is spent on
        # them, and AdamW's moments for them start when they do.
        for param in self.later:
            param.requires_grad_(epoch > self.head_epochs)
        model.train()
        loss_sum, batches = 0.0, 0
        for step, batch in enumerate(loader, start=1):
            batch = _to(batch, device)
            targets = batch.pop("labels")
            with _autocast(device):
                loss = self.scoring.loss(model(**batch).logits, targets)
            if not torch.isfinite(loss):
                return math.nan, f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}"
            (loss / accumulation).backward()
            loss_sum += loss.item()
            batches += 1
            if step % accumulation and step != len(loader):
                continue
            nn.utils.clip_grad_norm_(self.trainable, self.settings.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.done += 1
            if self.on_step is not None:
                self.on_step(self.done, self.total)
        return loss_sum / max(1, batches), ""


def _loader_parts(loader: DataLoader) -> dict:
    # The parts of a loader that keep their own randomness between epochs (the length-grouped
    # batch order, the augmentation stream) expose state_dict(); a DataLoader generator is torch's.
    parts = {name: getattr(loader, name, None) for name in ("batch_sampler", "collate_fn")}
    return {name: part for name, part in parts.items() if hasattr(part, "state_dict")}


def _rng_state() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(path: Path, epoch: int, model, optimizer, scheduler, loader: DataLoader, result: FitResult) -> None:
    best = result.best_eval
    state = {
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "loader": {name: part.state_dict() for name, part in _loader_parts(loader).items()}
        | ({"generator": loader.generator.get_state()} if loader.generator is not None else {}),
        "history": [asdict(m) for m in result.history],
        "best_epoch": result.best_epoch,
        # The best epoch's weights, unless they are this epoch's (then they are "model").
        "best_state": None if result.best_epoch == epoch else result.best_state,
        "best_eval": None if best is None else {
            "metrics": best.metrics, "y_true": torch.from_numpy(best.y_true), "outputs": torch.from_numpy(best.outputs),
        },
    }
    # A kill or a full disk while writing leaves the previous epoch's file whole.
    with replacing(path) as partial, open(partial, "wb") as file:
        # Through a Python file: torch's own writer of a path reports a full disk without its OS
        # error, a file object raises that error for ``replacing`` to recognise.
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())  # whole on disk before it replaces the previous epoch's file


def _restore(path: Path, model, optimizer, scheduler, loader: DataLoader, result: FitResult) -> int:
    """Load a checkpoint written by ``_save`` into the live objects; returns its epoch."""
    try:
        # weights_only: a restricted unpickler, so a tampered file cannot run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: start over, say why
        raise FtsearchError(f"cannot resume from the checkpoint {path}: {err}; delete it to start the trial over") from None
    try:
        history = [EpochMetrics(**_epoch_fields(m)) for m in state["history"]]
        best_eval = _evaluation(state["best_eval"])
    except (KeyError, TypeError) as err:
        raise FtsearchError(f"cannot resume from the checkpoint {path}: it was written by another version of "
                            f"ftsearch ({type(err).__name__}: {err}); delete it to start the trial over") from None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    loader_state = dict(state["loader"])
    if "generator" in loader_state and loader.generator is not None:
        loader.generator.set_state(loader_state.pop("generator"))
    for name, part in _loader_parts(loader).items():
        if name in loader_state:
            part.load_state_dict(loader_state[name])
    result.history, result.best_eval = history, best_eval
    result.best_epoch = state["best_epoch"]
    result.best_state = state["best_state"] if state["best_state"] is not None else state["model"]
    return int(state["epoch"])


def _epoch_fields(saved: dict) -> dict:
    # Checkpoints of ftsearch 0.1 (before problem types) held accuracy and F1 as fields of their own.
    if "metrics" not in saved and "val_accuracy" in saved:
        return {"epoch": saved["epoch"], "train_loss": saved["train_loss"],
                "metrics": {"accuracy": saved["val_accuracy"], "f1": saved["val_f1"]}}
    return saved


def _evaluation(saved: dict | None) -> Evaluation | None:
    if saved is None:
        return None
    if "outputs" not in saved and "y_pred" in saved:  # ftsearch 0.1: predicted classes, no outputs
        predicted = saved["y_pred"].numpy()
        outputs = np.eye(int(max(predicted.max(), saved["y_true"].numpy().max())) + 1, dtype=np.float32)[predicted]
        return Evaluation({"accuracy": saved["accuracy"], "f1": saved["f1"]}, saved["y_true"].numpy(), outputs)
    return Evaluation(dict(saved["metrics"]), saved["y_true"].numpy(), saved["outputs"].numpy())


def _improves(value: float, best: float | None, maximize: bool) -> bool:
    if best is None or math.isnan(best):
        return True
    return value > best if maximize else value < best
