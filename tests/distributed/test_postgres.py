"""Many machines, for real: PostgreSQL for Optuna and an `mlflow server` on 127.0.0.1 (the
fixtures in conftest.py), a search process and two workers as separate processes joining one
study through them."""

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

from ftsearch.generations import RUN_ID_ATTR, WORKER_ATTR
from tests.helpers import PARENT

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_three_processes_on_postgres_and_an_mlflow_server_run_one_study(postgres, mlflow_server, write_study, tmp_path):
    storage_url = f"{postgres.url}/optuna"
    path = write_study(n_trials=6, **{"search.epochs": {"low": 2, "high": 2}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "FTSEARCH_STATE_DIR": str(tmp_path / "host-a"),
           "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    search = subprocess.Popen([sys.executable, "-m", "ftsearch.cli", "search", str(path), "--storage", storage_url],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The workers act as other hosts: their own state directories, only the servers shared.
    workers = [
        subprocess.Popen([sys.executable, "-m", "ftsearch.cli", "worker", str(path), "--storage", storage_url],
                         cwd=ROOT, env={**env, "FTSEARCH_STATE_DIR": str(tmp_path / f"host-{name}")},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name in ("b", "c")
    ]
    outputs = [p.communicate(timeout=900)[0] for p in (search, *workers)]
    wall = time.monotonic() - start
    for process, output in zip((search, *workers), outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        assert "View run" not in output  # ftsearch says where runs are; MLflow's links are noise

    study = optuna.load_study(study_name="tiny", storage=storage_url)
    trials = study.trials
    print(f"3 processes on PostgreSQL: {len(trials)} trials in {wall:.0f} s")
    assert sorted(t.number for t in trials) == list(range(6))  # no duplicate, none missing
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs[WORKER_ATTR] for t in trials}) >= 2

    client = MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("tiny")
    everything = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in everything if PARENT not in r.data.tags]
    children = [r for r in everything if PARENT in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs[RUN_ID_ATTR] for t in trials)
    assert all(r.info.status == "FINISHED" and r.data.tags[PARENT] == parents[0].info.run_id for r in children)

    version = client.get_model_version_by_alias("tiny-sentiment", "candidate")
    assert version.tags["trial_number"] == str(study.best_trial.number)
    # Reachable through the server: the weights come back over HTTP and predict.
    predict = subprocess.run(
        [sys.executable, "-m", "ftsearch.cli", "predict", "models:/tiny-sentiment@candidate", "a great film"],
        cwd=ROOT, env={**env, "FTSEARCH_STATE_DIR": str(tmp_path / "host-d")}, check=False, capture_output=True, text=True,
    )
    assert predict.returncode == 0, predict.stderr[-2000:]
    assert predict.stdout.split("\t")[0] in ("neg", "pos")
