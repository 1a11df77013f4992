"""Tracking under load: many worker processes, PostgreSQL and an ``mlflow server`` on one machine.

Starts a throwaway PostgreSQL (``initdb`` in a temporary folder, a free port, databases ``optuna``
and ``mlflow``), an ``mlflow server`` backed by it (``--workers 2``, artifacts served), and then
runs two phases against them, each ``--workers`` local processes with ``OMP_NUM_THREADS=1`` and
their own ``FTSEARCH_STATE_DIR`` (as on separate hosts):

* **phase 1, ``ftsearch``**: a real study (the tests' tiny random BERT and synthetic reviews, many
  trials of 1-2 short epochs) run as one ``ftsearch search STUDY --storage postgresql://...`` and
  ``--workers - 1`` ``ftsearch worker STUDY --storage ...`` processes with ``--timeout`` =
  ``--minutes``: ftsearch's own code end to end (per-epoch metrics, params, tags, artifacts,
  figures, weights uploads, registration at the end).
* **phase 2, ``steps``**: ftsearch logs metrics per epoch, not per step; here each process runs
  short trials of the same tiny BERT for ``--step-minutes``, with a real training step per step,
  and logs three metrics *per step* through ftsearch's own ``tracking.StudyRun.start_trial`` /
  ``TrialRun.log_metrics`` (``MlflowClient.log_batch(synchronous=False)``) / ``TrialRun.finish``.

Every process runs its command through a small wrapper (``python -m bench.tracking_load _ftsearch
...`` calls ``ftsearch.cli.main``) that counts each ``MlflowClient`` call (outermost only), times
it, notes every exception it raised and keeps a ledger of every metric it sent; the ledger is
written to a JSON file per process. Afterwards the benchmark checks, for every metric in every
ledger, that the row is in PostgreSQL's ``metrics`` table (and, for a sample of runs, that
``MlflowClient.get_metric_history`` through the server returns it), counts the server's requests
from its access log, rows per table before and after each phase, Optuna trials by state, MLflow
runs by status, and scans every log for errors and tracebacks.

By default the processes run a copy of the working tree taken at the start (``ftsearch/``,
``tests/helpers.py``, the distributed tests' conftest, this file), so edits made while it runs do
not leak in; ``--source head`` runs ``git rev-parse HEAD`` instead. As root on Debian (PostgreSQL is installed with apt-get when
missing and run as the ``postgres`` user):

    .venv/bin/python -m bench.tracking_load [--minutes 10] [--workers 8] [--step-minutes M]

Raw results: ``bench/results/tracking-load-<timestamp>.json``; a summary table on stdout.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import datetime as dt
import functools
import glob
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tests.distributed import conftest
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
STUDY = "load"
STEPS_EXPERIMENT = "load-steps"
ACCESS = re.compile(r'^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) .*?"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')
TEST_FILES = ("tests/helpers.py", "tests/distributed/conftest.py")  # what the processes import from tests/
SUSPECT = re.compile(r"error|traceback|exception", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Inside each worker process: the ledger of MlflowClient calls and metrics sent.
# --------------------------------------------------------------------------------------------
class Ledger:
    """Counts and times every outermost ``MlflowClient`` method call in this process, records the
    exceptions they raised and every metric handed to ``log_batch`` / ``log_metric``; written
    as JSON to ``path`` when the process exits."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.local = threading.local()
        self.calls: collections.Counter = collections.Counter()
        self.durations: dict[str, list[float]] = collections.defaultdict(list)
        self.errors: list[dict] = []
        self.metrics: list[list] = []  # [run_id, key, step, value, timestamp or None, how]
        self.async_sent: set = set()
        self.resent = 0  # metrics sent again synchronously after their asynchronous batch failed
        self.trials: list[dict] = []
        self.started = time.time()

    def install(self) -> None:
        from mlflow import MlflowClient

        for name, fn in list(vars(MlflowClient).items()):
            if not name.startswith("_") and inspect.isfunction(fn):
                setattr(MlflowClient, name, self._wrap(name, fn))
        atexit.register(self.write)

    def _wrap(self, name: str, fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if getattr(self.local, "depth", 0):
                return fn(*args, **kwargs)
            self.local.depth = 1
            start = time.perf_counter()
            try:
                if name in ("log_batch", "log_metric"):
                    self._record(name, signature.bind(*args, **kwargs).arguments)
                return fn(*args, **kwargs)
            except BaseException as err:
                with self.lock:
                    self.errors.append({"method": name, "time": time.time(),
                                        "error": f"{type(err).__name__}: {err}"[:1000]})
                raise
            finally:
                self.local.depth = 0
                with self.lock:
                    self.calls[name] += 1
                    self.durations[name].append(time.perf_counter() - start)

        return wrapper

    def _record(self, name: str, arguments: dict) -> None:
        run_id = arguments["run_id"]
        asynchronous = bool(arguments.get("synchronous") is False)
        with self.lock:
            if name == "log_metric":
                step = arguments.get("step") or 0
                self.metrics.append([run_id, arguments["key"], step, float(arguments["value"]),
                                     arguments.get("timestamp"), "log_metric"])
                return
            for m in arguments.get("metrics") or ():
                ident = (run_id, m.key, m.step, m.timestamp)
                if asynchronous:
                    self.async_sent.add(ident)
                elif ident in self.async_sent:
                    self.resent += 1
                self.metrics.append([run_id, m.key, m.step, m.value, m.timestamp,
                                     "log_batch async" if asynchronous else "log_batch"])

    def write(self) -> None:
        with self.lock:
            timing = {name: _quantiles(values) for name, values in self.durations.items()}
            data = {"pid": os.getpid(), "started": self.started, "ended": time.time(),
                    "calls": dict(self.calls), "call_seconds": timing, "errors": self.errors,
                    "resent_metrics": self.resent, "trials": self.trials, "metrics": self.metrics}
        self.path.write_text(json.dumps(data))


def _quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"n": len(ordered), "total_s": round(sum(ordered), 3), "p50_ms": round(pick(0.5) * 1000, 2),
            "p95_ms": round(pick(0.95) * 1000, 2), "max_ms": round(ordered[-1] * 1000, 2)}


