"""MLflow tracking owned by ftsearch: one experiment and parent run per study, a child run per trial.

Runs are driven through ``MlflowClient`` with explicit run ids rather than MLflow's global
"active run", so that a trial's run can never be confused with another's and every run is
ended with an explicit status: no run is left RUNNING.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files

import matplotlib.pyplot as plt
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.utils.async_logging.run_operations import RunOperations
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from ftsearch import settings

STATE_TAG = "ftsearch.state"
REASON_TAG = "ftsearch.reason"
TRIAL_TAG = "ftsearch.trial_number"
STUDY_TAG = "ftsearch.study"
PARENT_TAG = "mlflow.parentRunId"
STOPPED_TAG = "ftsearch.stopped"  # on the parent run: why the study's stop rule ended it early
BASELINE_SKIPPED_TAG = "baseline_skipped"  # on the parent run: why no classical baseline could be fitted
# What kind of experiment a study is, for MLflow (its UI offers to set it; ``study_pages`` finds the
# studies by it). MLflow 3.17's open-source UI does not open an experiment by it (see study_pages).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "finetuning"

# What a tracking call raises when the store cannot be reached or refuses (an HTTP server away for
# longer than MLflow's retries, a broken database): callers that can go on without the call catch it.
TrackingError = MlflowException

# MLflow's asynchronous logging sends every queued batch as its own request, up to 10 at once per
# process. Measured with 8 workers logging per step against an `mlflow server` on PostgreSQL
# (bench/tracking_load.py), that exhausted the server's connection pool: requests waited 30 s and
# were refused, 2,703 of 4,800 metrics were lost. One request at a time per process, in order, is
# what a trial needs. (MLflow's buffering, which merges queued batches, is left off: a merged
# batch that fails does not mark the batches merged into it as failed, so flush() could not resend
# them.) A user's own setting wins.
os.environ.setdefault("MLFLOW_ASYNC_LOGGING_THREADPOOL_SIZE", "1")

# Optuna's final trial state -> MLflow run status: a pruned trial ran correctly and ended early.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "KILLED": "KILLED"}


def client() -> MlflowClient:
    """A client on the configured tracking store (``$MLFLOW_TRACKING_URI`` or ``mlruns/``)."""
    uri = settings.tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, registry_uri=uri)


def is_shared() -> bool:
    """Whether tracking goes to a server that workers on other machines share (then each new
    best trial's weights are uploaded, since its worker's disk is not the search process's)."""
    return settings.tracking_uri().startswith(("http://", "https://"))


def experiment_id(mlflow_client: MlflowClient, name: str) -> str:
    """The study's experiment, created on first use (artifacts under the state dir when local),
    tagged as a fine-tuning experiment (``EXPERIMENT_KIND_TAG``)."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # created by an ftsearch before it set the tag
            mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    location = None
    if mlflow_client.tracking_uri.startswith("sqlite:"):
        location = (settings.artifact_root() / name).as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def study_pages(base_url: str) -> dict[str, str]:
    """Each study's page in the MLflow UI at ``base_url``: its experiment on the training runs.
    MLflow 3.17's UI opens an experiment by its sidebar's GenAI / Model training switch (the
    ``workflowType`` in the address, else the browser's last choice, GenAI at first), not by the
    experiment's kind tag: the address says Model training."""
    mlflow_client = client()
    found = mlflow_client.search_experiments(filter_string=f"tags.`{EXPERIMENT_KIND_TAG}` = '{EXPERIMENT_KIND}'")
    return {e.name: f"{base_url}/#/experiments/{e.experiment_id}?workflowType=machine_learning"
            for e in sorted(found, key=lambda e: e.name)}


def _usable(mlflow_client: MlflowClient, run_id: str) -> bool:
    """Whether a stored parent run still exists (the MLflow store may have been reset or cleaned)."""
    try:
        return mlflow_client.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        print(f"warning: MLflow run {run_id} of this study no longer exists; starting a new parent run",
              file=sys.stderr, flush=True)
        return False


def system_metrics_on(study_setting: bool) -> bool:
    """Whether trial runs log system metrics: the study file's ``system_metrics``, unless MLflow's
    ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` is set on this machine."""
    return MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get() if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.defined else study_setting


def close_figures(figures) -> None:
    """Close matplotlib figures (logged or not): pyplot keeps every open one alive."""
    for figure in figures:
        plt.close(figure)


def _figure_artifact(mlflow_client: MlflowClient, run_id: str, figure, path: str) -> None:
    try:
        mlflow_client.log_figure(run_id, figure, path)
    finally:
        plt.close(figure)


def dataset_of(study_name: str, report: dict, split: str) -> tuple[str, str]:
    """The name and digest under which ``log_datasets`` logs ``split`` of the data checks' ``report``."""
    return f"{study_name}-{split}", report["digests"][split]


def log_datasets(mlflow_client: MlflowClient, run_id: str, study_name: str, report: dict, splits: tuple[str, ...]) -> None:
    """Log ``splits`` of the data checks' ``report`` as the run's MLflow dataset inputs (name,
    content digest, source, rows; context train / validation / test), so the UI shows which data a
    run saw and two runs on different data cannot be mistaken for each other."""
    contexts = {"train": "training", "val": "validation", "test": "test"}
    inputs = [
        DatasetInput(
            Dataset(*dataset_of(study_name, report, split), source_type="local",
                    source=json.dumps({"uri": report["sources"][split]}),
                    profile=json.dumps({"num_rows": report["sizes"][split]})),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, contexts[split])],
        )
        for split in splits
    ]
    mlflow_client.log_inputs(run_id, datasets=inputs)


