"""Deployment-aware search, measured: a study with two objectives (its metric and the latency of
its models where they are served), then the same study under a latency constraint, then the
constrained study's champion served over REST and exported to ONNX.

Runs the shipped study as ``make search STUDY=<study>`` does (its CPU plan on a CPU), in a fresh
state folder:

1. ``objectives: [<metric>, latency_ms]`` (with ``--set`` changes, e.g. searching several
   ``search.max_length``, so that the trials differ in latency): the Pareto front, how many trials
   are on it, the metric and latency at its two ends, the trial the select rule chose;
2. ``--fresh`` with ``constraints: {latency_ms: {max: B}}``, ``B`` the geometric mean of the
   fastest and the slowest trial of step 1 unless ``--latency-max`` says: which trials were
   infeasible and the registered model (the best feasible one) with its test value;
3. that model promoted and served (``ftsearch serve``): the median latency of requests of 1 and
   of 32 examples (one at a time), and of 100 concurrent single requests;
4. ``ftsearch export --format onnx``: PyTorch and ONNX Runtime latency per example, alone and in
   batches of 32, and the largest output difference.

    .venv/bin/python -m bench.deploy imdb --set 'search.max_length=[64,128,256]' --set n_trials=6

Raw results: ``bench/results/deploy-<study>-<timestamp>.json``; a summary on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("study")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--latency-max", type=float, help="the constraint of step 2, ms per example")
    args = parser.parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="ftsearch-deploy-"))
    os.environ["FTSEARCH_STATE_DIR"] = str(state)
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import torch

    from ftsearch import study
    from ftsearch.export import export
    from ftsearch.generations import front
    from ftsearch.publish import promote

    result: dict = {"study": args.study, "overrides": args.overrides, "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                                "platform": platform.platform()}}

    # 1. Two objectives.
    options = study.SearchOptions(study=args.study, overrides=(*args.overrides, "objectives=[accuracy, latency_ms]"))
    config = study.prepare(options).config
    start = time.monotonic()
    summary = study.run_search(options)
    optuna_study = _optuna_study(summary.study_name)
    completed = [t for t in optuna_study.trials if t.state.name == "COMPLETE"]
    pareto = sorted(front(optuna_study), key=lambda t: t.values[1])
    result["objectives"] = {
        "minutes": round((time.monotonic() - start) / 60, 1), "counts": summary.counts,
        "trials": [_trial(t, config.metric) for t in completed],
        "front": [t.number for t in pareto], "chosen": summary.best_trial,
        "fastest_end": _trial(pareto[0], config.metric), "most_accurate_end": _trial(pareto[-1], config.metric),
        "registered_test": summary.test_metrics.get(f"test_{config.metric}"),
    }

    # 2. A latency constraint that the slowest trials of step 1 break.
    latencies = [t.user_attrs["ftsearch.cost"]["latency_ms"] for t in completed]
    bound = args.latency_max or round(math.sqrt(min(latencies) * max(latencies)), 2)
    options = study.SearchOptions(study=args.study, fresh=True,
                                  overrides=(*args.overrides, f"constraints={{latency_ms: {{max: {bound}}}}}"))
    start = time.monotonic()
    summary = study.run_search(options)
    constrained = _optuna_study(summary.study_name)
    completed = [t for t in constrained.trials if t.state.name == "COMPLETE"]
    result["constrained"] = {
        "latency_max": bound, "minutes": round((time.monotonic() - start) / 60, 1), "counts": summary.counts,
        "trials": [{**_trial(t, config.metric), "feasible": all(v <= 0 for v in t.constraints.values())} for t in completed],
        "registered": {"trial": summary.best_trial, "selection": summary.selection, "version": summary.model_version,
                       **summary.test_metrics},
        "baseline_test": _parent_metric(summary.parent_run_id, f"baseline_test_{config.metric}"),
    }

    # 3. Served.
    print(promote(config.registered_model, config.metric, config.direction == "maximize", force=True))
    result["served"] = _served(args.study, config, state)

    # 4. ONNX.
    exported = export(f"models:/{config.registered_model}@champion", "onnx")
    result["onnx"] = {**exported.latency, "max_abs_diff": exported.max_abs_diff, "checked": exported.checked}

    out = ROOT / "bench" / "results" / f"deploy-{config.name}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str).replace(str(state), "$WORKDIR"))
    print(f"[deploy] raw results: {out.relative_to(ROOT)}")
    _print_summary(result, config.metric)
    return 0


def _optuna_study(name: str):
    import optuna

    from ftsearch import settings
    from ftsearch.distributed.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(settings.optuna_storage_url(None)))


def _trial(trial, metric: str) -> dict:
    cost = trial.user_attrs.get("ftsearch.cost", {})
    return {"trial": trial.number, f"val_{metric}": trial.values[0], "max_length": trial.params.get("max_length"),
            **{k: cost.get(k) for k in ("latency_ms", "latency_ms_b32", "size_mb")}}


def _parent_metric(run_id: str, key: str) -> float | None:
    from ftsearch import tracking

    return tracking.client().get_run(run_id).data.metrics.get(key)


def _served(study_name: str, config, state: Path) -> dict:
    """Median request latency of the served champion: 1 and 32 examples, one at a time; 100 at once."""
    from ftsearch.data.text import load_text_splits
    from tests.helpers import free_port, post_json, start_server, stop

    texts = load_text_splits(config.data, Path(config.source).parent, config.problem.target_kind).val["text"].tolist()
    port = free_port()
    server = start_server([str(Path(sys.prefix) / "bin" / "ftsearch"), "serve", study_name, "--port", str(port)],
                          {**os.environ}, state / "serve.log", cwd=ROOT)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        def one(i: int) -> dict:
            return {"dataframe_split": {"columns": ["text"], "data": [[texts[i % len(texts)]]]}}

        post_json(url, one(0))  # warm-up
        alone = [post_json(url, one(i))[2] for i in range(30)]
        batch = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts[:32]]}}
        batched = [post_json(url, batch)[2] for _ in range(10)]
        with ThreadPoolExecutor(max_workers=100) as pool:
            answers = list(pool.map(lambda i: post_json(url, one(i)), range(100)))
    finally:
        stop(server)
    return {"median_ms_1": 1000 * statistics.median(alone), "median_ms_32": 1000 * statistics.median(batched),
            "concurrent_100_ok": sum(status == 200 for status, _, _ in answers),
            "concurrent_100_median_ms": 1000 * statistics.median(s for _, _, s in answers),
            "concurrent_100_max_ms": 1000 * max(s for _, _, s in answers)}


def _print_summary(result: dict, metric: str) -> None:
    o, c, s, x = result["objectives"], result["constrained"], result["served"], result["onnx"]
    fast, accurate = o["fastest_end"], o["most_accurate_end"]
    print(f"objectives ({o['minutes']} min, {o['counts']}): front of {len(o['front'])} of {len(o['trials'])} completed "
          f"trials {o['front']}; fastest end trial {fast['trial']}: val {fast[f'val_{metric}']:.4f}, "
          f"{fast['latency_ms']:.2f} ms; most accurate end trial {accurate['trial']}: val "
          f"{accurate[f'val_{metric}']:.4f}, {accurate['latency_ms']:.2f} ms; chosen trial {o['chosen']}")
    infeasible = [t["trial"] for t in c["trials"] if not t["feasible"]]
    print(f"constrained to latency_ms <= {c['latency_max']} ({c['minutes']} min): infeasible trials {infeasible}; "
          f"registered {c['registered']['selection']} (test {c['registered'].get(f'test_{metric}')}; "
          f"baseline test {c['baseline_test']})")
    print(f"served: median {s['median_ms_1']:.1f} ms for 1 example, {s['median_ms_32']:.1f} ms for 32; "
          f"{s['concurrent_100_ok']}/100 concurrent requests answered, median {s['concurrent_100_median_ms']:.0f} ms")
    print(f"ONNX: PyTorch {x['torch_latency_ms']:.2f} / {x['torch_latency_ms_b32']:.2f} ms per example (alone / "
          f"batch 32), ONNX Runtime {x['onnx_latency_ms']:.2f} / {x['onnx_latency_ms_b32']:.2f}; largest output "
          f"difference {x['max_abs_diff']:.2g} on {x['checked']} examples")


if __name__ == "__main__":
    sys.exit(main())
