"""What each selection candidate scores: the single best trial, the ensemble of the top trials and
the blend with the baseline, on validation and on test, with their inference cost.

Runs the shipped study as ``make search STUDY=<study>`` does (its CPU plan on a CPU), in a fresh
state folder, with one change: the top trials' weights are kept after registration, so that every
candidate, not only the chosen one, can be scored on the test split here. The search itself still
chooses on validation and registers as usual; the test values of the candidates it did not choose
are for this table only.

    .venv/bin/python -m bench.selection imdb [--set KEY=VALUE ...]

Raw results: ``bench/results/selection-<study>-<timestamp>.json``; a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.selection", description=__doc__.split("\n\n")[0])
    parser.add_argument("study")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="ftsearch-selection-"))
    os.environ["FTSEARCH_STATE_DIR"] = str(state)
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import optuna
    import torch

    from ftsearch import selection, study, tracking
    from ftsearch.checkpoints import TrialCheckpoints
    from ftsearch.distributed.storage import open_storage
    from ftsearch.generations import top_trials

    TrialCheckpoints.drop_weights = lambda self: None  # keep every top trial's weights for the table
    options = study.SearchOptions(study=args.study, overrides=tuple(args.overrides), quiet=False)
    start = time.monotonic()
    summary = study.run_search(options)
    search_seconds = time.monotonic() - start

    prepared = study.prepare(options)
    config, modality, device = prepared.config, prepared.modality, prepared.device
    optuna_study = optuna.load_study(study_name=summary.study_name, storage=open_storage())
    checkpoints = TrialCheckpoints.of(summary.study_name)
    members = {}
    for trial in top_trials(optuna_study, config.selection.top_k):
        if checkpoints.weights(trial.number).is_dir():
            member = selection.trial_member(modality, device, trial.number, checkpoints.weights(trial.number))
            selection.add_outputs(member, modality, device, "test")
            members[trial.number] = member
    ranked = list(members.values())
    baseline = modality.baseline_member() if config.selection.blend_baseline else None
    found = selection.candidates(ranked, ranked[0].targets["val"], modality.problem, config.metric,
                                 ensemble=config.selection.ensemble, baseline=baseline)
    chosen = selection.choose(found, modality.problem, config.metric)
    y_test = ranked[0].targets["test"]
    rows = []
    for candidate in found:
        test = candidate.problem.score(y_test, selection.combined_outputs(candidate, members, baseline, "test"))
        rows.append({**candidate.as_dict(config.metric), f"test_{config.metric}": test[config.metric],
                     "chosen": candidate is chosen})
    parent_metrics = tracking.client().get_run(summary.parent_run_id).data.metrics
    result = {
        "study": args.study, "overrides": args.overrides, "metric": config.metric,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "device": device.type, "platform": platform.platform()},
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "search_seconds": round(search_seconds, 1), "counts": summary.counts,
        "baseline": {"val": parent_metrics.get(f"baseline_val_{config.metric}"),
                     "test": parent_metrics.get(f"baseline_test_{config.metric}")},
        "registered": {"version": summary.model_version, "test": summary.test_metrics.get(f"test_{config.metric}")},
        "candidates": rows,
    }
    out = ROOT / "bench" / "results" / f"selection-{config.name}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str).replace(str(state), "$WORKDIR"))
    print(f"[selection] raw results: {out.relative_to(ROOT)}")
    print(f"search: {search_seconds / 60:.1f} min, trials {summary.counts}")
    print(f"baseline: val {result['baseline']['val']:.4f}  test {result['baseline']['test']:.4f}")
    for row in rows:
        print(f"{row['description']:<45} val {row[f'val_{config.metric}']:.4f}  test {row[f'test_{config.metric}']:.4f}  "
              f"{row['models']} models  {row['ms_per_example']:.2f} ms/example{'  <- registered' if row['chosen'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
