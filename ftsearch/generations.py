"""How a search names and reads what it leaves in Optuna: study generations, the trial/study
attributes that link them to MLflow, and the few questions everyone asks of a study (its latest
generation, its best trial, how many trials ended how). Kept free of torch so that readers
(``ftsearch report``) load fast."""

from __future__ import annotations

from collections.abc import Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from ftsearch import objectives

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study attribute: the MLflow parent run
RUN_ID_ATTR = "mlflow_run_id"  # trial attribute: the trial's MLflow run
CONFIG_ATTR = "ftsearch_config"  # study attribute: the search identity it was started with
DATA_ATTR = "ftsearch.data_digests"  # study attribute: each split's content digest when it was started
REASON_ATTR = "reason"  # trial attribute: why it was pruned or failed
WORKER_ATTR = "ftsearch.worker"  # trial attribute: host:pid of the process that ran it
ENQUEUED_FROM_ATTR = "ftsearch.enqueued_from"  # trial attribute and run tag: a configuration tried first (enqueue[i], <study>#<n>)
RETRY_OF_ATTR = "ftsearch.retry_of"  # trial attribute: the trial a retry repeats (its checkpoint, its seed)
RETRIES_ATTR = "ftsearch.retries"  # trial attribute: how many times its parameters were retried
RESUMED_ATTR = "resumed_from_epoch"  # trial attribute and run param: the epoch a retry resumed after
# Trial attributes the report reads without going to MLflow (the same values are on the trial's run).
METHOD_ATTR = "ftsearch.method"  # how the backbone was adapted (full, freeze, lora, bitfit)
TRAINABLE_ATTR = "ftsearch.trainable_params"  # parameters the method trained
EPOCH_SECONDS_ATTR = "ftsearch.epoch_seconds"  # mean seconds per epoch (training and validation)
PEAK_MEMORY_ATTR = "ftsearch.peak_memory_mb"  # see ftsearch.train.peak_memory_mb
COST_ATTR = "ftsearch.cost"  # the saved model's ftsearch.cost.Cost, as a dict
MODEL_ID_ATTR = "ftsearch.model_id"  # trial attribute: the MLflow LoggedModel of its saved model
SELECT_ATTR = "ftsearch.select"  # study attribute: the study file's select rule, as {rule, tolerance}

# The order in which trial states are counted and shown everywhere.
STATE_ORDER = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def generations(study_names: list[str], name: str) -> dict[int, str]:
    """The generations of study ``name`` among ``study_names``: ``{1: name, 2: name.2, ...}``.

    ``--fresh`` starts generation n + 1, so that starting over loses no history."""
    found = {}
    for study_name in study_names:
        base, _, suffix = study_name.rpartition(".")
        if study_name == name:
            found[1] = study_name
        elif base == name and suffix.isascii() and suffix.isdecimal() and not suffix.startswith("0"):
            found[int(suffix)] = study_name
    return found


def latest_generation(study_names: list[str], name: str) -> str | None:
    """The Optuna study name of the latest generation of ``name``, None when it has none."""
    found = generations(study_names, name)
    return found[max(found)] if found else None


def feasible(trial: FrozenTrial) -> bool:
    """Whether a trial met the study's ``constraints`` (Optuna's rule: every constraint value <= 0;
    a trial without them, pruned before its cost was measured, is feasible)."""
    return all(value <= 0 for value in trial.constraints.values())


def is_multi_objective(study: optuna.Study) -> bool:
    """Whether the study optimises several objectives (a study file's ``objectives``)."""
    return len(study.directions) > 1


def front(study: optuna.Study) -> list[FrozenTrial]:
    """A multi-objective study's Pareto front of completed feasible trials (Optuna's
    ``best_trials``); empty for a single-objective study."""
    return study.best_trials if is_multi_objective(study) else []


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's best completed feasible trial, so every worker and the report agree on it, ties
    included: Optuna's choice, or with several objectives the study's ``select`` rule's choice from
    the Pareto front; None before any trial completed within the constraints."""
    if is_multi_objective(study):
        rule = study.user_attrs.get(SELECT_ATTR, {})
        return objectives.choose(study.best_trials, study.directions, rule.get("rule", "best"),
                                 rule.get("tolerance", 0.0))
    try:
        return study.best_trial
    except ValueError:
        return None


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The ``k`` best completed feasible trials, best first: the best trial, then the others by
    the study's metric (ties by trial number)."""
    best = best_trial(study)
    if best is None:
        return []
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.number != best.number and feasible(t)]
    return [best, *sorted(others, key=lambda t: (sign * objectives.primary(t), t.number))][:k]


def count_states(trials: Iterable[FrozenTrial], states: Iterable[str] = STATE_ORDER) -> dict[str, int]:
    """Trials per state name, for ``states`` in that order (COMPLETE, PRUNED, FAIL, ...)."""
    names = [t.state.name for t in trials]
    return {state: names.count(state) for state in states}

