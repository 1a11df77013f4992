"""A trial's life: sample -> build -> fit (per-epoch checkpoints, an out-of-memory retry) -> save
-> record. One call of ``TrialRunner`` is one trial, tracked as one MLflow child run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch
from mlflow.models import ModelSignature
from optuna.trial import FrozenTrial, TrialState
from transformers import set_seed

from ftsearch import objectives, progress, publish, tracking
from ftsearch.checkpoints import TrialCheckpoints
from ftsearch.config import StudyConfig
from ftsearch.cost import measure
from ftsearch.formatting import first_line
from ftsearch.generations import (
    COST_ATTR,
    ENQUEUED_FROM_ATTR,
    EPOCH_SECONDS_ATTR,
    METHOD_ATTR,
    MODEL_ID_ATTR,
    PEAK_MEMORY_ATTR,
    REASON_ATTR,
    RESUMED_ATTR,
    RETRY_OF_ATTR,
    RUN_ID_ATTR,
    TRAINABLE_ATTR,
    best_trial,
    count_states,
    front,
    top_trials,
)
from ftsearch.modalities.base import Modality
from ftsearch.outcomes import Outcome, end_run, outcome_of
from ftsearch.problems import ProblemType
from ftsearch.problems.base import Evaluation
from ftsearch.progress import BestTrial, Reporter, TrialCounts
from ftsearch.space import TrialConfig, sample_trial
from ftsearch.train import (
    EpochMetrics,
    FitResult,
    TrainSettings,
    fit,
    free_memory,
    peak_memory_mb,
    reset_peak_memory,
)

OOM_TAG = "ftsearch.oom_retry"
PROBLEM_STATE_ARTIFACT = "problem_state.json"  # thresholds / target scale the trial's model was saved with
FEATURE_CACHE_TAG = "ftsearch.feature_cache"
# The optimisation settings a trial samples; the rest of TrainSettings comes from the study.
_SAMPLED_SETTINGS = {f.name for f in dataclasses.fields(TrainSettings)} & set(TrialConfig.model_fields)


class TrialOutOfMemory(RuntimeError):
    """A trial that ran out of accelerator memory even at half its batch size."""


class Attempt(Protocol):
    """What one training of a configuration reports to: an Optuna trial, or a re-evaluation of
    one with another seed (``ftsearch.reevaluation``), which no study prunes."""

    number: int  # the trial (whose configuration it trains)

    @property
    def user_attrs(self) -> dict[str, Any]: ...

    def set_user_attr(self, key: str, value: Any) -> None: ...

    def report(self, value: float, step: int) -> None: ...

    def should_prune(self) -> bool: ...


@dataclass(frozen=True)
class Prepared:
    """A checked study: config, device and its modality (data and backbones), ready to search."""

    config: StudyConfig
    device: torch.device
    modality: Modality
    compile: bool = False


def train_settings(trial_cfg: TrialConfig, prepared: Prepared, grad_accumulation: int = 1) -> TrainSettings:
    """The training loop's settings for a sampled trial."""
    config = prepared.config
    return TrainSettings(
        **trial_cfg.model_dump(include=_SAMPLED_SETTINGS),
        metric=config.metric, maximize=config.direction == "maximize",
        device=str(prepared.device), compile=prepared.compile, grad_accumulation=grad_accumulation,
    )


def trial_counts(trials: list[FrozenTrial]) -> TrialCounts:
    """Done, pruned and failed trials, for the progress display."""
    counts = count_states(trials)
    return TrialCounts(counts["COMPLETE"], counts["PRUNED"], counts["FAIL"])


def best_info(best: FrozenTrial | None) -> BestTrial | None:
    return None if best is None else BestTrial(best.number, objectives.primary(best), dict(best.params))


def fit_outcome(result: FitResult, config: StudyConfig) -> Outcome:
    """How a fit that ran to its end (or was stopped) ended the trial."""
    if result.status == "diverged":
        return Outcome("PRUNED", result.reason)
    if result.status == "stopped":
        return Outcome("PRUNED", f"pruned by the {config.pruner.name} pruner after epoch {len(result.history)}")
    return Outcome("COMPLETE", value=float(result.best_value(config.metric)))


def _judged_dead(trial: optuna.Trial) -> bool:
    """Whether another worker failed this trial for missing heartbeats while it still ran."""
    finished = trial.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return any(t.number == trial.number for t in finished)


