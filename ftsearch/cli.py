"""The ``ftsearch`` command: search, check, worker, promote, predict, ui, serve, export, report, repair-journal. Thin: parses arguments and calls the package."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftsearch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    search = commands.add_parser("search", help="run or resume a study")
    search.add_argument("study", help="a study name under studies/ (e.g. imdb) or a path to a study file")
    search.add_argument("--n-trials", type=int, help="trials the study should reach (overrides the file)")
    search.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    search.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a study-file field, e.g. --set search.lr.high=1e-3 (repeatable)",
    )
    search.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    search.add_argument("--fresh", action="store_true", help="start a new study instead of resuming")
    search.add_argument("--warm-start", metavar="STUDY",
                        help="try the top trials of an earlier study or generation (e.g. imdb.2) first, where they fit")
    search.add_argument("--warm-start-trials", type=_positive_int, metavar="N",
                        help="how many of its top trials (default 3)")
    _trial_arguments(search)
    parallelism = search.add_mutually_exclusive_group()
    parallelism.add_argument(
        "--workers", type=_positive_int, default=1, metavar="N",
        help="worker processes on this machine (one GPU each when there are GPUs; default 1)",
    )
    parallelism.add_argument(
        "--trials-per-gpu", type=_positive_int, default=1, metavar="N",
        help="N worker processes on each GPU, each with 1/N of its memory (without a GPU: N sharing the CPU)",
    )

    check = commands.add_parser(
        "check", help="check a study's data and print what was found (creates no study and no run)"
    )
    check.add_argument("study", help="a study name under studies/ (e.g. imdb) or a path to a study file")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a study-file field, as for search (repeatable)")
    check.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="the device whose plan is checked (a CPU plan subsamples the data)")
    check.add_argument("--output", type=Path, metavar="PATH", help="also write the report as JSON to PATH")

    worker = commands.add_parser(
        "worker", help="join a study that `ftsearch search` started (another machine: shared --storage and MLflow server)"
    )
    worker.add_argument("study", help="the same study name or file as the search process")
    worker.add_argument("--timeout", type=float, help="seconds after which this worker starts no new trial")
    worker.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="the same --set overrides as the search process")
    worker.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    worker.add_argument("--wait", type=float, default=600, metavar="SECONDS",
                        help="how long to wait for the search process to start the study (default 600)")
    _trial_arguments(worker)

    promote = commands.add_parser("promote", help="move the champion alias to the study's candidate model")
    promote.add_argument("study", help="a study name under studies/ or a path to a study file")
    promote.add_argument("--force", action="store_true", help="promote even if it does not beat the champion")

    report = commands.add_parser(
        "report", help="leaderboard of a study's trials, and a self-contained HTML report of it"
    )
    report.add_argument("study", help="a study name under studies/ or a path to a study file")
    report.add_argument("--top", type=_positive_int, default=10, metavar="N", help="trials in the leaderboard (default 10)")
    report.add_argument(
        "--output", metavar="PATH",
        help="where to write the HTML report (default: <state dir>/reports/<optuna study>.html)",
    )
    report.add_argument("--storage", help="Optuna storage: a database URL or a journal file path (default: mlruns/optuna.journal)")

    predict = commands.add_parser("predict", help="predict with a registered model")
    predict.add_argument("model_uri", help="e.g. models:/ftsearch-imdb@champion")
    predict.add_argument("inputs", nargs="*", help="texts, or image files for an image model")
    predict.add_argument("--pair", nargs=2, action="append", metavar=("TEXT", "TEXT_PAIR"),
                         help="a pair of texts, for a sentence-pair model (repeatable)")
    predict.add_argument("--input", type=Path, metavar="FILE",
                         help="predict every row of a .csv / .tsv / .jsonl / .parquet file (needs --output)")
    predict.add_argument("--output", type=Path, metavar="FILE", help="where --input's rows go, with the predictions added")
    predict.add_argument("--text-column", metavar="NAME", help="--input's column of the (first) texts or image paths")
    predict.add_argument("--pair-column", metavar="NAME", help="--input's column of the second texts of pairs")
    predict.add_argument("--columns", nargs="+", metavar="NAME",
                         help="names of --input's columns, for a .csv / .tsv file without a header row")

    ui = commands.add_parser("ui", help="the MLflow UI on the studies' store, with a link to each study's runs")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=_positive_int, default=5000, help="port (default 5000)")
    ui.add_argument("--workers", type=_positive_int, help="server processes (default: MLflow's)")

    serve = commands.add_parser(
        "serve", help="serve a registered model over REST (MLflow's scoring server, from this environment)"
    )
    serve.add_argument("target", help="a study (its champion is served) or a model URI, e.g. models:/ftsearch-imdb@candidate")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_positive_int, default=5001, help="port (default 5001; the MLflow UI's is 5000)")
    serve.add_argument("--workers", type=_positive_int, default=1, help="server processes, each with its own model (default 1)")

    export = commands.add_parser(
        "export", help="export a registered model to ONNX, checked against PyTorch and timed under ONNX Runtime"
    )
    export.add_argument("model_uri", help="a registered version: models:/NAME@ALIAS or models:/NAME/VERSION")
    export.add_argument("--format", default="onnx", choices=["onnx"], help="the format (default onnx)")
    export.add_argument("--output", type=Path, metavar="DIR",
                        help="where to write it (default: <state dir>/exports/<name>-v<version>-onnx)")

    repair = commands.add_parser(
        "repair-journal",
        help="repair an Optuna journal file that a stopped writer left damaged (stop its searches and workers first)",
    )
    repair.add_argument("path", nargs="?", type=Path, help="the journal file (default: mlruns/optuna.journal)")
    return parser


def _trial_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        help="Optuna storage: a database URL (postgresql://user:pass@host/db) or a journal file path "
        "(default: mlruns/optuna.journal)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the final summary and errors")
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile each trial's model (pays a compilation per trial; worth it for long trials on a GPU)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, 130 when interrupted)."""
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from ftsearch.errors import FtsearchError

    try:
        return _COMMANDS[args.command](args)
    except FtsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ": the current trial was ended; run the same command again to resume" if args.command in ("search", "worker") else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """ftsearch prints its own progress; the libraries' progress bars and INFO logs are noise."""
    import logging
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # With a tracking server MLflow prints a "View run ... at" link for every run it ends.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="mlflow")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import mlflow  # noqa: F401 - configures its loggers on import; quieten them after that
    import optuna
    from transformers.utils import logging as hf_logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _stop_on_sigterm(signum, frame) -> None:
    # A scheduler's or `kill`'s SIGTERM ends the search like Ctrl-C: runs ended, study resumable.
    raise KeyboardInterrupt


