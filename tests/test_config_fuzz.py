"""Fuzzing the study-file loader: whatever a study file holds, the user gets FtsearchError (the CLI's
clear message and exit code 2) or a valid config, never a traceback."""

from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftsearch.config import STUDIES_DIR, StudyConfig, load_study
from ftsearch.errors import FtsearchError

SHIPPED = {p.stem: yaml.safe_load(p.read_text()) for p in STUDIES_DIR.rglob("*.yaml")}
KEYS = sorted({"low", "high", "log", "name", "seed", "data", "search", "lr", "epochs", "labels", "dataset",
               "augment", "cpu_plan", "n_trials", "task", "pruner", "sampler", "hflip", "auto_augment"})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(KEYS),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)


def paths(tree, prefix=()):
    """Every key path into a nested mapping."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield (*prefix, key)
            yield from paths(value, (*prefix, key))


@st.composite
def mutated_studies(draw):
    """A shipped study with a few values replaced, keys added or removed."""
    study = copy.deepcopy(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(study))))
        node = study
        for key in path[:-1]:
            node = node[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[path[-1]] = draw(values)
        elif action == "delete":
            del node[path[-1]]
        elif isinstance(node.get(path[-1]), dict):
            node[path[-1]][draw(st.sampled_from(KEYS))] = draw(values)
    return study


def check(tmp_path, text: str | bytes, cpu: bool) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        assert isinstance(load_study(str(path), cpu=cpu), StudyConfig)
    except FtsearchError as err:
        assert str(err).startswith(str(path))


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(study=mutated_studies(), cpu=st.booleans())
def test_mutated_study_files(tmp_path, study, cpu):
    check(tmp_path, yaml.safe_dump(study, allow_unicode=True), cpu)


@FUZZ
@given(tree=values)
def test_arbitrary_yaml_values(tmp_path, tree):
    check(tmp_path, yaml.safe_dump(tree, allow_unicode=True), cpu=True)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes(tmp_path, raw):
    check(tmp_path, raw, cpu=False)


@FUZZ
@given(overrides=st.lists(st.text(max_size=20), max_size=3))
def test_arbitrary_set_overrides(overrides):
    try:
        load_study("imdb", overrides)
    except FtsearchError:
        pass
