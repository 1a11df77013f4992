"""The report by adaptation method: the method of every trial (an older one without it counted as
freeze), the per-method table's values in the study's direction, and where both reports show them."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from ftsearch import report
from ftsearch.report import print_report, render_html
from ftsearch.report.views import format_count, format_mib, method_rows


def summaries(config) -> list[tuple]:
    """(method, trials, complete, pruned, best trial, its value, s/epoch, trainable, peak MiB) per method."""
    return [(s.method, s.trials, s.complete, s.pruned, s.best.number, s.best.value, s.epoch_seconds,
             s.trainable_params, s.peak_memory_mb) for s in method_rows(report.collect(config))]


def test_trials_carry_their_method_and_costs_and_an_older_trial_counts_as_freeze(methods_study):
    rows = {r.number: r for r in report.collect(methods_study("maximize")).rows}
    assert (rows[1].method, rows[1].trainable_params, rows[1].epoch_seconds, rows[1].peak_memory_mb) == (
        "lora", 12_300, 3.0, 1500.0)
    assert (rows[4].method, rows[4].trainable_params, rows[4].epoch_seconds, rows[4].peak_memory_mb) == (
        "freeze", None, None, None)


def test_methods_are_ranked_by_their_best_completed_trial_highest_first(methods_study):
    """lora's pruned trial reached 0.95, but its best is its best completed trial (0.80); bitfit,
    which never completed, shows its pruned trial's best epoch and comes after the methods that
    completed. freeze's best is the older trial, so its trainable count is the other trial's."""
    assert summaries(methods_study("maximize")) == [
        ("lora", 3, 2, 1, 1, 0.80, pytest.approx(4.0), 12_300, 3000.0),
        ("freeze", 2, 2, 0, 4, 0.72, 2.0, 578, 900.0),
        ("bitfit", 1, 0, 1, 5, 0.99, 1.0, 1_234_567, 700.0),
    ]


def test_methods_of_a_minimize_study_are_ranked_lowest_first(methods_study):
    assert summaries(methods_study("minimize")) == [
        ("freeze", 2, 2, 0, 0, 0.70, 2.0, 578, 900.0),
        ("lora", 3, 2, 1, 2, 0.75, pytest.approx(4.0), 20_000, 3000.0),
        ("bitfit", 1, 0, 1, 5, 0.99, 1.0, 1_234_567, 700.0),
    ]


def test_the_terminal_prints_the_method_column_and_the_table_by_method(methods_study):
    out = io.StringIO()
    print_report(report.collect(methods_study("maximize")), console=Console(file=out, width=160))
    printed = out.getvalue()
    board = printed[:printed.index("By adaptation method")]
    assert re.search(r"trial\s+state\s+val accuracy\s+epochs\s+duration\s+method\s+lr", board)
    trials = {line.split()[0]: line.split() for line in board.splitlines() if re.match(r"\s*\d+\s+(COMPLETE|PRUNED)", line)}
    assert trials["1"][-2:] == ["lora", "0.002"] and trials["4"][-2:] == ["freeze", "0.005"]
    after = printed[printed.index("By adaptation method, all 6 trials"):]
    assert re.search(r"method\s+trials\s+complete\s+pruned\s+best val accuracy\s+best trial\s+time / epoch\s+"
                     r"trainable params\s+peak memory", after)
    table = [line.split() for line in after.splitlines() if line.split()[:1] in (["lora"], ["freeze"], ["bitfit"])]
    assert table == [
        ["lora", "3", "2", "1", "0.8000", "1", "4.0", "s", "12.3k", "2.9", "GiB"],
        ["freeze", "2", "2", "0", "0.7200", "4", "2.0", "s", "578", "900", "MiB"],
        ["bitfit", "1", "0", "1", "0.9900", "5", "(pruned)", "1.0", "s", "1.23M", "700", "MiB"],
    ]


def test_the_html_has_the_method_column_and_the_methods_section(methods_study):
    page = render_html(report.collect(methods_study("minimize")))
    assert ('<tr><th>trial</th><th class="left">state</th><th>val accuracy</th><th>epochs</th><th>duration</th>'
            "<th>method</th><th>lr</th></tr>") in page
    assert re.search(r'<tr class="COMPLETE"><td>4</td>.*<td>freeze</td><td>0\.005</td></tr>', page)
    methods = page[page.index('<section id="methods">'):]
    methods = methods[:methods.index("</section>")]
    assert "<caption>By adaptation method, all 6 trials</caption>" in methods
    rows = re.findall(r"<tr><td class=\"left\">(\w+)</td>(.*?)</tr>", methods)
    assert [(m, re.findall(r"<td>(.*?)</td>", cells)) for m, cells in rows] == [
        ("freeze", ["2", "2", "0", "0.7000", "0", "2.0 s", "578", "900 MiB"]),
        ("lora", ["3", "2", "1", "0.7500", "2", "4.0 s", "20k", "2.9 GiB"]),
        ("bitfit", ["1", "0", "1", "0.9900", "5 (pruned)", "1.0 s", "1.23M", "700 MiB"]),
    ]


def test_an_older_single_method_study_says_freeze_once_and_has_no_method_table(minimize_study):
    """Trials from before methods were recorded: freeze among the shared values, and a sentence
    instead of a per-method table that would only repeat the leaderboard."""
    gathered = report.collect(minimize_study)
    out = io.StringIO()
    print_report(gathered, console=Console(file=out, width=160))
    assert "same in every trial shown: method freeze" in out.getvalue()
    assert "By adaptation method" not in out.getvalue()
    page = render_html(gathered)
    assert "Same in every trial: method freeze." in page
    assert ('<section id="methods"><h2>Methods</h2>\n<p class="note">Every trial used freeze, and none recorded '
            "its trainable parameters, time per epoch or peak memory.</p>") in page


def test_counts_and_memory_read_short():
    assert [format_count(n) for n in (None, 0, 578, 1234, 999_400, 999_999, 22_700_000, 1_100_000_000)] == [
        "—", "0", "578", "1.23k", "999k", "1M", "22.7M", "1.1B"]
    assert [format_mib(m) for m in (None, 850.4, 1023.4, 1023.6, 12_600.0)] == [
        "—", "850 MiB", "1023 MiB", "1.0 GiB", "12.3 GiB"]
