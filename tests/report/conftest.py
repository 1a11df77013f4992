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


@pytest.fixture
def registered_run(tmp_path):
    """Register a candidate of ``model`` whose run holds ``artifacts`` at its root: bytes are
    logged as files, anything else as JSON (``log_dict``). Returns the run's id."""
    from tests.helpers import store

    def register(artifacts: dict, model: str = "tiny-sentiment", tags: dict[str, str] | None = None) -> str:
        client = store()
        run = client.create_run(client.create_experiment(f"handmade-{model}"))
        run_id = run.info.run_id
        for name, content in artifacts.items():
            if isinstance(content, bytes):
                (tmp_path / name).write_bytes(content)
                client.log_artifact(run_id, str(tmp_path / name))
            else:
                client.log_dict(run_id, content, name)
        client.set_terminated(run_id)
        client.create_registered_model(model)
        version = client.create_model_version(model, source=run.info.artifact_uri, run_id=run_id,
                                              tags={"run_id": run_id, "trial_number": "0", **(tags or {})})
        client.set_registered_model_alias(model, "candidate", version.version)
        return run_id

    return register


@pytest.fixture
def minimize_study(write_study):
    """A study on rmse (lower is better) in the test's Optuna storage: three completed trials and
    one pruned whose best epoch beats them all. Returns its config (metric rmse, minimize)."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    # The config's own problem type need not have rmse: the report reads only its name and metric.
    config = load_study(str(write_study())).model_copy(update={"metric": "rmse", "direction": "minimize"})
    study = optuna.create_study(study_name=config.name, storage=open_storage(), direction="minimize")
    lr = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}
    for value, rate in [(0.5, 1e-3), (0.2, 2e-3), (0.9, 3e-3)]:
        study.add_trial(create_trial(value=value, params={"lr": rate}, distributions=lr,
                                     intermediate_values={0: value + 0.1, 1: value}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 4e-3}, distributions=lr,
                                 intermediate_values={0: 0.8, 1: 0.1}))
    return config