def _agent_ftsearch(argv: list[str]) -> int:
    """``_ftsearch LEDGER ARGS...``: ``ftsearch ARGS...`` with the ledger on."""
    ledger = Ledger(Path(argv[0]))
    ledger.install()
    import ftsearch
    from ftsearch.cli import main

    print(f"[load] ftsearch from {Path(ftsearch.__file__).parent}", flush=True)
    return main(argv[1:])


def _agent_prepare(argv: list[str]) -> int:
    """``_prepare DIR TRAIN_ROWS N_TRIALS``: the tiny BERT, the reviews and the study file."""
    import yaml

    from tests.helpers import build_tiny_bert, make_reviews, tiny_study

    folder, train_rows, n_trials = Path(argv[0]), int(argv[1]), int(argv[2])
    bert = build_tiny_bert(folder / "tiny-bert")
    reviews = {"train": folder / "train.csv", "test": folder / "test.csv"}
    make_reviews(train_rows, seed=1).to_csv(reviews["train"], index=False)
    make_reviews(40, seed=2).to_csv(reviews["test"], index=False)
    study = tiny_study(bert, reviews, n_trials=n_trials, name=STUDY, registered_model="load-sentiment",
                       **{"search.epochs": {"low": 1, "high": 2}})
    path = folder / f"{STUDY}.yaml"
    path.write_text(yaml.safe_dump(study))
    print(json.dumps({"study": str(path), "bert": str(bert), "train": str(reviews["train"]), "config": study}))
    return 0


