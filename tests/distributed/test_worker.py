"""Workers sharing a study: the journal storage under several processes, heartbeats, retries of
dead trials resuming from their checkpoint, the out-of-memory retry, memory across trials."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from ftsearch import tracking
from ftsearch.cli import main
from ftsearch.distributed import storage, worker
from ftsearch.generations import RESUMED_ATTR, RETRY_OF_ATTR, RUN_ID_ATTR, WORKER_ATTR
from tests.helpers import PARENT, optuna_study, runs, store

ROOT = Path(__file__).resolve().parents[2]

HAMMER = textwrap.dedent(
    """
    import random, sys, optuna
    from ftsearch.distributed import storage, worker
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = storage.open_storage(sys.argv[1])
    open_study = lambda: optuna.load_study(study_name="hammer", storage=store, sampler=optuna.samplers.RandomSampler())
    def objective(trial):
        return trial.suggest_float("x", 0, 1) + random.random() * 1e-3
    done = worker.work("hammer", store, open_study, objective, lambda study, trial: None, idle_poll=0.05)
    print(done.ran)
    """
)


def test_four_processes_share_the_journal_storage_without_losing_or_doubling_a_trial(tmp_path):
    # What SQLite fails at ("database is locked", optuna#820): processes claiming, reporting and
    # finishing trials on one storage at once. Every slot is run exactly once.
    journal = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="hammer", storage=storage.open_storage(str(journal)))
    worker.ensure_slots(study, 120)
    processes = [
        subprocess.Popen([sys.executable, "-c", HAMMER, str(journal)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    assert not any("locked" in err for _, err in outputs)
    ran = [int(out.split()[-1]) for out, _ in outputs]
    trials = optuna.load_study(study_name="hammer", storage=storage.open_storage(str(journal))).trials
    assert sum(ran) == len(trials) == 120
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sum(n > 0 for n in ran) >= 2  # they really ran side by side


def test_a_worker_killed_while_writing_does_not_block_the_journal(tmp_path):
    # Optuna's lock files outlive a killed holder for 30 s, long enough for live trials to miss
    # their heartbeats; the kernel drops a dead process's flock at once.
    journal = tmp_path / "optuna.journal"
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys, time; from pathlib import Path; from ftsearch.distributed.storage import FlockLock; "
         "FlockLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)"), str(journal)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    with open(f"{journal}.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held


def test_a_sqlite_storage_is_refused_for_several_workers(write_study, tmp_path, capsys):
    assert main(["search", str(write_study()), "--workers", "2", "--storage", f"sqlite:///{tmp_path}/o.db"]) == 2
    err = capsys.readouterr().err
    assert "database is locked" in err and "use PostgreSQL" in err


def _claimed_trial_with_a_run(study, storage_, params) -> tuple[int, str]:
    study.enqueue_trial(params)
    trial_id = worker.claim(study, storage_)
    trial = optuna.Trial(study, trial_id)
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    parent = tracking.StudyRun.open("stale", None, tags={})
    run = parent.start_trial(trial.number, tags={})
    trial.set_user_attr(RUN_ID_ATTR, run.run_id)
    trial.set_user_attr(WORKER_ATTR, "elsewhere:1")
    return trial_id, run.run_id


def test_a_trial_without_heartbeats_is_failed_within_two_intervals_and_retried_once(monkeypatch):
    monkeypatch.setenv(storage.HEARTBEAT_ENV, "1")
    storage_ = storage.open_storage(on_stale=worker.end_stale_trial)
    study = optuna.create_study(study_name="stale", storage=storage_)
    dead_id, dead_run = _claimed_trial_with_a_run(study, storage_, {"lr": 1e-3})
    storage_.record_heartbeat(dead_id)  # its last sign of life
    last_beat = time.time()
    alive_id, _ = _claimed_trial_with_a_run(study, storage_, {"lr": 2e-3})

    # The live trial's heartbeat thread also watches for dead ones: nobody else needs to look.
    failed_at = None
    with worker.heartbeat(study, storage_, alive_id):
        while time.time() - last_beat < 8:
            if storage_.get_trial(dead_id).state == TrialState.FAIL:
                failed_at = time.time()
                break
            time.sleep(0.1)
    # Two intervals without a beat, noticed at the next check (a slow machine may skip a round).
    assert failed_at is not None and 2 <= failed_at - last_beat <= 5
    assert not [t for t in threading.enumerate() if t.name.startswith("heartbeat-")]  # ended with its trial
    assert storage_.get_trial(alive_id).state == TrialState.RUNNING
    study.tell(storage_.get_trial(alive_id).number, 1.0)

    run = store().get_run(dead_run)
    assert run.info.status == "FAILED" and "stopped sending heartbeats" in run.data.tags["ftsearch.reason"]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == {"lr": 1e-3}
    assert waiting[0].user_attrs[RETRY_OF_ATTR] == 0

    # The retry dies too: its slot goes to a fresh trial, not a second retry.
    worker.claim(study, storage_)
    retry = study.get_trials(states=(TrialState.RUNNING,))[-1]
    assert retry.number == 2
    time.sleep(2.2)
    storage.fail_stale_trials(study)
    again = study.get_trials(states=(TrialState.WAITING,))
    assert len(again) == 1 and again[0].system_attrs["fixed_params"] == {}


def test_a_judge_slow_to_end_a_dead_trial_keeps_beating_for_its_own(monkeypatch):
    # Ending the dead trial's MLflow run takes three intervals (a slow tracking server): the
    # judging worker's own trial must still beat on time, or the next judge fails it alive.
    monkeypatch.setenv(storage.HEARTBEAT_ENV, "1")
    storage_ = storage.open_storage(on_stale=worker.end_stale_trial)
    study = optuna.create_study(study_name="stale", storage=storage_)
    dead_id, _ = _claimed_trial_with_a_run(study, storage_, {"lr": 1e-3})
    storage_.record_heartbeat(dead_id)
    alive_id, _ = _claimed_trial_with_a_run(study, storage_, {"lr": 2e-3})
    ended = threading.Event()

    def slow_end_run(run, outcome):
        time.sleep(3)
        ended.set()

    monkeypatch.setattr(worker, "end_run", slow_end_run)
    beats = []
    with worker.heartbeat(study, storage_, alive_id):
        while not ended.is_set():
            beats.append(storage_.get_trial(alive_id).system_attrs[storage.HEARTBEAT_ATTR])
            time.sleep(0.1)
    assert storage_.get_trial(dead_id).state == TrialState.FAIL
    assert len(set(beats)) >= 3  # it beat on while the judge was busy
    assert max(b - a for a, b in zip(sorted(set(beats)), sorted(set(beats))[1:])) < 2  # never stale
    assert storage_.stale_trial_ids(storage_.get_study_id_from_name("stale")) == []


def _checkpoint(state_dir: Path) -> Path:
    return state_dir / "checkpoints" / "tiny" / "resume" / "trial-0.pt"


def test_a_killed_search_resumes_its_trial_from_the_last_epoch(write_study, state_dir, monkeypatch, capsys):
    monkeypatch.setenv(storage.HEARTBEAT_ENV, "1")
    path = write_study(n_trials=1, **{"search.epochs": {"low": 12, "high": 12}})
    process = subprocess.Popen(
        [sys.executable, "-m", "ftsearch.cli", "search", str(path), "--quiet"],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 180
    while not _checkpoint(state_dir).is_file():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # right after its first epoch's checkpoint
    process.wait()

    time.sleep(2.5)  # two heartbeats missed
    assert main(["search", str(path)]) == 0
    trials = optuna_study("tiny").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    killed, retry = trials
    assert retry.params == killed.params and retry.user_attrs[RETRY_OF_ATTR] == 0
    resumed = retry.user_attrs[RESUMED_ATTR]
    assert 1 <= resumed < 12
    assert sorted(retry.intermediate_values) == list(range(1, 13))  # its curve is whole

    parents, children = runs("tiny")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_id = {c.info.run_id: c for c in children}
    dead, good = by_id[killed.user_attrs[RUN_ID_ATTR]], by_id[retry.user_attrs[RUN_ID_ATTR]]
    assert dead.info.status == "FAILED" and "stopped sending heartbeats" in dead.data.tags["ftsearch.reason"]
    assert good.info.status == "FINISHED" and good.data.params[RESUMED_ATTR] == str(resumed)
    assert good.data.params["seed"] == dead.data.params["seed"]
    history = store().get_metric_history(good.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, 13))
    versions = store().search_model_versions("name = 'tiny-sentiment'")
    assert len(versions) == 1 and versions[0].tags["trial_number"] == "1"
    # The trial ended: no resume state is left behind (the registered model has the weights).
    assert not _checkpoint(state_dir).exists()
    capsys.readouterr()
    assert main(["report", str(path)]) == 0
    assert "trial 0 failed: its worker" in capsys.readouterr().out  # why, though it could not say


DIE_BEFORE_RECORDING = textwrap.dedent(
    """
    import os, signal, sys
    from ftsearch.distributed import worker
    from ftsearch.cli import main
    # The worst moment: the trial trained to its end, its end is not recorded yet.
    worker._record_end = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(main(["search", sys.argv[1], "--quiet"]))
    """
)


def test_a_worker_killed_after_training_before_recording_the_end_leaves_a_retry_with_nothing_to_train(
    write_study, state_dir, monkeypatch
):
    monkeypatch.setenv(storage.HEARTBEAT_ENV, "1")
    path = write_study(n_trials=1, **{"search.epochs": {"low": 3, "high": 3}})
    died = subprocess.run([sys.executable, "-c", DIE_BEFORE_RECORDING, str(path)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert _checkpoint(state_dir).is_file()  # kept until the end is recorded

    time.sleep(2.5)  # two heartbeats missed
    assert main(["search", str(path)]) == 0
    dead, retry = optuna_study("tiny").trials
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.user_attrs[RESUMED_ATTR] == 3  # every epoch was kept: the retry trains none again
    assert retry.intermediate_values == dead.intermediate_values
    assert not _checkpoint(state_dir).exists()


def test_registration_keeps_the_resume_files_of_trials_still_to_run(tmp_path):
    from ftsearch.checkpoints import TrialCheckpoints

    folder = tmp_path / "tiny"
    checkpoints = TrialCheckpoints(folder)
    (folder / "trial-3").mkdir(parents=True)
    (folder / "resume").mkdir()
    (folder / "resume" / "trial-5.pt").write_bytes(b"state")  # a retry left waiting by the timeout
    checkpoints.drop_weights()
    assert sorted(p.name for p in folder.rglob("*")) == ["resume", "trial-5.pt"]
    (folder / "resume" / "trial-5.pt").unlink()
    checkpoints.drop_weights()
    assert not folder.exists()


class _OutOfMemoryAbove:
    """Wraps a model: a forward pass over more than ``limit`` examples raises CUDA's error."""

    def __init__(self, limit: int):
        self.limit, self.batches = limit, []

    def install(self, monkeypatch):
        from ftsearch.modalities.text import TextModality

        real_build = TextModality.build

        def build(task, trial):
            setup = real_build(task, trial)
            real_forward = setup.model.forward

            def forward(**batch):
                if not setup.model.training:  # evaluation runs without gradients, at its own size
                    return real_forward(**batch)
                self.batches.append(len(batch["input_ids"]))
                if len(batch["input_ids"]) > self.limit:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return real_forward(**batch)

            setup.model.forward = forward
            return setup

        monkeypatch.setattr(TextModality, "build", build)


