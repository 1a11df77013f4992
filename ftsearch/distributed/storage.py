"""Optuna storages that several worker processes can share, with heartbeats on running trials.

On one machine the default is a journal file: Optuna recommends it over SQLite for several
processes (appends under a file lock, so no "database is locked" when workers write at once).
Across machines, an RDB URL (PostgreSQL, MySQL). Both beat a heartbeat for each running trial,
so the trial of a worker that died (SIGKILL, preemption, lost host) is failed and retried. A
database that goes away (restarted, failed over, its connections cut) is waited for: every
storage call is retried until it is back, up to ``$FTSEARCH_STORAGE_OUTAGE_SECONDS``.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import tenacity
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import exc as sql_errors

from ftsearch import settings
from ftsearch.distributed.journal import TornTail, TornTailJournalBackend
from ftsearch.distributed.optuna_private import HeartbeatMixin
from ftsearch.errors import FtsearchError
from ftsearch.formatting import first_line

HEARTBEAT_ENV = "FTSEARCH_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 30
HEARTBEAT_ATTR = "ftsearch:heartbeat"
OUTAGE_ENV = "FTSEARCH_STORAGE_OUTAGE_SECONDS"
DEFAULT_OUTAGE_SECONDS = 600
RECONNECT_WAIT_MAX = 5.0  # the longest pause between two attempts to reach the database

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def _whole_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise FtsearchError(f"${name} must be a whole number of seconds, at least 1; got {raw!r}")
    return value


def heartbeat_seconds() -> int:
    """Seconds between heartbeats: ``$FTSEARCH_HEARTBEAT_SECONDS`` (default 30). A trial whose
    worker missed two heartbeats is failed."""
    return _whole_seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_SECONDS)


def outage_seconds() -> int:
    """How long a storage call waits for a database that went away: ``$FTSEARCH_STORAGE_OUTAGE_SECONDS``
    (default 600); then the call fails with the database's error."""
    return _whole_seconds(OUTAGE_ENV, DEFAULT_OUTAGE_SECONDS)


_last_trouble = -math.inf  # when this process last found the storage slow, failing or just back


def note_trouble(when: float) -> None:
    """Record (``time.monotonic()``) that the storage was slow, failing or just came back."""
    global _last_trouble
    _last_trouble = max(_last_trouble, when)


def seconds_since_trouble() -> float:
    """Seconds since this process last found the storage slow, failing or just back (inf: never)."""
    return time.monotonic() - _last_trouble


def _unwrapped(err: BaseException) -> BaseException:
    """The database's own error behind Optuna's ``StorageInternalError`` (whose text blames the data)."""
    if isinstance(err, optuna.exceptions.StorageInternalError) and err.__cause__ is not None:
        return err.__cause__
    return err


def is_unreachable(err: BaseException) -> bool:
    """Whether ``err`` says the database could not be reached (down, restarting, its connection
    cut), rather than that it refused a statement. Optuna wraps what fails inside a session in
    ``StorageInternalError``."""
    err = _unwrapped(err)
    if isinstance(err, sql_errors.DBAPIError) and err.connection_invalidated:
        return True
    return isinstance(err, (sql_errors.OperationalError, sql_errors.InterfaceError))


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
        # A writer killed mid-write leaves an unfinished last line: it is cut off (and kept) when
        # the journal is opened and before every append, so no record is appended onto it.
        super().__init__(TornTailJournalBackend(path, FlockLock(path), _warn_torn_tail))
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


def _warn_torn_tail(torn: TornTail) -> None:
    print(f"warning: {torn}", file=sys.stderr, flush=True)


def open_storage(url: str | None = None, on_stale: StaleCallback | None = None) -> BaseStorage:
    """The storage at ``url`` (a journal file path, or a database URL), default the local journal.

    ``on_stale`` is called for each trial found dead (no heartbeat for two intervals)."""
    url = settings.optuna_storage_url(url)
    interval = heartbeat_seconds()
    try:
        if is_journal(url):
            return HeartbeatJournalStorage(Path(url), interval, on_stale)
        return _rdb_storage(url, interval, on_stale)
    except FtsearchError:
        raise  # a damaged journal: its message names the line and the repair command
    except Exception as err:  # noqa: BLE001 - bad URL, unreachable server, missing driver
        raise FtsearchError(f"cannot open Optuna storage {url!r}: {str(err).splitlines()[0]}") from None


