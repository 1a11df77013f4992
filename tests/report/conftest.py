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
            "data": None,
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


@pytest.fixture
def methods_study(write_study):
    """Make a study on accuracy in the test's Optuna storage whose trials used three methods, in
    the given direction. Returns its config. Trial by trial (value: the objective, or for a pruned
    trial its epochs):

    0 freeze COMPLETE 0.70   578 trainable, 2 s/epoch, 900 MiB
    1 lora   COMPLETE 0.80   12,300 trainable, 3 s/epoch, 1500 MiB
    2 lora   COMPLETE 0.75   20,000 trainable, 5 s/epoch, 2500 MiB
    3 lora   PRUNED   0.6, 0.95   20,000 trainable, 4 s/epoch, 3000 MiB
    4 (none) COMPLETE 0.72   an older trial: no method, no costs recorded
    5 bitfit PRUNED   0.99   1,234,567 trainable, 1 s/epoch, 700 MiB
    """
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from ftsearch.generations import EPOCH_SECONDS_ATTR, METHOD_ATTR, PEAK_MEMORY_ATTR, TRAINABLE_ATTR

    distributions = {"lr": FloatDistribution(1e-4, 1e-1, log=True),
                     "method": CategoricalDistribution(("freeze", "lora", "bitfit"))}
    trials = [  # (method, state, value, intermediate values, trainable, seconds per epoch, peak MiB)
        ("freeze", TrialState.COMPLETE, 0.70, {0: 0.70}, 578, 2.0, 900.0),
        ("lora", TrialState.COMPLETE, 0.80, {0: 0.80}, 12_300, 3.0, 1500.0),
        ("lora", TrialState.COMPLETE, 0.75, {0: 0.75}, 20_000, 5.0, 2500.0),
        ("lora", TrialState.PRUNED, None, {0: 0.6, 1: 0.95}, 20_000, 4.0, 3000.0),
        (None, TrialState.COMPLETE, 0.72, {0: 0.72}, None, None, None),
        ("bitfit", TrialState.PRUNED, None, {0: 0.99}, 1_234_567, 1.0, 700.0),
    ]

    def make(direction: str):
        config = load_study(str(write_study())).model_copy(update={"direction": direction})
        study = optuna.create_study(study_name=config.name, storage=open_storage(), direction=direction)
        for i, (method, state, value, intermediate, trainable, seconds, peak) in enumerate(trials):
            params = {"lr": 1e-3 * (i + 1)} | ({"method": method} if method else {})
            attrs = {METHOD_ATTR: method, TRAINABLE_ATTR: trainable, EPOCH_SECONDS_ATTR: seconds,
                     PEAK_MEMORY_ATTR: peak} if method else {}
            study.add_trial(create_trial(state=state, value=value, params=params, user_attrs=attrs,
                                         distributions={k: distributions[k] for k in params},
                                         intermediate_values=intermediate))
        return config

    return make
