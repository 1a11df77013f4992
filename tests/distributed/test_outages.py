"""The services a search depends on, taken away mid-study and brought back: the MLflow tracking
server and the PostgreSQL database. Nothing may be lost, duplicated or left RUNNING."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from ftsearch.distributed import storage
from ftsearch.generations import RETRY_OF_ATTR, RUN_ID_ATTR
from tests.distributed.conftest import MlflowServer
from tests.helpers import PARENT, optuna_study

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
OUTAGE_SECONDS = 30


def _epochs_reported(name: str, storage_url: str | None = None) -> int:
    """Epochs the study's trials have reported to Optuna so far (0 before the study exists)."""
    try:
        if storage_url is None:
            trials = optuna_study(name).get_trials(deepcopy=False)
        else:
            trials = optuna.load_study(study_name=name, storage=storage_url).get_trials(deepcopy=False)
    except (KeyError, ValueError):
        return 0
    return sum(len(t.intermediate_values) for t in trials)


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the search ended or stalled before the outage: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_a_tracking_server_restarted_mid_study_loses_no_metric(write_study, tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path / "mlflow.log")
    n_trials, epochs = 3, 40  # trials of several seconds: the outage falls inside one
    path = write_study(n_trials=n_trials, **{"search.epochs": {"low": epochs, "high": epochs}})
    log = tmp_path / "search.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "OMP_NUM_THREADS": "1"}
    try:
        with log.open("w") as sink:
            search = subprocess.Popen([sys.executable, "-m", "ftsearch.cli", "search", str(path)], cwd=ROOT, env=env,
                                      stdout=sink, stderr=subprocess.STDOUT)
        _wait_for(lambda: _epochs_reported("tiny") >= 1, search, log)
        before = _epochs_reported("tiny")
        server.stop()
        time.sleep(OUTAGE_SECONDS)
        during = _epochs_reported("tiny") - before
        server.start()
        search.wait(timeout=600)
        output = log.read_text()
        assert search.returncode == 0, output[-4000:]
        print(f"{during} epoch(s) trained during the {OUTAGE_SECONDS} s outage")
        print("\n".join(line for line in output.splitlines() if "warn" in line.lower() or "retry" in line.lower())[:3000])
        assert during >= 5, output[-4000:]  # training went on while the server was away

        trials = optuna_study("tiny").get_trials(deepcopy=False)
        assert sorted(t.number for t in trials) == list(range(n_trials))
        assert all(t.state == TrialState.COMPLETE for t in trials)
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("tiny")
        everything = client.search_runs([experiment.experiment_id], max_results=100)
        assert all(r.info.status == "FINISHED" for r in everything), [(r.info.run_name, r.info.status) for r in everything]
        children = [r for r in everything if PARENT in r.data.tags]
        assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs[RUN_ID_ATTR] for t in trials)
        for trial in trials:
            run_id = trial.user_attrs[RUN_ID_ATTR]
            for key in ("val_accuracy", "train_loss"):
                steps = [m.step for m in client.get_metric_history(run_id, key)]
                assert sorted(steps) == list(range(1, epochs + 1)), (trial.number, key, steps)  # each epoch once
            values = {m.step: m.value for m in client.get_metric_history(run_id, "val_accuracy")}
            assert values == {step: pytest.approx(v) for step, v in trial.intermediate_values.items()}
            tags = client.get_run(run_id).data.tags
            assert tags["ftsearch.state"] == "COMPLETE"
    finally:
        if search.poll() is None:
            search.kill()
        server.stop()


def test_a_database_restarted_mid_study_loses_no_trial_and_judges_no_live_one_dead(postgres, write_study, tmp_path):
    # Three processes on one PostgreSQL database, beating every 5 s: the 30 s outage is 6 beats
    # that none of them could send, so a worker that judged by the beats alone would fail every
    # running trial when the database came back. (Not shorter: a loaded 2-core machine can hold a
    # heartbeat thread back for seconds.)
    tracking_server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path / "mlflow.log")
    storage_url = f"{postgres.url}/optuna"
    n_trials, epochs = 6, 30
    path = write_study(n_trials=n_trials, **{"search.epochs": {"low": epochs, "high": epochs}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server.url, "OMP_NUM_THREADS": "1", storage.HEARTBEAT_ENV: "5"}
    logs = [tmp_path / f"{name}.log" for name in ("search", "worker-b", "worker-c")]
    commands = [["search", str(path), "--storage", storage_url]] + [["worker", str(path), "--storage", storage_url]] * 2
    processes = []
    try:
        for log, command in zip(logs, commands, strict=True):
            with log.open("w") as sink:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "ftsearch.cli", *command], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                    env={**env, "FTSEARCH_STATE_DIR": str(tmp_path / f"state-{log.stem}")},
                ))
        _wait_for(lambda: _epochs_reported("tiny", storage_url) >= 3, processes[0], logs[0])
        postgres.stop()
        time.sleep(OUTAGE_SECONDS)
        postgres.start()
        for process in processes:
            process.wait(timeout=600)
        outputs = [log.read_text() for log in logs]
        for process, output in zip(processes, outputs, strict=True):
            assert process.returncode == 0, output[-4000:]
        assert any("the Optuna database is back after" in output for output in outputs)

        trials = optuna.load_study(study_name="tiny", storage=storage_url).get_trials(deepcopy=False)
        assert sorted(t.number for t in trials) == list(range(n_trials)), [(t.number, t.state) for t in trials]
        assert all(t.state == TrialState.COMPLETE for t in trials)
        assert not any(RETRY_OF_ATTR in t.user_attrs for t in trials)  # none judged dead, none run twice
        assert all(len(t.intermediate_values) == epochs for t in trials)
        client = MlflowClient(tracking_server.url)
        everything = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], max_results=100)
        assert all(r.info.status == "FINISHED" for r in everything)
        children = [r for r in everything if PARENT in r.data.tags]
        assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs[RUN_ID_ATTR] for t in trials)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        tracking_server.stop()
        postgres.start()  # for the module's other tests, if the outage was cut short
