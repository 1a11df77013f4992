"""Real servers for the distributed tests: PostgreSQL and `mlflow server` on 127.0.0.1, each
stoppable and restartable on the same port (the outage tests take them away mid-study).

PostgreSQL comes from Debian's packages when missing. Where it cannot be installed the tests that
need it are skipped with the reason, except under ``FTSEARCH_REQUIRE_POSTGRES=1`` (CI), where
they fail.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port, stop


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


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1 (trust auth) with databases ``optuna`` and
    ``mlflow``; ``url`` is its base URL."""

    def __init__(self, root: Path):
        if _postgres_bin() is None:
            _install_postgres()
        self.bin = _postgres_bin()
        if self.bin is None:
            _unavailable("apt-get reported success but pg_ctl is not under /usr/lib/postgresql")
        self.root, self.data, self.port = root, root / "data", free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"
        # PostgreSQL refuses to run as root: as root, run it as the `postgres` user Debian creates.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(root, "postgres")
            os.chmod(root, 0o755)
        subprocess.run(self.as_user + [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True)
        self.start()
        for db in ("optuna", "mlflow"):
            subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", db],
                           check=True)

    def start(self) -> None:
        """Start the server (again); nothing to do when it runs."""
        status = subprocess.run(self.as_user + [str(self.bin / "pg_ctl"), "-D", str(self.data), "status"],
                                check=False, capture_output=True)
        if status.returncode == 0:
            return
        started = subprocess.run(
            self.as_user + [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o",
                            f"-h 127.0.0.1 -p {self.port} -k {self.root}", "start"],
            check=False, capture_output=True, text=True,
        )
        if started.returncode != 0:
            _unavailable(f"PostgreSQL did not start: {started.stderr.strip()} {(self.root / 'log').read_text()[-500:]}")

    def stop(self) -> None:
        """Stop at once (``-m immediate``), cutting every connection, as a crash or a failover would."""
        subprocess.run(self.as_user + [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                       check=False, capture_output=True)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server for the module's tests. Its data lives outside pytest's temporary
    folders: pytest makes those private to root whenever a run starts, and the server (run as
    ``postgres`` under root) must still reach its data when it is restarted."""
    root = Path(tempfile.mkdtemp(prefix="ftsearch-postgres-"))
    try:
        server = Postgres(root)
        yield server
        server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` serving its artifacts itself, as on a shared host; ``url`` stays the same
    across ``stop`` and ``start``."""

    def __init__(self, backend: str, artifacts: Path, log: Path):
        self.backend, self.artifacts, self.log = backend, artifacts, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("a") as sink:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                 "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"],
                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                stop(self.process)
                pytest.fail(f"mlflow server did not come up: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` on PostgreSQL, for the module's tests."""
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    server = MlflowServer(f"{postgres.url}/mlflow", artifacts, artifacts.parent / "mlflow-server.log")
    yield server
    server.stop()
