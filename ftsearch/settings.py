"""Where ftsearch keeps its state and finds its data, from environment settings.

Everything lives under one state directory (``mlruns/`` by default) so that a clone of the project
is self-contained: the MLflow store, its artifacts, the Optuna storage, checkpoints and caches.
"""

from __future__ import annotations

import os
from pathlib import Path

from ftsearch.errors import FtsearchError

STATE_DIR_ENV = "FTSEARCH_STATE_DIR"
DATA_DIR_ENV = "FTSEARCH_DATA_DIR"
# Set by ``ftsearch search --trials-per-gpu`` for each worker: the share of its GPU's memory the
# worker may allocate (``torch.cuda.set_per_process_memory_fraction``).
GPU_MEMORY_SHARE_ENV = "FTSEARCH_GPU_MEMORY_SHARE"
# The most seconds spent timing each of a trial's two latency figures (ftsearch.cost): a quiet
# machine needs less, a busy one gets no more.
LATENCY_SECONDS_ENV = "FTSEARCH_LATENCY_SECONDS"
DEFAULT_LATENCY_SECONDS = 1.0
DEFAULT_STATE_DIR = "mlruns"
DEFAULT_DATA_DIR = "data"


def state_dir() -> Path:
    """The directory holding MLflow's store, Optuna's storage, checkpoints and caches."""
    path = Path(os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR)).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """The local data mirror: ``$FTSEARCH_DATA_DIR``, else ``./data``."""
    return Path(os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR)).resolve()


def tracking_uri() -> str:
    """MLflow tracking URI: ``$MLFLOW_TRACKING_URI`` or a SQLite store in the state directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow.db'}"


def artifact_root() -> Path:
    """Where experiments created on the default local store keep their artifacts."""
    return state_dir() / "artifacts"


def optuna_storage_url(override: str | None = None) -> str:
    """Optuna storage: ``--storage`` if given (a database URL or a journal file path), else the
    journal file in the state directory, which several local worker processes can share."""
    return override or str(state_dir() / "optuna.journal")


def checkpoint_dir() -> Path:
    """Per-trial best-epoch weights, kept until the study knows whether the trial is the best."""
    return state_dir() / "checkpoints"


def cache_dir() -> Path:
    """Tokenised data sets, shared by all trials and studies."""
    return state_dir() / "cache"


def gpu_memory_share() -> float | None:
    """This worker's share of its GPU's memory, in (0, 1], when it shares the GPU; None otherwise."""
    return _number(GPU_MEMORY_SHARE_ENV, None, 1, "a share of the GPU's memory")


def latency_seconds() -> float:
    """The most seconds ``ftsearch.cost`` spends timing each latency figure of a model."""
    return _number(LATENCY_SECONDS_ENV, DEFAULT_LATENCY_SECONDS, 600, "a number of seconds")


def _number(name: str, default: float | None, high: float, what: str) -> float | None:
    """Environment variable ``name`` as a number in (0, ``high``]; ``default`` when it is unset or
    empty; anything else is an error naming it."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number <= high:
        raise FtsearchError(f"{name}={value!r}: must be {what} in (0, {high:g}]")
    return number
