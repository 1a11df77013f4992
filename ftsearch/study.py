"""Drives a search: checks inputs, creates or resumes the Optuna study, runs trials, publishes.

Everything a user can get wrong (study file, data, backbones, device) is checked before any
Optuna study or MLflow run exists, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ftsearch import progress, publish, settings, tracking
from ftsearch.config import StudyConfig, load_study
from ftsearch.errors import FtsearchError
from ftsearch.generations import CONFIG_ATTR, PARENT_RUN_ATTR, REASON_ATTR, RUN_ID_ATTR, generations
from ftsearch.progress import BestTrial, Reporter, TrialCounts
from ftsearch.space import TrialConfig, sample_trial
from ftsearch.tasks import make_task
from ftsearch.tasks.base import Task
from ftsearch.train import EpochMetrics, FitResult, TrainSettings, evaluate, fit, resolve_device, seed_everything

HEARTBEAT_SECONDS = 60
MAX_FAILURES_IN_A_ROW = 3


@dataclass(frozen=True)
class SearchOptions:
    """What the user asked for on the command line."""

    study: str
    n_trials: int | None = None
    timeout: float | None = None
    overrides: tuple[str, ...] = ()
    device: str = "auto"
    fresh: bool = False
    storage: str | None = None
    quiet: bool = False
    compile: bool = False


@dataclass
class SearchSummary:
    """What a search did, for the CLI to print and tests to check."""

    study_name: str
    parent_run_id: str
    counts: dict[str, int] = field(default_factory=dict)
    best_trial: int | None = None
    best_value: float | None = None
    model_version: str | None = None
    test_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Prepared:
    """A checked study: config, device and its task (data and backbones), ready to search."""

    config: StudyConfig
    device: torch.device
    task: Task
    compile: bool = False


def prepare(options: SearchOptions, reporter: Reporter | None = None) -> Prepared:
    """Validate everything the user supplied; raises FtsearchError, creates nothing."""
    reporter = reporter if reporter is not None else progress.make_reporter(options.quiet)
    device = resolve_device(options.device)
    overrides = list(options.overrides)
    if options.n_trials is not None:
        overrides.append(f"n_trials={options.n_trials}")
    if options.timeout is not None:
        overrides.append(f"timeout={options.timeout}")
    config = load_study(options.study, overrides, cpu=device.type == "cpu")
    reporter.info(f"study {config.name} on {device.type.upper()}: {config.plan_summary()}")
    task = make_task(config, device)
    reporter.info(task.describe())
    return Prepared(config, device, task, options.compile)


def run_search(options: SearchOptions, reporter: Reporter | None = None) -> SearchSummary:
    """Run (or resume) the study named in ``options`` and register its best model.

    Progress goes to ``reporter`` (by default: live on a terminal, plain lines otherwise, nothing
    with ``options.quiet``), which is closed however the search ends."""
    reporter = reporter if reporter is not None else progress.make_reporter(options.quiet)
    try:
        return _run_search(options, reporter)
    finally:
        reporter.close()  # never leave a live display drawing over the terminal (Ctrl-C, errors)


def _run_search(options: SearchOptions, reporter: Reporter) -> SearchSummary:
    prepared = prepare(options, reporter)
    config = prepared.config
    study = open_study(config, options.storage, options.fresh)
    # Trials of a process that died (no heartbeat for the grace period) are failed now.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    parent = tracking.StudyRun.open(
        config.name, study.user_attrs.get(PARENT_RUN_ATTR), tags={"optuna.study": study.study_name}
    )
    start = time.monotonic()
    try:
        study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
        if "config.json" not in _artifact_names(parent):
            parent.log_dict(config.model_dump(), "config.json")
        for path, data in prepared.task.parent_artifacts().items():
            parent.log_dict(data, path)  # rewritten on resume: the data may have changed since
            if path == "skipped_files.json":
                reporter.warn(f"skipped {len(data)} unusable data file(s); they are listed in {path} on the MLflow parent run")
        _log_baseline(prepared.task, parent, config.metric, reporter)
        counts = _trial_counts(study)
        remaining = config.n_trials - counts.done
        reporter.study_started(
            study.study_name, n_trials=config.n_trials, metric=f"val {config.metric}", counts=counts,
            best=_best_info(_best_trial(study)), parent_run_id=parent.run_id,
        )
        runner = TrialRunner(prepared, parent, _checkpoint_root(study), reporter)
        if remaining > 0:
            # Failed trials do not count towards n_trials: the study runs until n_trials trials
            # completed or were pruned, or the timeout, or too many failures in a row.
            reached = optuna.study.MaxTrialsCallback(config.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
            study.optimize(
                runner,
                timeout=config.timeout,
                catch=(Exception,),
                callbacks=[reached, runner.after_trial],
                gc_after_trial=True,
            )
        reporter.study_ended(_trial_counts(study), _best_info(_best_trial(study)))
        summary = finish_study(study, prepared, parent, runner)
    except BaseException as err:
        # Ctrl-C or a crash: the parent run is ended, the study stays resumable as it is.
        parent.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    parent.finish("FINISHED")
    summary.seconds = time.monotonic() - start
    return summary


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna storage with heartbeats, so trials of a crashed process are failed, not left RUNNING."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=2 * HEARTBEAT_SECONDS,
                heartbeat_stale_trial_callback=_end_stale_trial_run,
            )
    except Exception as err:  # noqa: BLE001 - bad URL, unreachable server, missing driver
        raise FtsearchError(f"cannot open Optuna storage {url!r}: {str(err).splitlines()[0]}") from None


def _end_stale_trial_run(study: optuna.Study, trial: FrozenTrial) -> None:
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        tracking.TrialRun(tracking.client(), run_id).finish("FAIL", "its process stopped sending heartbeats")


def open_study(config: StudyConfig, storage_url: str | None, fresh: bool) -> optuna.Study:
    """Resume the study's latest Optuna study, or start a new generation when ``fresh``.

    Generations are named ``<name>``, ``<name>.2``, ... so that ``--fresh`` loses no history.
    """
    storage = make_storage(settings.optuna_storage_url(storage_url))
    names = [summary.study_name for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    found = generations(names, config.name)
    latest = found[max(found)] if found else None
    identity = json.dumps(config.search_identity(), sort_keys=True, default=str)
    if latest is not None and not fresh:
        existing = optuna.load_study(study_name=latest, storage=storage)
        if existing.user_attrs.get(CONFIG_ATTR, identity) != identity:
            changed = _changed_keys(json.loads(existing.user_attrs[CONFIG_ATTR]), json.loads(identity))
            raise FtsearchError(
                f"study {latest!r} was started with a different configuration ({', '.join(changed)} "
                "changed); add --fresh to start a new study, or restore those values to resume it"
            )
        name = latest
    elif latest is None:
        name = config.name
    else:
        name = f"{config.name}.{max(found) + 1}"
    trials_so_far = len(existing.trials) if latest is not None and not fresh else 0
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction=config.direction,
        # Offset by the trials already run, so a resumed study does not replay its first samples.
        sampler=make_sampler(config, trials_so_far),
        pruner=make_pruner(config),
        load_if_exists=True,
    )
    study.set_user_attr(CONFIG_ATTR, identity)
    return study


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def make_sampler(config: StudyConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = config.sampler.seed + offset
    if config.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.sampler.startup_trials)


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    p = config.pruner
    # Epochs are reported as steps 1, 2, ...: a warm-up of n steps lets epoch n be the first pruned.
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.min_epochs)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_epochs)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_epochs, max_resource=config.search.epochs.high)
    return optuna.pruners.NopPruner()


def _count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _trial_counts(study: optuna.Study) -> TrialCounts:
    return TrialCounts(_count(study, TrialState.COMPLETE), _count(study, TrialState.PRUNED), _count(study, TrialState.FAIL))


def _best_info(best: FrozenTrial | None) -> BestTrial | None:
    return None if best is None else BestTrial(best.number, best.value, dict(best.params))


def _checkpoint_root(study: optuna.Study) -> Path:
    return settings.checkpoint_dir() / study.study_name


def _artifact_names(run: tracking.StudyRun) -> set[str]:
    return {f.path for f in run.mlflow_client.list_artifacts(run.run_id)}


class TrialRunner:
    """The Optuna objective: one trial = sample, build, fine-tune, track, keep the best weights."""

    def __init__(self, prepared: Prepared, parent: tracking.StudyRun, checkpoints: Path, reporter: Reporter | None = None):
        self.prepared = prepared
        self.reporter = reporter if reporter is not None else progress.PlainReporter()
        self.config = prepared.config
        self.parent = parent
        self.checkpoints = checkpoints
        self.failures_in_a_row = 0

    def __call__(self, trial: optuna.Trial) -> float:
        trial_cfg = sample_trial(trial, self.config, self.prepared.task.blocks)
        run = self.parent.start_trial(trial.number, tags={"optuna.study": trial.study.study_name})
        state, reason, value = "FAIL", "", None
        try:
            trial.set_user_attr(RUN_ID_ATTR, run.run_id)
            # Params: exactly what Optuna sampled (so runs of one study share their columns);
            # the full resolved config, defaults included, is the artifact.
            run.log_params({**trial.params, "seed": trial_cfg.seed})
            run.log_dict(trial_cfg.model_dump(), "trial_config.json")
            self.reporter.trial_started(trial.number, _trial_line(trial_cfg), trial_cfg.epochs)
            result = self._train(trial, trial_cfg, run)
            if result.status == "diverged":
                state, reason = "PRUNED", result.reason
                raise optuna.TrialPruned(reason)
            if result.status == "stopped":
                state = "PRUNED"
                reason = f"pruned by the {self.config.pruner.name} pruner after epoch {len(result.history)}"
                raise optuna.TrialPruned(reason)
            state, value = "COMPLETE", float(result.best_value(self.config.metric))
            return value
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            state, reason = "KILLED", "interrupted by the user (Ctrl-C)"
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            raise
        finally:
            if reason:
                trial.set_user_attr(REASON_ATTR, reason)
            run.finish(state, reason)
            self.reporter.trial_ended(trial.number, state, reason, value)

    def _train(self, trial: optuna.Trial, trial_cfg: TrialConfig, run: tracking.TrialRun) -> FitResult:
        task = self.prepared.task
        seed_everything(trial_cfg.seed)  # the new classifier head is drawn from the trial's seed
        setup = task.build(trial_cfg)
        try:
            run.log_params({"trainable_params": setup.trainable_params, "total_params": setup.total_params})
            if setup.feature_cache:
                run.mlflow_client.set_tag(run.run_id, "ftsearch.feature_cache", setup.feature_cache)
                self.reporter.info(f"  frozen-prefix cache: {setup.feature_cache}")
            settings_ = TrainSettings(
                lr=trial_cfg.lr,
                epochs=trial_cfg.epochs,
                weight_decay=trial_cfg.weight_decay,
                warmup_ratio=trial_cfg.warmup_ratio,
                seed=trial_cfg.seed,
                metric=self.config.metric,
                maximize=self.config.direction == "maximize",
                device=str(self.prepared.device),
                compile=self.prepared.compile,
            )

            def on_epoch_end(m: EpochMetrics) -> bool:
                run.log_metrics({"train_loss": m.train_loss, "val_accuracy": m.val_accuracy, "val_f1": m.val_f1}, step=m.epoch)
                self.reporter.epoch_ended(m.epoch, {"train loss": m.train_loss, "val accuracy": m.val_accuracy, "val f1": m.val_f1})
                trial.report(m.value(self.config.metric), m.epoch)
                return trial.should_prune()

            result = fit(setup.model, setup.train_loader, setup.val_loader, settings_, on_epoch_end, on_step=self.reporter.step)
            if result.status == "completed":
                setup.model.load_state_dict(result.best_state)
                task.save(setup.model, trial_cfg, self.checkpoints / f"trial-{trial.number}")
            if result.best_epoch is not None:
                run.log_metrics({"best_epoch": result.best_epoch}, step=result.best_epoch)
                self._log_figures(run, result)
            return result
        finally:
            # Free the model and optimizer state before the next trial (no memory creeping up).
            del setup
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _log_figures(self, run: tracking.TrialRun, result: FitResult) -> None:
        """The best epoch's confusion matrix (and misclassified images); a figure that fails to draw
        is reported, not allowed to fail a trained trial."""
        task, evaluation = self.prepared.task, result.best_eval
        try:
            run.log_confusion_matrix(evaluation.y_true, evaluation.y_pred, task.labels, "confusion_matrix.png")
            task.log_misclassified(run, evaluation.y_true, evaluation.y_pred, "misclassified.png")
        except Exception as err:  # noqa: BLE001 - drawing is not worth the trial
            self.reporter.warn(f"could not draw the trial's figures: {type(err).__name__}: {err}")

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Keep only the best trial's weights on disk, keep the parent run's best up to date, and
        stop the study when trials keep failing (a bug or a broken setup, not bad luck)."""
        self.failures_in_a_row = self.failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            self.reporter.warn(f"stopping: {self.failures_in_a_row} trials failed in a row")
            study.stop()
        best = _best_trial(study)
        self.reporter.trials_updated(_trial_counts(study), _best_info(best))
        if self.checkpoints.is_dir():
            for folder in self.checkpoints.iterdir():
                if best is None or folder.name != f"trial-{best.number}":
                    shutil.rmtree(folder, ignore_errors=True)
        if best is not None and best.number == trial.number:
            self.parent.log_best(self.config.metric, best.value, best.number, best.params)


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def finish_study(study: optuna.Study, prepared: Prepared, parent: tracking.StudyRun, runner: TrialRunner) -> SearchSummary:
    """Log the study's plots, score the best trial on the test split and register it."""
    config = prepared.config
    counts = {s.name: _count(study, s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    summary = SearchSummary(study.study_name, parent.run_id, counts)
    _end_orphaned_runs(study, parent)
    _log_study_plots(study, parent, runner.reporter)
    best = _best_trial(study)
    if best is None:
        reasons = [t.user_attrs.get(REASON_ATTR, "") for t in study.trials if t.user_attrs.get(REASON_ATTR)]
        raise FtsearchError(
            f"no trial completed ({', '.join(f'{n} {s.lower()}' for s, n in counts.items())}), so there is "
            f"no model to register; first reason: {reasons[0] if reasons else 'none recorded'}"
        )
    summary.best_trial, summary.best_value = best.number, best.value
    run_id = best.user_attrs[RUN_ID_ATTR]
    version = publish.registered_version(config.registered_model, run_id)
    if version is not None:
        summary.model_version = version.version
        summary.test_metrics = {k: float(v) for k, v in version.tags.items() if k.startswith("test_")}
        runner.reporter.info(f"best trial {best.number} is already registered as {config.registered_model} v{version.version}")
        return summary
    folder = runner.checkpoints / f"trial-{best.number}"
    if not folder.is_dir():
        raise FtsearchError(f"the best trial's weights are missing from {folder}; rerun with --fresh")
    runner.reporter.info(f"scoring best trial {best.number} on the test split and registering it as {config.registered_model}")
    summary.test_metrics = score_on_test(folder, prepared, run_id)
    tags = {
        "study": config.name,
        "optuna_study": study.study_name,
        "trial_number": str(best.number),
        "run_id": run_id,
        f"val_{config.metric}": f"{best.value:.6f}",
        **{k: f"{v:.6f}" for k, v in summary.test_metrics.items()},
    }
    task = prepared.task
    version = publish.register_best(config.registered_model, folder, run_id, tags, task.entry_file, task.input_example())
    summary.model_version = version.version
    shutil.rmtree(runner.checkpoints, ignore_errors=True)  # the weights now live in the registry
    return summary


def _log_baseline(task: Task, parent: tracking.StudyRun, metric: str, reporter: Reporter) -> None:
    """Train the classical baseline once per study, for context next to the fine-tuned trials."""
    if f"baseline_val_{metric}" in parent.mlflow_client.get_run(parent.run_id).data.metrics:
        return
    scores = task.baseline()
    parent.mlflow_client.set_tag(parent.run_id, "baseline", task.baseline_name)
    for key, value in scores.items():
        parent.mlflow_client.log_metric(parent.run_id, key, value)
    reporter.info(f"baseline ({task.baseline_name}): val {metric} {scores[f'baseline_val_{metric}']:.4f}, "
                  f"test {metric} {scores[f'baseline_test_{metric}']:.4f}")


def _end_orphaned_runs(study: optuna.Study, parent: tracking.StudyRun) -> None:
    """End the MLflow run of any finished trial whose process died before it could end the run."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id and parent.mlflow_client.get_run(run_id).info.status == "RUNNING":
            tracking.TrialRun(parent.mlflow_client, run_id).finish(
                trial.state.name, trial.user_attrs.get(REASON_ATTR, "its process stopped before ending the run")
            )


def score_on_test(folder: Path, prepared: Prepared, run_id: str) -> dict[str, float]:
    """Score the saved model once on the held-out test split and log the metrics to its run."""
    model, loader = prepared.task.test_setup(folder)
    model.to(prepared.device)
    evaluation = evaluate(model, loader, prepared.device)
    metrics = {"test_accuracy": evaluation.accuracy, "test_f1": evaluation.f1}
    run = tracking.TrialRun(tracking.client(), run_id)
    run.log_metrics(metrics, step=0)
    run.log_confusion_matrix(evaluation.y_true, evaluation.y_pred, prepared.task.labels, "test_confusion_matrix.png")
    return metrics


def _log_study_plots(study: optuna.Study, parent: tracking.StudyRun, reporter: Reporter) -> None:
    from optuna.visualization import matplotlib as optuna_plots

    plots = {"optimization_history.png": optuna_plots.plot_optimization_history}
    if _count(study, TrialState.COMPLETE) >= 2:
        plots["param_importances.png"] = optuna_plots.plot_param_importances
    with warnings.catch_warnings():
        # Optuna flags its matplotlib plots experimental and warns on ties in importances.
        warnings.simplefilter("ignore")
        for path, plot in plots.items():
            try:
                parent.log_figure(plot(study).figure, path)
            except Exception as err:  # noqa: BLE001 - a plot is not worth losing the study's model
                reporter.warn(f"skipped the study plot {path}: {type(err).__name__}: {err}")


def _trial_line(trial_cfg: TrialConfig) -> str:
    """The sampled values, leaving out augmentations that stay off."""
    shown = {**trial_cfg.model_dump(exclude_defaults=True), "freeze_depth": trial_cfg.freeze_depth}
    shown.pop("seed", None)
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
