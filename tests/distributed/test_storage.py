"""The Optuna contract behind heartbeats on a journal-file storage.

Optuna has heartbeats only on RDB storages; ftsearch adds them to its journal storage through a
private base class (fenced in ``ftsearch/distributed/optuna_private.py``). These tests fail,
naming the private API, when an Optuna upgrade changes it: the base class and its abstract
methods, how ``optuna.storages.fail_stale_trials`` finds and fails dead trials and calls the
stale callback, and the trial ids it is handed.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from datetime import UTC, datetime, timedelta

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from ftsearch.distributed import optuna_private, storage
from ftsearch.distributed.storage import HEARTBEAT_ATTR, HeartbeatJournalStorage
from ftsearch.errors import FtsearchError

INTERVAL = 1  # seconds: a trial with no heartbeat for 2 s is dead
BASE = optuna_private.HEARTBEAT_API  # optuna.storages._heartbeat.BaseHeartbeat
HOOK = f"{BASE}.{optuna_private.STALE_TRIAL_IDS_HOOK}"
FAIL_STALE = f"optuna.storages.fail_stale_trials (through {HOOK})"


def broken(api: str, what: str) -> str:
    return (
        f"Optuna {optuna.__version__} broke the private API {api} that ftsearch's heartbeats on "
        f"journal storages depend on: {what}. See ftsearch/distributed/optuna_private.py."
    )


class Calls:
    """A stale-trial callback that records (study name, trial number, trial state) per call."""

    def __init__(self):
        self.seen: list[tuple[str, int, TrialState]] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.seen.append((study.study_name, trial.number, trial.state))


def _open(tmp_path, calls: Calls | None = None) -> HeartbeatJournalStorage:
    return HeartbeatJournalStorage(tmp_path / "optuna.journal", INTERVAL, calls)


def _running(
    store: HeartbeatJournalStorage, study_id: int, beat_age: float | None = None, started_ago: float = 0.0
) -> int:
    """A RUNNING trial whose last heartbeat was ``beat_age`` seconds ago (None: it never beat),
    started ``started_ago`` seconds ago."""
    start = datetime.now(tz=UTC) - timedelta(seconds=started_ago)
    template = FrozenTrial(
        number=-1, state=TrialState.RUNNING, value=None, datetime_start=start, datetime_complete=None,
        params={}, distributions={}, user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=-1,
    )
    trial_id = store.create_new_trial(study_id, template_trial=template)
    if beat_age is not None:
        store.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time() - beat_age)
    return trial_id


def _study(store: HeartbeatJournalStorage, name: str = "s") -> tuple[optuna.Study, int]:
    study = optuna.create_study(study_name=name, storage=store, load_if_exists=True)
    return study, store.get_study_id_from_name(name)


def _state(store: HeartbeatJournalStorage, trial_id: int) -> TrialState:
    return store.get_trial(trial_id).state


def _heartbeat_module():
    try:
        return importlib.import_module("optuna.storages._heartbeat")
    except ImportError as err:
        pytest.fail(broken("optuna.storages._heartbeat", f"the module cannot be imported ({err})"))


def test_base_heartbeat_keeps_the_abstract_methods_ftsearch_implements():
    module = _heartbeat_module()
    base = getattr(module, "BaseHeartbeat", None)
    assert base is not None, broken(BASE, "the class is gone")
    abstract, ours = frozenset(getattr(base, "__abstractmethods__", ())), optuna_private.HEARTBEAT_METHODS
    assert abstract == ours, broken(BASE, f"its abstract methods are {sorted(abstract)}, ftsearch has {sorted(ours)}")
    assert optuna_private.BaseHeartbeat is base
    assert optuna_private.STALE_TRIAL_IDS_HOOK in vars(optuna_private.HeartbeatMixin), (
        f"HeartbeatMixin must implement {HOOK}, the hook fail_stale_trials calls"
    )
    left = sorted(HeartbeatJournalStorage.__abstractmethods__)
    assert not left, broken(BASE, f"HeartbeatJournalStorage leaves {left} abstract")
    assert callable(getattr(optuna.storages, "fail_stale_trials", None)), broken(
        "optuna.storages.fail_stale_trials", "it is gone"
    )


def test_optuna_counts_the_journal_storage_as_one_with_heartbeats(tmp_path):
    module = _heartbeat_module()
    store = _open(tmp_path)
    assert isinstance(store, module.BaseHeartbeat), broken(BASE, "the journal storage is no longer an instance")
    enabled = getattr(module, "is_heartbeat_enabled", None)
    if enabled is not None:  # private too, and only a helper: its absence alone breaks nothing
        assert enabled(store), broken(f"{module.__name__}.is_heartbeat_enabled", "it says the journal storage has none")


def test_fail_stale_trials_fails_a_trial_silent_for_two_intervals_and_calls_the_callback_once(tmp_path):
    calls = Calls()
    store = _open(tmp_path, calls)
    study, study_id = _study(store)
    silent = _running(store, study_id, beat_age=10 * INTERVAL)
    never_beat = _running(store, study_id, beat_age=None, started_ago=10 * INTERVAL)
    fresh = _running(store, study_id, beat_age=0.0)
    just_started = _running(store, study_id, beat_age=None)

    storage.fail_stale_trials(study)

    silent_state, never_state = _state(store, silent), _state(store, never_beat)
    assert silent_state == TrialState.FAIL, broken(FAIL_STALE, "a trial silent for two intervals was not failed")
    assert never_state == TrialState.FAIL, broken(FAIL_STALE, "a trial started long ago, never beating, was not failed")
    assert _state(store, fresh) == TrialState.RUNNING, broken(FAIL_STALE, "a trial with a fresh heartbeat was failed")
    assert _state(store, just_started) == TrialState.RUNNING, broken(FAIL_STALE, "a trial that just started was failed")
    expected = [("s", store.get_trial(i).number, TrialState.FAIL) for i in (silent, never_beat)]
    callback = f"{BASE}.get_heartbeat_stale_trial_callback"
    assert calls.seen == expected, broken(callback, f"the stale callback saw {calls.seen}, expected {expected}")

    # Judged again, here and by another process with its own storage: nobody calls it twice.
    storage.fail_stale_trials(study)
    other = _open(tmp_path, calls)
    storage.fail_stale_trials(optuna.load_study(study_name="s", storage=other))
    assert calls.seen == expected, broken(callback, f"the stale callback ran more than once per trial: {calls.seen}")


def test_a_fresh_heartbeat_keeps_a_trial_running(tmp_path):
    calls = Calls()
    store = _open(tmp_path, calls)
    study, study_id = _study(store)
    beating = _running(store, study_id, started_ago=10 * INTERVAL)
    store.record_heartbeat(beating)  # through the storage, as the worker beats
    one_interval = _running(store, study_id, beat_age=INTERVAL, started_ago=10 * INTERVAL)

    storage.fail_stale_trials(study)

    assert _state(store, beating) == TrialState.RUNNING, broken(FAIL_STALE, "a trial that just beat was failed")
    one_state = _state(store, one_interval)
    assert one_state == TrialState.RUNNING, broken(FAIL_STALE, "a trial one interval after its beat was failed")
    assert calls.seen == [], broken(FAIL_STALE, f"the stale callback ran for live trials: {calls.seen}")
    assert store.stale_trial_ids(study_id) == []


def test_the_stale_trial_ids_are_the_ones_the_storage_itself_looks_up(tmp_path):
    # Two studies in one journal, their trials interleaved: trial ids are not trial numbers, so a
    # wrong id would fail another study's trial.
    calls = Calls()
    store = _open(tmp_path, calls)
    study_a, a_id = _study(store, "a")
    study_b, b_id = _study(store, "b")
    for _ in range(3):
        _running(store, a_id, beat_age=10 * INTERVAL)
        _running(store, b_id, beat_age=0.0)
    dead_b = [_running(store, b_id, beat_age=10 * INTERVAL) for _ in range(2)]
    numbers = [store.get_trial(i).number for i in dead_b]
    assert dead_b != numbers  # the test means something only when they differ

    found = store.stale_trial_ids(b_id)
    looked_up = [store.get_trial_id_from_study_id_trial_number(b_id, n) for n in numbers]
    assert found == dead_b == looked_up, (
        f"the stale trial ids {found} are not the ids of the dead trials {dead_b} (the storage looks up {looked_up}): "
        "fail_stale_trials would fail the wrong trials"
    )
    hook = getattr(store, optuna_private.STALE_TRIAL_IDS_HOOK)
    assert hook(b_id) == found, broken(HOOK, "it no longer gives the ids of stale_trial_ids")

    storage.fail_stale_trials(study_b)
    b_states = {t.number: t.state for t in study_b.get_trials(deepcopy=False)}
    assert [n for n, s in b_states.items() if s == TrialState.FAIL] == numbers, broken(
        "optuna.storages.fail_stale_trials", f"it failed trials {b_states} of study b, expected exactly {numbers}"
    )
    assert all(t.state == TrialState.RUNNING for t in study_a.get_trials(deepcopy=False))
    assert calls.seen == [("b", n, TrialState.FAIL) for n in numbers]


def _fresh_copy_of_optuna_private():
    """Import optuna_private again under another name, leaving the loaded one alone."""
    spec = importlib.util.spec_from_file_location("ftsearch_optuna_private_copy", optuna_private.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_missing_base_heartbeat_stops_ftsearch_with_a_message_naming_it(monkeypatch):
    monkeypatch.delattr(_heartbeat_module(), "BaseHeartbeat")
    with pytest.raises(ImportError) as raised:
        _fresh_copy_of_optuna_private()
    assert type(raised.value).__name__ == "OptunaPrivateAPIError"
    assert isinstance(raised.value, FtsearchError)  # the CLI prints it as a message, not a traceback
    message = str(raised.value)
    assert f"Optuna version ({optuna.__version__}) changed a private API ftsearch depends on" in message
    assert "optuna.storages._heartbeat.BaseHeartbeat" in message and "cannot be imported" in message


def test_changed_abstract_methods_stop_ftsearch_with_a_message_naming_them(monkeypatch):
    base = _heartbeat_module().BaseHeartbeat
    renamed = (optuna_private.HEARTBEAT_METHODS - {"_get_stale_trial_ids"}) | {"_get_stale_trials"}
    monkeypatch.setattr(base, "__abstractmethods__", frozenset(renamed))
    with pytest.raises(ImportError) as raised:
        _fresh_copy_of_optuna_private()
    message = str(raised.value)
    assert "changed a private API" in message and "optuna.storages._heartbeat.BaseHeartbeat" in message
    assert "no longer abstract ['_get_stale_trial_ids']" in message
    assert "newly abstract ['_get_stale_trials']" in message


def test_no_ftsearch_module_but_the_fence_names_a_private_optuna_api():
    # Private Optuna names belong in optuna_private.py, where the checks above guard them.
    import re
    from pathlib import Path

    import ftsearch

    package = Path(ftsearch.__file__).parent
    private = re.compile(
        r"optuna(\.\w+)*\._\w+|\b(study|trial|frozen)\._\w+|\._trial_id\b|\b_get_stale_trial_ids\b|\bBaseHeartbeat\b"
    )
    offenders = [
        f"{path.relative_to(package)}:{n}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "optuna_private.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    fence = "ftsearch/distributed/optuna_private.py"
    assert not offenders, f"private Optuna APIs used outside {fence}:\n" + "\n".join(offenders)
