"""A full disk as a message: ``writing(path)`` turns the error of a write that found its file system
full (or the quota spent) into ``DiskFull``, naming the path, the free space and what ftsearch
keeps there that may go."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ftsearch import settings
from ftsearch.errors import FtsearchError

# What each "full" error number means, in the words of the message.
_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class DiskFull(FtsearchError):
    """A write found its file system full (or the user's quota spent). The message names what was
    written, how much is free on that file system and what ftsearch keeps there that may go."""


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a full disk met by what runs inside into ``DiskFull``, naming ``path`` (what is being
    written); any other error passes unchanged.

    When the error names a file on another file system (the temporary folder a library stages
    files in), that file and its file system are named instead: that is the one that is full.
    """
    try:
        yield
    except DiskFull:
        raise
    except Exception as err:
        full = _full(err)
        if full is None:
            raise
        what, os_error = full
        raise DiskFull(_message(what, _written(Path(path), os_error))) from err


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Write ``path`` whole or not at all: the caller writes the file this yields (beside ``path``,
    named for this process, with its suffix), which then replaces ``path`` in one rename, so a
    reader never sees a partial file and a kill or a full disk leaves the previous one whole. On
    any error the partial file is deleted (before the free space is measured); a full disk raises
    ``DiskFull`` naming ``path``."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield partial
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def _full(err: BaseException) -> tuple[str, OSError | None] | None:
    """``(what is full, the OSError saying so)`` when ``err`` comes from a full disk, else None.

    Libraries that write in C++ or Rust hide the OS error: torch's zip writer raises a
    RuntimeError while handling it (so it is in the chain of causes), safetensors keeps only its
    text ("No space left on device (os error 28)"); both are recognised.
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        for code, what in _FULL.items():
            if isinstance(cause, OSError) and cause.errno == code:
                return what, cause
            if os.strerror(code) in str(cause):
                return what, None
        cause = cause.__cause__ or cause.__context__
    return None


def _written(path: Path, os_error: OSError | None) -> Path:
    # A copy's error names the destination second; a failed open or write names it first.
    named = None if os_error is None else (os_error.filename2 or os_error.filename)
    if not isinstance(named, str | bytes | os.PathLike):  # none, or a file descriptor
        return path
    named = Path(os.fsdecode(named))
    with contextlib.suppress(OSError):
        if _existing(named).stat().st_dev != _existing(path).stat().st_dev:
            return named
    return path


def _message(what: str, path: Path) -> str:
    try:
        mount = _mount_point(path)
        usage = shutil.disk_usage(mount)
        room = _what_may_go(mount.stat().st_dev)
        # A library staging files in the temporary folder can be sent elsewhere; ftsearch's state cannot.
        temporary, staged = Path(tempfile.gettempdir()), Path(os.path.abspath(path))
        elsewhere = (f", or set TMPDIR to a folder with room (now {temporary})"
                     if staged.is_relative_to(temporary) and not staged.is_relative_to(settings.state_dir()) else "")
    except OSError:  # the message must not hide the error it explains
        return f"{what} writing {path}: free space unknown; make room on its file system"
    return (f"{what} writing {path}: free space on {mount}: {_size(usage.free)} of {_size(usage.total)}; "
            f"make room there{': ' + ', '.join(room) if room else ''}{elsewhere}")


def _what_may_go(device: int) -> list[str]:
    """What ftsearch keeps on the full file system that may be deleted, with its size."""
    room = []
    cache, checkpoints = settings.cache_dir(), settings.checkpoint_dir()
    if _on(cache, device):
        room.append(f"{cache} ({_size(_bytes_in(cache))}: tokenised data and the frozen-prefix cache, "
                    "rebuilt when needed)")
    if _on(checkpoints, device):
        room.append(f"the folders under {checkpoints} of studies you will not resume "
                    f"({_size(_bytes_in(checkpoints))} in all)")
    return room


def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    path = _existing(path)
    device = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == device:
        path = path.parent
    return path


def _on(folder: Path, device: int) -> bool:
    try:
        return folder.is_dir() and folder.stat().st_dev == device
    except OSError:
        return False


def _bytes_in(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # deleted meanwhile by another worker
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"
