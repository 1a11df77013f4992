import optuna
import pytest

from ftsearch.config import load_study
from ftsearch.space import sample_trial


@pytest.mark.parametrize("blocks, expected_high", [(6, 4), (2, 2)])
def test_samples_stay_in_range_and_freeze_depth_follows_the_backbone(blocks, expected_high):
    config = load_study("imdb")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(30):
        trial = study.ask()
        cfg = sample_trial(trial, config, {"minilm-l6": blocks})
        study.tell(trial, 0.5)
        s = config.search
        assert s.lr.low <= cfg.lr <= s.lr.high
        assert cfg.batch_size in s.batch_size and cfg.max_length in s.max_length
        assert s.epochs.low <= cfg.epochs <= s.epochs.high
        assert 0 <= cfg.token_mask <= s.augment.token_mask.high
        assert cfg.seed == config.sampler.seed + trial.number
        seen.append(cfg.freeze_depth)
    assert max(seen) == expected_high and min(seen) == 0


def test_fixed_trial_gives_exactly_those_values():
    config = load_study("imdb")
    params = {"backbone": "minilm-l6", "freeze_depth": 4, "lr": 1e-4, "batch_size": 32, "weight_decay": 0.01,
              "epochs": 2, "warmup_ratio": 0.05, "max_length": 256, "truncation": "head", "token_mask": 0.1,
              "token_delete": 0.0}
    cfg = sample_trial(optuna.trial.FixedTrial(params), config, {"minilm-l6": 6})
    dump = cfg.model_dump()
    assert {k: dump[k] for k in params} == params and dump["seed"] == 0
    assert dump["hflip"] == 0.0 and dump["auto_augment"] == "none"  # image augmentations stay off


def test_image_space_samples_randaugment_settings_only_when_chosen():
    config = load_study("hymenoptera", ["search.augment.auto_augment=[none, randaugment]"])
    blocks = {name: 7 for name in config.backbones}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    chosen = set()
    for _ in range(20):
        trial = study.ask()
        cfg = sample_trial(trial, config, blocks)
        study.tell(trial, 0.5)
        chosen.add(cfg.auto_augment)
        assert ("randaugment_ops" in trial.params) == (cfg.auto_augment == "randaugment")
        assert "max_length" not in trial.params and 0 <= cfg.hflip <= 0.5
        assert cfg.token_mask == 0.0
    assert chosen == {"none", "randaugment"}


def test_the_schedule_is_searched_only_when_the_study_lists_schedules():
    plain = load_study("imdb")
    trial = optuna.create_study().ask()
    assert sample_trial(trial, plain, {"minilm-l6": 6}).scheduler == "linear" and "scheduler" not in trial.params
    searched = load_study("imdb", ["search.scheduler=[linear, cosine]"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    chosen = set()
    for _ in range(12):
        trial = study.ask()
        chosen.add(sample_trial(trial, searched, {"minilm-l6": 6}).scheduler)
        study.tell(trial, 0.5)
        assert trial.params["scheduler"] in ("linear", "cosine")
    assert chosen == {"linear", "cosine"}


def test_each_method_samples_only_its_own_keys():
    config = load_study("imdb", ["search.method=[full, freeze, lora, bitfit]", "search.lora_rank={low: 4, high: 64, log: true}",
                                 "search.lora_targets=[attention, all-linear]", "search.lr_decay={low: 0.5, high: 1.0}",
                                 "search.head_lr_multiplier={low: 1, high: 10, log: true}",
                                 "search.head_warmup_epochs={low: 0, high: 5}"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(40):
        trial = study.ask()
        cfg = sample_trial(trial, config, {"minilm-l6": 6})
        study.tell(trial, 0.5)
        seen.setdefault(cfg.method, []).append(cfg)
        assert trial.params["method"] == cfg.method
        assert ("lora_rank" in trial.params) == ("lora_targets" in trial.params) == (cfg.method == "lora")
        assert ("lr_decay" in trial.params) == ("head_lr_multiplier" in trial.params) == (cfg.method in ("full", "freeze"))
        assert ("freeze_depth" in trial.params) == (cfg.method != "full")
        assert cfg.head_warmup_epochs < cfg.epochs  # at least one epoch is the method's own
        if cfg.method == "full":
            assert cfg.freeze_depth == 0
        if cfg.method == "lora":
            assert 4 <= cfg.lora_rank <= 64 and cfg.lora_targets in ("attention", "all-linear")
        else:
            assert cfg.lora_rank == 8  # the unsearched default
    assert set(seen) == {"full", "freeze", "lora", "bitfit"}
    assert {c.lora_targets for c in seen["lora"]} == {"attention", "all-linear"}


def test_a_single_method_is_not_an_optuna_param():
    trial = optuna.create_study().ask()
    cfg = sample_trial(trial, load_study("imdb", ["search.method=[bitfit]"]), {"minilm-l6": 6})
    assert cfg.method == "bitfit" and "method" not in trial.params and "lr_decay" not in trial.params
