"""What a study tries first: the study file's ``enqueue:`` and ``--warm-start STUDY``."""

from __future__ import annotations

from ftsearch.cli import main
from ftsearch.config import load_study
from ftsearch.generations import ENQUEUED_FROM_ATTR, RUN_ID_ATTR
from ftsearch.space import misfits
from tests.helpers import optuna_study, store


def _config(write_study, **changes):
    config = load_study(str(write_study(**changes)), cpu=True)
    return config, {config.backbones[0]: 2}


def test_a_configuration_fits_when_every_value_is_one_the_study_samples(write_study):
    config, blocks = _config(write_study, **{"search.freeze_depth": {"low": 0, "high": 1}})
    assert misfits({"lr": 5e-3, "batch_size": 16, "freeze_depth": 1}, config, blocks) == []
    assert misfits({}, config, blocks) == []
    assert misfits({"lr": 0.9}, config, blocks) == ["lr 0.9: outside [0.004, 0.01]"]
    assert misfits({"batch_size": 64}, config, blocks) == ["batch_size 64: outside the choices 16"]
    assert misfits({"freeze_depth": 1.5}, config, blocks) == ["freeze_depth 1.5: outside [0, 1]"]
    [problem] = misfits({"lora_rank": 16}, config, blocks)
    assert problem.startswith("lora_rank: not searched by this study (it samples ") and "lr" in problem
    # The study's one method is no choice, yet naming it fits; another method does not.
    assert misfits({"method": "freeze"}, config, blocks) == []
    assert misfits({"method": "lora"}, config, blocks)[0].startswith("method: not searched")


def test_a_study_file_entry_that_does_not_fit_is_refused_before_anything_exists(write_study, state_dir, capsys):
    path = write_study(enqueue=[{"lr": 5e-3}, {"lr": 0.9, "batch_size": 16}])
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: enqueue[1] does not fit the study's search space: lr 0.9: outside [0.004, 0.01]" in err
    assert not state_dir.exists() or not any(state_dir.iterdir())


def test_the_study_files_configurations_run_first_once(write_study, capsys):
    path = write_study(n_trials=2, enqueue=[{"lr": 5e-3, "token_mask": 0.05}], **{"search.epochs": {"low": 1, "high": 1}})
    assert main(["search", str(path)]) == 0
    assert "trying first: enqueue[0]" in capsys.readouterr().out
    first = optuna_study("tiny").trials[0]
    assert first.params["lr"] == 5e-3 and first.params["token_mask"] == 0.05
    assert first.user_attrs[ENQUEUED_FROM_ATTR] == "enqueue[0]"
    assert store().get_run(first.user_attrs[RUN_ID_ATTR]).data.tags[ENQUEUED_FROM_ATTR] == "enqueue[0]"
    # Resumed with more trials: the entry is not enqueued again.
    assert main(["search", str(path), "--n-trials", "3"]) == 0
    assert "trying first" not in capsys.readouterr().out
    assert [t.user_attrs.get(ENQUEUED_FROM_ATTR) for t in optuna_study("tiny").trials] == ["enqueue[0]", None, None]


def test_warm_start_enqueues_the_earlier_studys_top_trials_that_fit_and_reports_the_rest(write_study, capsys):
    epochs = {"search.epochs": {"low": 1, "high": 1}}
    assert main(["search", str(write_study(n_trials=3, **epochs))]) == 0
    earlier = sorted(optuna_study("tiny").trials, key=lambda t: -t.value)
    # The new study's learning-rate range keeps only some of the earlier trials' values.
    lrs = sorted(t.params["lr"] for t in earlier)
    narrowed = {"low": lrs[0] * 0.999, "high": (lrs[1] + lrs[2]) / 2}
    fitting = [t for t in earlier if narrowed["low"] <= t.params["lr"] <= narrowed["high"]]
    misfit = [t for t in earlier if t not in fitting]
    capsys.readouterr()

    path = write_study(name="again", n_trials=3, **epochs, **{"search.lr": narrowed})
    assert main(["search", str(path), "--warm-start", "tiny"]) == 0
    out = capsys.readouterr()
    for trial in misfit:
        assert f"warm start: skipped tiny#{trial.number}, which does not fit this study: lr " in out.err + out.out
    trials = optuna_study("again").trials
    assert [t.user_attrs.get(ENQUEUED_FROM_ATTR) for t in trials[:len(fitting)]] == [f"tiny#{t.number}" for t in fitting]
    for new, old in zip(trials, fitting, strict=False):
        assert new.params == old.params
    assert ENQUEUED_FROM_ATTR not in trials[len(fitting)].user_attrs  # then the sampler's own

    assert main(["search", str(path), "--warm-start", "missing"]) == 2
    assert "--warm-start missing: there is no such study in the Optuna storage (its studies: again, tiny)" in capsys.readouterr().err


def test_warm_start_takes_at_most_the_free_trial_slots(write_study, capsys):
    epochs = {"search.epochs": {"low": 1, "high": 1}}
    assert main(["search", str(write_study(n_trials=3, **epochs))]) == 0
    capsys.readouterr()
    assert main(["search", str(write_study(name="small", n_trials=1, **epochs)), "--warm-start", "tiny"]) == 0
    out = capsys.readouterr()
    assert out.out.count("trying first: tiny#") == 1 and "no trial slot left (n_trials 1)" in out.err + out.out
    assert len(optuna_study("small").trials) == 1
