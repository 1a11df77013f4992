"""What the terminal and the HTML report both say: the trial counts line, the params split into
columns and constants, state labels, the per-method table, the baseline comparison, the sentence
on the registered model and its test tables as cells, and the data checks' findings as cells.
Plain strings; each renderer lays them out (and the HTML template escapes them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ftsearch.formatting import MISSING, format_metric, format_seconds
from ftsearch.generations import SELECT_ATTR
from ftsearch.report.collect import TEST_PREFIX, StudyReport, TrialRow, study_argument


def counts_text(report: StudyReport) -> str:
    """``2 complete, 1 pruned``, or ``no trials yet``; then why the stop rule ended the study, if it did."""
    counts = ", ".join(f"{n} {state.lower()}" for state, n in report.counts.items()) or "no trials yet"
    return f"{counts}; stopped early, {report.stopped}" if report.stopped else counts


def shown_params(row: TrialRow) -> dict[str, Any]:
    """The params the leaderboard shows for a trial: its method first, then what Optuna sampled
    (which holds the method itself only when the study searched more than one)."""
    return {"method": row.method} | row.params


def split_params(params: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """(names that differ between the trials' ``params``, names every trial shares with its value).

    A constant column says nothing about why one trial beat another; it is listed once instead.
    Trials without the param (one that failed before sampling it) do not make it vary. With a
    single trial nothing is split off, so its params are still shown as columns.
    """
    names = list(dict.fromkeys(name for values in params for name in values))
    if len(params) < 2:
        return names, {}
    constant = {}
    for name in names:
        values = {repr(row[name]): row[name] for row in params if name in row}
        if len(values) == 1:
            constant[name] = next(iter(values.values()))
    return [n for n in names if n not in constant], constant


def ranking_text(report: StudyReport) -> str:
    """``highest first`` or ``lowest first``: which way the leaderboard ranks the study's metric."""
    return "highest first" if report.maximize else "lowest first"


def front_text(report: StudyReport) -> str:
    """What a study with several objectives kept: its Pareto front and the trial the select rule
    chose from it, and that it pruned nothing."""
    select = report.study.user_attrs.get(SELECT_ATTR, {})
    rule = select.get("rule", "best") + (f", tolerance {select['tolerance']:g}" if select.get("rule") == "within" else "")
    if not report.front:
        chosen = "no completed trial within the constraints yet"
    else:
        chosen = (f"trial{'s' if len(report.front) > 1 else ''} {', '.join(map(str, report.front))}; "
                  f"the select rule ({rule}) chose trial {report.best.number if report.best else '?'}")
    note = report.config.pruning_note()
    return (f"Objectives {', '.join(report.objectives)}. Pareto front: {chosen}."
            + (f" {note[0].upper()}{note[1:]}." if note else ""))


def state_label(row: TrialRow) -> str:
    if row.state == "PRUNED":
        return f"PRUNED at epoch {row.epochs}" if row.epochs else "PRUNED"
    if row.over:
        return f"{row.state}, over {', '.join(row.over)}"
    return row.state


# The leaderboard's columns of what a trial's model costs where it is served (ftsearch.cost).
COST_COLUMNS = (("latency_ms", "ms / example"), ("latency_ms_b32", "ms / ex. at 32"), ("size_mb", "MB"))


def cost_head(report: StudyReport) -> list[str]:
    """The cost columns' headers, when any trial measured its cost (none for older studies)."""
    return [header for _, header in COST_COLUMNS] if any(row.cost for row in report.rows) else []


def cost_cells(report: StudyReport, row: TrialRow) -> list[str]:
    """``row``'s cells under ``cost_head``."""
    if not cost_head(report):
        return []
    return [f"{row.cost[name]:.3g}" if row.cost and name in row.cost else MISSING for name, _ in COST_COLUMNS]


@dataclass(frozen=True)
class MethodSummary:
    """One adaptation method's trials: how many and how they ended, the best of them (``best``,
    None when none has a value yet) and what the method cost: the mean of the trials' seconds per
    epoch, the trainable parameters of its best trial (else of any trial that recorded them) and
    the most memory any trial peaked at (MiB). A cost no trial recorded is None."""

    method: str
    trials: int
    complete: int
    pruned: int
    best: TrialRow | None
    epoch_seconds: float | None
    trainable_params: int | None
    peak_memory_mb: float | None

    @property
    def recorded_cost(self) -> bool:
        """Whether any of the method's trials recorded what it cost."""
        return any(v is not None for v in (self.epoch_seconds, self.trainable_params, self.peak_memory_mb))


def method_rows(report: StudyReport) -> list[MethodSummary]:
    """A summary per method that has trials, ranked like the leaderboard: by the value of each
    method's best trial in the study's direction, methods whose best was pruned after those whose
    best completed, methods with no value last; ties by name."""
    by_method: dict[str, list[TrialRow]] = {}
    for row in report.rows:
        by_method.setdefault(row.method, []).append(row)
    summaries = [_method_summary(method, rows, report.maximize) for method, rows in by_method.items()]

    def rank(summary: MethodSummary) -> tuple:
        best = summary.best
        if best is None or best.value is None:
            return (2, 0.0, summary.method)
        return (0 if best.state == "COMPLETE" else 1, -best.value if report.maximize else best.value, summary.method)

    return sorted(summaries, key=rank)


def _method_summary(method: str, rows: list[TrialRow], maximize: bool) -> MethodSummary:
    best = _best_row(rows, maximize)
    seconds = [r.epoch_seconds for r in rows if r.epoch_seconds is not None]
    trainable = [r.trainable_params for r in ([best] if best else []) + rows if r.trainable_params is not None]
    states = [r.state for r in rows]
    return MethodSummary(
        method=method,
        trials=len(rows),
        complete=states.count("COMPLETE"),
        pruned=states.count("PRUNED"),
        best=best,
        epoch_seconds=sum(seconds) / len(seconds) if seconds else None,
        trainable_params=trainable[0] if trainable else None,
        peak_memory_mb=max((r.peak_memory_mb for r in rows if r.peak_memory_mb is not None), default=None),
    )


def _best_row(rows: list[TrialRow], maximize: bool) -> TrialRow | None:
    """The best completed trial; when none completed, the pruned trial whose best epoch was best
    (the leaderboard's value for it), so that a method the pruner always stopped still shows how
    far it got."""
    for state in ("COMPLETE", "PRUNED"):
        scored = [r for r in rows if r.state == state and r.value is not None]
        if scored:
            return (max if maximize else min)(scored, key=lambda r: r.value)
    return None


def method_table(report: StudyReport, summaries: list[MethodSummary]) -> TableView:
    """The cells of the per-method table of ``summaries`` (from ``method_rows``)."""
    head = ["method", "trials", "complete", "pruned", f"best val {report.metric}", "best trial",
            "time / epoch", "trainable params", "peak memory"]
    rows = []
    for s in summaries:
        best = s.best
        best_trial = MISSING if best is None else f"{best.number}" + ("" if best.state == "COMPLETE" else " (pruned)")
        rows.append([s.method, str(s.trials), str(s.complete), str(s.pruned),
                     format_metric(best.value if best else None), best_trial,
                     format_seconds(s.epoch_seconds, tenths=True), format_count(s.trainable_params),
                     format_mib(s.peak_memory_mb)])
    return TableView("methods", f"By adaptation method, all {len(report.rows)} trials", head, rows, {0})


def methods_gap(summaries: list[MethodSummary]) -> str | None:
    """The sentence that stands in for the per-method table when it would only repeat the
    leaderboard (no trial yet, or a single method and no cost recorded, as in studies run before
    ftsearch recorded them); None when the table is worth showing."""
    if not summaries:
        return "No trial has run yet."
    if len(summaries) > 1 or any(s.recorded_cost for s in summaries):
        return None
    return (f"Every trial used {summaries[0].method}, and none recorded its trainable parameters, "
            "time per epoch or peak memory.")


def format_count(n: int | None) -> str:
    """A parameter count to 3 significant digits: ``578``, ``12.3k``, ``22.7M``, ``1.1B``."""
    if n is None:
        return MISSING
    scaled, suffix = float(n), ""
    for unit in ("k", "M", "B"):
        if abs(scaled) < 999.5:  # not 1000: 999,999 rounded to 3 digits would read 1e+03k, not 1M
            break
        scaled, suffix = scaled / 1000, unit
    return f"{scaled:.3g}{suffix}" if suffix else str(n)


def format_mib(mib: float | None) -> str:
    """Memory given in MiB: ``850 MiB``, or ``12.3 GiB`` from 1 GiB up."""
    if mib is None:
        return MISSING
    return f"{mib:.0f} MiB" if round(mib) < 1024 else f"{mib / 1024:.1f} GiB"


def comparison_rows(report: StudyReport) -> list[tuple[str, str, str]]:
    """(label, val metric, test metric) for the baseline, the best trial, the other candidates the
    search judged (ensemble, blend: test only for the registered one) and the difference between
    the registered model and the baseline, as far as each exists. The difference is taken so that positive means fine-tuning did better
    whichever way the metric goes (for rmse: baseline − fine-tuned), and its label says which."""
    rows = []
    baseline, best = report.baseline, report.best
    best_test = report.best_test.get(f"test_{report.metric}")
    if baseline is not None:
        rows.append((f"classical baseline: {baseline.name}", format_metric(baseline.val), format_metric(baseline.test)))
    if best is not None:
        rows.append((f"best fine-tuned trial ({best.number})", format_metric(best.value), format_metric(best_test)))
    for configuration in report.reevaluation:
        failed = f", {configuration.failed} failed" if configuration.failed else ""
        rows.append((f"trial {configuration.trial}'s configuration ({configuration.seeds} seeds{failed}): mean ± std",
                     f"{format_metric(configuration.mean)} ± {format_metric(configuration.std)}", ""))
    # The best trial's row is above; every other candidate (a re-evaluation's seed of another
    # configuration among them) gets its own.
    others = [c for c in report.candidates if best is None or c.kind != "best" or c.description != f"trial {best.number}"]
    for candidate in others:
        cost = "" if candidate.ms_per_example is None else f", {candidate.ms_per_example:.2f} ms per example"
        models = f"{candidate.models} model{'s' if candidate.models > 1 else ''}"
        label = f"{candidate.description} ({models}{cost}){' - registered' if candidate.chosen else ''}"
        rows.append((label, format_metric(candidate.val), format_metric(candidate.test)))
    chosen = next((c for c in others if c.chosen), None)
    if baseline is not None and chosen is not None:
        # What is registered is the combination: its difference is the one that matters.
        if report.maximize:
            rows.append(("registered − baseline", _difference(chosen.val, baseline.val), _difference(chosen.test, baseline.test)))
        else:
            rows.append(("baseline − registered", _difference(baseline.val, chosen.val), _difference(baseline.test, chosen.test)))
    elif baseline is not None and best is not None:
        if report.maximize:
            rows.append(("fine-tuned − baseline", _difference(best.value, baseline.val),
                         _difference(best_test, baseline.test)))
        else:
            rows.append(("baseline − fine-tuned", _difference(baseline.val, best.value),
                         _difference(baseline.test, best_test)))
    return rows


def _difference(a: float | None, b: float | None) -> str:
    return format_metric(None if a is None or b is None else a - b, signed=True)


def comparison_gaps(report: StudyReport) -> list[str]:
    """Sentences saying which side of the baseline comparison is missing, if any."""
    gaps = []
    if report.baseline is None:
        gaps.append(f"No classical baseline: {report.baseline_skipped}." if report.baseline_skipped
                    else "No classical baseline was logged on the study's parent run.")
    if report.best is None:
        gaps.append("No trial has completed yet, so there is no fine-tuned model to compare.")
    elif f"test_{report.metric}" not in report.best_test:
        gaps.append("The best trial has not been scored on the test split yet (that happens when the search ends).")
    return gaps


def model_sentence(report: StudyReport) -> str:
    """One sentence on the registered champion (or candidate) and its test metrics."""
    model = report.model
    if model is None:
        return (f"no registered model {report.config.registered_model!r} with alias champion or candidate yet "
                "(a search registers its best trial when it ends)")
    tests = ", ".join(f"{k} {format_metric(v)}" for k, v in model.test.items()) or "no test metrics tagged"
    origin = f"trial {model.trial_number} of study {model.optuna_study or '?'}"
    if model.optuna_study and model.optuna_study != report.study_name:
        origin += " (another generation than this report's)"
    hint = "" if model.alias == "champion" else f"; no champion yet: `ftsearch promote {study_argument(report.config)}`"
    return f"{model.alias}: {model.name} v{model.version} from {origin}: {tests}{hint}"


def latency_sentence(report: StudyReport) -> str | None:
    """What the registered model costs per example where it is served: as its trial measured it,
    and with ONNX Runtime beside PyTorch once ``ftsearch export`` timed both; None when nothing
    was measured (a combination of models, an older study)."""
    model = report.model
    ms = model.latency if model is not None else {}

    def pair(key: str) -> str:
        return f"{ms[key]:.2f} ms alone, {ms[key + '_b32']:.2f} ms in batches of 32"

    if "onnx_latency_ms" in ms:
        return (f"Latency per example on the CPU, timed by ftsearch export on the validation split: PyTorch "
                f"{pair('torch_latency_ms')}; ONNX Runtime {pair('onnx_latency_ms')} (outputs within "
                f"{ms['onnx_max_abs_diff']:.2g} of PyTorch's).")
    if "latency_ms" in ms:
        return (f"Latency per example where it is served, as its trial measured it: {pair('latency_ms')}; "
                f"`ftsearch export models:/{model.name}/{model.version}` times it under ONNX Runtime too.")
    return None


def model_metrics(report: StudyReport) -> dict[str, float]:
    """The registered model's validation metric (when tagged) and every test metric it carries."""
    model = report.model
    if model is None:
        return {}
    return ({f"val_{report.metric}": model.val} if model.val is not None else {}) | model.test


TABLE_DECIMALS = 3  # floats in test tables (precision, recall, thresholds...)


@dataclass(frozen=True)
class TableView:
    """A table as cells (a test table, or the per-method table): ``head`` is every column in order
    of first appearance, ``left`` the text columns (aligned left), ``hidden`` how many rows were
    left out after ``rows``."""

    name: str
    caption: str
    head: list[str]
    rows: list[list[str]]
    left: set[int]
    hidden: int = 0


def artifact_caption(name: str) -> str:
    """``test_per_label_f1.png`` -> ``Per label f1 on the test split``: the caption of a test
    figure or table, from its artifact name alone, so that a new problem type needs no wording here."""
    stem = name.removeprefix(TEST_PREFIX).rsplit(".", 1)[0].replace("_", " ").strip() or name
    return f"{stem[:1].upper()}{stem[1:]} on the test split"


def format_cell(value: Any) -> str:
    """A table cell: floats to 3 decimals, ints (and booleans) as they are, None as a dash."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{TABLE_DECIMALS}f}"
    return str(value)


def table_view(name: str, rows: list[dict[str, Any]], limit: int | None = None) -> TableView:
    """The cells of a test table, its first ``limit`` rows (all when None) in the order logged."""
    head = list(dict.fromkeys(column for row in rows for column in row))
    shown = rows if limit is None else rows[:limit]
    # A column is text when any of its values is: a label column stays left even if one is a number.
    left = {i for i, column in enumerate(head) if any(isinstance(row.get(column), str) for row in rows)}
    cells = [[format_cell(row.get(column)) for column in head] for row in shown]
    return TableView(name, artifact_caption(name), head, cells, left, len(rows) - len(shown))


@dataclass(frozen=True)
class DataView:
    """The data checks' findings as cells: a row per split (``splits``), the text's token lengths
    (``tokens``, None when the data is no text) and sentences on what the tables cannot say."""

    splits: TableView
    tokens: TableView | None
    notes: list[str]
    label_issues: TableView | None = None


def data_view(data: dict[str, Any]) -> DataView:
    """The cells and sentences of a ``data_report.json`` (``StudyReport.data``), whichever of its
    parts the study's modality and ``data.dedupe`` left in it, and of its ``label_issues``."""
    truncation = data.get("truncation")
    issues = data.get("label_issues")
    return DataView(_splits_table(data), _tokens_table(truncation) if truncation else None, _data_notes(data),
                    _label_issues_table(issues) if issues else None)


def format_share(share: float | None) -> str:
    """A share as a percentage to a tenth: ``44.0%``; an em dash for None."""
    return MISSING if share is None else f"{share:.1%}"


_Column = tuple[str, Callable[[str], str]]  # a column's name and its cell for a split


def _splits_table(data: dict[str, Any]) -> TableView:
    sizes, balance = data.get("sizes", {}), data.get("class_balance", {})
    columns: list[_Column] = [("rows", lambda split: format_cell(sizes.get(split)))]
    columns += _duplicate_columns(data["duplicates"]) if "duplicates" in data else []
    columns += _balance_columns(balance)
    head = ["split", *(name for name, _ in columns)]
    rows = [[split, *(cell(split) for _, cell in columns)] for split in dict.fromkeys([*sizes, *balance])]
    left = {0} | {i for i, name in enumerate(head) if name == "majority class"}
    return TableView("data-splits", "Rows per split", head, rows, left)


def _duplicate_columns(duplicates: dict[str, Any]) -> list[_Column]:
    within, leaked = duplicates.get("within_split", {}), duplicates.get("leaked_from_earlier_splits", {})
    dropped = duplicates.get("dropped", {})
    columns: list[_Column] = [
        ("repeated within the split", lambda split: format_cell(within.get(split))),
        # Train has no earlier split to leak from: its cell is a dash, not a zero.
        ("also in an earlier split", lambda split: format_cell(leaked.get(split))),
    ]
    if dropped:  # empty unless data.dedupe was drop
        columns.append(("dropped", lambda split: format_cell(dropped.get(split))))
    return columns


def _balance_columns(balance: dict[str, Any]) -> list[_Column]:
    def entry(split: str) -> dict[str, Any]:
        return balance.get(split, {})

    if any("per_label" in e for e in balance.values()):
        return [("labels per example", lambda split: _decimals(entry(split).get("labels_per_example")))]
    if balance:
        return [("majority class", lambda split: format_cell(entry(split).get("majority"))),
                ("majority share", lambda split: format_share(entry(split).get("majority_share")))]
    return []


def _decimals(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _tokens_table(truncation: dict[str, Any]) -> TableView:
    tokens, shares = truncation.get("tokens", {}), truncation.get("truncated_share", {})
    head = ["split", "median tokens", "90th percentile", "longest", *(f"truncated at {m}" for m in shares)]
    row = [truncation.get("split", MISSING), *(format_cell(tokens.get(k)) for k in ("median", "p90", "max")),
           *(format_share(share) for share in shares.values())]
    caption = (f"Token lengths by the {truncation.get('backbone', '?')} tokenizer, and the share of texts "
               "each searched max_length truncates")
    return TableView("data-tokens", caption, head, [row], {0})


def _label_issues_table(issues: dict[str, Any]) -> TableView:
    rows = issues.get("rows", [])
    examples = [c for c in ("text", "text_pair", "path") if any(c in row for row in rows)]
    head = ["train example", "given", "suggested", "label quality", *examples]
    cells = [[format_cell(row.get("index")), format_cell(row.get("given")), format_cell(row.get("suggested")),
              format_cell(row.get("quality")), *(format_cell(row.get(c)) for c in examples)] for row in rows]
    caption = (f"Likely label errors: {issues.get('found', MISSING)} of {issues.get('checked', MISSING)} train "
               f"examples by {issues.get('method', '?')}, worst first (informational: they were trained on)")
    if issues.get("agreement") is not None:
        caption += f"; out of fold, it agrees with {format_share(issues['agreement'])} of the given labels"
    return TableView("data-label-issues", caption, head, cells, {0, 1, 2, *range(4, len(head))},
                     hidden=max(0, int(issues.get("found", 0)) - len(rows)))


def _data_notes(data: dict[str, Any]) -> list[str]:
    notes = _duplicate_notes(data["duplicates"]) if "duplicates" in data else [
        "Duplicates and leaks across splits were not checked (data.dedupe: off)."]
    if "class_balance" not in data:
        notes.append("No class balance: the targets are numbers, not classes.")
    if skipped := data.get("skipped_files"):
        notes.append(f"{skipped} unusable image file(s) were skipped; skipped_files.json on the study's "
                     "parent run lists them.")
    return notes


_DUPLICATES_NOTE = (
    "Repeated and leaked rows are counted in the splits as loaded (texts compared ignoring case and whitespace, "
    "images by perceptual hash, within a few bits), "
    "before any dropping and subsampling; rows are what the trials used. A leak, a validation row whose text "
    "train has or a test row whose text train or validation has, inflates that split's score."
)


def _duplicate_notes(duplicates: dict[str, Any]) -> list[str]:
    notes = [_DUPLICATES_NOTE]
    found = any(duplicates.get("within_split", {}).values()) or any(
        duplicates.get("leaked_from_earlier_splits", {}).values())
    if found and not duplicates.get("dropped"):
        notes.append("The repeated and leaked rows were kept (data.dedupe: warn); data.dedupe: drop removes them.")
    return notes
