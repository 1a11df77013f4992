"""What the harness and its workers share: the search space, smoke data, and the probes.

The probes measure every framework the same way, from outside it:

* optimiser steps: a global ``torch.optim`` step hook records the wall time of every optimiser
  step, whoever owns the optimiser (ftsearch, Trainer/accelerate, the bare loop);
* validation passes: each framework reports its per-epoch validation accuracy somewhere public
  (ftsearch: its MLflow ``val_accuracy`` metric, Trainer: the ``on_evaluate`` callback, the bare
  loop: itself); the probe notes when and what;
* memory: a thread samples the process's resident set size (children included).

All times are ``time.time()`` (wall clock), so they line up with Optuna's trial datetimes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

# The smoke preset's tiny vocabulary, BERT and reviews are the tests' own: one definition for both.
from tests.helpers import make_reviews

FRAMEWORKS = ("ftsearch", "trainer", "bare")
LABELS = ["negative", "positive"]
EVAL_BATCH_SIZE = 64  # validation batch size in all three (ftsearch's own is 64)


@dataclass(frozen=True)
class Space:
    """The search space all three frameworks sample from, suggested in the same order with the
    same distributions, so a seeded sampler draws the same configurations in all of them while
    it samples at random (Optuna's TPE does for its first ``startup_trials`` trials)."""

    lr_low: float
    lr_high: float
    batch_sizes: tuple[int, ...]
    weight_decay_low: float
    weight_decay_high: float
    freeze_low: int
    freeze_high: int

    def as_dict(self) -> dict:
        return {
            "freeze_depth": [self.freeze_low, self.freeze_high],
            "lr": {"low": self.lr_low, "high": self.lr_high, "log": True},
            "batch_size": list(self.batch_sizes),
            "weight_decay": [self.weight_decay_low, self.weight_decay_high],
        }


def sample_configs(space: Space, n_trials: int, seed: int, startup_trials: int) -> list[dict]:
    """Configurations drawn the way the frameworks draw them (TPE, same seed, same order).

    Used for the bare loop only when ftsearch did not run in the same repeat; otherwise the bare
    loop replays ftsearch's own configurations."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    )
    configs = []
    for number in range(n_trials):
        trial = study.ask()
        configs.append({
            "number": number,
            "seed": seed + number,
            "freeze_depth": trial.suggest_int("freeze_depth", space.freeze_low, space.freeze_high),
            "lr": trial.suggest_float("lr", space.lr_low, space.lr_high, log=True),
            "batch_size": trial.suggest_categorical("batch_size", list(space.batch_sizes)),
            "weight_decay": trial.suggest_float("weight_decay", space.weight_decay_low, space.weight_decay_high),
        })
        study.tell(trial, 0.0)
    return configs


# ---- smoke data and model ------------------------------------------------------------------

def synthetic_reviews(n: int, seed: int):
    """Short reviews whose label (0 negative, 1 positive) is carried by two sentiment words: the
    tests' synthetic reviews, under the column names the harness uses."""
    frame = make_reviews(n, seed).rename(columns={"review": "text", "sentiment": "label"})
    frame["label"] = (frame["label"] == "pos").astype(int)
    return frame


# ---- probes ----------------------------------------------------------------------------------


@dataclass
class Probe:
    """Everything a worker records while its framework runs; written out as JSON."""

    steps: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    tracking_calls: list[list] = field(default_factory=list)  # [name, start, end]
    marks: list[dict] = field(default_factory=list)
    sync_cuda: bool = False
    _hook = None
    _sampler: RssSampler | None = None

    def start(self) -> None:
        import torch.optim.optimizer as optim

        def after_step(optimizer, args, kwargs) -> None:
            if self.sync_cuda:
                import torch

                torch.cuda.synchronize()
            self.steps.append(time.time())

        self._hook = optim.register_optimizer_step_post_hook(after_step)
        self._sampler = RssSampler()
        self._sampler.start()

    def stop(self) -> dict:
        if self._hook is not None:
            self._hook.remove()
        return self._sampler.stop() if self._sampler else {}

    def eval_done(self, accuracy: float, epoch: float | None) -> None:
        self.evals.append({"t": time.time(), "acc": float(accuracy), "epoch": epoch})

    def mark(self, what: str, **data) -> None:
        self.marks.append({"what": what, "t": time.time(), **data})


class RssSampler(threading.Thread):
    """Peak resident set size of this process, and of it with its child processes (a forked child's
    shared pages count twice there), sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True, name="rss-sampler")
        import psutil

        self.process = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = 0
        self.peak_with_children = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        import psutil

        try:
            rss = self.process.memory_info().rss
            children = 0
            for child in self.process.children(recursive=True):
                try:
                    children += child.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        self.peak = max(self.peak, rss)
        self.peak_with_children = max(self.peak_with_children, rss + children)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> dict:
        self.sample()
        self._halt.set()
        self.join(timeout=2)
        return {"peak_rss_bytes": self.peak, "peak_rss_with_children_bytes": self.peak_with_children}
