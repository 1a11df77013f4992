"""Numbers as ftsearch shows them: durations, params and metrics, in the terminal and the HTML.

The one place for number formatting, so that a value reads the same wherever it is shown:

- durations: ``42 s``, ``3 min 05 s``, ``1 h 02 min`` (the live progress shows tenths of a second
  under a minute: ``4.2 s``);
- params: floats to 4 significant digits (3 in the compact progress lines);
- metrics: 4 decimals, signed for a difference; an em dash for a value that does not exist yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MISSING = "—"  # what a value that does not exist (yet) is shown as


def format_seconds(seconds: float | None, *, tenths: bool = False) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; an em dash when unknown. With ``tenths``, a duration
    under a minute keeps one decimal (``4.2 s``), as the live progress shows a trial's time."""
    if seconds is None:
        return MISSING
    if tenths and seconds < 60:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_value(value: Any, digits: int = 4) -> str:
    """A param or metric for display: floats to ``digits`` significant digits, the rest as str()."""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_metric(value: float | None, *, signed: bool = False) -> str:
    """A metric to 4 decimals (``+0.0123`` when ``signed``); an em dash for None."""
    if value is None:
        return MISSING
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def format_params(params: Mapping[str, object], digits: int = 3) -> str:
    """``lr 0.00561, batch_size 16``: params on one line, floats to ``digits`` significant digits."""
    return ", ".join(f"{name} {format_value(value, digits)}" for name, value in params.items())


def first_line(err: BaseException) -> str:
    """An error's first line (its type's name when it says nothing): what a warning quotes of it."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__
