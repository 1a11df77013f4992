"""The worker loop: claim a trial slot, run it under a heartbeat, record how it ended, repeat.

A study holds exactly ``n_trials`` slots: waiting trials enqueued when the study starts. A
worker claims one with a single storage transaction (WAITING -> RUNNING), so two workers never
run the same trial and the study never runs more trials than asked for, however many workers
join. A trial that fails gives its slot back as a fresh waiting trial; one whose worker died
(no heartbeat) or was interrupted is enqueued again with its parameters once, and resumes from
its last finished epoch.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from ftsearch import tracking
from ftsearch.distributed import storage as storages
from ftsearch.generations import RETRIES_ATTR, RETRY_OF_ATTR, RUN_ID_ATTR, WORKER_ATTR
from ftsearch.outcomes import Outcome, end_run, outcome_of

MAX_RETRIES = 1
MAX_FAILURES_IN_A_ROW = 3
IDLE_RECHECK_SECONDS = 0.5
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)

Objective = Callable[[optuna.Trial], float]
AfterTrial = Callable[[optuna.Study, FrozenTrial], None]


def worker_name() -> str:
    """``host:pid``: which process ran a trial (a trial user attribute, shown in the report)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def ensure_slots(study: optuna.Study, n_trials: int) -> None:
    """Enqueue waiting trials until the study's finished, running and waiting trials make
    ``n_trials`` (failed ones do not count)."""
    trials = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING, TrialState.WAITING))
    for _ in range(n_trials - len(trials)):
        study.enqueue_trial({})


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Give the slot of a trial that ended FAIL back: the same parameters once more (resuming from
    its checkpoint) when its process died or was interrupted, else a fresh sample."""
    retries = int(trial.user_attrs.get(RETRIES_ATTR, 0))
    if retries < MAX_RETRIES and trial.params:
        origin = int(trial.user_attrs.get(RETRY_OF_ATTR, trial.number))
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTR: origin, RETRIES_ATTR: retries + 1})
    else:
        study.enqueue_trial({})


def end_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Storage callback for a trial found dead (no heartbeat): retry it once and end its MLflow run
    FAILED with the reason. Runs in whichever process noticed, exactly once per trial."""
    requeue(study, trial)  # first: the slot must be back before anyone sees the study idle
    reason = f"its worker ({trial.user_attrs.get(WORKER_ATTR, 'unknown')}) stopped sending heartbeats: killed, out of memory or lost"
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        try:
            end_run(tracking.TrialRun(tracking.client(), run_id), Outcome("FAIL", reason))
        except Exception as err:  # noqa: BLE001 - the tracking server may be down; the study goes on
            print(f"warning: could not end the MLflow run {run_id} of dead trial {trial.number}: {err}", file=sys.stderr)


def claim(study: optuna.Study, storage: BaseStorage) -> int | None:
    """Atomically move the oldest waiting trial to RUNNING; its trial id, or None if none is left."""
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return trial_id
        except UpdateFinishedTrialError:
            continue
    return None


def judge(study: optuna.Study) -> None:
    """Fail the trials of dead workers, unless this process itself found the storage failing or
    slow in the last two heartbeat intervals (or it just came back): then the other workers could
    not beat either, and their silence says nothing yet."""
    if storages.seconds_since_trouble() > 2 * storages.heartbeat_seconds() + storages.RECONNECT_WAIT_MAX:
        storages.fail_stale_trials(study)