class _Outage:
    """What one thread says of a database outage: a warning when it starts, a line when it ends."""

    def __init__(self):
        self.since: float | None = None

    def failed(self, state: tenacity.RetryCallState) -> None:
        note_trouble(time.monotonic())
        if self.since is None:
            self.since = time.monotonic()
            print(f"warning: the Optuna database is unreachable ({first_line(_unwrapped(state.outcome.exception()))[:300]}); retrying for up to {outage_seconds()} s "
                  f"(${OUTAGE_ENV})", file=sys.stderr, flush=True)

    def over(self) -> None:
        if self.since is not None:
            note_trouble(time.monotonic())  # the others may still be reconnecting: judge no one yet
            print(f"the Optuna database is back after {time.monotonic() - self.since:.0f} s", file=sys.stderr, flush=True)
            self.since = None


_calls = threading.local()


def _reconnecting(method: Callable) -> Callable:
    """``method``, retried with backoff while the database is unreachable. Only the outermost
    storage call of a thread retries (the calls it makes inside pass errors up to it), so an
    outage is waited for once, not once per nesting level."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if getattr(_calls, "inside", False) or not self.waits_for_outages:
            return method(self, *args, **kwargs)
        outage = _Outage()
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_unreachable),
            wait=tenacity.wait_exponential_jitter(initial=0.5, max=RECONNECT_WAIT_MAX),
            stop=tenacity.stop_after_delay(outage_seconds()),
            before_sleep=outage.failed,
            reraise=True,
        )
        _calls.inside = True
        try:
            result = retrying(method, self, *args, **kwargs)
        finally:
            _calls.inside = False
        outage.over()
        return result

    return call


class ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, waiting out a database that went away instead of failing the trial
    that happened to touch it: every method is retried while the database is unreachable
    (connections are checked before use, ``pool_pre_ping``, so a restart's dead connections are
    replaced). A write whose commit reached the database but whose answer was lost is sent again;
    Optuna's writes then either repeat harmlessly or are refused as already done.

    A database that cannot be reached when the storage is opened is an error at once: that is a
    wrong URL or a server not started, not an outage."""

    waits_for_outages = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.waits_for_outages = True


def _wrap_every_method(cls: type) -> None:
    # Every method Optuna's own layers call, private ones included (its cache calls
    # ``_create_new_trial`` and the like): found, not listed, so a new one is covered too.
    for base in cls.__mro__[1:]:
        for name, member in vars(base).items():
            if inspect.isfunction(member) and not name.startswith("__") and name not in vars(cls):
                setattr(cls, name, _reconnecting(getattr(optuna.storages.RDBStorage, name)))


_wrap_every_method(ReconnectingRDBStorage)


def _rdb_storage(url: str, interval: int, on_stale: StaleCallback | None) -> BaseStorage:
    def connect() -> BaseStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            if url.startswith("sqlite:"):
                # SQLite waits for a busy database instead of failing at once; a local file does not go away.
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=interval, grace_period=2 * interval,
                    heartbeat_stale_trial_callback=on_stale, engine_kwargs={"connect_args": {"timeout": 60}},
                )
            return ReconnectingRDBStorage(
                url, heartbeat_interval=interval, grace_period=2 * interval,
                heartbeat_stale_trial_callback=on_stale, engine_kwargs={"pool_pre_ping": True},
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
    """Fail the running trials whose worker stopped beating (and run the stale callback on each).
    Nobody is judged while the database is away: that is noted, and the next call judges."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            optuna.storages.fail_stale_trials(study)
        except Exception as err:
            if not is_unreachable(err):
                raise
            note_trouble(time.monotonic())
