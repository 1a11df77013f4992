"""Study generations: how `--fresh` names a new study and how resume and report find the latest."""

from ftsearch.generations import generations


def test_generations_of_a_study_and_nothing_else():
    names = ["imdb", "imdb.2", "imdb.10", "imdb-2", "imdb.x", "imdb.02", "other", "other.3", "imdb.2.3"]
    assert generations(names, "imdb") == {1: "imdb", 2: "imdb.2", 10: "imdb.10"}
    assert generations(names, "other") == {1: "other", 3: "other.3"}
    assert generations(names, "missing") == {}


def test_a_dotted_study_name_keeps_its_own_generations():
    assert generations(["v1.x", "v1.x.2", "v1"], "v1.x") == {1: "v1.x", 2: "v1.x.2"}


def test_the_top_trials_are_the_best_first_then_by_value_ties_by_number():
    import optuna

    from ftsearch.generations import top_trials

    for direction, values, expected in (("maximize", [0.7, 0.9, 0.8, 0.9, 0.6], [1, 3, 2]),
                                        ("minimize", [0.7, 0.9, 0.8, 0.6, 0.6], [3, 4, 0])):
        study = optuna.create_study(direction=direction)
        for value in values:
            study.add_trial(optuna.trial.create_trial(value=value))
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
        assert [t.number for t in top_trials(study, 3)] == expected
        assert [t.number for t in top_trials(study, 10)][:3] == expected and len(top_trials(study, 10)) == 5
    assert top_trials(optuna.create_study(), 3) == []
