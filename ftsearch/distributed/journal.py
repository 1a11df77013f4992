"""A journal file that survives a writer stopped in the middle of a write.

Optuna's journal is one JSON record per line, appended under a lock. A writer killed inside its
``write()`` (SIGKILL lands between two pages of it), or one whose disk filled up (a short write,
then ENOSPC), leaves a last line with no newline. Optuna's reader never applies such a line (it
takes it for a write still in progress), but its next writer appends right after it, and the two
make one line that is no JSON: the new record is silently not applied, and once anything follows,
every read fails with a ``JSONDecodeError``.

So the torn tail is cut off, under the writers' lock, before it can merge: when the journal is
opened and before every append. The cut bytes are kept next to the journal. They are never
replayed, even when they happen to be a whole record that lost only its newline: no reader ever
applied them, and their writer either died or saw its write fail (and may write it again).

A malformed line that does end in a newline is not what a stopped writer leaves; reading one is
an error naming the line and ``ftsearch repair-journal``, which splits a torn line that a later
record was appended to (what writers without this check leave) and refuses anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from optuna.storages.journal import JournalFileBackend

from ftsearch.errors import FtsearchError

_CHUNK = 1 << 16  # bytes read at a time when looking back for the last newline
_RECORD_START = b'{"op_code":'  # how Optuna's writer begins every record


class JournalLock(Protocol):
    """The journal writers' lock (``storage.FlockLock``, or one of Optuna's lock files)."""

    def acquire(self) -> bool: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class TornTail:
    """An unfinished last line cut from a journal, and where its bytes were kept."""

    journal: Path
    offset: int  # where the torn bytes began: the journal's size now
    size: int  # how many bytes were cut
    kept: Path  # a copy of them

    def __str__(self) -> str:
        return (
            f"the Optuna journal {self.journal} ended in an unfinished line (a writer stopped mid-write): "
            f"dropped its {self.size} bytes from byte {self.offset} on; a copy is in {self.kept}"
        )


@dataclass(frozen=True)
class JournalRepair:
    """What ``repair_journal`` did: the records it split out of torn lines, the torn bytes it cut,
    and where the journal as it was before is kept (None when there was nothing to repair)."""

    journal: Path
    split_lines: tuple[int, ...]  # 1-based numbers of the lines a record was split out of
    dropped_bytes: int
    original: Path | None


def repair_torn_tail(path: Path, lock: JournalLock) -> TornTail | None:
    """Cut an unfinished last line (one without a newline) off the journal at ``path``, under the
    writers' ``lock``, keeping its bytes in ``<journal>.torn-<timestamp>``; None when the journal
    is missing, empty or ends in a newline. Complete lines are never touched, so processes reading
    the journal meanwhile keep their places in it."""
    lock.acquire()
    try:
        return _cut_torn_tail(path)
    finally:
        lock.release()


def _cut_torn_tail(path: Path) -> TornTail | None:
    """``repair_torn_tail`` for a caller that holds the lock."""
    if not path.exists():
        return None
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0 or os.pread(f.fileno(), 1, size - 1) == b"\n":
            return None
        cut = _after_last_newline(f.fileno(), size)
        kept = _side_name(path, "torn")
        with open(kept, "xb") as copy:
            f.seek(cut)
            shutil.copyfileobj(f, copy)
            copy.flush()
            os.fsync(copy.fileno())
        _fsync_dir(path.parent)  # the copy must survive a crash before the bytes are cut
        f.truncate(cut)
        os.fsync(f.fileno())
    return TornTail(journal=path, offset=cut, size=size - cut, kept=kept)


def _after_last_newline(fd: int, size: int) -> int:
    """The offset just after the last newline of the file (0 when it has none)."""
    end = size
    while end > 0:
        start = max(0, end - _CHUNK)
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _side_name(journal: Path, kind: str) -> Path:
    """A free name ``<journal>.<kind>-<timestamp>`` (``.1``, ``.2``... added within one second).
    Its callers hold the writers' lock, so no other ftsearch process takes the name meanwhile."""
    stem = f"{journal}.{kind}-{time.strftime('%Y%m%dT%H%M%S')}"
    candidate, n = Path(stem), 0
    while candidate.exists():
        n += 1
        candidate = Path(f"{stem}.{n}")
    return candidate


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def malformed_line(path: Path) -> tuple[int, str] | None:
    """The first newline-terminated line of the journal that is not a JSON record, as (1-based
    line number, what is wrong with it); None when there is none."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return None  # an unfinished last line is a torn tail, not corruption
            problem = _problem(line)
            if problem is not None:
                return number, problem
    return None


def _problem(line: bytes) -> str | None:
    """What makes ``line`` no journal record, in words; None when it is one."""
    try:
        record = json.loads(line.decode("utf-8"))  # Optuna writes ASCII; decoding here keeps json from guessing UTF-16
    except UnicodeDecodeError:
        return "bytes that are not text"
    except json.JSONDecodeError as err:
        return f"{err.msg} at character {err.pos + 1}"
    return None if isinstance(record, dict) and "op_code" in record else "JSON, but no Optuna record"


def corrupt_error(path: Path, number: int, problem: str) -> FtsearchError:
    """The error for a malformed line in the middle of a journal, naming the repair command."""
    return FtsearchError(
        f"the Optuna journal {path} is damaged at line {number} ({problem}). Stop every search and "
        f"worker using it, then run `ftsearch repair-journal {path}`"
    )


def repair_journal(path: Path, lock: JournalLock) -> JournalRepair:
    """Repair the journal at ``path`` (no process may be using it; ``lock`` is the writers' lock).

    Cuts an unfinished last line, and splits each malformed line that is an unfinished record
    followed by a whole one (a writer appended after a torn write) into that whole record, on its
    own line; the torn bytes are dropped, as no reader ever applied them. The journal as it was is
    kept in ``<journal>.before-repair-<timestamp>``, and the new one replaces it atomically. A
    malformed line with no whole record at its end is refused (FtsearchError): that is not what a
    stopped writer leaves, and dropping a record would renumber the trials after it."""
    lock.acquire()
    try:
        with open(path, "rb") as f:
            lines = list(f)  # split at b"\n" only, as Optuna's reader does
        kept: list[bytes] = []
        split: list[int] = []
        dropped = 0
        for number, line in enumerate(lines, start=1):
            if not line.endswith(b"\n"):
                dropped += len(line)  # the unfinished last line
                continue
            if _problem(line) is None:
                kept.append(line)
                continue
            start = _whole_record_at_end(line)
            if start is None:
                raise FtsearchError(
                    f"cannot repair the Optuna journal {path}: line {number} is not a journal record "
                    f"({_problem(line)}) and does not end in one, so it is not what a stopped writer "
                    f"leaves. Look at it with `sed -n {number}p {path}`, then restore the journal from "
                    "a backup, or move it aside to start its studies afresh"
                )
            kept.append(line[start:])
            split.append(number)
            dropped += start
        if not split and not dropped:
            return JournalRepair(journal=path, split_lines=(), dropped_bytes=0, original=None)
        original = _side_name(path, "before-repair")
        os.link(path, original)  # the journal as it was, under another name, without a copy
        repaired = path.with_name(f"{path.name}.repairing")
        with open(repaired, "wb") as out:
            out.write(b"".join(kept))
            out.flush()
            os.fsync(out.fileno())
        os.replace(repaired, path)
        _fsync_dir(path.parent)
    finally:
        lock.release()
    return JournalRepair(journal=path, split_lines=tuple(split), dropped_bytes=dropped, original=original)


def _whole_record_at_end(line: bytes) -> int | None:
    """Where the whole record that ends ``line`` begins, when the line is an unfinished record
    followed by a whole one; None otherwise. The earliest record start that parses wins: a start
    inside the unfinished part takes the rest of it along and does not parse, and one nested inside
    the whole record leaves its closing braces over."""
    start = line.find(_RECORD_START, 1)
    while start > 0:
        if _problem(line[start:]) is None:
            return start
        start = line.find(_RECORD_START, start + 1)
    return None


class _TailCuttingLock:
    """The writers' lock, cutting a torn tail each time it is taken: Optuna's own append, which
    writes while it holds the lock, then never writes onto one."""

    def __init__(self, lock: JournalLock, path: Path, on_torn_tail: Callable[[TornTail], None]):
        self._lock, self._path, self._on_torn_tail = lock, path, on_torn_tail

    def acquire(self) -> bool:
        self._lock.acquire()
        try:
            torn = _cut_torn_tail(self._path)
        except BaseException:
            self._lock.release()
            raise
        if torn is not None:
            self._on_torn_tail(torn)
        return True

    def release(self) -> None:
        self._lock.release()


class TornTailJournalBackend(JournalFileBackend):
    """Optuna's journal file backend that never lets a torn tail merge with a new record.

    The tail is checked when the journal is opened and, under the lock, before every append: a
    worker killed mid-write leaves the others running, and their next append would merge with what
    it left. Each cut is handed to ``on_torn_tail``. A malformed line met while reading raises
    ``corrupt_error`` instead of Optuna's ``JSONDecodeError``."""

    def __init__(self, path: Path, lock: JournalLock, on_torn_tail: Callable[[TornTail], None]):
        super().__init__(str(path), lock_obj=_TailCuttingLock(lock, path, on_torn_tail))
        self._path = path
        torn = repair_torn_tail(path, lock)
        if torn is not None:
            on_torn_tail(torn)

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        try:
            yield from super().read_logs(log_number_from)
        except ValueError as err:  # Optuna's JSONDecodeError or "Invalid log format."
            found = malformed_line(self._path)
            if found is None:
                raise  # the line was fixed meanwhile: let Optuna's error say what it saw
            raise corrupt_error(self._path, *found) from err
