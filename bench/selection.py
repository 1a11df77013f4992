"""What each selection candidate scores: the single best trial (with ``selection.seeds``: the best
seed of the configuration with the best mean, and the best trial alone beside it), the weight
soup, the ensemble of the top trials and the blend with the baseline, on validation and on test,
with their inference cost.

Runs the shipped study as ``make search STUDY=<study>`` does (its CPU plan on a CPU), in a fresh
state folder, with one change: every candidate the search judges is also scored on the test split
here, before the search registers the one it chose (the top trials' weights are kept for that). The search itself still
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

    import torch

    from ftsearch import selection, study, tracking
    from ftsearch.checkpoints import TrialCheckpoints
    from ftsearch.generations import best_trial

    TrialCheckpoints.drop_weights = lambda self: None  # keep every top trial's weights for the table
    judged: dict = {}
    real_select = study._select

    def scored_on_test(optuna_study, prepared, parent, runner):
        # Every candidate the search judged, scored on test here before the search registers one.
        found, chosen, members, baseline, configurations = real_select(optuna_study, prepared, parent, runner)
        modality, device, metric = prepared.modality, prepared.device, prepared.config.metric
        for member in [*members.values(), *(c.soup for c in found if c.soup is not None)]:
            selection.add_outputs(member, modality, device, "test")
        y_test = next(iter(members.values())).targets["test"]
        judged["rows"] = [{**c.as_dict(metric), "chosen": c is chosen, f"test_{metric}": c.problem.score(
            y_test, selection.combined_outputs(c, members, baseline, "test"))[metric]} for c in found]
        judged["reevaluation"] = [c.as_dict(metric) for c in configurations]
        best = best_trial(optuna_study)
        kept = TrialCheckpoints.of(optuna_study.study_name).weights(best.number)
        if configurations and kept.is_dir():
            # What the search would have registered without re-evaluation: the best trial's own model.
            alone = selection.trial_member(modality, device, best.number, kept)
            selection.add_outputs(alone, modality, device, "test")
            judged["best_alone"] = {"trial": best.number, f"val_{metric}": best.value,
                                    f"test_{metric}": alone.problem.score(y_test, alone.outputs["test"])[metric]}
        return found, chosen, members, baseline, configurations

    study._select = scored_on_test
    options = study.SearchOptions(study=args.study, overrides=tuple(args.overrides), quiet=False)
    start = time.monotonic()
    summary = study.run_search(options)
    search_seconds = time.monotonic() - start
    config = study.prepare(options).config
    rows = judged["rows"]
    parent_metrics = tracking.client().get_run(summary.parent_run_id).data.metrics
    result = {
        "study": args.study, "overrides": args.overrides, "metric": config.metric,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "device": study.resolve_device(options.device).type, "platform": platform.platform()},
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "search_seconds": round(search_seconds, 1), "counts": summary.counts,
        "baseline": {"val": parent_metrics.get(f"baseline_val_{config.metric}"),
                     "test": parent_metrics.get(f"baseline_test_{config.metric}")},
        "registered": {"version": summary.model_version, "test": summary.test_metrics.get(f"test_{config.metric}")},
        "candidates": rows, "reevaluation": judged["reevaluation"], "best_alone": judged.get("best_alone"),
    }
    out = ROOT / "bench" / "results" / f"selection-{config.name}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str).replace(str(state), "$WORKDIR"))
    print(f"[selection] raw results: {out.relative_to(ROOT)}")
    print(f"search: {search_seconds / 60:.1f} min, trials {summary.counts}")
    print(f"baseline: val {result['baseline']['val']:.4f}  test {result['baseline']['test']:.4f}")
    for c in judged["reevaluation"]:
        values = ", ".join("failed" if r["value"] is None else f"{r['value']:.4f}" for r in c["runs"])
        print(f"trial {c['trial']}'s configuration: val mean {c[f'mean_val_{config.metric}']:.4f} "
              f"+- {c[f'std_val_{config.metric}']:.4f} ({values})")
    if alone := judged.get("best_alone"):
        print(f"{'best trial ' + str(alone['trial']) + ' alone (no re-evaluation)':<45} val {alone[f'val_{config.metric}']:.4f}  "
              f"test {alone[f'test_{config.metric}']:.4f}")
    for row in rows:
        print(f"{row['description']:<45} val {row[f'val_{config.metric}']:.4f}  test {row[f'test_{config.metric}']:.4f}  "
              f"{row['models']} models  {row['ms_per_example']:.2f} ms/example{'  <- registered' if row['chosen'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
