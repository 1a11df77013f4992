"""From the workers' raw records to metrics, medians, ratios and the markdown table.

Every metric is computed here, from the same raw events, by the same code for all frameworks:

* a trial's window is [start, end] of its Optuna trial (ftsearch, Trainer) or of the loop
  iteration (bare);
* a validation pass runs from the last optimiser step before the framework reports the epoch's
  validation accuracy to that report;
* training time is the span from the trial's first to its last optimiser step, less the
  validation passes inside it; it covers every training batch but the trial's first (whose
  forward and backward run before the first step), so train samples = train size x epochs run -
  batch size. Model loading, tokenising, caching, checkpointing and tracking before the first
  step or after the last are in the trial's wall time, not in its training time.
"""

from __future__ import annotations

import bisect
import math
import statistics

from bench.common import FRAMEWORKS

NAMES = {"ftsearch": "ftsearch", "trainer": "Trainer.hyperparameter_search", "bare": "bare PyTorch"}
PAIRS = (("ftsearch", "trainer"), ("ftsearch", "bare"))

# key, table label, format
METRICS = (
    ("train_samples_per_s", "train throughput, samples/s (median of trials)", "{:.1f}"),
    ("eval_samples_per_s", "eval throughput, samples/s (median of trials)", "{:.1f}"),
    ("trial_wall_s", "wall time per trial, s (median of trials)", "{:.1f}"),
    ("study_wall_s", "study wall time, s (whole call)", "{:.1f}"),
    ("search_wall_s", "search wall time, s (start to last trial's end)", "{:.1f}"),
    ("time_to_target_s", "time to val acc >= {target}, s", "{:.1f}"),
    ("time_to_common_target_s", "time to val acc >= {common} (reached by all), s", "{:.1f}"),
    ("best_val_acc", "best val accuracy", "{:.4f}"),
    ("best_val_acc_at_budget", "best val accuracy within {budget:g} s", "{:.4f}"),
    ("peak_rss_mb", "peak RSS of the process, MB", "{:.0f}"),
    ("cuda_peak_mb", "peak CUDA memory allocated, MB", "{:.0f}"),
    ("tracking_overhead_frac", "tracking time / trial wall (median of trials)", "{:.2%}"),
    ("tracking_study_frac", "tracking time / study wall", "{:.2%}"),
)
THROUGHPUTS = ("train_samples_per_s", "eval_samples_per_s")