def test_out_of_memory_retries_at_half_the_batch_with_twice_the_accumulation(write_study, monkeypatch):
    oom = _OutOfMemoryAbove(8)
    oom.install(monkeypatch)
    assert main(["search", str(write_study(n_trials=1))]) == 0
    (trial,) = optuna_study("tiny").trials
    assert trial.state == TrialState.COMPLETE and trial.params["batch_size"] == 16
    assert oom.batches[0] == 16 and max(oom.batches[1:]) == 8
    run = store().get_run(trial.user_attrs[RUN_ID_ATTR])
    assert run.data.tags["ftsearch.oom_retry"] == "batch size 16 -> 8, gradient accumulation 2"
    assert [m.step for m in store().get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3, 4]


def test_a_trial_out_of_memory_at_half_the_batch_fails_with_that_batch_size(write_study, monkeypatch, capsys):
    _OutOfMemoryAbove(4).install(monkeypatch)
    assert main(["search", str(write_study(n_trials=1))]) == 2  # every trial fails the same way
    trials = optuna_study("tiny").trials
    assert len(trials) == 4 and [t.state for t in trials[:3]] == [TrialState.FAIL] * 3  # then it stops
    reason = trials[0].user_attrs["reason"]
    assert reason == "TrialOutOfMemory: out of memory at batch size 8 (and at 16 before)"
    assert "first reason: TrialOutOfMemory: out of memory at batch size 8" in capsys.readouterr().err
    assert all(c.info.status == "FAILED" for c in runs("tiny")[1])


