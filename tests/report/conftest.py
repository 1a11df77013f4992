"""The study the report tests are about: a real tiny search, run once for all of them."""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import pytest
import yaml

from ftsearch.cli import main
from ftsearch.config import load_study
from ftsearch.distributed.storage import open_storage
from tests.helpers import tiny_study


@pytest.fixture(scope="session")
def reported(tmp_path_factory, tiny_bert, tiny_reviews):
    """A 3-trial study (two completed, one pruned), promoted, then reported once with the defaults.

    Returns (state root, study file, terminal output)."""
    root = tmp_path_factory.mktemp("reported")
    study_file = root / "tiny.yaml"
    pruned = {"name": "median", "min_epochs": 1, "startup_trials": 2}  # trials 0 and 1 are never pruned
    study_file.write_text(yaml.safe_dump(tiny_study(tiny_bert, tiny_reviews, n_trials=3, pruner=pruned)))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the enqueued lr 0.9 is outside the searched range
        mp.setenv("FTSEARCH_STATE_DIR", str(root / "mlruns"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        from ftsearch.study import open_study

        study = open_study(load_study(str(study_file), cpu=True), open_storage(), fresh=False)
        for lr in (8e-3, 5e-3, 0.9):  # 0.9 cannot learn: the median pruner stops it (or its loss blows up)
            study.enqueue_trial({"lr": lr})
        assert main(["search", str(study_file), "--quiet"]) == 0
        assert main(["promote", str(study_file)]) == 0
        with contextlib.redirect_stdout(out):
            assert main(["report", str(study_file)]) == 0
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return root, study_file, out.getvalue()


@pytest.fixture
def in_reported(reported, monkeypatch):
    monkeypatch.setenv("FTSEARCH_STATE_DIR", str(reported[0] / "mlruns"))
    return reported


@pytest.fixture
def handmade(write_study):
    """A StudyReport built by hand (an empty in-memory study, nothing in MLflow) with ``changes``:
    for what a real search does not produce on demand (other metrics, markup in user text)."""
    import optuna

    from ftsearch.report import StudyReport

    def make(**changes) -> StudyReport:
        fields = {
            "config": load_study(str(write_study())),
            "study": optuna.create_study(study_name="tiny", direction="maximize"),
            "storage_url": "in memory",
            "parent_run_id": None,
            "rows": [],
            "counts": {},
            "curves": {},
            "baseline": None,
            "best": None,
            "best_test": {},
            "model": None,
            "notes": [],
        }
        return StudyReport(**(fields | changes))

    return make
