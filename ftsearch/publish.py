"""The MLflow Model Registry: registering a study's best model, promotion by alias, loading.

Registration is all or nothing: a version that cannot get its tags and its ``candidate`` alias
is deleted again, and a model that cannot be logged (a full disk: ``DiskFull``) leaves no files
in the artifact store. Aliases only (``candidate``, ``champion``); registry stages are deprecated.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.utils.file_utils import local_file_uri_to_path

from ftsearch import tracking
from ftsearch.disk import writing
from ftsearch.errors import FtsearchError

CANDIDATE = "candidate"
CHAMPION = "champion"
COMPLETE_TAG = "ftsearch.registration"
PACKAGE_DIR = Path(__file__).parent


def _requirements() -> list[str]:
    # Stated explicitly: MLflow's own inference would load the model in a subprocess to find them.
    names = ["torch", "torchvision", "transformers", "timm", "safetensors", "pillow", "mlflow", "pandas"]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_model(
    run_id: str,
    model_folder: Path,
    entry_file: Path,
    input_example: pd.DataFrame,
    signature: ModelSignature,
    *,
    name: str = "model",
    step: int = 0,
    tags: dict[str, str] | None = None,
    model_type: str | None = None,
) -> str:
    """Log ``model_folder`` as an MLflow ``LoggedModel`` of ``run_id`` (a pyfunc served by
    ``entry_file``) and return its ``model_id``. The run's metrics at ``step`` (a trial's best
    epoch: its validation metrics and measured cost) are linked to it, so MLflow's models view
    ranks models by them; the run's params become its params.

    All or nothing: a model that cannot be logged (a full disk: ``DiskFull``) is deleted with what
    MLflow had copied of it. ``signature``: the modality's inputs and the problem type's outputs."""
    mlflow_client = tracking.client()  # also points MLflow's model logging at the configured store
    # Created in the run's own experiment, by the run's id: the run is never reopened, so it stays
    # FINISHED (or RUNNING, for a trial) whatever happens here.
    run = mlflow_client.get_run(run_id)
    logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id, experiment_id=run.info.experiment_id,
                                            params=run.data.params, tags=tags, model_type=model_type)
    stored = _local_folder(logged.artifact_location)
    # MLflow stages the model in the temporary folder, then copies it to the artifact store: a
    # full disk in either is named by ``writing``.
    with writing(stored or Path(tempfile.gettempdir())):
        try:
            Model.log(
                artifact_path=None,  # MLflow 3 names a model by ``name``; the old argument is still required
                name=name,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                step=step,
                python_model=str(entry_file),
                artifacts={"model": str(model_folder)},
                input_example=input_example,
                signature=signature,
                # The package travels with the model, so it loads where ftsearch is not installed.
                code_paths=[str(PACKAGE_DIR)],
                pip_requirements=_requirements(),
            )
        except Exception:
            # What MLflow had copied is of no use, and on a full disk it is space the next attempt
            # needs: deleted before ``writing`` measures the free space.
            if stored is not None:
                shutil.rmtree(stored, ignore_errors=True)
            with contextlib.suppress(MlflowException):  # the error above is the one to report
                mlflow_client.delete_logged_model(logged.model_id)
            raise
    return logged.model_id


def logged_model_exists(model_id: str) -> bool:
    """Whether ``model_id`` is a complete LoggedModel of the configured store (one logged to
    another store, or deleted, is not)."""
    try:
        return tracking.client().get_logged_model(model_id).status == LoggedModelStatus.READY
    except MlflowException:
        return False


def delete_model(model_id: str) -> None:
    """Delete a LoggedModel and its artifacts (one logged for a registration that failed)."""
    mlflow_client = tracking.client()
    stored = _local_folder(mlflow_client.get_logged_model(model_id).artifact_location)
    mlflow_client.delete_logged_model(model_id)
    if stored is not None:
        shutil.rmtree(stored, ignore_errors=True)


def register_best(registered_name: str, model_id: str, run_id: str, tags: dict[str, str]) -> ModelVersion:
    """Register LoggedModel ``model_id`` (of ``run_id``) as a new version with alias ``candidate``.

    ``tags`` (study, trial number, test metrics...) go on the model version; they must already
    be final, because the alias is set only once everything else has succeeded, and the version
    is marked complete last. A version left incomplete by a crash is removed by the next call.
    """
    discard_incomplete(registered_name, run_id)
    mlflow_client = tracking.client()
    version = None
    try:
        # register_model prints its own progress to stderr; ftsearch reports the version itself.
        with contextlib.redirect_stderr(io.StringIO()):
            version = mlflow.register_model(f"models:/{model_id}", registered_name, tags=tags)
        if version.status != "READY":  # register_model waits for it; a store may still say no
            raise FtsearchError(f"{registered_name} v{version.version} did not become ready ({version.status}); nothing was registered")
        mlflow_client.set_registered_model_alias(registered_name, CANDIDATE, version.version)
        mlflow_client.set_model_version_tag(registered_name, version.version, COMPLETE_TAG, "complete")
    except BaseException:
        if version is not None:
            mlflow_client.delete_model_version(registered_name, version.version)
        raise
    return version


def _local_folder(uri: str) -> Path | None:
    """The folder of an artifact location on this machine's file system, or None (a server)."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in ("", "file"):
        return None
    return Path(local_file_uri_to_path(uri))


