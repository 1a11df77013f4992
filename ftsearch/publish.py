"""The MLflow Model Registry: registering a study's best model, promotion by alias, loading.

Registration is all or nothing: a version that cannot get its tags and its ``candidate`` alias
is deleted again. Aliases only (``candidate``, ``champion``); registry stages are deprecated.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from ftsearch import tracking
from ftsearch.errors import FtsearchError

CANDIDATE = "candidate"
CHAMPION = "champion"
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")


def _requirements() -> list[str]:
    # Stated explicitly: MLflow's own inference would load the model in a subprocess to find them.
    names = ["ftsearch", "torch", "transformers", "mlflow", "pandas"]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def register_best(
    registered_name: str,
    model_folder: Path,
    run_id: str,
    tags: dict[str, str],
    input_example: list[str],
) -> ModelVersion:
    """Log ``model_folder`` as an MLflow model in ``run_id`` and register it with alias ``candidate``.

    ``tags`` (study, trial number, test metrics...) go on the model version; they must already
    be final, because the alias is set last and only once everything else has succeeded.
    """
    tracking.client()
    mlflow.start_run(run_id=run_id)
    try:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(ENTRY_FILE),
            artifacts={"model": str(model_folder)},
            input_example=pd.DataFrame({"text": input_example}),
            pip_requirements=_requirements(),
        )
    finally:
        # The trial's run was FINISHED before and stays so, whatever happened while logging.
        mlflow.end_run("FINISHED")

    mlflow_client = tracking.client()
    version = None
    try:
        version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
        mlflow_client.set_registered_model_alias(registered_name, CANDIDATE, version.version)
    except BaseException:
        if version is not None:
            mlflow_client.delete_model_version(registered_name, version.version)
        raise
    return version


def registered_versions(registered_name: str) -> list[ModelVersion]:
    """All versions of a registered model (empty when it does not exist yet)."""
    return tracking.client().search_model_versions(f"name = '{registered_name}'")


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


def predict(model_uri: str, texts: list[str]) -> pd.DataFrame:
    """Load a registered (or any MLflow pyfunc) model by URI and predict labels for ``texts``."""
    tracking.client()
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as err:
        raise FtsearchError(
            f"cannot load model {model_uri!r}: {str(err).splitlines()[0]}. Use models:/<name>@champion "
            "after `ftsearch promote STUDY`, or models:/<name>@candidate"
        ) from None
    return model.predict(pd.DataFrame({"text": texts}))
