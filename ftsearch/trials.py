"""One trial: sample, build, fine-tune (with per-epoch checkpoints and an out-of-memory retry),
track in MLflow, keep the best trial's weights on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ftsearch import progress, tracking
from ftsearch.config import StudyConfig
from ftsearch.generations import REASON_ATTR, RESUMED_ATTR, RETRY_OF_ATTR, RUN_ID_ATTR
from ftsearch.progress import BestTrial, Reporter, TrialCounts
from ftsearch.space import TrialConfig, sample_trial
from ftsearch.tasks.base import Task
from ftsearch.train import EpochMetrics, FitResult, TrainSettings, fit, free_memory, seed_everything

OOM_TAG = "ftsearch.oom_retry"
WEIGHTS_ARTIFACT = "weights"  # a new best trial's weights, on a shared tracking server


class TrialOutOfMemory(RuntimeError):
    """A trial that ran out of accelerator memory even at half its batch size."""


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's best completed trial (Optuna's choice, so every worker agrees on it)."""
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def _judged_dead(trial: optuna.Trial) -> bool:
    """Whether another worker failed this trial for missing heartbeats while it still ran."""
    finished = trial.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return any(t.number == trial.number for t in finished)


def trial_counts(trials: list[FrozenTrial]) -> TrialCounts:
    states = [t.state for t in trials]
    return TrialCounts(states.count(TrialState.COMPLETE), states.count(TrialState.PRUNED), states.count(TrialState.FAIL))


def best_info(best: FrozenTrial | None) -> BestTrial | None:
    return None if best is None else BestTrial(best.number, best.value, dict(best.params))


