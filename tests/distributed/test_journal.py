"""A journal file torn by a writer stopped mid-write (ftsearch/distributed/journal.py).

What Optuna 5.1 does on its own, which these tests guard against: it ignores an unfinished last
line, its next writer appends right after it (the new record is lost inside a line that is no
JSON: ``create_new_trial`` then fails with an AttributeError), and from then on every read fails
with a ``JSONDecodeError``.
"""

from __future__ import annotations

import optuna
import pytest
from optuna.storages import JournalStorage

from ftsearch.distributed.journal import TornTail, TornTailJournalBackend, repair_journal, repair_torn_tail
from ftsearch.distributed.storage import FlockLock
from ftsearch.errors import FtsearchError


def _x(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0, 1)


def _storage(journal, seen: list[TornTail] | None = None) -> JournalStorage:
    """A journal storage on ``journal`` whose torn tails are appended to ``seen``."""
    sink = seen if seen is not None else []
    return JournalStorage(TornTailJournalBackend(journal, FlockLock(journal), sink.append))


def _lines(tmp_path, trials: int = 2) -> tuple[object, list[bytes]]:
    """A journal of study ``s`` with ``trials`` finished trials, and its lines."""
    journal = tmp_path / "optuna.journal"
    optuna.create_study(study_name="s", storage=_storage(journal)).optimize(_x, n_trials=trials)
    with open(journal, "rb") as f:
        return journal, list(f)


def _states(journal) -> list[str]:
    return [t.state.name for t in optuna.load_study(study_name="s", storage=_storage(journal)).trials]


def _side_files(journal) -> list[str]:
    """The files next to ``journal`` that ftsearch made of it (its lock aside)."""
    names = (p.name for p in journal.parent.iterdir())
    return sorted(n for n in names if n.startswith(f"{journal.name}.") and not n.endswith(".flock"))


@pytest.mark.parametrize("keep", [25, -1, 1], ids=["torn-json", "whole-record-without-newline", "one-byte"])
def test_a_torn_tail_is_cut_and_its_bytes_kept(tmp_path, keep):
    journal, lines = _lines(tmp_path)
    sound, torn = b"".join(lines[:-1]), lines[-1][:keep]
    journal.write_bytes(sound + torn)

    cut = repair_torn_tail(journal, FlockLock(journal))

    assert cut is not None and (cut.offset, cut.size) == (len(sound), len(torn))
    assert journal.read_bytes() == sound
    assert cut.kept.read_bytes() == torn and cut.kept.name.startswith("optuna.journal.torn-")
    assert f"dropped its {len(torn)} bytes" in str(cut) and str(cut.kept) in str(cut)
    # The record whose newline was never written is dropped too: no reader ever applied it.
    assert _states(journal) == ["COMPLETE", "RUNNING"]


def test_a_journal_that_is_one_torn_line_becomes_empty(tmp_path):
    journal = tmp_path / "optuna.journal"
    journal.write_bytes(b'{"op_code":0,"wor')
    cut = repair_torn_tail(journal, FlockLock(journal))
    assert cut is not None and (cut.offset, cut.size) == (0, 17) and journal.read_bytes() == b""


def test_a_torn_tail_longer_than_a_read_is_found(tmp_path):
    journal, lines = _lines(tmp_path)
    sound = b"".join(lines)
    journal.write_bytes(sound + b'{"op_code":8,"user_attr":{"k":"' + b"v" * 200_000)
    cut = repair_torn_tail(journal, FlockLock(journal))
    assert cut is not None and cut.offset == len(sound) and journal.read_bytes() == sound


def test_a_sound_journal_is_left_alone(tmp_path):
    journal, lines = _lines(tmp_path)
    empty = tmp_path / "empty.journal"
    empty.touch()
    for path in (journal, empty, tmp_path / "missing.journal"):
        assert repair_torn_tail(path, FlockLock(path)) is None
    assert journal.read_bytes() == b"".join(lines) and empty.read_bytes() == b""
    assert _side_files(journal) == []


def test_opening_a_journal_cuts_its_torn_tail_and_says_so(tmp_path):
    journal, lines = _lines(tmp_path)
    journal.write_bytes(b"".join(lines) + lines[-1][:30])
    seen: list[TornTail] = []
    study = optuna.load_study(study_name="s", storage=_storage(journal, seen))
    study.optimize(_x, n_trials=1)
    assert [(t.offset, t.size) for t in seen] == [(len(b"".join(lines)), 30)]
    assert _states(journal) == ["COMPLETE"] * 3