class TrialRunner:
    """The objective of one worker: one call = one trial, tracked as one MLflow child run."""

    def __init__(self, prepared: Prepared, parent: tracking.StudyRun, checkpoints: TrialCheckpoints,
                 reporter: Reporter | None = None):
        self.prepared, self.config, self.modality = prepared, prepared.config, prepared.modality
        self.parent, self.checkpoints = parent, checkpoints
        self.reporter = reporter if reporter is not None else progress.PlainReporter()
        self.system_metrics = tracking.system_metrics_on(self.config.system_metrics)  # on each trial's run

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        trial_cfg = sample_trial(trial, self.config, self.modality.blocks)
        tags = {"optuna.study": trial.study.study_name}
        if ENQUEUED_FROM_ATTR in trial.user_attrs:  # a configuration tried first (ftsearch.warmstart)
            tags[ENQUEUED_FROM_ATTR] = trial.user_attrs[ENQUEUED_FROM_ATTR]
        run = self.parent.start_trial(trial.number, tags=tags, system_metrics=self.system_metrics)
        outcome = Outcome("FAIL")
        try:
            self._record_start(trial, trial_cfg, run)
            result = self.fit_and_save(trial, trial_cfg, run, self.checkpoints.resume_file(trial),
                                       self.checkpoints.weights(trial.number))
            outcome = fit_outcome(result, self.config)
            if outcome.state == "PRUNED":
                raise optuna.TrialPruned(outcome.reason)
            self._set_constraints(trial)
            self._log_trial_model(trial, run, result.best_epoch)
            self._share_if_top(trial, outcome.value, run)
            if not self.config.objectives:
                return outcome.value
            # The best epoch's validation metrics (the saved model's) and its measured costs.
            return objectives.values(self.config.objective_names, result.history[result.best_epoch - 1].metrics,
                                     trial.user_attrs[COST_ATTR])
        except BaseException as err:
            outcome = outcome_of(err)
            raise
        finally:
            self._record_end(trial, run, outcome)

    def _record_start(self, trial: optuna.Trial, trial_cfg: TrialConfig, run: tracking.TrialRun) -> None:
        trial.set_user_attr(RUN_ID_ATTR, run.run_id)
        trial.set_user_attr(METHOD_ATTR, trial_cfg.method)
        if RETRY_OF_ATTR in trial.user_attrs:
            run.set_tag(RETRY_OF_ATTR, str(trial.user_attrs[RETRY_OF_ATTR]))
        self.log_configuration(run, trial.params, trial_cfg)
        self.reporter.trial_started(trial.number, _trial_line(trial_cfg), trial_cfg.epochs)

    def log_configuration(self, run: tracking.TrialRun, params: dict, trial_cfg: TrialConfig) -> None:
        """What a run trains with: as params exactly what Optuna sampled (so runs of one study share
        their columns) with the seed and method; the full resolved config, defaults included, as the
        artifact; the train and validation splits as its datasets (the test split is the parent's,
        scored once)."""
        run.log_params({**params, "seed": trial_cfg.seed, "method": trial_cfg.method})
        run.log_dict(trial_cfg.model_dump(), "trial_config.json")
        tracking.log_datasets(run.mlflow_client, run.run_id, self.config.name, self.modality.checks.report,
                              ("train", "val"))

    def _record_end(self, trial: optuna.Trial, run: tracking.TrialRun, outcome: Outcome) -> None:
        # Judged dead by another worker (while it ran, or after its last report): that worker ended
        # its run and queued its retry; nothing here may overwrite what it recorded.
        judged_dead = outcome.state == "ABANDONED" or _judged_dead(trial)
        if not judged_dead:
            # The resume file stays until the trial's end is recorded (after_trial): a worker
            # killed before that leaves a retry that needs it, even after the last epoch.
            if outcome.reason:
                trial.set_user_attr(REASON_ATTR, outcome.reason)
            try:
                end_run(run, outcome)
            except tracking.TrackingError as err:
                # The tracking server was away for longer than the retries: the trial's result
                # stands in the study, and the search ends the run at the study's end.
                self.reporter.warn(f"trial {trial.number}: could not end its MLflow run {run.run_id} ({first_line(err)[:300]}); "
                                   "the search ends it when the study finishes")
        reason = "" if outcome.state == "ABANDONED" else outcome.reason
        self.reporter.trial_ended(trial.number, "FAIL" if judged_dead else outcome.state, reason, outcome.value)

    def fit_and_save(self, trial: Attempt, trial_cfg: TrialConfig, run: tracking.TrialRun, resume_file: Path,
                     weights: Path) -> FitResult:
        """Fit (resuming from ``resume_file``, written after every epoch) and save a completed
        model to ``weights``; on an out-of-memory error, once more at half the batch and twice the
        gradient accumulation (the same effective batch), from the last finished epoch."""
        logged: set[int] = set()
        files = (resume_file, weights)
        try:
            return self._train(trial, trial_cfg, run, logged, files)
        except torch.OutOfMemoryError:
            pass  # out of the except block first, so the traceback's tensors can be freed
        free_memory()
        half = trial_cfg.batch_size // 2
        if half < 1:
            raise TrialOutOfMemory(f"out of memory at batch size {trial_cfg.batch_size}")
        note = f"batch size {trial_cfg.batch_size} -> {half}, gradient accumulation 2"
        self.reporter.warn(f"  trial {trial.number}: out of memory at batch size {trial_cfg.batch_size}; retrying with {note}")
        run.set_tag(OOM_TAG, note)
        try:
            return self._train(trial, trial_cfg.model_copy(update={"batch_size": half}), run, logged, files, accumulation=2)
        except torch.OutOfMemoryError:
            pass
        free_memory()
        raise TrialOutOfMemory(f"out of memory at batch size {half} (and at {trial_cfg.batch_size} before)")

    def _train(
        self, trial: Attempt, trial_cfg: TrialConfig, run: tracking.TrialRun, logged: set[int],
        files: tuple[Path, Path], accumulation: int = 1,
    ) -> FitResult:
        """Build, fit and save one attempt of the trial; ``logged`` holds the epochs already
        logged (by an attempt that ran out of memory, or inherited from a checkpoint)."""
        set_seed(trial_cfg.seed)  # the new head is drawn from the trial's seed
        reset_peak_memory(self.prepared.device)
        setup = self.modality.build(trial_cfg)
        try:
            if not logged:
                run.log_params({"trainable_params": setup.trainable_params, "total_params": setup.total_params})
                trial.set_user_attr(TRAINABLE_ATTR, setup.trainable_params)
            if setup.feature_cache:
                run.set_tag(FEATURE_CACHE_TAG, setup.feature_cache)
                self.reporter.info(f"  frozen-prefix cache: {setup.feature_cache}")
            epochs = _EpochRecorder(trial, run, self.reporter, self.config.metric, logged, trial_cfg.epochs,
                                    prunable=not self.config.objectives)
            result = fit(
                setup.model, setup.train_loader, setup.val_loader, train_settings(trial_cfg, self.prepared, accumulation),
                epochs.on_epoch_end, on_step=self.reporter.step, checkpoint=files[0],
                on_resume=epochs.on_resume, scoring=self.modality.problem, groups=setup.adapted.groups,
            )
            self._record_cost(trial, run, result)
            # The decision rule (multi-label thresholds) tuned on the best epoch's validation outputs
            # is saved with the model: the test split and serving use it as is.
            problem = self.modality.problem if result.best_eval is None else self.modality.problem.tuned(result.best_eval)
            if result.status == "completed":
                setup.model.load_state_dict(result.best_state)
                self.modality.save(setup.serving_model(), trial_cfg, files[1], problem)
                self._record_serving_cost(trial, run, files[1], result.best_epoch)
            if result.best_epoch is not None:
                run.log_metrics({"best_epoch": result.best_epoch}, step=result.best_epoch)
                self._log_figures(run, result.best_eval, problem)
            return result
        finally:
            # Free the model and optimizer state before the next trial (no memory creeping up).
            del setup
            free_memory()

    def _record_cost(self, trial: Attempt, run: tracking.TrialRun, result: FitResult) -> None:
        """Seconds per epoch and peak memory, on the run and on the trial (for the report)."""
        seconds = [m.seconds for m in result.history if m.seconds > 0]
        peak = peak_memory_mb(self.prepared.device)
        run.log_metrics({"peak_memory_mb": peak}, step=len(result.history))
        trial.set_user_attr(PEAK_MEMORY_ATTR, round(peak, 1))
        if seconds:
            trial.set_user_attr(EPOCH_SECONDS_ATTR, round(sum(seconds) / len(seconds), 3))

    def _record_serving_cost(self, trial: Attempt, run: tracking.TrialRun, weights: Path, step: int) -> None:
        """The saved model's latency, parameters and size where it will be served (``serve_device``),
        on the run (at the best epoch, whose weights were saved) and on the trial (for constraints
        and the report)."""
        device = self.config.serve_device
        predictor, inputs = self.modality.served(weights, device)
        try:
            cost = measure(predictor, inputs, weights, device)
        finally:
            del predictor
            free_memory()
        run.log_metrics(cost.as_dict(), step=step)
        trial.set_user_attr(COST_ATTR, {k: round(v, 4) for k, v in cost.as_dict().items()})
        self.reporter.info(f"  served on {device}: {cost.latency_ms:.1f} ms per example alone, "
                           f"{cost.latency_ms_b32:.1f} in batches of 32; {cost.params_m:.1f}M parameters, "
                           f"{cost.size_mb:.1f} MB")

    def log_model(self, run_id: str, folder: Path, name: str, step: int = 0, tags: dict[str, str] | None = None) -> str:
        """Log the model saved in ``folder`` as an MLflow LoggedModel of ``run_id``, as it is served
        (the modality's entry file, input example and signature); returns its ``model_id``."""
        signature = ModelSignature(inputs=self.modality.input_schema(),
                                   outputs=self.modality.problem.output_schema(self.modality.labels))
        return publish.log_model(run_id, folder, self.modality.entry_file, self.modality.input_example(), signature,
                                 name=name, step=step, tags=tags, model_type=self.config.task)

    def _log_trial_model(self, trial: optuna.Trial, run: tracking.TrialRun, best_epoch: int) -> None:
        """The completed trial's saved model as the LoggedModel ``trial-<n>``, its best epoch's
        metrics (validation, measured cost) linked, so MLflow's models view ranks the trials' models
        and a registration of this trial is made from it (``MODEL_ID_ATTR``). One that cannot be
        logged is said, and the trial stands: its weights are on disk, logged if it is registered."""
        run.flush()  # MLflow links the run's metrics at the best epoch: they must be stored first
        try:
            model_id = self.log_model(run.run_id, self.checkpoints.weights(trial.number), f"trial-{trial.number}",
                                      best_epoch, tags={tracking.TRIAL_TAG: str(trial.number),
                                                        tracking.STUDY_TAG: self.parent.study_name})
        except Exception as err:  # noqa: BLE001 - the model is the trial's record, not its result
            self.reporter.warn(f"trial {trial.number}: could not log its model to MLflow ({first_line(err)[:300]}); "
                               "it is logged when it is registered")
            return
        trial.set_user_attr(MODEL_ID_ATTR, model_id)

    def _set_constraints(self, trial: optuna.Trial) -> None:
        """Each ``constraints`` bound as Optuna's constraint value: the measured cost's relative
        excess over its bound (feasible when <= 0), so that costs in different units weigh alike
        in the sampler's infeasibility score."""
        cost = trial.user_attrs[COST_ATTR]
        for name, bound in self.config.constraints.items():
            trial.set_constraint(name, cost[name] / bound.max - 1.0)

    def _log_figures(self, run: tracking.TrialRun, evaluation: Evaluation, problem: ProblemType) -> None:
        """The best epoch's figures and tables: the problem type's, then the modality's of the
        examples. A figure that fails to draw is reported, not allowed to fail a trained trial (nor
        to keep the figures drawn before it from being logged)."""
        for draw in (lambda: problem.figures(evaluation, self.modality.labels),
                     lambda: self.modality.example_figures(evaluation)):
            try:
                figures = draw()
            except Exception as err:  # noqa: BLE001 - drawing is not worth the trial
                self.reporter.warn(f"could not draw the trial's figures: {type(err).__name__}: {err}")
                continue
            try:
                for path, figure in figures.items():
                    run.log_figure(figure, path)
            except Exception as err:  # noqa: BLE001 - nor is logging one
                self.reporter.warn(f"could not log the trial's figures: {type(err).__name__}: {err}")
            finally:
                tracking.close_figures(figures.values())
        try:
            for path, rows in problem.tables(evaluation, self.modality.labels).items():
                run.log_dict(rows, path)
            if problem.state():
                run.log_dict(problem.state(), PROBLEM_STATE_ARTIFACT)
        except Exception as err:  # noqa: BLE001 - nor are the tables
            self.reporter.warn(f"could not log the trial's tables: {type(err).__name__}: {err}")

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Once ``trial``'s end is recorded: delete its resume file, the weights of finished trials
        outside the top few (never those of a trial still running in another worker), and keep
        the parent run's best up to date."""
        self.checkpoints.resume_file(trial).unlink(missing_ok=True)
        trials = study.get_trials(deepcopy=False)
        # Read after the snapshot: a trial finished in it that is not the best now never will be.
        best = best_trial(study)
        self.reporter.trials_updated(trial_counts(trials), best_info(best))
        # With several objectives, the front's trials too: the select rule may choose any of them.
        top = {t.number for t in [*top_trials(study, self.config.selection.top_k), *front(study)]}
        self.checkpoints.keep_only({t.number for t in trials if t.state.is_finished()}, top)
        if best is not None and best.number == trial.number:
            try:
                self.parent.log_best(self.config.metric, objectives.primary(best), best.number, best.params)
            except tracking.TrackingError as err:  # logged again when the study finishes
                self.reporter.warn(f"could not record the new best trial on the MLflow parent run ({first_line(err)[:300]})")

    def _share_if_top(self, trial: optuna.Trial, value: float, run: tracking.TrialRun) -> None:
        """With a shared tracking server, upload the weights of a trial that enters (or ties) the
        top ``selection.top_k`` so far, before the trial is told complete: the search process,
        maybe on another machine, registers the chosen model from them."""
        if not tracking.is_shared():
            return
        top = top_trials(trial.study, self.config.selection.top_k)
        last = objectives.primary(top[-1]) if top else None
        # With several objectives any trial may be on the front, until the trials after it say.
        if (self.config.objectives or len(top) < self.config.selection.top_k or value == last
                or self.config.problem.better(self.config.metric, value, last)):
            self.checkpoints.upload(run, trial.number)