class TrialRunner:
    """The objective of one worker: one call = one trial, tracked as one MLflow child run."""

    def __init__(
        self,
        task: Task,
        config: StudyConfig,
        device: torch.device,
        parent: tracking.StudyRun,
        checkpoints: Path,
        reporter: Reporter | None = None,
        compile: bool = False,
    ):
        self.task, self.config, self.device, self.compile = task, config, device, compile
        self.reporter = reporter if reporter is not None else progress.PlainReporter()
        self.parent = parent
        self.checkpoints = checkpoints

    def resume_file(self, trial: optuna.Trial | FrozenTrial) -> Path:
        """Per-epoch training state, named after the trial a retry repeats so it finds it."""
        origin = trial.user_attrs.get(RETRY_OF_ATTR, trial.number)
        return self.checkpoints / "resume" / f"trial-{origin}.pt"

    def __call__(self, trial: optuna.Trial) -> float:
        trial_cfg = sample_trial(trial, self.config, self.task.blocks)
        run = self.parent.start_trial(trial.number, tags={"optuna.study": trial.study.study_name})
        state, reason, value = "FAIL", "", None
        try:
            trial.set_user_attr(RUN_ID_ATTR, run.run_id)
            # Params: exactly what Optuna sampled (so runs of one study share their columns);
            # the full resolved config, defaults included, is the artifact.
            run.log_params({**trial.params, "seed": trial_cfg.seed})
            if RETRY_OF_ATTR in trial.user_attrs:
                run.mlflow_client.set_tag(run.run_id, RETRY_OF_ATTR, str(trial.user_attrs[RETRY_OF_ATTR]))
            run.log_dict(trial_cfg.model_dump(), "trial_config.json")
            self.reporter.trial_started(trial.number, _trial_line(trial_cfg), trial_cfg.epochs)
            result = self._fit_in_memory(trial, trial_cfg, run)
            if result.status == "diverged":
                state, reason = "PRUNED", result.reason
                raise optuna.TrialPruned(reason)
            if result.status == "stopped":
                state = "PRUNED"
                reason = f"pruned by the {self.config.pruner.name} pruner after epoch {len(result.history)}"
                raise optuna.TrialPruned(reason)
            state, value = "COMPLETE", float(result.best_value(self.config.metric))
            self._share_if_best(trial, value, run)
            return value
        except optuna.TrialPruned:
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            # Judged dead by another worker while it ran (it missed two heartbeats): that worker
            # ended the run and queued the retry, which resumes from this trial's checkpoint.
            state = "ABANDONED"
            raise
        except KeyboardInterrupt:
            state, reason = "KILLED", "interrupted (Ctrl-C or SIGTERM); it resumes from its last epoch when the search goes on"
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            raise
        finally:
            if state != "ABANDONED" and _judged_dead(trial):
                state = "ABANDONED"  # after its last report: the judging worker ended its run
            if state != "ABANDONED":
                # The resume file stays until the trial's end is recorded (after_trial): a worker
                # killed before that leaves a retry that needs it, even after the last epoch.
                if reason:
                    trial.set_user_attr(REASON_ATTR, reason)
                run.finish(state, reason)
            self.reporter.trial_ended(trial.number, "FAIL" if state == "ABANDONED" else state, reason, value)

    def _fit_in_memory(self, trial: optuna.Trial, trial_cfg: TrialConfig, run: tracking.TrialRun) -> FitResult:
        """Fit; on an out-of-memory error, once more at half the batch and twice the gradient
        accumulation (the same effective batch), from the last finished epoch."""
        logged: set[int] = set()
        try:
            return self._train(trial, trial_cfg, run, logged)
        except torch.OutOfMemoryError:
            pass  # out of the except block first, so the traceback's tensors can be freed
        free_memory()
        half = trial_cfg.batch_size // 2
        if half < 1:
            raise TrialOutOfMemory(f"out of memory at batch size {trial_cfg.batch_size}")
        note = f"batch size {trial_cfg.batch_size} -> {half}, gradient accumulation 2"
        self.reporter.warn(f"  trial {trial.number}: out of memory at batch size {trial_cfg.batch_size}; retrying with {note}")
        run.mlflow_client.set_tag(run.run_id, OOM_TAG, note)
        try:
            return self._train(trial, trial_cfg.model_copy(update={"batch_size": half}), run, logged, accumulation=2)
        except torch.OutOfMemoryError:
            pass
        free_memory()
        raise TrialOutOfMemory(f"out of memory at batch size {half} (and at {trial_cfg.batch_size} before)")

    def _train(
        self, trial: optuna.Trial, trial_cfg: TrialConfig, run: tracking.TrialRun, logged: set[int], accumulation: int = 1
    ) -> FitResult:
        task = self.task
        seed_everything(trial_cfg.seed)  # the new classifier head is drawn from the trial's seed
        setup = task.build(trial_cfg)
        try:
            if not logged:
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
                device=str(self.device),
                compile=self.compile,
                grad_accumulation=accumulation,
            )

            def on_epoch_end(m: EpochMetrics) -> bool:
                if m.epoch not in logged:
                    logged.add(m.epoch)
                    run.log_metrics({"train_loss": m.train_loss, "val_accuracy": m.val_accuracy, "val_f1": m.val_f1}, step=m.epoch)
                    trial.report(m.value(self.config.metric), m.epoch)
                self.reporter.epoch_ended(m.epoch, {"train loss": m.train_loss, "val accuracy": m.val_accuracy, "val f1": m.val_f1})
                return trial.should_prune()

            def on_resume(history: list[EpochMetrics]) -> None:
                # A retry is a new run: it carries the epochs it inherits, so its curve is whole.
                if not logged and RETRY_OF_ATTR in trial.user_attrs:
                    run.log_params({RESUMED_ATTR: len(history)})
                    trial.set_user_attr(RESUMED_ATTR, len(history))
                    self.reporter.info(f"  resumed trial {trial.user_attrs[RETRY_OF_ATTR]} after epoch {len(history)}")
                for m in history:
                    on_epoch_end(m)

            result = fit(
                setup.model, setup.train_loader, setup.val_loader, settings_, on_epoch_end,
                on_step=self.reporter.step, checkpoint=self.resume_file(trial), on_resume=on_resume,
            )
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
            free_memory()

    def _log_figures(self, run: tracking.TrialRun, result: FitResult) -> None:
        """The best epoch's confusion matrix (and misclassified images); a figure that fails to draw
        is reported, not allowed to fail a trained trial."""
        evaluation = result.best_eval
        try:
            run.log_confusion_matrix(evaluation.y_true, evaluation.y_pred, self.task.labels, "confusion_matrix.png")
            self.task.log_misclassified(run, evaluation.y_true, evaluation.y_pred, "misclassified.png")
        except Exception as err:  # noqa: BLE001 - drawing is not worth the trial
            self.reporter.warn(f"could not draw the trial's figures: {type(err).__name__}: {err}")

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Once ``trial``'s end is recorded: delete its resume file, the weights of finished trials
        that are not the best (never those of a trial still running in another worker), and keep
        the parent run's best up to date."""
        self.resume_file(trial).unlink(missing_ok=True)
        trials = study.get_trials(deepcopy=False)
        # Read after the snapshot: a trial finished in it that is not the best now never will be.
        best = best_trial(study)
        self.reporter.trials_updated(trial_counts(trials), best_info(best))
        finished = {t.number for t in trials if t.state.is_finished()}
        for folder in self.checkpoints.glob("trial-*"):
            number = folder.name.removeprefix("trial-")
            if number.isdecimal() and int(number) in finished and (best is None or int(number) != best.number):
                shutil.rmtree(folder, ignore_errors=True)
        if best is not None and best.number == trial.number:
            self.parent.log_best(self.config.metric, best.value, best.number, best.params)

    def drop_resume_files(self, study: optuna.Study) -> None:
        """Delete the resume files left by workers killed between recording a trial's end and
        deleting its file, once no trial is waiting or running to resume from them."""
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
            shutil.rmtree(self.checkpoints / "resume", ignore_errors=True)

    def drop_weights(self) -> None:
        """Delete every trial's weights (once the best is registered), and the study's checkpoint
        folder unless resume files are left in it for trials still to run."""
        for folder in self.checkpoints.glob("trial-*"):
            shutil.rmtree(folder, ignore_errors=True)
        if not any(self.checkpoints.glob("resume/*")):
            shutil.rmtree(self.checkpoints, ignore_errors=True)

    def _share_if_best(self, trial: optuna.Trial, value: float, run: tracking.TrialRun) -> None:
        """With a shared tracking server, upload the weights of a trial that beats (or ties) the
        best so far, before the trial is told complete: the search process, maybe on another
        machine, registers the best trial from them."""
        if not tracking.is_shared():
            return
        best = best_trial(trial.study)
        maximize = self.config.direction == "maximize"
        if best is None or (value >= best.value if maximize else value <= best.value):
            run.mlflow_client.log_artifacts(run.run_id, str(self.checkpoints / f"trial-{trial.number}"), WEIGHTS_ARTIFACT)


def _trial_line(trial_cfg: TrialConfig) -> str:
    """The sampled values, leaving out augmentations that stay off."""
    shown = {**trial_cfg.model_dump(exclude_defaults=True), "freeze_depth": trial_cfg.freeze_depth}
    shown.pop("seed", None)
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