def _search(args: argparse.Namespace) -> int:
    import signal

    from ftsearch.study import SearchOptions, run_search

    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    summary = run_search(
        SearchOptions(
            study=args.study,
            n_trials=args.n_trials,
            timeout=args.timeout,
            overrides=tuple(args.overrides),
            device=args.device,
            fresh=args.fresh,
            storage=args.storage,
            quiet=args.quiet,
            compile=args.compile,
            workers=args.workers,
            trials_per_gpu=args.trials_per_gpu,
            warm_start=args.warm_start,
            warm_start_trials=args.warm_start_trials,
        )
    )
    counts = ", ".join(f"{n} {state.lower()}" for state, n in summary.counts.items())
    print(f"study {summary.study_name} done in {summary.seconds:.0f} s: {counts} (MLflow parent run {summary.parent_run_id})")
    if summary.best_trial is not None:
        tests = ", ".join(f"{k} {v:.4f}" for k, v in summary.test_metrics.items())
        print(f"best trial {summary.best_trial}: validation {summary.best_value:.4f}")
        print(f"registered {summary.selection} (validation {summary.selection_value:.4f}; {tests}) as version "
              f"{summary.model_version} with alias 'candidate'; promote it with `ftsearch promote {args.study}`")
    return 0


def _worker(args: argparse.Namespace) -> int:
    import signal

    from ftsearch.study import SearchOptions, run_worker

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    options = SearchOptions(
        study=args.study, timeout=args.timeout, overrides=tuple(args.overrides), device=args.device,
        storage=args.storage, quiet=args.quiet, compile=args.compile,
    )
    run_worker(options, wait=args.wait)
    return 0