@contextmanager
def heartbeat(study: optuna.Study, storage: BaseStorage, trial_id: int):
    """Beat for ``trial_id`` while the block runs, and meanwhile fail other workers' dead trials
    (so a kill is noticed within two intervals even when no worker is between trials).

    Beating and judging are separate threads: ending a dead trial's MLflow run can take longer
    than an interval (a slow or unreachable tracking server), and a judge that stopped its own
    beats meanwhile was itself judged dead, alive, by the next worker to look."""
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat() -> None:
        due = time.monotonic()
        while True:
            started = time.monotonic()
            try:
                storage.record_heartbeat(trial_id)
                if time.monotonic() - started > interval / 2:
                    storages.note_trouble(started)
            except Exception as err:  # noqa: BLE001 - a lost beat must not end the beating
                storages.note_trouble(time.monotonic())
                print(f"warning: heartbeat of trial id {trial_id} failed: {type(err).__name__}: {err}", file=sys.stderr)
            # At a fixed rate: a slow beat shortens the wait for the next one instead of adding to it.
            due = max(due + interval, time.monotonic())
            if stop.wait(due - time.monotonic()):
                return

    def watch() -> None:
        while not stop.wait(interval):
            try:
                judge(study)
            except Exception as err:  # noqa: BLE001 - judging others must not end this trial
                print(f"warning: could not check for dead trials: {type(err).__name__}: {err}", file=sys.stderr)

    threads = [
        threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True),
        threading.Thread(target=watch, name=f"heartbeat-{trial_id}-judge", daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


# How each outcome is stored: killed and abandoned trials failed (a killed one is retried).
_TRIAL_STATE = {"COMPLETE": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED}


def _record_end(
    study: optuna.Study, storage: BaseStorage, trial: optuna.Trial, trial_id: int, outcome: Outcome
) -> FrozenTrial | None:
    """Tell the storage how the trial ended; None when another worker had already judged it dead
    (it ended the trial and gave its slot back)."""
    state = _TRIAL_STATE.get(outcome.state, TrialState.FAIL)
    try:
        if state != TrialState.FAIL:
            return study.tell(trial, outcome.value if state == TrialState.COMPLETE else None, state=state)
        # FAIL through the storage: the transition succeeds for exactly one process, so the
        # slot is given back exactly once (a judging worker requeues only if it won instead).
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return None
    except UpdateFinishedTrialError:
        return None
    except ValueError:
        # Optuna's "Cannot tell a FAIL trial": judged dead by another worker between this trial's
        # last look and its tell. Any other refusal leaves the trial running, and is raised.
        if storage.get_trial(trial_id).state.is_finished():
            return None
        raise
    frozen = storage.get_trial(trial_id)
    requeue(study, frozen) if outcome.interrupted else study.enqueue_trial({})
    return frozen


def _say(trial: optuna.Trial, outcome: Outcome, warn: Callable[[str], None]) -> None:
    if outcome.state == "ABANDONED":
        warn(f"trial {trial.number} was {outcome.reason}")
    elif outcome.state == "FAIL":  # the runner recorded the reason on the run; the study goes on
        warn(f"trial {trial.number} failed: {outcome.reason}")


@dataclass
class WorkerResult:
    """What one worker did."""

    ran: int = 0
    stopped_early: str = ""  # why it stopped with trials left (not the timeout: that is asked for)
    converged: str = ""  # why ``should_stop`` ended it


def work(
    study_name: str,
    storage: BaseStorage,
    open_study: Callable[[], optuna.Study],
    objective: Objective,
    after_trial: AfterTrial,
    *,
    timeout: float | None = None,
    idle_poll: float = 2.0,
    warn: Callable[[str], None] = print,
    should_stop: Callable[[optuna.Study], str | None] = lambda study: None,
) -> WorkerResult:
    """Run trial slots of ``study_name`` until none is waiting and none runs elsewhere (a running
    trial may still die and come back as a retry), the timeout, repeated failures, or
    ``should_stop`` giving a reason (asked before every claim, so every worker stops).

    ``open_study`` gives a fresh Study object per trial, so the sampler sees every trial that
    finished since (Optuna caches the trial list per study object)."""
    result = WorkerResult()
    deadline = None if timeout is None else time.monotonic() + timeout
    failures_in_a_row = 0
    idle_checks = 0
    while deadline is None or time.monotonic() < deadline:
        study = open_study()
        judge(study)
        if reason := should_stop(study):
            result.converged = reason
            return result
        trial_id = claim(study, storage)
        if trial_id is None:
            busy = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
            # Seen idle twice, a poll apart: a trial that just failed elsewhere has had its slot
            # given back by then.
            idle_checks = 0 if busy else idle_checks + 1
            if idle_checks >= 2:
                return result
            time.sleep(idle_poll if busy else IDLE_RECHECK_SECONDS)
            continue
        idle_checks = 0
        storage.record_heartbeat(trial_id)  # at once: a trial that never beat is never judged dead
        trial = optuna.Trial(study, trial_id)
        trial.set_user_attr(WORKER_ATTR, worker_name())
        outcome = Outcome("FAIL")
        try:
            with heartbeat(study, storage, trial_id):
                outcome = Outcome("COMPLETE", value=objective(trial))
        except BaseException as err:
            outcome = outcome_of(err)
            if not isinstance(err, Exception):  # Ctrl-C and the like: recorded, then on up
                raise
            _say(trial, outcome, warn)
        finally:
            frozen = _record_end(study, storage, trial, trial_id, outcome)
            result.ran += 1
            if frozen is not None and not outcome.interrupted:
                try:
                    after_trial(study, frozen)
                except Exception as err:  # noqa: BLE001 - housekeeping must not stop the worker
                    warn(f"after trial {trial.number}: {type(err).__name__}: {err}")
            gc.collect()
        failures_in_a_row = failures_in_a_row + 1 if outcome.state in ("FAIL", "ABANDONED") else 0
        if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            result.stopped_early = f"{failures_in_a_row} trials failed in a row"
            return result
    return result
