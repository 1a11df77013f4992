"""What a study optimises: its validation metric alone, or several objectives (validation metrics
and the measured costs of ``ftsearch.cost``) whose trade-off an Optuna multi-objective study keeps
as a Pareto front, with the rule (``select``) that chooses the one model to register from it.

The study's metric is always the first objective, so ``primary(trial)`` reads it from any trial,
single- or multi-objective. Free of torch and of the rest of ftsearch: the report asks it which
trial a study chose, exactly as the search did.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

RULES = ("best", "within", "knee")
"""``best``: the front's best metric; ``within``: the front's best second objective among the
trials whose metric is within ``tolerance`` of the best; ``knee``: the front's trial nearest the
ideal point once every objective is scaled to [0, 1] over the front."""


def primary(trial: FrozenTrial) -> float | None:
    """The trial's value of the study's metric (the first objective); None until it completed."""
    return trial.values[0] if trial.values else None


def values(names: Sequence[str], metrics: Mapping[str, float], cost: Mapping[str, float]) -> list[float]:
    """A completed trial's objective values, in ``names`` order: validation metrics from
    ``metrics`` (its best epoch's), costs from ``cost``."""
    return [float(metrics[name]) if name in metrics else float(cost[name]) for name in names]


def choose(front: Sequence[FrozenTrial], directions: Sequence[StudyDirection], rule: str = "best",
           tolerance: float = 0.0) -> FrozenTrial | None:
    """The trial ``rule`` picks from a Pareto ``front`` (Optuna's ``study.best_trials``: feasible
    trials no other feasible trial dominates); None for an empty front. Ties go to the better
    next objectives, then to the earlier trial, so every reader picks the same one."""
    if not front:
        return None
    signs = [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in directions]

    def scaled(trial: FrozenTrial) -> list[float]:  # higher is better in every objective
        return [sign * value for sign, value in zip(signs, trial.values, strict=True)]

    def lexicographic(trial: FrozenTrial) -> tuple:
        return (*scaled(trial), -trial.number)

    if rule == "best":
        return max(front, key=lexicographic)
    if rule == "within":
        top = max(scaled(t)[0] for t in front)
        # 0.90 - 0.89 is 0.010000000000000009 in floating point: a user's 0.01 must include it.
        close = [t for t in front if top - scaled(t)[0] <= tolerance + 1e-9]
        return max(close, key=lambda t: (scaled(t)[1], scaled(t)[0], -t.number))
    if rule == "knee":
        columns = list(zip(*(scaled(t) for t in front), strict=True))
        lows, highs = [min(c) for c in columns], [max(c) for c in columns]

        def distance(trial: FrozenTrial) -> float:
            # An objective on which the whole front agrees is no trade-off: it counts for nothing.
            gaps = [(high - v) / (high - low) if high > low else 0.0
                    for v, low, high in zip(scaled(trial), lows, highs, strict=True)]
            return math.hypot(*gaps)

        return min(front, key=lambda t: (distance(t), tuple(-v for v in scaled(t)), t.number))
    raise ValueError(f"unknown select rule {rule!r}: use one of {', '.join(RULES)}")
