"""The training loop: fine-tune a classifier, evaluate each epoch, keep the best epoch's weights.

It knows nothing of Optuna, MLflow or the terminal: it reports each epoch to a callback, which
may ask it to stop (that is how pruning reaches it), and each optimiser step to another (that is
how a progress display follows it).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
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

    def best_value(self, metric: str) -> float | None:
        if self.best_epoch is None:
            return None
        return self.history[self.best_epoch - 1].value(metric)


EpochCallback = Callable[[EpochMetrics], bool]
"""Called after each epoch; returning True stops training (for example when pruned)."""

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
) -> FitResult:
    """Fine-tune ``model`` with AdamW, linear warm-up and decay, gradient clipping.

    Stops early when ``on_epoch_end`` returns True, and with status ``diverged`` on a non-finite
    loss. The best epoch (by ``settings.metric``) is kept, not the last. ``on_step`` hears of every
    optimiser step (see ``StepCallback``).
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
    total_steps = settings.epochs * len(train_loader)
    scheduler = linear_warmup_decay(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = FitResult(status="completed")
    done = 0

    for epoch in range(1, settings.epochs + 1):
        model.train()
        loss_sum, batches = 0.0, 0
        for step, batch in enumerate(train_loader, start=1):
            with _autocast(device):
                loss = model(**_to(batch, device)).loss
            if not torch.isfinite(loss):
                result.status = "diverged"
                result.reason = f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}"
                return result
            loss.backward()
            nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item()
            batches += 1
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
        if on_epoch_end is not None and on_epoch_end(metrics):
            result.status = "stopped"
            return result
    return result


def _improves(value: float, best: float | None, maximize: bool) -> bool:
    if best is None or math.isnan(best):
        return True
    return value > best if maximize else value < best
