"""Every private Optuna name ftsearch uses, fenced in this one module.

ftsearch beats a heartbeat for each running trial on a journal-file storage (the default), so
the trial of a worker that died is failed and retried. Optuna offers heartbeats only on
``RDBStorage`` (its ``heartbeat_interval``, ``grace_period`` and
``heartbeat_stale_trial_callback`` arguments); ``JournalStorage`` takes none of them, and Optuna
has no public base class, protocol or wrapper that gives a storage heartbeats (checked against
Optuna 5.0.0). ``optuna.storages.RetryHeartbeatStaleTrialCallback`` is public, but it is only a
callback handed to a storage that already has heartbeats.

What is private, and why:

``optuna.storages._heartbeat.BaseHeartbeat``
    The (unexported) base class of the storages with heartbeats. The public
    ``optuna.storages.fail_stale_trials(study)`` recognises such a storage only by
    ``isinstance(storage, BaseHeartbeat)`` with ``get_heartbeat_interval()`` not None; for any
    other storage it silently does nothing. So the journal storage must inherit it.

``BaseHeartbeat._get_stale_trial_ids(study_id)``
    One of its four abstract methods, the one ``fail_stale_trials`` calls to find the trials to
    fail (it then sets each to FAIL and calls ``get_heartbeat_stale_trial_callback()`` on the
    ones it failed itself). The other three (``record_heartbeat``, ``get_heartbeat_interval``,
    ``get_heartbeat_stale_trial_callback``) have public names. :class:`HeartbeatMixin` below
    implements the private one as a call to :meth:`HeartbeatMixin.stale_trial_ids`, so no other
    ftsearch module names it.

No longer used: ``FrozenTrial._trial_id``. The public
``BaseStorage.get_trial_id_from_study_id_trial_number(study_id, trial.number)`` gives the same id.

On an Optuna upgrade, run ``tests/distributed/test_storage.py``; it fails, naming the private
API, when any of this changed. By hand, check in ``optuna/storages/_heartbeat.py``: that
``BaseHeartbeat`` is still there with the same abstract methods (:data:`HEARTBEAT_METHODS`),
that ``fail_stale_trials`` still selects storages by ``isinstance`` on it and still calls
``_get_stale_trial_ids`` and ``get_heartbeat_stale_trial_callback``; and whether Optuna now
offers heartbeats on ``JournalStorage`` itself, which would make this module unnecessary.

Importing this module raises :class:`OptunaPrivateAPIError` (an ``ImportError`` and an
``FtsearchError``, so the CLI prints it as a message) when ``BaseHeartbeat`` is gone or its
abstract methods changed: heartbeats that silently stopped working would let the trials of dead
workers run forever.
"""

from __future__ import annotations

import abc

import optuna

from ftsearch.errors import FtsearchError

TESTED_WITH = "5.0.0"
HEARTBEAT_API = "optuna.storages._heartbeat.BaseHeartbeat"
STALE_TRIAL_IDS_HOOK = "_get_stale_trial_ids"
HEARTBEAT_METHODS = frozenset(
    {"record_heartbeat", STALE_TRIAL_IDS_HOOK, "get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
)


class OptunaPrivateAPIError(FtsearchError, ImportError):
    """The installed Optuna changed a private API that ftsearch depends on."""

    def __init__(self, api: str, change: str):
        self.api = api
        super().__init__(
            f"this Optuna version ({optuna.__version__}) changed a private API ftsearch depends on: "
            f"{api} ({change}). ftsearch needs it for heartbeats on journal-file storages; install "
            f"the Optuna it was tested with (pip install optuna=={TESTED_WITH}) or update "
            "ftsearch/distributed/optuna_private.py (its docstring says what to check)."
        )


def _base_heartbeat() -> type:
    try:
        from optuna.storages._heartbeat import BaseHeartbeat
    except ImportError as err:
        raise OptunaPrivateAPIError(HEARTBEAT_API, f"it cannot be imported: {err}") from err
    abstract = frozenset(getattr(BaseHeartbeat, "__abstractmethods__", ()))
    if abstract != HEARTBEAT_METHODS:
        gone, new = sorted(HEARTBEAT_METHODS - abstract), sorted(abstract - HEARTBEAT_METHODS)
        raise OptunaPrivateAPIError(
            HEARTBEAT_API, f"its abstract methods changed: no longer abstract {gone}, newly abstract {new}"
        )
    return BaseHeartbeat


BaseHeartbeat = _base_heartbeat()


class HeartbeatMixin(BaseHeartbeat):
    """``BaseHeartbeat`` with its private hook under a public name: a storage class that inherits
    this (after its ``BaseStorage`` class) and implements :meth:`stale_trial_ids`,
    ``record_heartbeat``, ``get_heartbeat_interval`` and ``get_heartbeat_stale_trial_callback``
    gets its dead trials failed by ``optuna.storages.fail_stale_trials``."""

    @abc.abstractmethod
    def stale_trial_ids(self, study_id: int) -> list[int]:
        """Ids of the study's running trials whose heartbeat stopped."""
        raise NotImplementedError

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self.stale_trial_ids(study_id)

