"""The benchmark harness (bench/) end to end on its --smoke preset: all three frameworks, 1 repeat.

Tiny synthetic data and a tiny random BERT built on the fly, so it needs neither the IMDB mirror
nor real weights; the timings it produces mean nothing, only their presence and sanity is checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("ftsearch", "trainer", "bare")
PER_FRAMEWORK = (
    "train_samples_per_s", "eval_samples_per_s", "trial_wall_s", "study_wall_s", "search_wall_s",
    "time_to_target_s", "time_to_common_target_s", "best_val_acc", "best_val_acc_at_budget", "peak_rss_mb",
    "tracking_overhead_frac", "tracking_study_frac",
)


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory) -> tuple[dict, str]:
    pytest.importorskip("accelerate")  # Trainer needs it
    pytest.importorskip("psutil")
    out = tmp_path_factory.mktemp("bench-results")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "FTSEARCH_STATE_DIR")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    written = sorted(out.glob("*.json"))
    assert len(written) == 1 and written[0].with_suffix(".md").is_file()
    return json.loads(written[0].read_text()), proc.stdout


def test_every_metric_for_every_framework(smoke_result):
    result, _ = smoke_result
    medians = result["summary"]["medians"]
    assert set(medians) == set(FRAMEWORKS)
    for fw in FRAMEWORKS:
        for key in PER_FRAMEWORK:
            value = medians[fw][key]
            assert value is not None and math.isfinite(value), f"{fw}: {key} = {value}"
        for key in ("train_samples_per_s", "eval_samples_per_s", "trial_wall_s", "study_wall_s", "peak_rss_mb"):
            assert medians[fw][key] > 0, f"{fw}: {key} = {medians[fw][key]}"
        assert 0.0 <= medians[fw]["best_val_acc"] <= 1.0
    # ftsearch tracks to MLflow (its overhead is measured); the other two do not track at all.
    assert 0 < medians["ftsearch"]["tracking_overhead_frac"] < 1
    assert medians["trainer"]["tracking_overhead_frac"] == medians["bare"]["tracking_overhead_frac"] == 0


def test_runs_trials_and_ratios(smoke_result):
    result, _ = smoke_result
    (repeat,) = result["repeats"]
    for fw in FRAMEWORKS:
        run = repeat["frameworks"][fw]
        assert run["ok"], run.get("error")
        assert len(run["trials"]) == result["settings"]["n_trials"] == 2
        for trial in run["trials"]:
            assert trial["train_samples_per_s"] > 0 and math.isfinite(trial["train_samples_per_s"])
            assert trial["eval_samples_per_s"] > 0 and math.isfinite(trial["eval_samples_per_s"])
            assert trial["wall_s"] > 0 and trial["eval_passes"] == result["settings"]["epochs"]
    # Same space, same sampler seed: all three ran the same configurations on the same rows.
    assert repeat["configs_match_ftsearch"] == {"trainer": True, "bare": True}
    assert repeat["frameworks"]["ftsearch"]["data_check"] == "identical"
    for pair in ("ftsearch/trainer", "ftsearch/bare"):
        assert result["summary"]["ratios"][pair]["train_samples_per_s"] > 0


def test_report_says_where_and_how(smoke_result):
    result, stdout = smoke_result
    assert "--smoke" in result["command"]
    for key in ("python", "torch", "transformers", "optuna", "mlflow"):
        assert result["versions"][key]
    assert result["machine"]["cores_logical"] >= 1 and result["machine"]["ram_gb"] > 0
    assert "cpu_plan" not in result["settings"]["ftsearch_study"]
    assert "| train throughput" in stdout  # the table is printed
