"""When a study has converged: its best value stopped improving (the study file's ``stop`` key).

Optuna's terminator would judge this but is deprecated for removal, and the rule is small: the
study stops once none of its last ``patience`` finished trials beat the best value of the trials
before them by more than ``min_delta`` (as Keras' early stopping judges epochs). Pruned trials
count as finished trials that did not improve. Trials are taken in the order they finished, so
the rule reads the same study the same way in every worker, and again on resume. With several
objectives, the study's metric (the first) is the one judged.
"""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial, TrialState

from ftsearch.objectives import primary


def converged(trials: Sequence[FrozenTrial], direction: str, patience: int, min_delta: float) -> str | None:
    """Why the study should stop (a sentence), or None while it may still improve."""
    finished = sorted(
        (t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.datetime_complete),
        key=lambda t: (t.datetime_complete, t.number),
    )
    if len(finished) <= patience:
        return None
    sign = 1.0 if direction == "maximize" else -1.0
    before = [t for t in finished[:-patience] if t.state == TrialState.COMPLETE]
    if not before:
        return None  # nothing to improve on yet: every earlier trial was pruned
    best = max(before, key=lambda t: sign * primary(t))
    recent = [t for t in finished[-patience:] if t.state == TrialState.COMPLETE]
    gains = [sign * (primary(t) - primary(best)) for t in recent]
    if gains and max(gains) > min_delta:
        return None
    return (f"converged: none of the last {patience} finished trials beat the best before them "
            f"(trial {best.number}, {primary(best):.4g}) by more than {min_delta:g}")
