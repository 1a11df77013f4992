"""What a study tries first: the study file's ``enqueue:`` configurations (a known-good recipe) and
the top trials of an earlier study or generation (``--warm-start STUDY``), enqueued as the first
trials, before the sampler proposes its own.

A configuration is a trial's parameters (``lr``, ``batch_size``, ``freeze_depth``, ...; those it
leaves out are sampled). It is enqueued only where it fits the new space
(``ftsearch.space.misfits``): a study file's entry that does not fit is an error before anything
is created; an earlier study's trial that does not fit (another backbone, a range since narrowed)
is reported and skipped. Each configuration is enqueued once per study, so resuming does not
enqueue it again, and at most as many as the study has trial slots left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from ftsearch.config import StudyConfig
from ftsearch.distributed import storage as storages
from ftsearch.errors import FtsearchError
from ftsearch.generations import ENQUEUED_FROM_ATTR, top_trials
from ftsearch.progress import Reporter
from ftsearch.space import misfits

ENQUEUED_ATTR = "ftsearch:enqueued"  # study attribute: the configurations already enqueued, once each
DEFAULT_WARM_START_TRIALS = 3


@dataclass(frozen=True)
class Configuration:
    """Parameters to try, and where they come from."""

    source: str  # ``enqueue[0]`` (the study file) or ``imdb#7`` (trial 7 of study imdb)
    params: dict

    @property
    def key(self) -> str:
        """What marks it enqueued in a study: its source and parameters."""
        return f"{self.source} {json.dumps(self.params, sort_keys=True)}"


def from_study_file(config: StudyConfig, blocks: dict[str, int]) -> list[Configuration]:
    """The study file's ``enqueue:`` entries; one that does not fit the space is an error that names
    the file, the entry and what is allowed."""
    found = []
    for i, params in enumerate(config.enqueue):
        problems = misfits(params, config, blocks)
        if problems:
            raise FtsearchError(f"{config.source}: enqueue[{i}] does not fit the study's search space: "
                                f"{'; '.join(problems)}")
        found.append(Configuration(f"enqueue[{i}]", dict(params)))
    return found


def from_study(optuna_storage: BaseStorage, name: str, n: int = DEFAULT_WARM_START_TRIALS) -> list[Configuration]:
    """The ``n`` best completed trials of the study (or generation) ``name``, best first."""
    names = storages.names_in(optuna_storage)
    if name not in names:
        shown = ", ".join(sorted(names)) or "none"
        raise FtsearchError(f"--warm-start {name}: there is no such study in the Optuna storage (its studies: {shown}); "
                            "name one of them (a generation is <study>.<n>), with the same --storage")
    previous = optuna.load_study(study_name=name, storage=optuna_storage)
    top = top_trials(previous, n)
    if not top:
        raise FtsearchError(f"--warm-start {name}: that study has no completed trial to start from")
    return [Configuration(f"{name}#{t.number}", dict(t.params)) for t in top]


def enqueue_first(study: optuna.Study, config: StudyConfig, blocks: dict[str, int], wanted: list[Configuration],
                  reporter: Reporter) -> list[Configuration]:
    """Enqueue ``wanted`` (the study file's entries first) as the study's next trials, skipping
    those already enqueued in it, those that do not fit (said) and those beyond its free trial
    slots (said). Returns what was enqueued."""
    done = set(study.user_attrs.get(ENQUEUED_ATTR, []))
    # Failed trials give their slot back (``worker.ensure_slots``): they do not take one.
    taken = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING))
    slots = config.n_trials - len(taken)
    enqueued = []
    for configuration in wanted:
        if configuration.key in done:
            continue
        problems = misfits(configuration.params, config, blocks)
        if problems:
            reporter.warn(f"warm start: skipped {configuration.source}, which does not fit this study: {'; '.join(problems)}")
        elif slots <= 0:
            reporter.warn(f"warm start: skipped {configuration.source}: no trial slot left (n_trials {config.n_trials})")
            continue  # not marked: a larger n_trials later gives it a slot
        else:
            study.enqueue_trial(configuration.params, user_attrs={ENQUEUED_FROM_ATTR: configuration.source})
            enqueued.append(configuration)
            slots -= 1
        done.add(configuration.key)
    study.set_user_attr(ENQUEUED_ATTR, sorted(done))
    if enqueued:
        reporter.info(f"trying first: {', '.join(c.source for c in enqueued)}")
    return enqueued
