"""Many machines, for real: PostgreSQL for Optuna and an `mlflow server` on 127.0.0.1, a search
process and two workers as separate processes joining one study through them.

PostgreSQL comes from Debian's packages when missing. Where it cannot be installed the test is
skipped with the reason, except under ``FTSEARCH_REQUIRE_POSTGRES=1`` (CI), where it fails.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from ftsearch.generations import RUN_ID_ATTR, WORKER_ATTR
from tests.helpers import PARENT

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(reason: str):
    if os.environ.get("FTSEARCH_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required here (FTSEARCH_REQUIRE_POSTGRES=1) but {reason}")
    print(f"skipping: {reason}")
    pytest.skip(reason)


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def _install_postgres() -> None:
    as_root = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "-q", "postgresql"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "postgresql"]):
        done = subprocess.run(as_root + command, check=False, env=env, capture_output=True, text=True)
        if done.returncode == 0 and command[1] == "install":
            return
    _unavailable(f"PostgreSQL could not be installed with apt-get: {done.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A throwaway PostgreSQL server on 127.0.0.1 (trust auth); yields its base URL."""
    if _postgres_bin() is None:
        _install_postgres()
    bin_dir = _postgres_bin()
    if bin_dir is None:
        _unavailable("apt-get reported success but pg_ctl is not under /usr/lib/postgresql")
    root = tmp_path_factory.mktemp("postgres")
    data, port = root / "data", _free_port()
    # PostgreSQL refuses to run as root: as root, run it as the `postgres` user Debian creates.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
        os.chmod(root, 0o755)
        for parent in root.parents:  # the server must reach its data directory
            if parent != Path("/"):
                os.chmod(parent, os.stat(parent).st_mode | 0o011)
    subprocess.run(as_user + [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    started = subprocess.run(
        as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                   f"-h 127.0.0.1 -p {port} -k {root}", "start"],
        check=False, capture_output=True, text=True,
    )
    if started.returncode != 0:
        _unavailable(f"PostgreSQL did not start: {started.stderr.strip()} {(root / 'log').read_text()[-500:]}")
    base = f"postgresql://postgres@127.0.0.1:{port}"
    for db in ("optuna", "mlflow"):
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db], check=True)
    yield base
    subprocess.run(as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], check=False, capture_output=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` on PostgreSQL, serving artifacts itself, as on a shared host."""
    artifacts, port = tmp_path_factory.mktemp("mlflow-artifacts"), _free_port()
    log = artifacts.parent / "mlflow-server.log"
    with log.open("w") as sink:  # the child keeps its own descriptor
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{postgres}/mlflow",
             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=sink, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(30)


def test_three_processes_on_postgres_and_an_mlflow_server_run_one_study(postgres, mlflow_server, write_study, tmp_path):
    storage_url = f"{postgres}/optuna"
    path = write_study(n_trials=6, **{"search.epochs": {"low": 2, "high": 2}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "FTSEARCH_STATE_DIR": str(tmp_path / "host-a"),
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

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
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