def _agent_steps(argv: list[str]) -> int:
    """``_steps LEDGER PARENT_RUN INDEX SECONDS STEPS BERT TRAIN_CSV``: short trials of the tiny BERT
    that log train_loss, lr and grad_norm every step through ftsearch's TrialRun; a new trial
    starts only before SECONDS have passed."""
    ledger = Ledger(Path(argv[0]))
    ledger.install()
    parent_run, index, seconds, steps, bert, train_csv = argv[1], int(argv[2]), float(argv[3]), int(argv[4]), argv[5], argv[6]
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, BertTokenizer
    from transformers.utils import logging as hf_logging

    import ftsearch
    from ftsearch import tracking

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    print(f"[load] ftsearch from {Path(ftsearch.__file__).parent}", flush=True)
    data = pd.read_csv(train_csv)
    tokenizer = BertTokenizer.from_pretrained(bert)
    encoded = tokenizer(list(data["review"]), padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor((data["sentiment"] == "pos").astype(int).to_numpy())
    parent = tracking.StudyRun.attach(STEPS_EXPERIMENT, parent_run)
    deadline = time.monotonic() + seconds
    number = 0
    generator = torch.Generator().manual_seed(index)
    while time.monotonic() < deadline:
        trial_start = time.monotonic()
        torch.manual_seed(index * 100_000 + number)
        model = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
        lr = 5e-3
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
        run = parent.start_trial(index * 100_000 + number, tags={"load.worker": str(index)})
        run.log_params({"lr": lr, "steps": steps, "worker": index})
        for step in range(steps):
            rows = torch.randint(0, len(labels), (16,), generator=generator)
            out = model(input_ids=encoded["input_ids"][rows], attention_mask=encoded["attention_mask"][rows],
                        labels=labels[rows])
            out.loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            optimiser.step()
            optimiser.zero_grad()
            current = lr * (1 - step / steps)
            for group in optimiser.param_groups:
                group["lr"] = current
            run.log_metrics({"train_loss": out.loss.item(), "lr": current, "grad_norm": norm}, step=step)
        trained = time.monotonic()
        error = ""
        try:
            run.finish("COMPLETE")  # waits for every queued batch
        except tracking.TrackingError as err:
            # As ftsearch's trial runner does (trial.py _record_end): warn and go on with the next trial.
            error = f"{type(err).__name__}: {err}"[:500]
            print(f"warning: trial {number}: could not end its MLflow run {run.run_id} ({error[:300]})", flush=True)
        ended = time.monotonic()
        ledger.trials.append({"run_id": run.run_id, "steps": steps, "train_s": round(trained - trial_start, 3),
                              "finish_s": round(ended - trained, 3), "finish_error": error})
        number += 1
    print(f"[load] worker {index} ran {number} trial(s)", flush=True)
    return 0


AGENTS = {"_ftsearch": _agent_ftsearch, "_prepare": _agent_prepare, "_steps": _agent_steps}


# --------------------------------------------------------------------------------------------
# The servers.
# --------------------------------------------------------------------------------------------
class Postgres(conftest.Postgres):
    """The distributed tests' throwaway PostgreSQL (databases optuna and mlflow), queried here."""

    def __init__(self, root: Path):
        root.mkdir(parents=True)
        super().__init__(root)

    def version(self) -> str:
        return self.query("mlflow", "SHOW server_version")[0][0]

    def query(self, db: str, sql: str, params=None) -> list[tuple]:
        import psycopg

        with psycopg.connect(f"{self.url}/{db}", autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()


def kill_group(process: subprocess.Popen) -> None:
    """End a process this benchmark started and everything it started (its own session)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


class MlflowServer:
    def __init__(self, backend: str, root: Path, workers: int, extra_env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log, self.log = root / "mlflow-access.log", root / "mlflow-server.log"
        with self.access_log.open("w") as out, self.log.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                 "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", str(workers)],
                cwd=root, stdout=out, stderr=err, start_new_session=True, env={**os.environ, **extra_env})
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                if response.status == 200:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                kill_group(self.process)
                raise SystemExit(f"mlflow server did not come up: {self.log.read_text()[-3000:]}")
            time.sleep(0.5)


class Sampler(threading.Thread):
    """Every few seconds: load average, available memory, PostgreSQL connections per database,
    and how many other pytest processes run on the machine."""

    def __init__(self, postgres: Postgres, every: float = 5.0):
        super().__init__(daemon=True)
        self.postgres, self.every, self.samples = postgres, every, []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            sample = {"time": time.time(), "load1": os.getloadavg()[0], "mem_available_mb": _mem_available_mb(),
                      "pytest_processes": _pytest_processes()}
            try:
                rows = self.postgres.query("postgres", "SELECT datname, count(*) FROM pg_stat_activity "
                                                       "WHERE datname IS NOT NULL GROUP BY datname")
                sample["connections"] = {name: n for name, n in rows}
            except Exception as err:  # noqa: BLE001 - a sample lost is not a result lost
                sample["connections_error"] = str(err)[:300]
            self.samples.append(sample)

    def summary(self, start: float, end: float) -> dict:
        inside = [s for s in self.samples if start <= s["time"] <= end]
        if not inside:
            return {}
        conns = [sum(s.get("connections", {}).values()) for s in inside]
        return {"samples": len(inside), "load1_median": round(statistics.median(s["load1"] for s in inside), 2),
                "load1_max": round(max(s["load1"] for s in inside), 2),
                "mem_available_mb_min": min(s["mem_available_mb"] for s in inside),
                "pg_connections_max": max(conns),
                "pg_connections_max_by_db": {db: max(s.get("connections", {}).get(db, 0) for s in inside)
                                             for db in ("optuna", "mlflow")},
                "other_pytest_processes_max": max(s["pytest_processes"] for s in inside)}


def _mem_available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return -1


def _pytest_processes() -> int:
    count = 0
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"pytest" in Path(cmdline).read_bytes():
                count += 1
    return count


# --------------------------------------------------------------------------------------------
# The benchmark.
# --------------------------------------------------------------------------------------------
def snapshot(target: Path, source: str) -> dict:
    """Copy what the processes run (ftsearch/, TEST_FILES, bench/) into ``target``."""
    head = _git("rev-parse", "--short", "HEAD")
    if source == "head":
        archive = subprocess.run(["git", "archive", "HEAD", "ftsearch", *TEST_FILES, "pyproject.toml"],
                                 cwd=ROOT, check=True, capture_output=True).stdout
        target.mkdir(parents=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    else:
        listed = _git("ls-files", "-co", "--exclude-standard").splitlines()
        files = sorted(f for f in listed if f.startswith("ftsearch/") or f in (*TEST_FILES, "pyproject.toml"))
        for name in files:
            if (ROOT / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, target / name)
    (target / "bench").mkdir(parents=True, exist_ok=True)
    (target / "bench" / "__init__.py").write_text("")
    shutil.copy2(Path(__file__), target / "bench" / "tracking_load.py")
    digest = hashlib.sha256()
    for name in files:
        if (target / name).is_file():
            digest.update(name.encode() + b"\0" + (target / name).read_bytes())
    changed = [] if source == "head" else [
        line for line in _git("status", "--porcelain", "--", "ftsearch", *TEST_FILES, "pyproject.toml").splitlines()]
    return {"source": source, "commit": head, "uncommitted_changes_in_code_run": changed,
            "code_sha256": digest.hexdigest()}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def table_counts(pg: Postgres) -> dict:
    names = [r[0] for r in pg.query("mlflow", "SELECT table_name FROM information_schema.tables "
                                              "WHERE table_schema = 'public' ORDER BY table_name")]
    wanted = [n for n in names if n in ("metrics", "latest_metrics", "params", "tags", "runs", "experiments",
                                         "model_versions", "registered_models", "datasets", "inputs", "input_tags")]
    return {n: pg.query("mlflow", f'SELECT count(*) FROM "{n}"')[0][0] for n in wanted}


def spawn(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as sink:
        return subprocess.Popen([sys.executable, "-m", "bench.tracking_load", *args], cwd=cwd, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(processes: dict[str, subprocess.Popen], limit: float) -> dict[str, int | None]:
    deadline = time.monotonic() + limit
    codes = {}
    for name, process in processes.items():
        try:
            codes[name] = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_group(process)
            codes[name] = None  # did not end in time: killed
    return codes


WORKER_ENV: dict[str, str] = {}  # --worker-env


def base_env(server: MlflowServer) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MLFLOW_TRACKING_URI": server.url,
           "PYTHONUNBUFFERED": "1", **WORKER_ENV}
    env.pop("PYTHONPATH", None)
    return env


def _pairs(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {value!r}")
        out[key] = rest
    return out


def phase_ftsearch(args, pg: Postgres, server: MlflowServer, src: Path, prepared: dict, root: Path) -> dict:
    folder = root / "phase-ftsearch"
    folder.mkdir()
    storage = f"{pg.url}/optuna"
    timeout = str(args.minutes * 60)
    env = base_env(server)
    processes, logs = {}, {}
    before = table_counts(pg)
    start = time.time()
    for i in range(args.workers):
        name = "search" if i == 0 else f"worker-{i}"
        command = (["search", prepared["study"], "--storage", storage, "--timeout", timeout, "--quiet"] if i == 0 else
                   ["worker", prepared["study"], "--storage", storage, "--timeout", timeout, "--wait", "600", "--quiet"])
        logs[name] = folder / f"{name}.log"
        processes[name] = spawn(["_ftsearch", str(folder / f"{name}.ledger.json"), *command], src,
                                {**env, "FTSEARCH_STATE_DIR": str(folder / name / "mlruns")}, logs[name])
    codes = wait_all(processes, args.minutes * 60 + 1200)
    end = time.time()
    after = table_counts(pg)

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials = study.get_trials(deepcopy=False)
    states = collections.Counter(t.state.name for t in trials)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    window = None
    if finished:
        first = min(t.datetime_start for t in finished if t.datetime_start)
        last = max(t.datetime_complete for t in finished if t.datetime_complete)
        window = (last - first).total_seconds()
    per_process = collections.Counter(t.user_attrs.get("ftsearch.worker", "?") for t in finished)
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished]
    run_status = dict(pg.query("mlflow", "SELECT r.status, count(*) FROM runs r JOIN experiments e "
                                         "ON r.experiment_id = e.experiment_id WHERE e.name = %s GROUP BY r.status",
                               (STUDY,)))
    mismatched = []
    statuses = dict(pg.query("mlflow", "SELECT run_uuid, status FROM runs"))
    expected = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}
    for t in trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        if t.state.name in expected and (run_id is None or statuses.get(run_id) != expected[t.state.name]):
            mismatched.append({"trial": t.number, "state": t.state.name, "run_id": run_id,
                               "run_status": statuses.get(run_id)})
    summary_line = next((line for line in logs["search"].read_text().splitlines() if line.startswith("study ")), "")
    return {
        "start": start, "end": end, "wall_s": round(end - start, 1), "exit_codes": codes,
        "rows_before": before, "rows_after": after, "logs": {k: str(v) for k, v in logs.items()},
        "ledgers": [str(folder / f"{name}.ledger.json") for name in processes],
        "trials": {"states": dict(states), "finished": len(finished), "window_s": window,
                   "per_minute_window": round(len(finished) / window * 60, 2) if window else None,
                   "per_minute_wall": round(len(finished) / (end - start) * 60, 2),
                   "per_process": dict(per_process), "median_trial_s": round(statistics.median(durations), 2) if durations else None,
                   "retries": sum(1 for t in trials if "ftsearch.retry_of" in t.user_attrs)},
        "runs_by_status": run_status, "trial_run_mismatches": mismatched, "search_summary": summary_line,
    }


def phase_steps(args, pg: Postgres, server: MlflowServer, src: Path, prepared: dict, root: Path) -> dict:
    from mlflow import MlflowClient

    folder = root / "phase-steps"
    folder.mkdir()
    client = MlflowClient(server.url)
    experiment = client.create_experiment(STEPS_EXPERIMENT)
    parent = client.create_run(experiment, run_name=f"study-{STEPS_EXPERIMENT}",
                               tags={"ftsearch.study": STEPS_EXPERIMENT}).info.run_id
    env = base_env(server)
    processes, logs = {}, {}
    before = table_counts(pg)
    start = time.time()
    for i in range(args.workers):
        name = f"steps-{i}"
        logs[name] = folder / f"{name}.log"
        processes[name] = spawn(["_steps", str(folder / f"{name}.ledger.json"), parent, str(i),
                                 str(args.step_minutes * 60), str(args.steps_per_trial), prepared["bert"], prepared["train"]],
                                src, {**env, "FTSEARCH_STATE_DIR": str(folder / name / "mlruns")}, logs[name])
    codes = wait_all(processes, args.step_minutes * 60 + 900)
    end = time.time()
    after = table_counts(pg)
    client.set_terminated(parent, "FINISHED")
    run_status = dict(pg.query("mlflow", "SELECT r.status, count(*) FROM runs r JOIN experiments e "
                                         "ON r.experiment_id = e.experiment_id WHERE e.name = %s GROUP BY r.status",
                               (STEPS_EXPERIMENT,)))
    return {"start": start, "end": end, "wall_s": round(end - start, 1), "exit_codes": codes,
            "rows_before": before, "rows_after": after, "logs": {k: str(v) for k, v in logs.items()},
            "ledgers": [str(folder / f"{name}.ledger.json") for name in processes],
            "parent_run": parent, "runs_by_status": run_status}


def _value_key(value) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


def check_ledgers(phase: dict, pg: Postgres, server: MlflowServer, sample_runs: int) -> dict:
    """Client side: calls, errors, timings; then every metric in the ledgers against the store."""
    from mlflow import MlflowClient

    calls, errors, timings, trials = collections.Counter(), [], {}, []
    sent: set = set()
    sent_no_ts: set = set()
    resent = missing_ledgers = 0
    entries = 0
    for path in phase["ledgers"]:
        if not Path(path).exists():
            missing_ledgers += 1
            continue
        data = json.loads(Path(path).read_text())
        calls.update(data["calls"])
        errors += [{**e, "process": Path(path).name} for e in data["errors"]]
        resent += data["resent_metrics"]
        trials += data["trials"]
        for name, q in data["call_seconds"].items():
            timings.setdefault(name, []).append(q)
        for run_id, key, step, value, timestamp, _how in data["metrics"]:
            entries += 1
            if timestamp is None:
                sent_no_ts.add((run_id, key, int(step), _value_key(value)))
            else:
                sent.add((run_id, key, int(step), _value_key(value), int(timestamp)))
    run_ids = sorted({e[0] for e in sent} | {e[0] for e in sent_no_ts})
    stored: set = set()
    rows = pg.query("mlflow", "SELECT run_uuid, key, step, value, timestamp, is_nan FROM metrics WHERE run_uuid = ANY(%s)",
                    (run_ids,))
    for run_id, key, step, value, timestamp, is_nan in rows:
        stored.add((run_id, key, int(step), "nan" if is_nan else repr(float(value)), int(timestamp)))
    stored_no_ts = {s[:4] for s in stored}
    lost = sorted(sent - stored) + sorted(sent_no_ts - stored_no_ts)
    unexpected = sorted({s[:4] for s in stored} - {s[:4] for s in sent} - sent_no_ts)
    # The same through the server's API, for a sample of runs: every key's history.
    client = MlflowClient(server.url)
    by_run = collections.defaultdict(set)
    for e in sent:
        by_run[e[0]].add(e[:4])
    api_checked = api_lost = 0
    for run_id in run_ids[:: max(1, len(run_ids) // max(1, sample_runs))][:sample_runs]:
        for key in sorted({e[1] for e in by_run[run_id]}):
            history = {(run_id, key, m.step, _value_key(m.value)) for m in client.get_metric_history(run_id, key)}
            want = {e for e in by_run[run_id] if e[1] == key}
            api_checked += len(want)
            api_lost += len(want - history)
    return {"client_calls": dict(calls), "client_calls_total": sum(calls.values()),
            "client_call_timing": {name: _merge_quantiles(qs) for name, qs in timings.items()},
            "client_errors": errors, "ledgers_missing": missing_ledgers, "metrics_in_ledgers": entries,
            "distinct_metrics_sent": len(sent) + len(sent_no_ts), "metric_rows_in_store": len(rows),
            "lost_metrics": len(lost), "lost_examples": [list(x) for x in lost[:20]],
            "stored_not_in_ledger": len(unexpected), "stored_not_in_ledger_examples": [list(x) for x in unexpected[:10]],
            "metrics_resent_after_async_failure": resent,
            "api_check": {"runs": min(sample_runs, len(run_ids)), "metrics_checked": api_checked, "lost": api_lost},
            "runs_in_ledgers": len(run_ids), "trials": trials, "trial_summary": _trial_summary(trials)}


def _trial_summary(trials: list[dict]) -> dict:
    if not trials:
        return {}
    finish = [t["finish_s"] for t in trials]
    return {"trials": len(trials), "median_train_s": round(statistics.median(t["train_s"] for t in trials), 2),
            "median_finish_s": round(statistics.median(finish), 2), "max_finish_s": max(finish),
            "finish_errors": sum(1 for t in trials if t.get("finish_error"))}


def _merge_quantiles(qs: list[dict]) -> dict:
    # Per-process quantiles: the call count and total are exact, the p50 is the median of the
    # processes' medians, p95 and max the largest of theirs.
    return {"n": sum(q["n"] for q in qs), "total_s": round(sum(q["total_s"] for q in qs), 2),
            "p50_ms": round(statistics.median(q["p50_ms"] for q in qs), 2),
            "p95_ms_max_over_processes": max(q["p95_ms"] for q in qs), "max_ms": max(q["max_ms"] for q in qs)}


def parse_access_log(path: Path, phases: dict) -> dict:
    """Requests per phase (by timestamp), per endpoint and status; /health polls left out."""
    out = {name: {"requests": 0, "by_endpoint": collections.Counter(), "by_status": collections.Counter(),
                  "per_second": collections.Counter()} for name in phases}
    other = 0
    windows = {name: (dt.datetime.fromtimestamp(int(p["start"])), dt.datetime.fromtimestamp(int(p["end"]) + 1))
               for name, p in phases.items()}
    for line in path.read_text(errors="replace").splitlines():
        match = ACCESS.match(line)
        if not match or "/api/" not in match.group(3):
            continue
        when = dt.datetime.strptime(match.group(1), "%Y/%m/%d %H:%M:%S")
        endpoint = re.sub(r"/artifacts/.*", "/artifacts/...", match.group(3).split("?")[0])
        for name, (lo, hi) in windows.items():
            if lo <= when <= hi:
                counts = out[name]
                counts["requests"] += 1
                counts["by_endpoint"][f"{match.group(2)} {endpoint}"] += 1
                counts["by_status"][match.group(4)] += 1
                counts["per_second"][match.group(1)] += 1
                break
        else:
            other += 1
    result = {}
    for name, counts in out.items():
        seconds = phases[name]["end"] - phases[name]["start"]
        per_second = sorted(counts["per_second"].values())
        result[name] = {"requests": counts["requests"], "per_s": round(counts["requests"] / seconds, 2),
                        "peak_per_s": per_second[-1] if per_second else 0,
                        "server_errors_5xx": sum(n for s, n in counts["by_status"].items() if s.startswith("5")),
                        "client_errors_4xx": sum(n for s, n in counts["by_status"].items() if s.startswith("4")),
                        "by_status": dict(counts["by_status"]), "by_endpoint": dict(counts["by_endpoint"].most_common())}
    result["outside_phases"] = other
    return result


def scan_logs(paths: dict[str, str]) -> dict:
    """Lines that mention an error, an exception or a traceback, per log (deduplicated, counted)."""
    found = {}
    for name, path in paths.items():
        lines = collections.Counter(line.strip()[:300] for line in Path(path).read_text(errors="replace").splitlines()
                                    if SUSPECT.search(line))
        if lines:
            found[name] = dict(lines.most_common(30))
    return found


def versions(pg: Postgres) -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version(), "postgresql": pg.version()}
    for package in ("mlflow", "optuna", "sqlalchemy", "psycopg", "torch", "transformers", "uvicorn"):
        with contextlib.suppress(Exception):
            out[package] = version(package)
    return out


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], check=False, capture_output=True, text=True)
                  .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {"cpu": model, "cores": os.cpu_count(), "ram_gib": round(mem / 1024 ** 2, 1), "os": platform.platform()}


def summarise(result: dict) -> str:
    rows = [("", *result["phases"].keys())]

    def row(label, fn):
        rows.append((label, *(fn(name, p) for name, p in result["phases"].items())))

    access = result["server_access"]
    row("processes / wall", lambda n, p: f"{len(p['exit_codes'])} / {p['wall_s']:.0f} s")
    row("non-zero exits", lambda n, p: str(sum(1 for c in p["exit_codes"].values() if c != 0)))
    row("trials finished", lambda n, p: str(p["trials"]["finished"]) if "trials" in p
        else f"{len(p['check']['trials'])} ({p['check']['trial_summary'].get('finish_errors', 0)} could not end their run)")
    row("trials / minute", lambda n, p: f"{p['trials']['per_minute_window']} (window), {p['trials']['per_minute_wall']} (wall)"
        if "trials" in p else f"{len(p['check']['trials']) / p['wall_s'] * 60:.1f} (wall)")
    row("Optuna trial states", lambda n, p: ", ".join(f"{k} {v}" for k, v in p["trials"]["states"].items()) if "trials" in p else "—")
    row("MLflow runs by status", lambda n, p: ", ".join(f"{k} {v}" for k, v in p["runs_by_status"].items()))
    row("server requests / s (access log)", lambda n, p: f"{access[n]['per_s']} (peak {access[n]['peak_per_s']}, {access[n]['requests']} in all)")
    row("server responses other than 2xx", lambda n, p: ", ".join(f"{s}: {c}" for s, c in sorted(access[n]["by_status"].items())
                                                                 if not s.startswith("2")) or "none")
    row("client MlflowClient calls / s", lambda n, p: f"{p['check']['client_calls_total'] / p['wall_s']:.1f} ({p['check']['client_calls_total']} in all)")
    row("metrics sent / s (client ledgers)", lambda n, p: f"{p['check']['metrics_in_ledgers'] / p['wall_s']:.1f}")
    row("metric rows written / s (SQL)", lambda n, p: f"{(p['rows_after'].get('metrics', 0) - p['rows_before'].get('metrics', 0)) / p['wall_s']:.1f}")
    row("rows added: metrics / params / tags / runs", lambda n, p: " / ".join(
        str(p["rows_after"].get(t, 0) - p["rows_before"].get(t, 0)) for t in ("metrics", "params", "tags", "runs")))
    row("client exceptions from MlflowClient", lambda n, p: str(len(p["check"]["client_errors"])))
    row("error/traceback lines in logs", lambda n, p: str(sum(sum(v.values()) for v in p["log_findings"].values())))
    row("metrics sent (distinct) / lost", lambda n, p: f"{p['check']['distinct_metrics_sent']} / {p['check']['lost_metrics']}")
    row("API re-check (get_metric_history)", lambda n, p: f"{p['check']['api_check']['metrics_checked']} checked, {p['check']['api_check']['lost']} lost")
    row("peak PostgreSQL connections", lambda n, p: str(p.get("machine_load", {}).get("pg_connections_max", "—")))
    row("load average (median / max)", lambda n, p: f"{p.get('machine_load', {}).get('load1_median', '—')} / {p.get('machine_load', {}).get('load1_max', '—')}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _portable(text: str, workdir: Path) -> str:
    """The results without this machine's paths: the temporary folder as ``$WORKDIR``, the project's
    own paths relative to it (the file is committed beside RESULTS.md)."""
    return text.replace(str(workdir), "$WORKDIR").replace(f"{ROOT}/", "").replace(str(ROOT), ".")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in AGENTS:
        return AGENTS[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.tracking_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="phase 1 (ftsearch study): each process's --timeout")
    parser.add_argument("--workers", type=int, default=8, help="processes per phase (phase 1: 1 search + N-1 workers)")
    parser.add_argument("--step-minutes", type=float, help="phase 2 (per-step logging) length (default: --minutes)")
    parser.add_argument("--steps-per-trial", type=int, default=100, help="phase 2: steps per trial (3 metrics each)")
    parser.add_argument("--n-trials", type=int, help="phase 1 study's n_trials (default: 150 per minute, more than can run)")
    parser.add_argument("--train-rows", type=int, default=128, help="phase 1 train+validation reviews (val 25%%)")
    parser.add_argument("--server-workers", type=int, default=2, help="mlflow server --workers")
    parser.add_argument("--phases", default="ftsearch,steps", help="which phases, comma-separated")
    parser.add_argument("--sample-runs", type=int, default=40, help="runs per phase re-checked through get_metric_history")
    parser.add_argument("--source", choices=["tree", "head"], default="tree",
                        help="run a copy of the working tree (default) or of git HEAD")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the mlflow server (e.g. MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=100)")
    parser.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of every worker process (e.g. MLFLOW_ASYNC_LOGGING_THREADPOOL_SIZE=1)")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. what else ran)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, ledgers, databases)")
    args = parser.parse_args(argv)
    args.step_minutes = args.minutes if args.step_minutes is None else args.step_minutes
    n_trials = args.n_trials or max(20, int(150 * args.minutes))
    WORKER_ENV.update(_pairs(args.worker_env))
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]

    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(tempfile.mkdtemp(prefix="ftsearch-load-"))
    os.chmod(root, 0o755)
    pg = server = sampler = None
    result: dict = {"command": "python -m bench.tracking_load " + " ".join(argv), "started": stamp,
                    "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                 "n_trials": n_trials}, "machine": machine(), "workdir": str(root), "phases": {}}
    problems = False
    try:
        result["code"] = snapshot(root / "src", args.source)
        pg = Postgres(root / "pg")
        result["versions"] = versions(pg)
        result["postgres_max_connections"] = pg.query("postgres", "SHOW max_connections")[0][0]
        server = MlflowServer(f"{pg.url}/mlflow", root, args.server_workers, _pairs(args.server_env))
        done = subprocess.run([sys.executable, "-m", "bench.tracking_load", "_prepare", str(root / "data"),
                               str(args.train_rows), str(n_trials)], cwd=root / "src", env=base_env(server),
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"preparing the data failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        prepared = json.loads(done.stdout.strip().splitlines()[-1])
        result["study"] = prepared["config"]
        sampler = Sampler(pg)
        sampler.start()
        runners = {"ftsearch": phase_ftsearch, "steps": phase_steps}
        for name in phases:
            print(f"[load] phase {name}: {args.workers} processes for "
                  f"{args.minutes if name == 'ftsearch' else args.step_minutes} min", flush=True)
            result["phases"][name] = runners[name](args, pg, server, root / "src", prepared, root)
            result["phases"][name]["machine_load"] = sampler.summary(result["phases"][name]["start"],
                                                                     result["phases"][name]["end"])
        for name, phase in result["phases"].items():
            phase["check"] = check_ledgers(phase, pg, server, args.sample_runs)
            phase["log_findings"] = scan_logs(phase["logs"])
        time.sleep(1)
        result["server_access"] = parse_access_log(server.access_log, result["phases"])
        result["server_log_findings"] = scan_logs({"mlflow-server": str(server.log), "postgres": str(pg.root / "log")})
        result["tables_at_end"] = table_counts(pg)
        problems = any(
            any(c != 0 for c in p["exit_codes"].values()) or p["check"]["lost_metrics"] or p["check"]["client_errors"]
            or p["log_findings"] or "RUNNING" in p["runs_by_status"] or p.get("trials", {}).get("states", {}).get("FAIL")
            or p.get("trial_run_mismatches") or result["server_access"][n]["server_errors_5xx"]
            for n, p in result["phases"].items())
        result["problems_found"] = bool(problems)
    finally:
        if sampler is not None:
            sampler.stopped.set()
        if server is not None:
            kill_group(server.process)
        if pg is not None:
            pg.stop()
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / f"tracking-load-{stamp}.json"
        out.write_text(_portable(json.dumps(result, indent=1, default=str), root))
        print(f"[load] raw results: {out}")
    print(summarise(result))
    if problems or args.keep:
        print(f"[load] kept {root} (logs, ledgers, PostgreSQL data)")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