@dataclass
class TrialRun:
    """The child run of one trial.

    Its metrics are sent in the background (MLflow's asynchronous logging), so training goes on
    while a tracking server is away: MLflow's HTTP client retries each batch with backoff (by
    default 7 times over about 4 minutes, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and
    ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``). :meth:`flush` waits for them, and sends a batch MLflow
    gave up on once more; a metric is identified by its key, step, value and timestamp, so a batch
    that arrives twice is stored once."""

    mlflow_client: MlflowClient
    run_id: str
    _pending: list[tuple[RunOperations, list[Metric]]] = field(default_factory=list, repr=False)
    _monitor: SystemMetricsMonitor | None = field(default=None, repr=False)

    def monitor_system(self) -> None:
        """Log the machine's CPU, memory, disk, network (and GPU) use on this run, sampled in the
        background every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (10), until it ends."""
        self._monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.mlflow_client.tracking_uri)
        self._monitor.start()

    def log_params(self, params: dict[str, Any]) -> None:
        self.mlflow_client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_dict(self, data: dict[str, Any], path: str) -> None:
        self.mlflow_client.log_dict(self.run_id, data, path)

    def set_tag(self, key: str, value: str) -> None:
        self.mlflow_client.set_tag(self.run_id, key, value)

    def log_metrics(self, metrics: dict[str, float], step: int, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        """Queue ``metrics`` at ``step`` for the background sender; returns at once. With
        ``model_id`` they are that LoggedModel's metrics too, measured on ``dataset`` (its name
        and digest, as ``log_datasets`` logs it)."""
        now = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        batch = [Metric(k, float(v), now, step, model_id=model_id, dataset_name=name, dataset_digest=digest)
                 for k, v in metrics.items()]
        self._pending.append((self.mlflow_client.log_batch(self.run_id, metrics=batch, synchronous=False), batch))

    def flush(self) -> None:
        """Wait until every queued metric is stored. A batch whose retries ran out (the server away
        longer than that) is sent again, synchronously, with the same retries: a second chance to
        outlast the outage before :class:`TrackingError` says it could not."""
        pending, self._pending = self._pending, []
        for operation, batch in pending:
            try:
                operation.wait()
            except Exception:  # noqa: BLE001 - whatever the sender met, the batch is sent once more
                self.mlflow_client.log_batch(self.run_id, metrics=batch)

    def log_figure(self, figure, path: str) -> None:
        """Log a matplotlib figure as ``path`` and close it."""
        _figure_artifact(self.mlflow_client, self.run_id, figure, path)

    def finish(self, state: str, reason: str = "") -> None:
        """Wait for the queued metrics, tag the Optuna state (and reason) and end the run with the
        matching status."""
        try:
            if self._monitor is not None:
                self._monitor.finish()  # its last samples, while the run still takes them
                self._monitor = None
            self.flush()
            self.mlflow_client.set_tag(self.run_id, STATE_TAG, state)
            if reason:
                self.mlflow_client.set_tag(self.run_id, REASON_TAG, reason[:5000])
        finally:
            self.mlflow_client.set_terminated(self.run_id, RUN_STATUS[state])


@dataclass
class StudyRun:
    """The parent run of a study, with one child run per trial."""

    mlflow_client: MlflowClient
    experiment_id: str
    run_id: str
    study_name: str

    @classmethod
    def open(cls, study_name: str, run_id: str | None, tags: dict[str, str]) -> StudyRun:
        """Reopen the study's parent run (``run_id``) or start a new one."""
        mlflow_client = client()
        exp_id = experiment_id(mlflow_client, study_name)
        if run_id is not None and _usable(mlflow_client, run_id):
            mlflow_client.update_run(run_id, status="RUNNING")
        else:
            run = mlflow_client.create_run(exp_id, run_name=f"study-{study_name}", tags={STUDY_TAG: study_name, **tags})
            run_id = run.info.run_id
        return cls(mlflow_client, exp_id, run_id, study_name)

    @classmethod
    def attach(cls, study_name: str, run_id: str) -> StudyRun:
        """The parent run another process (``ftsearch search``) opened, for a worker to add trials
        under; its status stays that process's business."""
        mlflow_client = client()
        return cls(mlflow_client, experiment_id(mlflow_client, study_name), run_id, study_name)

    def start_trial(self, number: int, tags: dict[str, str], system_metrics: bool = False) -> TrialRun:
        """The child run of trial ``number`` (logging system metrics while it runs, if asked)."""
        return self._child(f"trial-{number}", {TRIAL_TAG: str(number), **tags}, system_metrics)

    def start_reevaluation(self, number: int, seed: int, tags: dict[str, str], system_metrics: bool = False) -> TrialRun:
        """A child run that trains trial ``number``'s configuration again with ``seed``. It is not
        a trial (no trial-number tag): the study's trial tables leave it out."""
        return self._child(f"trial-{number}-seed-{seed}", tags, system_metrics)

    def _child(self, name: str, tags: dict[str, str], system_metrics: bool) -> TrialRun:
        run = self.mlflow_client.create_run(
            self.experiment_id, run_name=name, tags={PARENT_TAG: self.run_id, STUDY_TAG: self.study_name, **tags}
        )
        child = TrialRun(self.mlflow_client, run.info.run_id)
        if system_metrics:
            child.monitor_system()
        return child

    def log_dict(self, data: dict[str, Any], path: str) -> None:
        self.mlflow_client.log_dict(self.run_id, data, path)

    def set_tag(self, key: str, value: str) -> None:
        self.mlflow_client.set_tag(self.run_id, key, value)

    def log_best(self, metric: str, value: float, trial_number: int, params: dict[str, Any]) -> None:
        # Params are immutable in MLflow and the best trial changes as the study goes on, so
        # the best params are tags and an artifact, the best value a metric stepped by trial.
        self.mlflow_client.log_metric(self.run_id, f"best_val_{metric}", value, step=trial_number)
        self.mlflow_client.set_tag(self.run_id, "best_trial", str(trial_number))
        for key, val in params.items():
            self.mlflow_client.set_tag(self.run_id, f"best.{key}", str(val))
        self.log_dict({"trial": trial_number, f"val_{metric}": value, "params": params}, "best_params.json")

    def log_figure(self, figure, path: str) -> None:
        _figure_artifact(self.mlflow_client, self.run_id, figure, path)

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow_client.set_terminated(self.run_id, status)