def _check(args: argparse.Namespace) -> int:
    import json

    import matplotlib.pyplot as plt

    from ftsearch.errors import BaselineUnavailable
    from ftsearch.progress import make_reporter
    from ftsearch.study import SearchOptions, prepare

    reporter = make_reporter(quiet=False)
    prepared = prepare(SearchOptions(study=args.study, overrides=tuple(args.overrides), device=args.device), reporter)
    report = dict(prepared.modality.checks.report)
    try:
        found = prepared.modality.label_issues()
    except BaselineUnavailable as err:
        found = None
        reporter.warn(f"likely label errors not checked: {err}")
    if found is not None:
        for line in found.lines():
            reporter.info(line)
        report["label_issues"] = found.report
        for name, figure in found.figures.items():
            if args.output is not None:
                figure.savefig(args.output.with_name(name))
                print(f"wrote {args.output.with_name(name)}")
            plt.close(figure)
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2))
        print(f"wrote the data report to {args.output}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from ftsearch.config import load_study
    from ftsearch.publish import promote

    config = load_study(args.study)
    print(promote(config.registered_model, config.metric, config.direction == "maximize", force=args.force))
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ftsearch.config import load_study
    from ftsearch.report import REPORT_ARTIFACT, make_report, print_report

    result = make_report(load_study(args.study), Path(args.output) if args.output else None, args.storage)
    print_report(result.report, top=args.top)
    print(f"HTML report: {result.path}")
    if result.logged_to:
        print(f"logged as {REPORT_ARTIFACT} to MLflow parent run {result.logged_to}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ftsearch.errors import FtsearchError

    given = [name for name, value in (("inputs", args.inputs), ("--pair", args.pair), ("--input", args.input)) if value]
    if len(given) != 1:
        together = f"; not {' and '.join(given)} together" if given else ""
        raise FtsearchError("give what to predict as texts (or image paths), as --pair TEXT TEXT_PAIR, "
                            f"or as --input FILE --output FILE{together}")
    if args.input is not None:
        return _predict_file(args)
    if args.output is not None:
        raise FtsearchError("--output goes with --input FILE")
    from ftsearch.serve import predict

    table = predict(args.model_uri, args.inputs, [tuple(p) for p in args.pair] if args.pair else None)
    shown_inputs = args.inputs or [f"{a} || {b}" for a, b in args.pair]
    for text, (_, row) in zip(shown_inputs, table.iterrows(), strict=True):
        print(_prediction_line(row, text))
    return 0


def _prediction_line(row, text: str) -> str:
    """The first column of a prediction (label, labels or number), the highest probabilities, the input."""
    answer = row.iloc[0]
    answer = f"{answer:.4g}" if isinstance(answer, float) else (answer or "(none)")
    probs = sorted(((row[c], c.removeprefix("prob_")) for c in row.index if c.startswith("prob_")), reverse=True)
    shown = text if len(text) <= 60 else text[:57] + "..."
    detail = f"\t({', '.join(f'{name} {p:.3f}' for p, name in probs[:5])})" if probs else ""
    return f"{answer}{detail}\t{shown}"


def _predict_file(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from ftsearch.errors import FtsearchError
    from ftsearch.serve import predict_file

    if args.output is None:
        raise FtsearchError("--input needs --output FILE: where the rows go with their predictions")
    renames = {name: column for name, column in (("text", args.text_column), ("path", args.text_column),
                                                   ("text_pair", args.pair_column)) if column}
    with Progress(transient=True, console=_stderr_console()) as progress:
        task = progress.add_task(f"predicting {args.input.name}", total=None)
        rows = predict_file(args.model_uri, args.input, args.output, renames,
                            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
                            columns=args.columns)
    print(f"wrote {rows} predictions to {args.output}")
    return 0


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _ui(args: argparse.Namespace) -> int:
    import os

    from ftsearch import settings, tracking

    base = f"http://{args.host}:{args.port}"
    uri = settings.tracking_uri()
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")  # a tracking server serves its own UI
    pages = tracking.study_pages(base)
    print(f"MLflow UI: {base}")
    for name, url in pages.items():
        print(f"  study {name}: {url}")
    if not pages:
        print("  no study yet: `make search STUDY=imdb` runs one")
    print("  (MLflow opens an experiment on its GenAI overview unless 'Model training' is chosen in its sidebar "
          "once; these links choose it)", flush=True)
    if base == uri.rstrip("/"):
        return 0
    bin_dir = Path(sys.prefix) / "bin"
    command = [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
               *(["--workers", str(args.workers)] if args.workers else [])]
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    os.execve(command[0], command, env)  # the server takes over this process: Ctrl-C reaches it directly


def _serve(args: argparse.Namespace) -> int:
    import os

    from ftsearch.serve import model_uri, server_command

    uri = model_uri(args.target)
    command, env = server_command(uri, args.host, args.port, args.workers)
    print(f"serving {uri} on http://{args.host}:{args.port}/invocations (Ctrl-C stops it)", flush=True)
    os.execve(command[0], command, env)  # the server takes over this process: signals reach it directly


def _export(args: argparse.Namespace) -> int:
    from ftsearch.export import export

    done = export(args.model_uri, args.format, args.output)
    ms = done.latency
    print(f"exported {done.uri} to {done.folder} ({args.format}); its outputs match PyTorch's on {done.checked} "
          f"validation examples (largest difference {done.max_abs_diff:.2g})")
    print(f"latency per example on this CPU: PyTorch {ms['torch_latency_ms']:.2f} ms alone, "
          f"{ms['torch_latency_ms_b32']:.2f} ms in batches of 32; ONNX Runtime {ms['onnx_latency_ms']:.2f} ms alone, "
          f"{ms['onnx_latency_ms_b32']:.2f} ms in batches of 32")
    print(f"logged to run {done.run_id} as onnx/")
    return 0


def _repair_journal(args: argparse.Namespace) -> int:
    from ftsearch import settings
    from ftsearch.distributed.journal import repair_journal
    from ftsearch.distributed.storage import FlockLock
    from ftsearch.errors import FtsearchError

    path = args.path or Path(settings.optuna_storage_url(None))
    if not path.is_file():
        raise FtsearchError(f"no journal file at {path}")
    done = repair_journal(path, FlockLock(path))
    if done.original is None:
        print(f"{path}: nothing to repair")
        return 0
    split = ", ".join(map(str, done.split_lines)) or "none"
    print(f"{path}: repaired ({done.dropped_bytes} torn bytes dropped; records split out of lines: {split}); "
          f"the journal as it was is kept in {done.original}")
    return 0


_COMMANDS = {
    "search": _search, "check": _check, "worker": _worker, "promote": _promote, "predict": _predict, "report": _report,
    "ui": _ui, "serve": _serve, "export": _export, "repair-journal": _repair_journal,
}


if __name__ == "__main__":
    sys.exit(main())
