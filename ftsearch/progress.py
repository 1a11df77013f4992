"""Showing a search's progress: one event stream, three ways to show it.

The search reports events (a trial started, a step, an epoch's metrics, a trial's end, the counts
and best so far) to a ``Reporter``; ``make_reporter`` picks how they are shown:

- ``LiveReporter`` when stdout is a terminal: the event lines scroll by above a live display of
  the study's trials (done, pruned, failed of ``n_trials``), the best value so far with its
  params, and the current trial's epoch and steps with elapsed time and ETA.
- ``PlainReporter`` otherwise (CI logs, pipes, captured output): one plain line per event, no
  ANSI codes, nothing redrawn.
- ``QuietReporter`` for ``--quiet``: nothing on stdout (the CLI prints the final summary itself);
  warnings go to stderr.

Warnings (a figure not drawn, data files skipped, a study stopped for repeated failures) are
lines of the event stream on stdout, so they stay in order with the trials around them, except
when quiet, where stdout is kept for the summary and they go to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from ftsearch.formatting import format_params, format_seconds


@dataclass(frozen=True)
class TrialCounts:
    """Finished trials of a study by state; ``done`` (complete + pruned) counts towards n_trials."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0

    @property
    def done(self) -> int:
        return self.complete + self.pruned

    def __str__(self) -> str:
        return f"{self.complete} complete, {self.pruned} pruned, {self.failed} failed"


@dataclass(frozen=True)
class BestTrial:
    """The best trial so far: its number, value and sampled params."""

    number: int
    value: float
    params: Mapping[str, object] = field(default_factory=dict)


class Reporter(Protocol):
    """What the search tells about its progress. Every method is cheap; ``step`` is called on
    every optimiser step. ``close`` is safe to call more than once and must always be called
    (the reporters are context managers)."""

    def info(self, message: str) -> None:
        """A line of context: the plan, the data, the baseline, registration."""

    def warn(self, message: str) -> None:
        """Something the user should know even with --quiet."""

    def study_started(
        self, name: str, *, n_trials: int, metric: str, counts: TrialCounts, best: BestTrial | None, parent_run_id: str
    ) -> None: ...

    def trial_started(self, number: int, params: str, epochs: int) -> None: ...

    def step(self, step: int, total: int) -> None: ...

    def epoch_ended(self, epoch: int, metrics: Mapping[str, float]) -> None: ...

    def trial_ended(self, number: int, state: str, reason: str = "", value: float | None = None) -> None: ...

    def trials_updated(self, counts: TrialCounts, best: BestTrial | None) -> None: ...

    def study_ended(self, counts: TrialCounts, best: BestTrial | None) -> None: ...

    def close(self) -> None: ...


def make_reporter(quiet: bool = False, stream: TextIO | None = None) -> Reporter:
    """Quiet, live (``stream``, default stdout, is a terminal) or plain."""
    if quiet:
        return QuietReporter()
    if is_terminal(stream if stream is not None else sys.stdout):
        return LiveReporter(Console(file=stream))
    return PlainReporter(stream)


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
    except ValueError:  # a closed stream
        return False


_STATE_STYLES = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "KILLED": "red"}


class _Reporter:
    """The event lines and the state shared by every reporter; subclasses say where lines go."""

    def __init__(self) -> None:
        self.name = ""
        self.n_trials = 0
        self.metric = "value"
        self.counts = TrialCounts()
        self.best: BestTrial | None = None
        self.trial: int | None = None
        self.epochs = 0
        self._trial_start = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self, text: str, style: str = "") -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def info(self, message: str) -> None:
        self._line(message)

    def warn(self, message: str) -> None:
        self._line(f"warning: {message}", "yellow")

    def study_started(
        self, name: str, *, n_trials: int, metric: str, counts: TrialCounts, best: BestTrial | None, parent_run_id: str
    ) -> None:
        self.name, self.n_trials, self.metric, self.counts, self.best = name, n_trials, metric, counts, best
        self._line(
            f"optuna study {name}: {counts.done} trial(s) done, {max(0, n_trials - counts.done)} to run; "
            f"MLflow parent run {parent_run_id}"
        )

    def trial_started(self, number: int, params: str, epochs: int) -> None:
        self.trial, self.epochs, self._trial_start = number, epochs, time.monotonic()
        self._line(f"trial {number}: {params}")

    def step(self, step: int, total: int) -> None:
        pass

    def epoch_ended(self, epoch: int, metrics: Mapping[str, float]) -> None:
        values = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self._line(f"  epoch {epoch}/{self.epochs}: {values}" if self.epochs else f"  epoch {epoch}: {values}")

    def trial_ended(self, number: int, state: str, reason: str = "", value: float | None = None) -> None:
        text = f"trial {number}: {state}"
        if number == self.trial:
            text += f" after {format_seconds(time.monotonic() - self._trial_start, tenths=True)}"
        if value is not None:
            text += f", {self.metric} {value:.4f}"
        if reason:
            text += f" - {reason}"
        self.trial = None
        self._line(text, _STATE_STYLES.get(state, ""))

    def trials_updated(self, counts: TrialCounts, best: BestTrial | None) -> None:
        self.counts = counts
        if best is not None and (self.best is None or best.number != self.best.number):
            self.best = best
            self._line(f"best so far: trial {best.number}, {self.metric} {best.value:.4f} ({format_params(best.params)})", "bold")

    def study_ended(self, counts: TrialCounts, best: BestTrial | None) -> None:
        self.counts, self.best = counts, best if best is not None else self.best
        text = f"search over: {counts}"
        if self.best is not None:
            text += f"; best trial {self.best.number}, {self.metric} {self.best.value:.4f}"
        self._line(text)


