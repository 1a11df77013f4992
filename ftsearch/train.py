"""The training loop: fine-tune a classifier, evaluate each epoch, keep the best epoch's weights.

It knows nothing of Optuna, MLflow or the terminal: it reports each epoch to a callback, which
may ask it to stop (that is how pruning reaches it), and each optimiser step to another (that is
how a progress display follows it).
"""

from __future__ import annotations

import gc
import math
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils.data import DataLoader

from ftsearch.errors import FtsearchError


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of one fine-tuning run."""

    lr: float
    epochs: int
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    metric: Literal["accuracy", "f1"] = "accuracy"
    maximize: bool = True
    device: str = "cpu"
    compile: bool = False  # torch.compile the model's forward (dynamic shapes: batches vary in length)
    grad_accumulation: int = 1  # batches per optimiser step (the batch that fits times this = the effective batch)


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch produced; ``val_f1`` is macro-averaged over classes."""

    epoch: int
    train_loss: float
    val_accuracy: float
    val_f1: float

    def value(self, metric: str) -> float:
        return {"accuracy": self.val_accuracy, "f1": self.val_f1}[metric]


@dataclass(frozen=True)
class Evaluation:
    """Accuracy, macro F1, and the labels and predictions they came from."""

    accuracy: float
    f1: float
    y_true: np.ndarray
    y_pred: np.ndarray


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
    """``auto`` picks CUDA when present; asking for CUDA without it is a user error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise FtsearchError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or cpu")
    return torch.device(requested)


def free_memory() -> None:
    """Return what a finished (or failed) fit held to the allocator, and CUDA's cache to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(device: torch.device):
    # bf16 autocast needs no loss scaling; on the CPU it is slower than fp32, so CUDA only.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Biases and normalisation weights are not decayed, as in BERT's recipe.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Learning rate rising linearly over ``warmup`` steps, then falling linearly to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> Evaluation:
    """Accuracy and macro F1 of ``model`` over ``loader``."""
    model.eval()
    y_true, y_pred = [], []
    for batch in loader:
        batch = _to(batch, device)
        labels = batch.pop("labels")
        with _autocast(device):
            logits = model(**batch).logits
        y_true.append(labels.cpu().numpy())
        y_pred.append(logits.argmax(-1).cpu().numpy())
    truth, pred = np.concatenate(y_true), np.concatenate(y_pred)
    return Evaluation(
        accuracy=float(accuracy_score(truth, pred)),
        f1=float(f1_score(truth, pred, average="macro")),
        y_true=truth,
        y_pred=pred,
    )


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    settings: TrainSettings,
    on_epoch_end: EpochCallback | None = None,
    on_step: StepCallback | None = None,
    checkpoint: Path | None = None,
    on_resume: ResumeCallback | None = None,
) -> FitResult:
    """Fine-tune ``model`` with AdamW, linear warm-up and decay, gradient clipping.

    Stops early when ``on_epoch_end`` returns True, and with status ``diverged`` on a non-finite
    loss. The best epoch (by ``settings.metric``) is kept, not the last. ``on_step`` hears of every
    optimiser step (see ``StepCallback``).

    With ``checkpoint``, everything needed to go on (weights, optimiser, scheduler, every random
    stream, the history and the best epoch) is written there after each epoch; a call that finds
    that file resumes after its epoch, as if never interrupted (``result.resumed_from_epoch``,
    ``on_resume`` hears of the restored epochs). The caller deletes the file when it is done.
    """
    seed_everything(settings.seed)
    device = torch.device(settings.device)
    model.to(device)
    if settings.compile:
        # In place, so the state dict keeps its keys; dynamic, so each new batch length does not
        # trigger a recompilation.
        model.compile(dynamic=True)
    optimizer = torch.optim.AdamW(
        _param_groups(model, settings.weight_decay), lr=settings.lr, fused=device.type == "cuda"
    )
    accumulation = max(1, settings.grad_accumulation)
    steps_per_epoch = math.ceil(len(train_loader) / accumulation)
    total_steps = settings.epochs * steps_per_epoch
    scheduler = linear_warmup_decay(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = FitResult(status="completed")
    first_epoch = 1
    if checkpoint is not None and checkpoint.is_file():
        first_epoch = _restore(checkpoint, model, optimizer, scheduler, train_loader, result) + 1
        result.resumed_from_epoch = first_epoch - 1
        if on_resume is not None:
            on_resume(list(result.history))
    done = (first_epoch - 1) * steps_per_epoch

    for epoch in range(first_epoch, settings.epochs + 1):
        model.train()
        loss_sum, batches = 0.0, 0
        for step, batch in enumerate(train_loader, start=1):
            with _autocast(device):
                loss = model(**_to(batch, device)).loss
            if not torch.isfinite(loss):
                result.status = "diverged"
                result.reason = f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}"
                return result
            (loss / accumulation).backward()
            loss_sum += loss.item()
            batches += 1
            if step % accumulation and step != len(train_loader):
                continue
            nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if on_step is not None:
                on_step(done, total_steps)

        evaluation = evaluate(model, val_loader, device)
        metrics = EpochMetrics(epoch, loss_sum / max(1, batches), evaluation.accuracy, evaluation.f1)
        result.history.append(metrics)
        if _improves(metrics.value(settings.metric), result.best_value(settings.metric), settings.maximize):
            result.best_epoch = epoch
            result.best_eval = evaluation
            result.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if checkpoint is not None:
            _save(checkpoint, epoch, model, optimizer, scheduler, train_loader, result)
        if on_epoch_end is not None and on_epoch_end(metrics):
            result.status = "stopped"
            return result
    return result


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
            "accuracy": best.accuracy, "f1": best.f1,
            "y_true": torch.from_numpy(best.y_true), "y_pred": torch.from_numpy(best.y_pred),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a kill while writing leaves the previous epoch's file whole


def _restore(path: Path, model, optimizer, scheduler, loader: DataLoader, result: FitResult) -> int:
    """Load a checkpoint written by ``_save`` into the live objects; returns its epoch."""
    try:
        # weights_only: a restricted unpickler, so a tampered file cannot run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: start over, say why
        raise FtsearchError(f"cannot resume from the checkpoint {path}: {err}; delete it to start the trial over") from None
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
    result.history = [EpochMetrics(**m) for m in state["history"]]
    result.best_epoch = state["best_epoch"]
    result.best_state = state["best_state"] if state["best_state"] is not None else state["model"]
    best = state["best_eval"]
    if best is not None:
        result.best_eval = Evaluation(best["accuracy"], best["f1"], best["y_true"].numpy(), best["y_pred"].numpy())
    return int(state["epoch"])


def _improves(value: float, best: float | None, maximize: bool) -> bool:
    if best is None or math.isnan(best):
        return True
    return value > best if maximize else value < best