def test_resident_memory_after_ten_trials_is_back_to_its_level_after_the_first(write_study, monkeypatch):
    psutil = pytest.importorskip("psutil")
    from ftsearch.progress import PlainReporter
    from ftsearch.study import SearchOptions, run_search

    process, after_trial = psutil.Process(), []

    class Measuring(PlainReporter):
        def trials_updated(self, counts, best):
            super().trials_updated(counts, best)
            after_trial.append(process.memory_info().rss)
            if torch.cuda.is_available():
                after_trial[-1] += torch.cuda.memory_allocated()

    path = write_study(n_trials=10, **{"search.epochs": {"low": 2, "high": 2}})
    run_search(SearchOptions(str(path), device="cpu"), Measuring())
    assert len(after_trial) == 10
    first, last = after_trial[0], after_trial[-1]
    print(f"RSS after trial 1: {first / 2**20:.0f} MiB, after trial 10: {last / 2**20:.0f} MiB")
    assert last <= 1.10 * first, [f"{r / 2**20:.0f}" for r in after_trial]


def _joined(output: str) -> list[str]:
    return [line.split("worker ", 2)[2].split(" joined")[0] for line in output.splitlines() if " joined study " in line]


def test_two_local_workers_share_one_study_and_one_parent_run(write_study, capsys):
    path = write_study(n_trials=4, **{"search.epochs": {"low": 2, "high": 2}})
    assert main(["search", str(path), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "[worker 0]" in out and "[worker 1]" in out
    trials = optuna_study("tiny").trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert out.count("joined study tiny") == 2  # both ran (one may have been quick enough for all)
    assert {t.user_attrs[WORKER_ATTR] for t in trials} <= set(_joined(out))
    parents, children = runs("tiny")
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags[PARENT] for c in children} == {parents[0].info.run_id}
    assert sorted(c.info.run_id for c in children) == sorted(t.user_attrs[RUN_ID_ATTR] for t in trials)
    assert len(store().search_model_versions("name = 'tiny-sentiment'")) == 1


def test_a_worker_waits_for_the_search_to_start_the_study_then_says_what_to_run(write_study, capsys):
    assert main(["worker", str(write_study()), "--wait", "0"]) == 2
    err = capsys.readouterr().err
    assert "was not started within 0 s" in err and "run `ftsearch search tiny`" in err


def test_a_trial_judged_dead_while_alive_stops_and_leaves_its_checkpoint_to_the_retry(write_study, monkeypatch, capsys):
    # A worker stalled for longer than two heartbeats (here: it never beats) is judged dead by
    # another; when it wakes, it must not overwrite what that worker recorded, nor delete the
    # checkpoint its retry resumes from.
    import contextlib

    import ftsearch.trial as trials_module

    monkeypatch.setenv(storage.HEARTBEAT_ENV, "1")
    monkeypatch.setattr(worker, "heartbeat", lambda *args: contextlib.nullcontext())
    real_fit, judged = trials_module.fit, []

    def fit_judged_dead_after_epoch_2(model, train, val, settings, on_epoch_end, **kwargs):
        def on_epoch(metrics):
            if metrics.epoch == 2 and not judged:
                time.sleep(2.2)
                other = optuna.load_study(study_name="tiny", storage=storage.open_storage(on_stale=worker.end_stale_trial))
                storage.fail_stale_trials(other)  # what another worker's watch does
                judged.append(1)
            return on_epoch_end(metrics)

        return real_fit(model, train, val, settings, on_epoch, **kwargs)

    monkeypatch.setattr(trials_module, "fit", fit_judged_dead_after_epoch_2)
    assert main(["search", str(write_study(n_trials=1))]) == 0
    printed = capsys.readouterr()
    assert "was judged dead by another worker" in printed.out + printed.err
    dead, retry = optuna_study("tiny").trials
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.user_attrs[RESUMED_ATTR] == 2  # the zombie left the checkpoint alone
    run = store().get_run(dead.user_attrs[RUN_ID_ATTR])
    assert run.info.status == "FAILED" and "stopped sending heartbeats" in run.data.tags["ftsearch.reason"]


def test_a_trial_judged_dead_just_before_its_tell_is_left_to_its_judge(tmp_path):
    # Another worker failed the trial between its last look and its tell: Optuna refuses the tell
    # ("Cannot tell a FAIL trial"), and the worker must take that as "judged dead", not crash.
    from ftsearch.outcomes import Outcome

    journal = storage.open_storage(str(tmp_path / "optuna.journal"))
    study = optuna.create_study(study_name="s", storage=journal)
    trial = study.ask()
    trial_id = journal.get_trial_id_from_study_id_trial_number(study._study_id, trial.number)
    assert journal.set_trial_state_values(trial_id, state=TrialState.FAIL)
    assert worker._record_end(study, journal, trial, trial_id, Outcome("COMPLETE", value=1.0)) is None
    assert [t.state for t in study.trials] == [TrialState.FAIL]
