"""How a trial ended, decided in one place: from the training result, or from the exception that
stopped it. The trial runner records it on the trial's MLflow run, the worker on the Optuna
storage; both ask ``outcome_of`` so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from ftsearch import tracking

State = Literal["COMPLETE", "PRUNED", "FAIL", "KILLED", "ABANDONED"]
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM); it resumes from its last epoch when the search goes on"


@dataclass(frozen=True)
class Outcome:
    """``state``: COMPLETE (with ``value``), PRUNED (stopped early, or diverged), FAIL (a bug or a
    broken setup), KILLED (interrupted: retried from its last epoch) or ABANDONED (another worker
    judged it dead while it ran, ended its run and queued its retry); ``reason`` says why. A
    completed trial of a study with several objectives has one ``value`` per objective."""

    state: State
    reason: str = ""
    value: float | list[float] | None = None

    @property
    def interrupted(self) -> bool:
        return self.state == "KILLED"


def outcome_of(error: BaseException) -> Outcome:
    """The outcome of a trial that ``error`` stopped."""
    if isinstance(error, optuna.TrialPruned):
        return Outcome("PRUNED", str(error))
    if isinstance(error, UpdateFinishedTrialError):
        # It missed two heartbeats: whoever noticed failed it and ended its run.
        return Outcome("ABANDONED", "judged dead by another worker (two heartbeats missed); its retry takes over")
    if isinstance(error, KeyboardInterrupt):
        return Outcome("KILLED", INTERRUPTED)
    return Outcome("FAIL", f"{type(error).__name__}: {error}")


def end_run(run: tracking.TrialRun, outcome: Outcome) -> None:
    """End a trial's MLflow run with its outcome (state tag, reason, matching run status): the one
    place a trial's run is ended, by its own process, by a worker that found it dead, or by the
    search process sweeping runs whose process died."""
    run.finish(outcome.state, outcome.reason)
