"""Re-evaluation over seeds: the top trials' configurations trained again with other seeds, so that
the registered model is a configuration that is good rather than a seed that was lucky.

On a small validation split one standard error is often larger than the gaps between the top
trials (IMDB's CPU plan: 400 reviews, about two points; hymenoptera: 76 images, one image is 1.3
points), so the single best trial is often the luckiest draw. With ``selection: {seeds: N}`` each
of the top ``top_k`` configurations is trained N - 1 more times, with the seeds
``trial seed + i * SEED_STRIDE``: each time a child MLflow run of the study tagged
``ftsearch.reevaluation_of`` (its trial), trained to its last epoch (no pruner stops it). The
configurations are ranked by their mean validation value over the seeds (of equal means the one
with the smaller spread), those with a failed or diverged seed after the others; each is then represented among the candidates of
``ftsearch.selection`` by its seed with the best validation value.

What each seed gave is kept on the Optuna study (``ftsearch:reevaluations``), its run as soon as
it starts, so a search interrupted here (Ctrl-C, or a process killed outright) goes on with the
seeds still to train, the one it was training from its last epoch; its run is ended KILLED. A seed
that completed or diverged is final; one that failed is trained again by a later search.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FixedTrial, FrozenTrial

from ftsearch import tracking
from ftsearch.disk import DiskFull
from ftsearch.generations import RETRY_OF_ATTR, RUN_ID_ATTR
from ftsearch.objectives import primary
from ftsearch.outcomes import Outcome, end_run, outcome_of
from ftsearch.problems.base import ProblemType
from ftsearch.space import sample_trial
from ftsearch.trial import TrialRunner, fit_outcome

REEVALUATION_OF_TAG = "ftsearch.reevaluation_of"  # run tag: the trial whose configuration the run trains again
REEVALUATIONS_ATTR = "ftsearch:reevaluations"  # study attribute: trial -> what each of its other seeds gave
# Trial seeds are the sampler's seed plus the trial number: a stride this large keeps a
# re-evaluation's seed off every trial's.
SEED_STRIDE = 10_000


@dataclass(frozen=True)
class SeedRun:
    """One training of a configuration: the trial itself, or a re-evaluation with another seed."""

    seed: int
    value: float | None  # the best epoch's validation value; None when it failed or diverged
    run_id: str
    state: str = "COMPLETE"
    reason: str = ""


@dataclass
class Configuration:
    """A top trial's configuration and what each of its seeds gave on validation, the trial first."""

    trial: int
    runs: list[SeedRun] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [r.value for r in self.runs if r.value is not None]

    @property
    def failed(self) -> int:
        """Seeds that failed or diverged: a configuration that does not train reliably."""
        return sum(r.value is None for r in self.runs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """The sample standard deviation over the seeds (0 for one)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def best_run(self, problem: ProblemType, metric: str) -> SeedRun:
        """The seed with the best validation value (the trial's own among equals)."""
        best = self.runs[0]
        for run in self.runs[1:]:
            if run.value is not None and (best.value is None or problem.better(metric, run.value, best.value)):
                best = run
        return best

    def as_dict(self, metric: str) -> dict[str, Any]:
        """For the parent run's ``candidates.json`` and the report."""
        return {"trial": self.trial, f"mean_val_{metric}": self.mean, f"std_val_{metric}": self.std,
                "seeds": len(self.runs), "failed": self.failed, "runs": [dataclasses.asdict(r) for r in self.runs]}


def rank(configurations: list[Configuration], problem: ProblemType, metric: str) -> list[Configuration]:
    """Best first: those whose every seed trained before the others, then by mean validation value;
    of equal means the steadier (smaller standard deviation), then the earlier, better-ranked trial."""
    ranked: list[Configuration] = []
    for configuration in configurations:
        at = len(ranked)
        while at > 0 and _before(configuration, ranked[at - 1], problem, metric):
            at -= 1
        ranked.insert(at, configuration)
    return ranked


def _before(a: Configuration, b: Configuration, problem: ProblemType, metric: str) -> bool:
    if a.failed != b.failed:
        return a.failed < b.failed
    if not a.values or not b.values:
        return False
    if abs(a.mean - b.mean) > 1e-12:  # means of the same counts, summed in another order
        return problem.better(metric, a.mean, b.mean)
    return a.std < b.std - 1e-12


FINAL_STATES = ("COMPLETE", "PRUNED")  # a seed's result that a later search keeps


class _Rerun:
    """A re-evaluation as the training loop's caller sees a trial: it reports to no study and no
    pruner stops it. Like a trial's retry, it says so when it resumes from its resume file."""

    def __init__(self, number: int):
        self.number = number
        self.user_attrs: dict[str, Any] = {RETRY_OF_ATTR: number}

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def report(self, value: float, step: int) -> None:
        pass

    def should_prune(self) -> bool:
        return False


def reevaluate(study: optuna.Study, top: list[FrozenTrial], runner: TrialRunner, seeds: int) -> list[Configuration]:
    """Train each of ``top``'s configurations with ``seeds - 1`` more seeds (those a previous call
    already trained are not trained again), and return them ranked (``rank``)."""
    config, reporter = runner.config, runner.reporter
    done: dict[str, list[dict]] = dict(study.user_attrs.get(REEVALUATIONS_ATTR, {}))
    configurations = []
    todo = sum(max(0, seeds - 1 - sum(r["state"] in FINAL_STATES for r in done.get(str(t.number), []))) for t in top)
    if todo:
        reporter.info(f"re-evaluating the top {len(top)} configurations with {seeds} seeds each: "
                      f"{todo} more training run(s)")
    for trial in top:
        origin = int(trial.user_attrs.get(RETRY_OF_ATTR, trial.number))
        first = config.sampler.seed + origin
        configuration = Configuration(trial.number, [SeedRun(first, primary(trial), trial.user_attrs[RUN_ID_ATTR])])
        recorded = {r["seed"]: SeedRun(**r) for r in done.get(str(trial.number), [])}
        record = functools.partial(_record, study, done, recorded, trial.number)
        for i in range(1, seeds):
            seed = first + i * SEED_STRIDE
            if seed not in recorded or recorded[seed].state not in FINAL_STATES:
                _end_if_running(runner, recorded.get(seed))
                recorded[seed] = _train_again(study, trial, seed, f"{i + 1} of {seeds}", runner, record)
                record(recorded[seed])
            configuration.runs.append(recorded[seed])
        configurations.append(configuration)
    ranked = rank(configurations, runner.modality.problem, config.metric)
    for configuration in ranked:
        values = ", ".join("failed" if r.value is None else f"{r.value:.4f}" for r in configuration.runs)
        summary = (f"mean {configuration.mean:.4f} +- {configuration.std:.4f}" if configuration.values
                   else "no seed trained")
        reporter.info(f"  trial {configuration.trial}'s configuration: val {config.metric} {summary} ({values})"
                      + ("  <- best mean" if configuration is ranked[0] else ""))
    return ranked


def _record(study: optuna.Study, done: dict[str, list[dict]], recorded: dict[int, SeedRun], number: int,
            run: SeedRun) -> None:
    """Keep ``run`` among trial ``number``'s seeds, on the study at once."""
    recorded[run.seed] = run
    done[str(number)] = [dataclasses.asdict(r) for r in recorded.values()]
    study.set_user_attr(REEVALUATIONS_ATTR, done)


def _end_if_running(runner: TrialRunner, earlier: SeedRun | None) -> None:
    """End the run of a seed whose process was killed outright while it trained."""
    if earlier is not None and runner.parent.mlflow_client.get_run(earlier.run_id).info.status == "RUNNING":
        end_run(tracking.TrialRun(runner.parent.mlflow_client, earlier.run_id),
                Outcome("KILLED", "its process stopped while it trained; trained again from its last epoch"))


def _train_again(study: optuna.Study, trial: FrozenTrial, seed: int, which: str, runner: TrialRunner,
                 record: Callable[[SeedRun], None]) -> SeedRun:
    """One more training of ``trial``'s configuration with ``seed``, as a child run of the study
    (``record``-ed as RUNNING first, so that a killed search finds and ends it)."""
    config, modality = runner.config, runner.modality
    trial_cfg = sample_trial(FixedTrial(trial.params, trial.number), config, modality.blocks).model_copy(
        update={"seed": seed})
    run = runner.parent.start_reevaluation(trial.number, seed, tags={
        REEVALUATION_OF_TAG: str(trial.number), "optuna.study": study.study_name}, system_metrics=runner.system_metrics)
    record(SeedRun(seed, None, run.run_id, "RUNNING"))
    resume = runner.checkpoints.reevaluation_resume_file(trial.number, seed)
    outcome = Outcome("FAIL")
    try:
        runner.log_configuration(run, trial.params, trial_cfg)
        runner.reporter.trial_started(trial.number, f"its configuration again with seed {seed} ({which})",
                                      trial_cfg.epochs)
        result = runner.fit_and_save(_Rerun(trial.number), trial_cfg, run, resume,
                                     runner.checkpoints.reevaluation_weights(trial.number, seed))
        outcome = fit_outcome(result, config)
    except DiskFull as err:  # it says what to free; the seed is trained again once there is room
        outcome = outcome_of(err)
        raise
    except Exception as err:  # noqa: BLE001 - one seed that fails marks the configuration, not the search
        outcome = outcome_of(err)
        runner.reporter.warn(f"trial {trial.number}'s configuration failed with seed {seed}: {outcome.reason}")
    except BaseException as err:  # Ctrl-C: the run is ended; a resumed search trains this seed again
        outcome = outcome_of(err)
        raise
    finally:
        end_run(run, outcome)
        runner.reporter.trial_ended(trial.number, outcome.state, outcome.reason, outcome.value)
    resume.unlink(missing_ok=True)
    return SeedRun(seed, outcome.value, run.run_id, outcome.state, outcome.reason)
