"""Waiting out a database that went away, without a real server: connection errors injected
into the SQL a real (SQLite) storage runs. The real PostgreSQL restart is in test_outages.py."""

from __future__ import annotations

import time
from concurrent.futures import Future

import optuna
import pytest
from mlflow.utils.async_logging.run_operations import RunOperations
from sqlalchemy import event
from sqlalchemy import exc as sql_errors

from ftsearch import tracking
from ftsearch.distributed import storage, worker


@pytest.fixture
def rdb(tmp_path, monkeypatch):
    """A reconnecting storage on SQLite, and ``fail(n, error)``: the next ``n`` statements raise."""
    db = storage.ReconnectingRDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(study_name="s", storage=db)
    armed = {"left": 0, "error": None, "statements": 0}

    def before(conn, cursor, statement, parameters, context, executemany):
        armed["statements"] += 1
        if armed["left"] > 0:
            armed["left"] -= 1
            raise armed["error"]

    event.listen(db.engine, "before_cursor_execute", before)

    def fail(n: int, error: Exception) -> dict:
        armed.update(left=n, error=error, statements=0)
        return armed

    monkeypatch.setattr(storage, "_last_trouble", float("-inf"))
    return db, fail


def refused() -> Exception:
    return sql_errors.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def test_a_call_that_meets_a_lost_connection_is_retried_until_the_database_is_back(rdb, capsys):
    db, fail = rdb
    fail(3, refused())
    assert [s.study_name for s in db.get_all_studies()] == ["s"]
    err = capsys.readouterr().err
    assert err.count("the Optuna database is unreachable") == 1  # one warning per outage, not per attempt
    assert "the Optuna database is back after" in err
    assert storage.seconds_since_trouble() < 5  # just back: nobody may be judged yet


def test_a_statement_the_database_refuses_is_not_retried(rdb):
    db, fail = rdb
    armed = fail(1, sql_errors.IntegrityError("INSERT", {}, ValueError("duplicate key")))
    with pytest.raises((sql_errors.IntegrityError, optuna.exceptions.StorageInternalError)):
        db.get_all_studies()
    assert armed["statements"] == 1


def test_an_outage_longer_than_the_limit_fails_with_the_databases_error(rdb, monkeypatch):
    db, fail = rdb
    monkeypatch.setenv(storage.OUTAGE_ENV, "1")
    fail(10**6, refused())
    start = time.monotonic()
    with pytest.raises((sql_errors.OperationalError, optuna.exceptions.StorageInternalError)) as raised:
        db.get_all_studies()
    assert 1 <= time.monotonic() - start < 10
    assert storage.is_unreachable(raised.value)


def test_nobody_is_judged_dead_right_after_the_storage_was_away(monkeypatch):
    judged = []
    monkeypatch.setattr(storage, "fail_stale_trials", lambda study: judged.append(study))
    monkeypatch.setenv(storage.HEARTBEAT_ENV, "1")
    storage.note_trouble(time.monotonic())
    worker.judge("study")
    assert judged == []
    monkeypatch.setattr(storage, "_last_trouble", time.monotonic() - 2 * 1 - storage.RECONNECT_WAIT_MAX - 0.1)
    worker.judge("study")
    assert judged == ["study"]


def test_the_reconnecting_storage_is_used_for_database_servers_only(tmp_path):
    assert type(storage.open_storage(f"sqlite:///{tmp_path / 'o.db'}")) is optuna.storages.RDBStorage
    assert isinstance(storage.open_storage(str(tmp_path / "o.journal")), storage.HeartbeatJournalStorage)


def test_metrics_the_background_sender_gave_up_on_are_sent_again_and_stored_once():
    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id(client, "e")).info.run_id
    real = client.log_batch
    sent_in_background = []

    def log_batch(run_id, metrics=(), params=(), tags=(), synchronous=None):
        if synchronous is False:  # the first batch's retries "ran out"; the second one arrives
            if not sent_in_background:
                sent_in_background.append(metrics)
                gave_up = Future()
                gave_up.set_exception(ConnectionError("Max retries exceeded"))
                return RunOperations([gave_up])
            return real(run_id, metrics=metrics, synchronous=False)
        return real(run_id, metrics=metrics, params=params, tags=tags)

    client.log_batch = log_batch
    run = tracking.TrialRun(client, run_id)
    run.log_metrics({"val_accuracy": 0.5}, step=1)
    run.log_metrics({"val_accuracy": 0.75}, step=2)
    run.finish("COMPLETE")
    history = client.get_metric_history(run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.75)]
    assert client.get_run(run_id).info.status == "FINISHED"
