"""Study generations: how `--fresh` names a new study and how resume and report find the latest."""

from ftsearch.generations import generations


def test_generations_of_a_study_and_nothing_else():
    names = ["imdb", "imdb.2", "imdb.10", "imdb-2", "imdb.x", "imdb.02", "other", "other.3", "imdb.2.3"]
    assert generations(names, "imdb") == {1: "imdb", 2: "imdb.2", 10: "imdb.10"}
    assert generations(names, "other") == {1: "other", 3: "other.3"}
    assert generations(names, "missing") == {}


def test_a_dotted_study_name_keeps_its_own_generations():
    assert generations(["v1.x", "v1.x.2", "v1"], "v1.x") == {1: "v1.x", 2: "v1.x.2"}