class PlainReporter(_Reporter):
    """One line per event on ``stream`` (default: whatever ``sys.stdout`` is when printing)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream

    def _line(self, text: str, style: str = "") -> None:
        print(text, file=self.stream if self.stream is not None else sys.stdout, flush=True)


class QuietReporter(_Reporter):
    """Nothing during the search; warnings on stderr."""

    def _line(self, text: str, style: str = "") -> None:
        pass

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class LiveReporter(_Reporter):
    """Event lines printed above a live display of the study and the current trial.

    The display starts with the first trial and stops at the study's end or ``close``; it is
    transient (erased when stopped), so the scrollback keeps just the event lines. While it runs,
    anything else written to stdout or stderr is printed above it too.
    """

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4) -> None:
        super().__init__()
        self.console = console if console is not None else Console()
        self.refresh_per_second = refresh_per_second
        self._trials = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=self.console,
            auto_refresh=False,
        )
        self._trials_task = self._trials.add_task("trials", total=None, counts="")
        self._steps = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            auto_refresh=False,
        )
        self._steps_task = self._steps.add_task("", total=None)
        self._epoch = 0
        self._live: Live | None = None
        self._closed = False

    def _line(self, text: str, style: str = "") -> None:
        self.console.print(Text(text, style=style), soft_wrap=True)  # wrapped by the terminal, like plain lines
        self.refresh()  # the display shows the state the line reports, not the previous one

    def render(self) -> RenderableType:
        """What the live display shows now."""
        if self.best is None:
            best = Text("best: no trial completed yet", style="dim")
        else:
            best = Text.assemble(
                ("best: ", "bold"),
                (f"{self.metric} {self.best.value:.4f}", "bold green"),
                f" (trial {self.best.number}) ",
                (format_params(self.best.params), "dim"),
            )
        best.no_wrap, best.overflow = True, "ellipsis"
        parts: list[RenderableType] = [self._trials, best]
        if self.trial is not None:
            parts.append(self._steps)
        return Group(*parts)

    def refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def _start_live(self) -> None:
        if self._live is None and not self._closed:
            self._live = Live(
                get_renderable=self.render,
                console=self.console,
                refresh_per_second=self.refresh_per_second,
                transient=True,
            )
            self._live.start(refresh=True)

    def _stop_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def _show_counts(self) -> None:
        self._trials.update(
            self._trials_task,
            description=f"study {self.name}",
            total=self.n_trials,
            completed=min(self.counts.done, self.n_trials),
            counts=f"{self.counts.complete} complete · {self.counts.pruned} pruned · {self.counts.failed} failed",
        )

    def study_started(self, name: str, **kwargs) -> None:
        super().study_started(name, **kwargs)
        self._trials.reset(self._trials_task)  # the study's elapsed time starts now
        self._show_counts()

    def trial_started(self, number: int, params: str, epochs: int) -> None:
        super().trial_started(number, params, epochs)
        self._epoch = 1
        self._steps.reset(self._steps_task, total=None, description=self._step_description())
        self._start_live()

    def _step_description(self) -> str:
        return f"trial {self.trial} · epoch {self._epoch}/{self.epochs}"

    def step(self, step: int, total: int) -> None:
        per_epoch = max(1, total // max(1, self.epochs))
        epoch = min(max(1, self.epochs), (step - 1) // per_epoch + 1)
        if epoch != self._epoch:
            self._epoch = epoch
            self._steps.update(self._steps_task, description=self._step_description())
        self._steps.update(self._steps_task, completed=step, total=total)

    def trials_updated(self, counts: TrialCounts, best: BestTrial | None) -> None:
        self.counts = counts
        self._show_counts()
        super().trials_updated(counts, best)

    def study_ended(self, counts: TrialCounts, best: BestTrial | None) -> None:
        self._stop_live()
        super().study_ended(counts, best)

    def close(self) -> None:
        """Stop the display (restoring the cursor and stdout/stderr); safe on any path, any time."""
        self._closed = True
        self._stop_live()
