"""Study files: every shipped file loads; bad files and overrides give clear errors."""

import json
from pathlib import Path

import pytest

from ftsearch.config import STUDIES_DIR, load_study, parse_overrides, resolve_study_path
from ftsearch.errors import FtsearchError

SHIPPED = sorted(p for p in STUDIES_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_studies_are_shipped():
    assert any(p.stem == "imdb" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
@pytest.mark.parametrize("cpu", [False, True], ids=["gpu-plan", "cpu-plan"])
def test_every_shipped_study_loads(path, cpu):
    config = load_study(str(path), cpu=cpu)
    assert config.n_trials >= 1 and config.backbones
    assert config.search.lr.low <= config.search.lr.high


def test_cpu_plan_shrinks_imdb():
    full, cpu = load_study("imdb"), load_study("imdb", cpu=True)
    assert full.data.train_size is None
    assert cpu.data.train_size == 4000 and cpu.search.max_length == [256] and cpu.search.truncation == ["head_tail"]
    assert full.search.augment.token_mask is not None and cpu.search.augment.used() == set()  # the cache applies
    assert "train 4000" in cpu.plan_summary()


def test_overrides_are_typed_and_win_over_the_plan():
    config = load_study("imdb", ["n_trials=2", "search.lr.high=1e-3", "search.batch_size=[8]"], cpu=True)
    assert config.n_trials == 2
    assert config.search.lr.high == pytest.approx(1e-3)
    assert config.search.batch_size == [8]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["bogus=1"], "bogus: unknown key; allowed here: name, task, data"),
        (["search.lr.low=1", "search.lr.high=0.1"], "search.lr: low (1.0) is above high (0.1)"),
        (["search.epochs.high=1000"], "search.epochs: range must lie within [1, 100]"),
        (["metric=auc"], "metric: Input should be 'accuracy', 'f1', 'mcc' or 'roc_auc'"),
        (["search.batch_size=[0]"], "search.batch_size: choices must lie within [1, 4096]"),
        (["search.augment.token_mask.high=0.9"], "search.augment.token_mask: range must lie within"),
        (["data.labels=[one]"], "data.labels"),
        (["cpu_plan.search.lrr=1"], "cpu_plan.search.lrr: unknown key; allowed here: lr, batch_size"),
        (["search.augment.hflip={low: 0, high: 0.5}"], "search.augment.hflip does not apply to text-classification"),
        (["data.placeholder_share=0.5"], "data.placeholder_share does not apply to text-classification"),
        (["data.labels=null"], "data.labels: required for text-classification"),
        (["task=text-regresion"], ("task: Input should be 'text-classification', 'text-pair-classification', "
                                   "'text-regression', 'multi-label-classification' or 'image-classification'")),
        (["metric=rmse"], "metric: Input should be 'accuracy', 'f1', 'mcc' or 'roc_auc' (the metrics of text-classification)"),
        (["task=text-regression", "metric=accuracy"], "metric: Input should be 'pearson', 'spearman', 'rmse' or 'mae'"),
        (["task=text-regression", "metric=pearson"], "data.labels / data.labels_file do not apply to text-regression"),
        (["task=text-pair-classification"], "data.text_pair_column: required for text-pair-classification"),
        (["task=multi-label-classification", "metric=f1_micro", "data.target_range=[1, 5]"],
         "data.target_range does not apply to multi-label-classification"),
        (["thresholds=global"], "thresholds does not apply to text-classification"),
        (["data.label_separator=','"], "data.label_separator does not apply to text-classification"),
        (["data.labels=[a, b, c]", "metric=roc_auc"], "metric 'roc_auc' needs 2 classes (text-classification here has 3)"),
        (["data.target_range=[5, 1]"], "target_range: low (5.0) must be below high (1.0)"),
        (["direction=minimize"], "direction: metric 'accuracy' is higher-is-better: use 'maximize' or leave direction out"),
        (["search.scheduler=[linear, warmup_stable_decay]"], "search.scheduler.1: Input should be 'linear', 'cosine'"),
        (["search.method=[freeze, prefix]"], "search.method.1: Input should be 'full', 'freeze', 'lora' or 'bitfit'"),
        (["search.method=[lora, lora]"], "search.method: each method at most once"),
        (["search.lora_rank={low: 4, high: 64, log: true}"],
         "search.lora_rank applies to the method(s) lora, and search.method is ['freeze']: add one of them"),
        (["search.method=[lora, bitfit]", "search.lr_decay={low: 0.5, high: 1}"],
         "search.lr_decay applies to the method(s) full, freeze"),
        (["search.method=[lora]", "search.lora_rank={low: 0, high: 8, log: true}"], "a log range needs low >= 1"),
        (["search.method=[lora]", "search.lora_targets=[query]"], "search.lora_targets.0: Input should be 'attention'"),
        (["search.lr_decay={low: 0, high: 1}"], "search.lr_decay: range must lie within [0.05, 1.0]"),
        (["search.truncation=[head, middle]"], "search.truncation.1: Input should be 'head', 'tail' or 'head_tail'"),
        (["task=text-pair-classification", "data.text_pair_column=b", "search.truncation=[tail]"],
         "search.truncation ['tail'] does not apply to pairs of texts"),
    ],
)
def test_bad_values_name_file_key_and_what_is_allowed(overrides, expected):
    with pytest.raises(FtsearchError) as err:
        load_study("imdb", overrides)
    assert "imdb.yaml" in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["search.max_length=[64]"], "search.max_length does not apply to image-classification"),
        (["search.truncation=[tail]"], "search.truncation does not apply to image-classification"),
        (["data.text_column=x"], "data.text_column does not apply"),
        (["search.augment.auto_augment=[none, trivial]"], "need 'randaugment' in search.augment.auto_augment"),
    ],
)
def test_image_study_rejects_keys_it_would_ignore(overrides, expected):
    with pytest.raises(FtsearchError, match=expected.replace("'", ".")):
        load_study("hymenoptera", overrides)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("search: {lr: [1, 2\n")
    with pytest.raises(FtsearchError, match=r"broken.yaml: not valid YAML"):
        load_study(str(path))


