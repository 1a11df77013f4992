"""The kill test: a 3-worker study whose workers are killed with SIGKILL at random moments.

Replay a failure with the seed it prints: ``FTSEARCH_KILL_SEED=<seed> make test ARGS="-m slow -k kill"``.
The figures (kills, retried trials, resumed epochs, lost trials) are printed and written to
``$FTSEARCH_TEST_ARTIFACTS/kill-test.json``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from ftsearch.distributed import storage
from ftsearch.generations import RESUMED_ATTR, RETRY_OF_ATTR, RUN_ID_ATTR, WORKER_ATTR
from tests.helpers import optuna_study, runs, store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KILLS = 5
N_TRIALS = 12
EPOCHS = 6


def _running_workers(study_name: str, children: set[int]) -> list[int]:
    """Worker processes in the middle of a trial that has finished an epoch (so that every kill
    loses work a retry must not redo); none before the study exists."""
    try:
        running = optuna_study(study_name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except (KeyError, ValueError):  # the study does not exist yet
        return []
    pids = {int(t.user_attrs.get(WORKER_ATTR, ":0").rsplit(":", 1)[1]) for t in running if t.intermediate_values}
    return sorted(pids & children)


def _children(pid: int) -> set[int]:
    psutil = pytest.importorskip("psutil")
    try:
        return {c.pid for c in psutil.Process(pid).children() if c.status() != psutil.STATUS_ZOMBIE}
    except psutil.NoSuchProcess:
        return set()


def test_three_workers_killed_five_times_lose_nothing(write_study, state_dir, monkeypatch, tmp_path):
    seed = int(os.environ.get("FTSEARCH_KILL_SEED", random.SystemRandom().randrange(2**32)))
    print(f"\nkill test seed: {seed} (replay with FTSEARCH_KILL_SEED={seed})")
    rng = random.Random(seed)
    monkeypatch.setenv(storage.HEARTBEAT_ENV, "2")
    path = write_study(n_trials=N_TRIALS, **{"search.epochs": {"low": EPOCHS, "high": EPOCHS}})
    log = tmp_path / "search.log"
    start = time.monotonic()
    with log.open("w") as sink:
        search = subprocess.Popen(
            [sys.executable, "-m", "ftsearch.cli", "search", str(path), "--workers", "3"],
            cwd=ROOT, env=dict(os.environ), stdout=sink, stderr=subprocess.STDOUT,
        )
    kills = []
    try:
        while len(kills) < KILLS and search.poll() is None:
            # A random moment, or the first one after it when a worker is mid-trial: waiting a
            # whole new random delay each time none is could let the study end before 5 kills.
            time.sleep(rng.uniform(0.5, 3.0))
            while search.poll() is None and not (victims := _running_workers("tiny", _children(search.pid))):
                time.sleep(0.2)
            if victims:
                victim = rng.choice(victims)
                os.kill(victim, signal.SIGKILL)
                kills.append({"pid": victim, "at_s": round(time.monotonic() - start, 1)})
        search.wait(timeout=900)
    finally:
        if search.poll() is None:
            search.kill()
    output = log.read_text()
    assert search.returncode == 0, output[-4000:]
    assert len(kills) == KILLS, f"only {len(kills)} kills landed before the study ended ({kills}); seed {seed}"

    trials = optuna_study("tiny").trials
    states = [t.state for t in trials]
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    retries = [t for t in trials if RETRY_OF_ATTR in t.user_attrs]
    resumed = [t.user_attrs[RESUMED_ATTR] for t in retries if RESUMED_ATTR in t.user_attrs]
    figures = {
        "seed": seed, "kills": len(kills), "trials": len(trials), "completed_or_pruned": len(counted),
        "failed_by_kill": len(failed), "retried": len(retries), "resumed_after_epochs": resumed,
        "lost": N_TRIALS - len(counted), "wall_s": round(time.monotonic() - start, 1), "kill_times": kills,
    }
    print(json.dumps(figures))
    artifacts = Path(os.environ.get("FTSEARCH_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "kill-test.json").write_text(json.dumps(figures, indent=2))

    # The study reached its trial count and nothing is left running or waiting.
    assert len(counted) == N_TRIALS
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    # Every killed trial failed, and its parameters were tried again (once at most).
    warnings = "\n".join(line for line in output.splitlines() if "warning" in line or "failed" in line)
    assert 1 <= len(failed) <= len(kills), f"failed trials {[t.number for t in failed]}; the log said:\n{warnings}"
    for dead in failed:
        if not dead.params:  # killed before it sampled anything (its trial had just ended): a fresh slot
            continue
        again = [t for t in retries if t.user_attrs[RETRY_OF_ATTR] == dead.user_attrs.get(RETRY_OF_ATTR, dead.number)]
        assert again, f"trial {dead.number} was not retried"
        assert all(t.params == dead.params for t in again)
        if RETRY_OF_ATTR not in dead.user_attrs:  # a first death: the retry resumes, never starts over
            first_retry = min(again, key=lambda t: t.number)
            assert first_retry.user_attrs.get(RESUMED_ATTR, 0) >= len(dead.intermediate_values), dead.number
    assert resumed, "no retry resumed from a checkpoint"

    # MLflow: one run per trial, none RUNNING; killed ones FAILED with the reason; metrics present.
    parents, children = runs("tiny")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_id = {c.info.run_id: c for c in children}
    assert sorted(by_id) == sorted(t.user_attrs[RUN_ID_ATTR] for t in trials if RUN_ID_ATTR in t.user_attrs)
    assert all(c.info.status in ("FINISHED", "FAILED") for c in children)
    for trial in counted:
        run = by_id[trial.user_attrs[RUN_ID_ATTR]]
        steps = sorted(m.step for m in store().get_metric_history(run.info.run_id, "val_accuracy"))
        assert steps == list(range(1, len(trial.intermediate_values) + 1)), trial.number
        assert run.info.status == "FINISHED"
    for trial in failed:
        if RUN_ID_ATTR in trial.user_attrs:
            run = by_id[trial.user_attrs[RUN_ID_ATTR]]
            assert run.info.status == "FAILED" and run.data.tags["ftsearch.reason"], trial.number

    # The registry holds exactly the best trial's model, completely registered.
    versions = store().search_model_versions("name = 'tiny-sentiment'")
    best = optuna_study("tiny").best_trial
    assert len(versions) == 1
    assert versions[0].tags["trial_number"] == str(best.number)
    assert versions[0].tags["ftsearch.registration"] == "complete"
    # Nothing left on disk but what the registry does not hold: the checkpoints are gone.
    assert not (state_dir / "checkpoints" / "tiny").exists()
