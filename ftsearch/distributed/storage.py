"""Optuna storages that several worker processes can share, with heartbeats on running trials.

On one machine the default is a journal file: Optuna recommends it over SQLite for several
processes (appends under a file lock, so no "database is locked" when workers write at once).
Across machines, an RDB URL (PostgreSQL, MySQL). Both beat a heartbeat for each running trial,
so the trial of a worker that died (SIGKILL, preemption, lost host) is failed and retried.
"""

from __future__ import annotations

import fcntl
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from ftsearch import settings
from ftsearch.distributed.optuna_private import HeartbeatMixin
from ftsearch.errors import FtsearchError

HEARTBEAT_ENV = "FTSEARCH_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 30
HEARTBEAT_ATTR = "ftsearch:heartbeat"

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def heartbeat_seconds() -> int:
    """Seconds between heartbeats: ``$FTSEARCH_HEARTBEAT_SECONDS`` (default 30). A trial whose
    worker missed two heartbeats is failed."""
    raw = os.environ.get(HEARTBEAT_ENV, str(DEFAULT_HEARTBEAT_SECONDS))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise FtsearchError(f"${HEARTBEAT_ENV} must be a whole number of seconds, at least 1; got {raw!r}")
    return value


def is_journal(url: str) -> bool:
    """Whether a storage setting names a journal file (a path) rather than a database URL."""
    return "://" not in url


class FlockLock:
    """The journal's write lock as a kernel lock (``flock``), which the kernel drops when its
    holder dies: a worker killed mid-write never leaves the others waiting, as Optuna's lock
    files do (they are broken only after 30 s, long enough for live trials to look dead)."""

    def __init__(self, journal: Path):
        self._path = f"{journal}.flock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class HeartbeatJournalStorage(JournalStorage, HeartbeatMixin):
    """A journal-file storage with heartbeats, which Optuna only offers on RDB storages.

    A heartbeat is a timestamp in the trial's system attributes; trials on one journal file run
    on one machine, so their clocks agree. Optuna has no public way to add heartbeats to a
    storage: the private base class this needs is fenced in
    :mod:`ftsearch.distributed.optuna_private`."""

    def __init__(self, path: Path, interval: int, callback: StaleCallback | None):
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(JournalFileBackend(str(path), lock_obj=FlockLock(path)))
        self._interval = interval
        self._callback = callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:
            pass  # another worker already judged this trial dead; its own end will say so

    def stale_trial_ids(self, study_id: int) -> list[int]:
        """Running trials with no heartbeat for two intervals (one that never beat: since it
        started). ``optuna.storages.fail_stale_trials`` fails them."""
        cutoff = time.time() - 2 * self._interval
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            last = beat if beat is not None else trial.datetime_start.timestamp()
            if last < cutoff:
                stale.append(self.get_trial_id_from_study_id_trial_number(study_id, trial.number))
        return stale

    def get_heartbeat_interval(self) -> int:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback | None:
        return self._callback


def open_storage(url: str | None = None, on_stale: StaleCallback | None = None) -> BaseStorage:
    """The storage at ``url`` (a journal file path, or a database URL), default the local journal.

    ``on_stale`` is called for each trial found dead (no heartbeat for two intervals)."""
    url = settings.optuna_storage_url(url)
    interval = heartbeat_seconds()
    try:
        if is_journal(url):
            return HeartbeatJournalStorage(Path(url), interval, on_stale)
        return _rdb_storage(url, interval, on_stale)
    except Exception as err:  # noqa: BLE001 - bad URL, unreachable server, missing driver
        raise FtsearchError(f"cannot open Optuna storage {url!r}: {str(err).splitlines()[0]}") from None


def _rdb_storage(url: str, interval: int, on_stale: StaleCallback | None) -> BaseStorage:
    def connect() -> BaseStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=interval,
                grace_period=2 * interval,
                heartbeat_stale_trial_callback=on_stale,
                # SQLite waits for a busy database instead of failing at once.
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else None,
            )

    # Workers starting together on an empty database race to create its tables: the loser sees
    # a duplicate-object error, and the tables exist when it tries again.
    if url.startswith(("postgresql", "mysql")):
        for attempt in range(2):
            try:
                return connect()
            except Exception:  # noqa: BLE001 - the last attempt below raises what is wrong
                time.sleep(1 + attempt)
    return connect()


def names_in(storage: BaseStorage) -> list[str]:
    """Names of the studies in an open storage."""
    return [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]


def open_existing(url: str | None = None) -> BaseStorage | None:
    """The storage at ``url``, or None when it is a local file that does not exist yet (opening it
    would create it)."""
    url = settings.optuna_storage_url(url)
    if is_journal(url):
        local = Path(url)
    elif url.startswith("sqlite:///"):
        local = Path(url.removeprefix("sqlite:///"))
    else:
        local = None
    return None if local is not None and not local.exists() else open_storage(url)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the running trials whose worker stopped beating (and run the stale callback on each)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