class _EpochRecorder:
    """The fit callbacks of one trial: each epoch logged once to MLflow and reported to Optuna
    (which may prune), and epochs inherited from a checkpoint replayed into a retry's run."""

    def __init__(self, trial: Attempt, run: tracking.TrialRun, reporter: Reporter, metric: str, logged: set[int],
                 last_epoch: int, prunable: bool = True):
        self.trial, self.run, self.reporter, self.metric, self.logged = trial, run, reporter, metric, logged
        # Optuna takes intermediate values (and prunes) in single-objective studies only.
        self.last_epoch, self.prunable = last_epoch, prunable

    def on_epoch_end(self, m: EpochMetrics) -> bool:
        if m.epoch not in self.logged:
            self.logged.add(m.epoch)
            self.run.log_metrics({"train_loss": m.train_loss, "epoch_seconds": m.seconds,
                                  **{f"val_{k}": v for k, v in m.metrics.items()}}, step=m.epoch)
            if self.prunable:
                self.trial.report(m.value(self.metric), m.epoch)
        self.reporter.epoch_ended(m.epoch, {"train loss": m.train_loss, **{f"val {k}": v for k, v in m.metrics.items()}})
        # Pruning saves the epochs still to come: after the last one it would only throw away a
        # finished model, whose value the study would then never count as complete.
        return self.prunable and m.epoch < self.last_epoch and self.trial.should_prune()

    def on_resume(self, history: list[EpochMetrics]) -> None:
        # A retry is a new run: it carries the epochs it inherits, so its curve is whole.
        trial = self.trial
        if not self.logged and RETRY_OF_ATTR in trial.user_attrs:
            self.run.log_params({RESUMED_ATTR: len(history)})
            trial.set_user_attr(RESUMED_ATTR, len(history))
            self.reporter.info(f"  resumed trial {trial.user_attrs[RETRY_OF_ATTR]} after epoch {len(history)}")
        for m in history:
            self.on_epoch_end(m)


def _trial_line(trial_cfg: TrialConfig) -> str:
    """The sampled values, leaving out augmentations that stay off."""
    shown = {"method": trial_cfg.method, **trial_cfg.model_dump(exclude_defaults=True), "freeze_depth": trial_cfg.freeze_depth}
    shown.pop("seed", None)
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