def test_a_running_worker_does_not_append_to_what_a_killed_one_left(tmp_path):
    # Two workers share the journal; one dies in the middle of a write; the other goes on.
    journal, lines = _lines(tmp_path)
    seen: list[TornTail] = []
    survivor = optuna.load_study(study_name="s", storage=_storage(journal, seen))
    with open(journal, "ab") as f:
        f.write(lines[-1][:40])

    survivor.optimize(_x, n_trials=2)

    assert [(t.offset, t.size) for t in seen] == [(len(b"".join(lines)), 40)]
    assert _states(journal) == ["COMPLETE"] * 4


def _merged(lines: list[bytes], at: int) -> bytes:
    """The journal a writer without the tail check leaves: it appended line ``at`` right after an
    unfinished copy of the record before it."""
    return b"".join(lines[:at]) + lines[at - 1][:25] + b"".join(lines[at:])


def test_a_damaged_line_in_the_middle_is_refused_with_its_number_and_the_repair(tmp_path):
    journal, lines = _lines(tmp_path)
    journal.write_bytes(_merged(lines, 4))
    with pytest.raises(FtsearchError) as caught:
        _storage(journal)
    message = str(caught.value)
    assert str(journal) in message and "line 5 (" in message and f"ftsearch repair-journal {journal}" in message


def test_repair_splits_a_record_out_of_a_torn_line(tmp_path):
    journal, lines = _lines(tmp_path, trials=3)
    before = b"".join(lines)
    journal.write_bytes(_merged(lines, 4) + lines[-1][:10])

    done = repair_journal(journal, FlockLock(journal))

    assert done.split_lines == (5,) and done.dropped_bytes == 25 + 10
    assert journal.read_bytes() == before  # as if the torn writes had never happened
    assert done.original is not None and done.original.read_bytes() == _merged(lines, 4) + lines[-1][:10]
    assert _states(journal) == ["COMPLETE"] * 3


def test_repair_refuses_a_line_that_does_not_end_in_a_record(tmp_path):
    journal, lines = _lines(tmp_path)
    damaged = b"".join(lines[:3]) + b"\x00" * 40 + b"\n" + b"".join(lines[3:])
    journal.write_bytes(damaged)
    with pytest.raises(FtsearchError, match=r"line 4 is not a journal record .* `sed -n 4p "):
        repair_journal(journal, FlockLock(journal))
    assert journal.read_bytes() == damaged and _side_files(journal) == []


def test_repair_leaves_a_sound_journal_alone(tmp_path):
    journal, lines = _lines(tmp_path)
    done = repair_journal(journal, FlockLock(journal))
    assert (done.split_lines, done.dropped_bytes, done.original) == ((), 0, None)
    assert journal.read_bytes() == b"".join(lines) and _side_files(journal) == []


def test_open_storage_recovers_a_torn_tail(tmp_path, capsys):
    from ftsearch.distributed.storage import open_storage

    journal = tmp_path / "optuna.journal"
    optuna.create_study(study_name="s", storage=open_storage(str(journal))).optimize(_x, n_trials=2)
    whole = journal.read_bytes()
    journal.write_bytes(whole[:-30])  # the last record (trial 1's end) lost its last 30 bytes
    capsys.readouterr()

    study = optuna.load_study(study_name="s", storage=open_storage(str(journal)))
    study.optimize(_x, n_trials=1)

    err = capsys.readouterr().err
    assert f"warning: the Optuna journal {journal} ended in an unfinished line" in err
    assert "dropped its" in err and ".torn-" in err
    states = [t.state.name for t in optuna.load_study(study_name="s", storage=open_storage(str(journal))).trials]
    assert states == ["COMPLETE", "RUNNING", "COMPLETE"]  # trial 1 is left to the heartbeats


def test_open_storage_names_a_damaged_line_and_the_repair(tmp_path):
    from ftsearch.distributed.storage import open_storage

    journal, lines = _lines(tmp_path)
    journal.write_bytes(_merged(lines, 4))
    with pytest.raises(FtsearchError) as caught:
        open_storage(str(journal))
    message = str(caught.value)
    assert message.startswith(f"the Optuna journal {journal} is damaged at line 5 (")
    assert message.endswith(f"run `ftsearch repair-journal {journal}`")


def test_the_repair_command_repairs_then_has_nothing_to_do(tmp_path, capsys):
    from ftsearch.cli import main

    journal, lines = _lines(tmp_path, trials=3)
    journal.write_bytes(_merged(lines, 4))
    assert main(["repair-journal", str(journal)]) == 0
    assert "repaired (25 torn bytes dropped; records split out of lines: 5)" in capsys.readouterr().out
    assert _states(journal) == ["COMPLETE"] * 3
    assert main(["repair-journal", str(journal)]) == 0
    assert "nothing to repair" in capsys.readouterr().out
    assert main(["repair-journal", str(tmp_path / "missing.journal")]) == 2
    assert "no journal file at" in capsys.readouterr().err
