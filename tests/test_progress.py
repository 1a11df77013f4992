"""Progress output: plain lines off a terminal, a live display on one, nothing with --quiet."""

from __future__ import annotations

import io
import re
import sys

import pytest
from rich.console import Console

from ftsearch.cli import main
from ftsearch.progress import (
    BestTrial,
    LiveReporter,
    PlainReporter,
    QuietReporter,
    TrialCounts,
    make_reporter,
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def drive(reporter) -> None:
    """One short study: a resumed study with one trial done runs one more, which becomes the best."""
    with reporter:
        reporter.info("study tiny on CPU: 2 trials")
        reporter.study_started(
            "tiny", n_trials=3, metric="val accuracy", counts=TrialCounts(1, 0, 0),
            best=BestTrial(0, 0.9, {"lr": 0.00561, "batch_size": 16}), parent_run_id="abc123",
        )
        reporter.trial_started(1, "lr 0.005, batch_size 16", epochs=2)
        for step in range(1, 21):
            reporter.step(step, 40)
        reporter.epoch_ended(1, {"train loss": 0.5, "val accuracy": 0.8})
        if isinstance(reporter, LiveReporter):
            reporter.refresh()
        reporter.trial_ended(1, "COMPLETE", value=0.95)
        reporter.trials_updated(TrialCounts(2, 0, 0), BestTrial(1, 0.95, {"lr": 0.005, "batch_size": 16}))
        reporter.trial_started(2, "lr 0.1, batch_size 16", epochs=2)
        reporter.trial_ended(2, "PRUNED", reason="pruned by the median pruner after epoch 1")
        reporter.trials_updated(TrialCounts(2, 1, 0), BestTrial(1, 0.95, {"lr": 0.005, "batch_size": 16}))
        reporter.warn("could not draw the trial's figures: ValueError: no")
        reporter.study_ended(TrialCounts(2, 1, 0), BestTrial(1, 0.95, {"lr": 0.005, "batch_size": 16}))


def test_plain_reporter_prints_one_line_per_event_without_ansi_codes():
    out = io.StringIO()
    drive(PlainReporter(out))
    text = out.getvalue()
    assert "\x1b" not in text
    lines = re.sub(r"after \d+\.\d s", "after T", text).splitlines()
    assert lines == [
        "study tiny on CPU: 2 trials",
        "optuna study tiny: 1 trial(s) done, 2 to run; MLflow parent run abc123",
        "trial 1: lr 0.005, batch_size 16",
        "  epoch 1/2: train loss 0.5000, val accuracy 0.8000",
        "trial 1: COMPLETE after T, val accuracy 0.9500",
        "best so far: trial 1, val accuracy 0.9500 (lr 0.005, batch_size 16)",
        "trial 2: lr 0.1, batch_size 16",
        "trial 2: PRUNED after T - pruned by the median pruner after epoch 1",
        "warning: could not draw the trial's figures: ValueError: no",
        "search over: 2 complete, 1 pruned, 0 failed; best trial 1, val accuracy 0.9500",
    ]


def test_plain_reporter_follows_sys_stdout(capsys):
    PlainReporter().info("hello")
    assert capsys.readouterr().out == "hello\n"


def test_quiet_reporter_prints_nothing_but_warnings_on_stderr(capsys):
    drive(QuietReporter())
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "warning: could not draw the trial's figures: ValueError: no\n"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_make_reporter_picks_live_only_on_a_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    assert isinstance(make_reporter(quiet=True, stream=FakeTerminal()), QuietReporter)
    assert isinstance(make_reporter(stream=io.StringIO()), PlainReporter)
    assert isinstance(make_reporter(stream=FakeTerminal()), LiveReporter)
    monkeypatch.setenv("TERM", "dumb")
    assert isinstance(make_reporter(stream=FakeTerminal()), PlainReporter)


def live_reporter() -> tuple[LiveReporter, io.StringIO]:
    out = io.StringIO()
    # A high refresh rate is not needed: the test refreshes by hand; auto refresh stays harmless.
    return LiveReporter(Console(file=out, force_terminal=True, width=120)), out


def test_live_reporter_renders_counts_best_and_step_progress():
    reporter, out = live_reporter()
    stdout = sys.stdout
    drive(reporter)
    raw = out.getvalue()
    text = ANSI.sub("", raw)
    assert "\x1b[" in raw  # it did draw with terminal codes
    # The study's trials (done of n_trials, by state) and the best so far with its params.
    assert "study tiny" in text and "1/3" in text and "1 complete · 0 pruned · 0 failed" in text
    assert "best: val accuracy 0.9000 (trial 0) lr 0.00561, batch_size 16" in text
    # The current trial: epoch and steps done of the total, elapsed and remaining time.
    assert re.search(r"trial 1 · epoch 1/2 .*20/40 steps \d+:\d\d:\d\d eta \d+:\d\d:\d\d", text)
    # The event lines are printed above it, into the scrollback.
    assert "  epoch 1/2: train loss 0.5000, val accuracy 0.8000" in text
    assert "trial 2: PRUNED after" in text and "search over: 2 complete, 1 pruned, 0 failed" in text
    # Stopped: the cursor is shown again and stdout is no longer redirected into the display.
    assert raw.rstrip("\n").endswith("best trial 1, val accuracy 0.9500") and "\x1b[?25h" in raw
    assert sys.stdout is stdout


def test_live_reporter_updates_the_best_and_counts_after_a_trial():
    reporter, out = live_reporter()
    with reporter:
        reporter.study_started("tiny", n_trials=2, metric="val f1", counts=TrialCounts(), best=None, parent_run_id="r")
        reporter.trial_started(0, "lr 0.01", epochs=1)
        reporter.refresh()
        assert "best: no trial completed yet" in ANSI.sub("", out.getvalue())
        reporter.trial_ended(0, "COMPLETE", value=0.5)
        reporter.trials_updated(TrialCounts(1, 0, 0), BestTrial(0, 0.5, {"lr": 0.01}))
        reporter.trial_started(1, "lr 0.02", epochs=1)
        out.truncate(0)
        reporter.refresh()
        shown = ANSI.sub("", out.getvalue())
        assert "1/2" in shown and "best: val f1 0.5000 (trial 0) lr 0.01" in shown and "trial 1 · epoch 1/1" in shown


def test_live_display_is_stopped_when_the_search_is_interrupted(write_study, monkeypatch):
    import ftsearch.trial as trials_module
    from ftsearch.study import SearchOptions, run_search

    def interrupted_fit(model, train_loader, val_loader, settings, on_epoch_end=None, on_step=None, **kwargs):
        on_step(1, 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(trials_module, "fit", interrupted_fit)
    reporter, out = live_reporter()
    stdout, stderr = sys.stdout, sys.stderr
    with pytest.raises(KeyboardInterrupt):
        run_search(SearchOptions(str(write_study(n_trials=1))), reporter)
    assert reporter._live is None and sys.stdout is stdout and sys.stderr is stderr
    raw = out.getvalue()
    assert "\x1b[?25h" in raw  # the cursor is visible again
    assert "trial 0: KILLED after" in ANSI.sub("", raw)


def test_a_real_search_prints_plain_lines_when_not_a_terminal(write_study, capsys):
    path = write_study(n_trials=1, **{"search.epochs": {"low": 2, "high": 2}})
    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    lines = out.splitlines()
    assert lines[0].startswith("study tiny on CPU")
    assert any(line.startswith("optuna study tiny: 0 trial(s) done, 1 to run") for line in lines)
    assert any(re.fullmatch(r"trial 0: method freeze, backbone .*, lr .*, batch_size 16, .*", line) for line in lines)
    epochs = [line for line in lines if line.startswith("  epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["  epoch 1/2", "  epoch 2/2"]
    assert any(re.fullmatch(r"trial 0: COMPLETE after [\d.]+ s, val accuracy [01]\.\d{4}", line) for line in lines), lines
    assert any(line.startswith("best so far: trial 0, val accuracy ") for line in lines)
    assert any(line.startswith("search over: 1 complete, 0 pruned, 0 failed; best trial 0") for line in lines)
    assert lines[-3].startswith("study tiny done in ")


def test_a_quiet_search_prints_only_the_summary(write_study, capsys):
    path = write_study(n_trials=1, **{"search.epochs": {"low": 2, "high": 2}})
    assert main(["search", str(path), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("study tiny done in ") and "1 complete, 0 pruned, 0 fail" in lines[0]
    assert lines[1].startswith("best trial 0: validation ")
    assert lines[2].startswith("registered trial 0") and "as version 1 with alias 'candidate'" in lines[2]