def median(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def trial_metrics(record: dict, trial: dict, n_train: int, n_val: int, epochs: int) -> dict:
    """Per-trial metrics from the raw events inside the trial's window."""
    start, end, t0 = trial.get("start"), trial.get("end"), record["t0"]
    config = trial.get("config", {})
    out = {"number": trial["number"], "state": trial.get("state"), "config": config,
           "wall_s": None, "train_s": None, "train_samples": None, "train_samples_per_s": None,
           "eval_s": None, "eval_passes": 0, "eval_samples_per_s": None, "val_acc": trial.get("value"),
           "epoch_accs": [], "optimizer_steps": 0, "tracking_s": None, "tracking_frac": None,
           "start_s": None if start is None else start - t0, "end_s": None if end is None else end - t0}
    if start is None or end is None:
        return out
    steps = [s for s in record["steps"] if start <= s <= end]
    evals = sorted((e for e in record["evals"] if start <= e["t"] <= end), key=lambda e: e["t"])
    out["wall_s"] = end - start
    out["optimizer_steps"] = len(steps)
    out["epoch_accs"] = [e["acc"] for e in evals]
    if evals:
        out["val_acc"] = max(e["acc"] for e in evals)
    windows = []  # (end, duration) of each validation pass
    for e in evals:
        i = bisect.bisect_right(steps, e["t"])
        if i > 0:
            windows.append((e["t"], e["t"] - steps[i - 1]))
    if windows:
        out["eval_s"] = sum(d for _, d in windows)
        out["eval_passes"] = len(windows)
        if out["eval_s"] > 0:
            out["eval_samples_per_s"] = n_val * len(windows) / out["eval_s"]
    if len(steps) >= 2:
        inside = sum(d for t, d in windows if t <= steps[-1])
        out["train_s"] = steps[-1] - steps[0] - inside
        epochs_run = len(evals) or epochs
        out["train_samples"] = n_train * epochs_run - int(config.get("batch_size") or 0)
        if out["train_s"] > 0 and out["train_samples"] > 0:
            out["train_samples_per_s"] = out["train_samples"] / out["train_s"]
    if record.get("tracking") == "mlflow":
        out["tracking_s"] = sum(max(0.0, min(b, end) - max(a, start)) for _, a, b in record["tracking_calls"])
        out["tracking_frac"] = out["tracking_s"] / out["wall_s"] if out["wall_s"] > 0 else None
    elif record.get("tracking"):
        out["tracking_s"], out["tracking_frac"] = 0.0, 0.0
    return out


def run_metrics(record: dict, settings: dict) -> dict:
    """One framework's run (one repeat): per-trial metrics and the study-level ones."""
    trials = [
        trial_metrics(record, t, settings["train_size"], settings["val_size"], settings["epochs"])
        for t in sorted(record["trials"], key=lambda t: t["number"])
    ]
    finished = [t for t in trials if t["end_s"] is not None and t["val_acc"] is not None]
    target, budget = settings["target_acc"], settings["budget_s"]
    reached = [t["end_s"] for t in finished if t["val_acc"] >= target]
    in_budget = [t["val_acc"] for t in finished if t["end_s"] <= budget]
    tracked = record.get("tracking") == "mlflow"
    tracking_total = sum(b - a for _, a, b in record["tracking_calls"]) if tracked else 0.0
    study_wall = record["t_end"] - record["t0"]
    metrics = {
        "train_samples_per_s": median(t["train_samples_per_s"] for t in trials),
        "eval_samples_per_s": median(t["eval_samples_per_s"] for t in trials),
        "trial_wall_s": median(t["wall_s"] for t in trials),
        "study_wall_s": study_wall,
        "search_wall_s": max((t["end_s"] for t in finished), default=None),
        "time_to_target_s": min(reached, default=None),
        "time_to_common_target_s": None,  # filled in once every run is known
        "best_val_acc": max((t["val_acc"] for t in finished), default=None),
        "best_val_acc_at_budget": max(in_budget, default=None),
        "peak_rss_mb": record.get("peak_rss_bytes", 0) / 2**20,
        "cuda_peak_mb": record["cuda_peak_bytes"] / 2**20 if "cuda_peak_bytes" in record else None,
        "tracking_overhead_frac": median(t["tracking_frac"] for t in trials),
        "tracking_study_frac": tracking_total / study_wall if study_wall > 0 else None,
    }
    extra = {
        "tracking_s": tracking_total,
        "tracking_calls": len(record["tracking_calls"]),
        "import_s": record["t0"] - record["process_started"] if record.get("process_started") else None,
        "peak_rss_with_children_mb": record.get("peak_rss_with_children_bytes", 0) / 2**20,
        "trials_run": len(trials),
    }
    return {"metrics": metrics, "extra": extra, "trials": trials}


def time_to(trials: list[dict], target: float) -> float | None:
    return min((t["end_s"] for t in trials if t["end_s"] is not None and t["val_acc"] is not None
                and t["val_acc"] >= target - 1e-12), default=None)


def configs_match(reference: list[dict], other: list[dict]) -> bool:
    """Same sampled configuration trial by trial (seeds aside: Trainer seeds all trials alike)."""
    ref = {t["number"]: t["config"] for t in reference}
    if not other or len(other) != len(ref):
        return False
    for t in other:
        a, b = ref.get(t["number"]), t["config"]
        if a is None or a["freeze_depth"] != b["freeze_depth"] or a["batch_size"] != b["batch_size"]:
            return False
        same_lr = math.isclose(a["lr"], b["lr"], rel_tol=1e-9)
        if not (same_lr and math.isclose(a["weight_decay"], b["weight_decay"], rel_tol=1e-9, abs_tol=1e-15)):
            return False
    return True


def summarise(repeats: list[dict], settings: dict) -> dict:
    """Fill in the common target, then medians over repeats and pairwise ratios within repeats."""
    runs = [run for rep in repeats for run in rep["frameworks"].values() if run.get("ok")]
    bests = [run["metrics"]["best_val_acc"] for run in runs if run["metrics"]["best_val_acc"] is not None]
    common = min(bests) if bests else None
    for run in runs:
        if common is not None:
            run["metrics"]["time_to_common_target_s"] = time_to(run["trials"], common)

    keys = [k for k, _, _ in METRICS]
    for rep in repeats:
        fws = rep["frameworks"]
        rep["ratios"] = {}
        for a, b in PAIRS:
            if fws.get(a, {}).get("ok") and fws.get(b, {}).get("ok"):
                ratio = {}
                for k in keys:
                    x, y = fws[a]["metrics"][k], fws[b]["metrics"][k]
                    ratio[k] = x / y if x is not None and y not in (None, 0) else None
                rep["ratios"][f"{a}/{b}"] = ratio
        ref = fws.get("ftsearch", {})
        rep["configs_match_ftsearch"] = {
            fw: configs_match(ref["trials"], fws[fw]["trials"])
            for fw in fws if fw != "ftsearch" and ref.get("ok") and fws[fw].get("ok")
        }

    medians = {}
    for fw in FRAMEWORKS:
        ok = [rep["frameworks"][fw] for rep in repeats if rep["frameworks"].get(fw, {}).get("ok")]
        if ok:
            medians[fw] = {k: median(run["metrics"][k] for run in ok) for k in keys}
    ratios = {}
    for a, b in PAIRS:
        name = f"{a}/{b}"
        got = [rep["ratios"][name] for rep in repeats if name in rep["ratios"]]
        if got:
            ratios[name] = {k: median(r[k] for r in got) for k in keys}
    return {"common_target": common, "medians": medians, "ratios": ratios, "per_trial": per_trial(repeats)}


def per_trial(repeats: list[dict]) -> list[dict]:
    """Trial by trial (same number = same configuration), medians over repeats."""
    numbers = sorted({t["number"] for rep in repeats for run in rep["frameworks"].values() if run.get("ok")
                      for t in run["trials"]})
    rows = []
    for n in numbers:
        row = {"number": n, "config": None, "frameworks": {}}
        for fw in FRAMEWORKS:
            found = [t for rep in repeats if rep["frameworks"].get(fw, {}).get("ok")
                     for t in rep["frameworks"][fw]["trials"] if t["number"] == n]
            if not found:
                continue
            if row["config"] is None or fw == "ftsearch":
                row["config"] = found[0]["config"]
            row["frameworks"][fw] = {
                k: median(t[k] for t in found)
                for k in ("train_samples_per_s", "eval_samples_per_s", "wall_s", "val_acc", "tracking_frac")
            }
        rows.append(row)
    return rows


# ---- markdown ------------------------------------------------------------------------------------


def _fmt(value, pattern: str) -> str:
    if value is None:
        return "—"
    return pattern.format(value)


def markdown(result: dict) -> str:
    s, summary, machine, versions = result["settings"], result["summary"], result["machine"], result["versions"]
    fws = [fw for fw in FRAMEWORKS if fw in summary["medians"]]
    common = summary["common_target"]
    lines = [
        f"# ftsearch benchmark, {result['started']}",
        "",
        f"Command: `{result['command']}`",
        "",
        (f"Machine: {machine['cpu']}, {machine['cores_logical']} logical / {machine['cores_physical']} physical cores"
         f" ({machine['cores_available']} available), {machine['ram_gb']:.1f} GB RAM, GPU: {machine['gpu'] or 'none'}"),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        (f"Setting: {s['data']}, train {s['train_size']} / val {s['val_size']} (stratified, seed {s['data_seed']}), "
         f"backbone {s['backbone']}, max length {s['max_length']}, {s['epochs']} epoch(s), {s['n_trials']} trials, "
         f"TPE seed {s['sampler_seed']} ({s['startup_trials']} random startup trials), device {s['device']}, "
         f"{s['repeats']} repeat(s); space: lr {s['space']['lr_low']:g}..{s['space']['lr_high']:g} log, "
         f"batch size {s['space']['batch_sizes']}, weight decay {s['space']['weight_decay_low']:g}.."
         f"{s['space']['weight_decay_high']:g}, freeze depth {s['space']['freeze_low']}..{s['space']['freeze_high']}"
         + (" (workers run in parallel: timings meaningless)" if s.get("parallel") else "")),
        "",
        (f"Medians over {s['repeats']} repeat(s); ratios are taken pair by pair within each repeat, then the median. "
         f"Common target: {_fmt(common, '{:.4f}')} (the highest val accuracy every run reached)."),
        "",
        "| metric | " + " | ".join(NAMES[fw] for fw in fws) + " | " + " | ".join(
            f"{a} / {NAMES[b].split('.')[0]}" for a, b in PAIRS if f"{a}/{b}" in summary["ratios"]) + " |",
        "|---|" + "---:|" * (len(fws) + sum(f"{a}/{b}" in summary["ratios"] for a, b in PAIRS)),
    ]
    for key, label, pattern in METRICS:
        if key == "cuda_peak_mb" and all(summary["medians"][fw].get(key) is None for fw in fws):
            continue  # a CPU run
        label = label.format(target=s["target_acc"], common=_fmt(common, "{:.4f}"), budget=s["budget_s"])
        cells = []
        for fw in fws:
            value = summary["medians"][fw].get(key)
            if key.startswith("tracking") and fw != "ftsearch" and value == 0:
                cells.append("0 (no tracking)")
            else:
                cells.append(_fmt(value, pattern))
        for a, b in PAIRS:
            name = f"{a}/{b}"
            if name in summary["ratios"]:
                cells.append(_fmt(summary["ratios"][name].get(key), "{:.2f}x"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += ["", "Per trial (medians over repeats): train samples/s, eval samples/s, wall s, best val acc", "",
              "| trial | freeze | lr | batch | wd | " + " | ".join(NAMES[fw].split(".")[0] for fw in fws) + " |",
              "|---:|---:|---:|---:|---:|" + "---|" * len(fws)]
    for row in summary["per_trial"]:
        c = row["config"] or {}
        cells = []
        for fw in fws:
            m = row["frameworks"].get(fw)
            cells.append("—" if m is None else " / ".join([
                _fmt(m["train_samples_per_s"], "{:.1f}"), _fmt(m["eval_samples_per_s"], "{:.1f}"),
                _fmt(m["wall_s"], "{:.1f}"), _fmt(m["val_acc"], "{:.3f}")]))
        lines.append(f"| {row['number']} | {c.get('freeze_depth')} | {_fmt(c.get('lr'), '{:.2e}')} | "
                     f"{c.get('batch_size')} | {_fmt(c.get('weight_decay'), '{:.3f}')} | " + " | ".join(cells) + " |")

    notes = []
    for rep in result["repeats"]:
        for fw, match in rep.get("configs_match_ftsearch", {}).items():
            if not match:
                notes.append(f"repeat {rep['repeat']}: {NAMES[fw]} ran other configurations than ftsearch "
                             "(expected once TPE leaves its random startup trials)")
        for fw, run in rep["frameworks"].items():
            if not run.get("ok"):
                notes.append(f"repeat {rep['repeat']}: {NAMES[fw]} FAILED: {run.get('error')}")
            elif run.get("data_check") and run["data_check"] != "identical":
                notes.append(f"repeat {rep['repeat']}: ftsearch data check: {run['data_check']}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