def _versions_of_run(registered_name: str, run_id: str) -> list[ModelVersion]:
    versions = tracking.client().search_model_versions(f"name = '{registered_name}'")
    return [v for v in versions if v.tags.get("run_id") == run_id]


def registered_version(registered_name: str, run_id: str, tags: dict[str, str] | None = None) -> ModelVersion | None:
    """The completely registered version of the model logged in ``run_id`` (with ``tags``, when
    given), if there is one."""
    wanted = {COMPLETE_TAG: "complete", **(tags or {})}
    complete = [v for v in _versions_of_run(registered_name, run_id)
                if all(v.tags.get(key) == value for key, value in wanted.items())]
    return complete[0] if complete else None


def discard_incomplete(registered_name: str, run_id: str) -> None:
    """Delete versions of ``run_id``'s model that a crash left without their alias or final tag."""
    mlflow_client = tracking.client()
    for version in _versions_of_run(registered_name, run_id):
        if version.tags.get(COMPLETE_TAG) != "complete":
            mlflow_client.delete_model_version(registered_name, version.version)


def _by_alias(registered_name: str, alias: str) -> ModelVersion | None:
    try:
        return tracking.client().get_model_version_by_alias(registered_name, alias)
    except MlflowException:
        return None


def promote(registered_name: str, metric: str, maximize: bool, force: bool = False) -> str:
    """Move ``champion`` to the ``candidate`` version if its test metric beats the champion's.

    Returns a sentence saying what was done and why.
    """
    key = f"test_{metric}"
    candidate = _by_alias(registered_name, CANDIDATE)
    if candidate is None:
        raise FtsearchError(
            f"registered model {registered_name!r} has no {CANDIDATE!r} version: run the search first "
            "(a search registers its best model as the candidate when it ends)"
        )
    if candidate.status != "READY" or candidate.tags.get(COMPLETE_TAG) != "complete" or key not in candidate.tags:
        raise FtsearchError(
            f"{registered_name} v{candidate.version} is not completely registered (status {candidate.status}, "
            f"{key} {'logged' if key in candidate.tags else 'missing'}): the champion stays where it is; "
            "run the search again to register the best model completely"
        )
    champion = _by_alias(registered_name, CHAMPION)
    cand_score = float(candidate.tags[key])
    if champion is not None and champion.version == candidate.version:
        return f"{registered_name} v{candidate.version} is already the champion ({key} {cand_score:.4f})"
    if champion is not None and not force:
        champ_score = float(champion.tags.get(key, "nan"))
        better = cand_score > champ_score if maximize else cand_score < champ_score
        if not better:
            return (
                f"kept champion {registered_name} v{champion.version} ({key} {champ_score:.4f}): candidate "
                f"v{candidate.version} does not beat it ({key} {cand_score:.4f}); use --force to promote anyway"
            )
    tracking.client().set_registered_model_alias(registered_name, CHAMPION, candidate.version)
    if champion is None:
        why = "there was no champion yet"
    elif force:
        why = f"forced over v{champion.version}"
    else:
        why = f"it beats v{champion.version} ({key} {champion.tags.get(key)})"
    return f"promoted {registered_name} v{candidate.version} ({key} {cand_score:.4f}) to {CHAMPION}: {why}"