def test_non_mapping_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(FtsearchError, match="must be a YAML mapping"):
        load_study(str(path))


@pytest.mark.parametrize("name", ["../etc/passwd", "a/../b", "nope", "with space"])
def test_unknown_or_unsafe_study_names(name):
    with pytest.raises(FtsearchError, match="study"):
        resolve_study_path(name)


@pytest.mark.parametrize("name", ["../up", "a/b", "a\\b", "x..y", ".hidden", "imdb.2", "trailing\n"])
def test_a_study_file_cannot_name_itself_a_path(write_study, name):
    path = write_study()
    path.write_text(path.read_text() + f"name: {json.dumps(name)}\n")  # JSON strings are YAML
    with pytest.raises(FtsearchError, match=r"name.*not a valid study name"):
        load_study(str(path))


def test_study_by_name_and_by_path():
    assert resolve_study_path("imdb") == STUDIES_DIR / "imdb.yaml"
    assert resolve_study_path(str(STUDIES_DIR / "imdb.yaml")) == STUDIES_DIR / "imdb.yaml"


def test_parse_overrides_nests_and_parses_yaml():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    with pytest.raises(FtsearchError, match="expected KEY=VALUE"):
        parse_overrides(["novalue"])


def test_missing_file_by_path(tmp_path):
    with pytest.raises(FtsearchError, match="does not exist"):
        resolve_study_path(str(Path(tmp_path) / "absent.yaml"))


def test_direction_follows_the_metric_when_left_out(tmp_path):
    import yaml

    raw = yaml.safe_load((STUDIES_DIR / "imdb.yaml").read_text())
    raw.pop("direction")
    path = tmp_path / "imdb.yaml"
    path.write_text(yaml.safe_dump({**raw, "metric": "f1"}))
    config = load_study(str(path))
    assert config.direction == "maximize" and config.problem.name == "single-label-classification"
    # Left out or given, the same search: a study started before resumes under the same identity.
    assert config.search_identity() == load_study("imdb", ["metric=f1"]).search_identity()
