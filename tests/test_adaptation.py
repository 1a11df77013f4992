"""How a backbone is adapted: what each method trains and at which learning rate, for text and
image models; the head warm-up; LoRA merged for serving; a study searching every method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoTokenizer

from ftsearch.adaptation import adapt, freeze_lowest_blocks
from ftsearch.cli import main
from ftsearch.data.features import feature_loader
from ftsearch.data.tokens import make_loader, tokenize_cached
from ftsearch.errors import FtsearchError
from ftsearch.models.text import UpperBlocksClassifier, load_classifier, transformer_blocks
from ftsearch.problems import problem_type
from ftsearch.space import TrialConfig
from ftsearch.train import TrainSettings, make_optimizer
from ftsearch.train import fit as train_fit
from tests.helpers import cached_features, labelled_reviews, optuna_study, tiny_study

CPU = torch.device("cpu")
fit = partial(train_fit, scoring=problem_type("single-label-classification"))
SAMPLED = {"backbone": "tiny", "lr": 3e-3, "batch_size": 16, "weight_decay": 0.0, "epochs": 2, "warmup_ratio": 0.0}


def trial(method: str, **keys) -> TrialConfig:
    return TrialConfig(**{**SAMPLED, "method": method, "freeze_depth": 0, **keys})


def text_model(tiny_bert) -> nn.Module:
    torch.manual_seed(0)
    return load_classifier(tiny_bert, ("neg", "pos"))


def trained(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


@pytest.fixture(scope="module")
def tokens(tiny_bert, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    cache = tmp_path_factory.mktemp("tokens")

    return {"train": tokenize_cached(tokenizer, labelled_reviews(160, 1), 32, cache),
            "val": tokenize_cached(tokenizer, labelled_reviews(64, 3), 32, cache)}


def loaders(tokens):
    return make_loader(tokens["train"], 16, 0, shuffle=True, seed=0), make_loader(tokens["val"], 64, 0, shuffle=False)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_freeze_depth_freezes_embeddings_and_the_lowest_blocks(tiny_bert, depth):
    model = text_model(tiny_bert)
    total = sum(p.numel() for p in model.parameters())
    trainable = freeze_lowest_blocks(model, depth)
    blocks = transformer_blocks(model)
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        assert all(p.requires_grad == (i >= depth) for p in block.parameters())
    assert all(p.requires_grad == (depth == 0) for p in model.bert.embeddings.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert (trainable == total) == (depth == 0) and trainable > 0


def test_freeze_is_one_method_for_text_and_images_and_serves_the_whole_model(tiny_bert, tiny_cnn):
    from ftsearch.models.vision import build_classifier, resolve_vision_backbone

    text = text_model(tiny_bert)
    adapted = adapt(text, trial("freeze", freeze_depth=1))
    assert adapted.trainable == freeze_lowest_blocks(text_model(tiny_bert), 1)
    assert adapted.serving(UpperBlocksClassifier(text, 1)) is text and adapted.serving(text) is text
    image = build_classifier(resolve_vision_backbone(str(tiny_cnn)), 2)
    total = sum(p.numel() for p in image.parameters())
    assert adapt(image, trial("freeze", freeze_depth=1)).trainable < total and image.frozen
    image.train()
    assert all(not m.training for m in image.frozen)  # frozen stages keep their batch-norm statistics
    assert all(p.requires_grad for p in image.backbone.get_classifier().parameters())
    with torch.inference_mode():
        assert image.eval()(torch.rand(1, 3, 48, 48)).logits.shape == (1, 2)


def test_lora_trains_only_its_adapters_above_the_frozen_prefix_and_the_head(tiny_bert):
    model = text_model(tiny_bert)
    adapted = adapt(model, trial("lora", freeze_depth=1, lora_rank=4))
    upper = "bert.encoder.layer.1.attention.self"
    assert trained(model) == {f"{upper}.{p}.lora_{ab}.default.weight" for p in ("query", "value") for ab in "AB"} | {
        "classifier.weight", "classifier.bias"}
    # rank 4 on two 32x32 projections, and the 32 -> 2 head
    assert adapted.trainable == 2 * (4 * 32 + 32 * 4) + 32 * 2 + 2 == 578

    everywhere = text_model(tiny_bert)
    adapted = adapt(everywhere, trial("lora", lora_rank=4, lora_targets="all-linear"))
    linears = [m for block in transformer_blocks(everywhere) for m in block.modules() if hasattr(m, "lora_A")]
    assert len(linears) == 2 * 6  # query, key, value, attention output, intermediate, output
    assert adapted.trainable == sum(4 * (m.in_features + m.out_features) for m in linears) + 66


def test_merged_lora_model_predicts_as_the_adapted_one_with_plain_weights(tiny_bert):
    model = text_model(tiny_bert)
    adapted = adapt(model, trial("lora", lora_rank=4, lora_targets="all-linear"))
    with torch.no_grad():  # LoRA starts as the identity (B = 0); make it change something
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 3, 0]])
    mask = (ids != 0).long()
    model.eval()
    with torch.inference_mode():
        unmerged = model(input_ids=ids, attention_mask=mask).logits
        before = text_model(tiny_bert).eval()(input_ids=ids, attention_mask=mask).logits
        merged = adapted.serving(model)
        served = merged(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(unmerged, before, atol=1e-3)  # the adapters did change the model
    torch.testing.assert_close(served, unmerged, rtol=1e-5, atol=1e-5)
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    assert set(merged.state_dict()) == set(text_model(tiny_bert).state_dict())


def test_bitfit_trains_only_biases_norms_and_the_head_above_the_prefix(tiny_bert):
    model = text_model(tiny_bert)
    adapt(model, trial("bitfit", freeze_depth=1))
    names = trained(model)
    assert names and all(n.endswith(".bias") or "LayerNorm" in n or n.startswith("classifier.") for n in names)
    assert "classifier.weight" in names and "bert.encoder.layer.1.attention.self.query.bias" in names
    assert "bert.encoder.layer.1.output.LayerNorm.weight" in names
    assert not any(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in names)
    assert not any(n.endswith(".weight") and "LayerNorm" not in n and not n.startswith("classifier") for n in names)


def test_layer_wise_decay_and_the_head_multiplier_set_every_parameter_s_learning_rate(tiny_bert):
    model = text_model(tiny_bert)
    adapted = adapt(model, trial("full", lr_decay=0.5, head_lr_multiplier=10.0))
    optimizer = make_optimizer(adapted.groups, TrainSettings(lr=1e-3, epochs=1))
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(lr_of) == sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))

    def expected(name: str) -> float:
        if name.startswith("classifier."):
            return 1e-2
        if name.startswith("bert.embeddings."):
            return 1e-3 * 0.5**2  # one step below the lowest block
        if name.startswith("bert.encoder.layer.0."):
            return 1e-3 * 0.5
        return 1e-3  # the top block and the pooler above it

    for name, param in model.named_parameters():
        assert lr_of[id(param)] == pytest.approx(expected(name)), name


def test_head_warmup_trains_the_head_alone_then_everything(tiny_bert, tokens):
    model = text_model(tiny_bert)
    adapted = adapt(model, trial("full", epochs=3))
    snapshots = []

    def snapshot(metrics):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return False

    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train, val = loaders(tokens)
    settings = TrainSettings(lr=3e-3, epochs=3, warmup_ratio=0.2, head_warmup_epochs=1)
    result = fit(model, train, val, settings, snapshot, groups=adapted.groups)
    assert result.status == "completed" and len(snapshots) == 3
    body = [k for k in start if not k.startswith("classifier.") and "position_ids" not in k]
    first, second = snapshots[0], snapshots[1]
    assert not torch.equal(first["classifier.weight"], start["classifier.weight"])
    assert all(torch.equal(first[k], start[k]) for k in body)  # epoch 1: the head alone
    assert any(not torch.equal(second[k], first[k]) for k in body)  # then the body joins
    assert all(m.seconds > 0 for m in result.history)


def test_lora_above_a_cached_prefix_trains_as_it_does_without_the_cache(tiny_bert, tokens):
    # Same seed, same batches, no dropout in the frozen prefix either way: the runs differ only
    # by the float16 rounding of the cached hidden states.
    lora = trial("lora", freeze_depth=1, lora_rank=4, epochs=3)
    settings = TrainSettings(lr=1e-2, epochs=3, warmup_ratio=0.1, seed=0)
    plain_model = text_model(tiny_bert)
    plain_groups = adapt(plain_model, lora).groups
    plain = fit(plain_model, *loaders(tokens), settings, groups=plain_groups)
    model = text_model(tiny_bert)
    groups = adapt(model, lora).groups
    train, _ = cached_features(model, 1, tokens["train"])
    val, _ = cached_features(model, 1, tokens["val"])
    cached = fit(UpperBlocksClassifier(model, 1), feature_loader(train, 16, shuffle=True, seed=0),
                 feature_loader(val, 64, shuffle=False), settings, groups=groups)
    assert [m.train_loss for m in cached.history] == pytest.approx([m.train_loss for m in plain.history], rel=0.02)
    assert [m.value("accuracy") for m in cached.history] == pytest.approx(
        [m.value("accuracy") for m in plain.history], abs=0.02)
    assert plain.history[-1].train_loss < plain.history[0].train_loss  # and it did learn


def test_image_backbones_take_bitfit_decay_and_lora_on_their_convolutions(tiny_cnn):
    from ftsearch.models.vision import build_classifier, resolve_vision_backbone

    backbone = resolve_vision_backbone(str(tiny_cnn))
    bitfit = build_classifier(backbone, 2)
    adapt(bitfit, trial("bitfit", freeze_depth=1))
    assert all(n.endswith(".bias") or ".bn" in n or n.startswith("backbone.bn") or "classifier" in n
               for n in trained(bitfit))
    assert not any(n.startswith(("backbone.conv_stem.", "backbone.blocks.0.")) for n in trained(bitfit))

    with pytest.raises(FtsearchError, match="no attention projections"):
        adapt(build_classifier(backbone, 2), trial("lora"))
    model = build_classifier(backbone, 2)
    adapted = adapt(model, trial("lora", lora_targets="all-linear", lora_rank=2, freeze_depth=1))
    assert trained(model) and all("lora_" in n or "classifier" in n for n in trained(model))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    x = torch.rand(2, 3, 48, 48)
    model.eval()
    with torch.inference_mode():
        unmerged = model(x).logits
        merged = adapted.serving(model)
        torch.testing.assert_close(merged(x).logits, unmerged, rtol=1e-4, atol=1e-5)
    assert set(merged.backbone.state_dict()) == set(build_classifier(backbone, 2).backbone.state_dict())


@pytest.fixture(scope="module")
def every_method(tmp_path_factory, tiny_bert, tiny_reviews):
    """A study that searches all four methods (random sampling, seeded so each one is drawn)."""
    root = tmp_path_factory.mktemp("methods")
    study = tiny_study(tiny_bert, tiny_reviews, **{"n_trials": 4, "sampler.name": "random", "sampler.seed": 2,
                                                   "search.epochs": {"low": 2, "high": 2}})
    study["search"] |= {"method": ["full", "freeze", "lora", "bitfit"], "freeze_depth": {"low": 0, "high": 1},
                        "lora_rank": {"low": 2, "high": 8, "log": True}, "lr_decay": {"low": 0.5, "high": 1.0},
                        "head_warmup_epochs": {"low": 0, "high": 1}}
    study["registered_model"] = "tiny-methods"
    (root / "methods.yaml").write_text(yaml.safe_dump(study))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTSEARCH_STATE_DIR", str(root / "mlruns"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["search", str(root / "methods.yaml")]) == 0
        trials = optuna_study("methods").get_trials()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return root, trials


def test_a_study_searching_every_method_runs_each_with_its_own_keys(every_method):
    _, trials = every_method
    assert {t.params["method"] for t in trials} == {"full", "freeze", "lora", "bitfit"}
    for t in trials:
        method = t.params["method"]
        assert ("lora_rank" in t.params) == (method == "lora")
        assert ("lr_decay" in t.params) == (method in ("full", "freeze"))
        assert ("freeze_depth" in t.params) == (method != "full")
        assert t.user_attrs["ftsearch.method"] == method and t.user_attrs["ftsearch.trainable_params"] > 0
        assert t.user_attrs["ftsearch.epoch_seconds"] > 0 and t.user_attrs["ftsearch.peak_memory_mb"] > 0
    by_method = {t.params["method"]: t.user_attrs["ftsearch.trainable_params"] for t in trials}
    assert by_method["lora"] < by_method["bitfit"] < by_method["full"]


def test_the_registered_model_predicts_without_peft(every_method):
    root, _ = every_method
    # A process where importing peft fails: serving must not need it, whichever method won.
    code = ("import sys; sys.modules['peft'] = None\n"
            "from ftsearch.cli import main\n"
            "sys.exit(main(['predict', 'models:/tiny-methods@candidate', 'great superb loved film']))")
    env = {**os.environ, "FTSEARCH_STATE_DIR": str(root / "mlruns"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\t")[0] in ("pos", "neg")


def test_a_lora_trial_s_saved_model_reloads_without_peft_and_predicts_as_trained(tiny_bert, tmp_path):
    from ftsearch.predictor import save_classifier

    model = text_model(tiny_bert)
    adapted = adapt(model, trial("lora", lora_rank=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ids = [[2, 10, 11, 12, 3]]
    with torch.inference_mode():
        expected = model.eval()(input_ids=torch.tensor(ids)).logits[0].tolist()
    save_classifier(adapted.serving(model), AutoTokenizer.from_pretrained(tiny_bert), tmp_path / "saved", 32,
                    ("neg", "pos"), {"problem": "single-label-classification"})
    code = ("import sys, json, torch; sys.modules['peft'] = None\n"
            "from ftsearch.models.text import load_classifier\n"
            f"model = load_classifier({str(tmp_path / 'saved')!r}, ('neg', 'pos')).eval()\n"
            f"print(json.dumps(model(input_ids=torch.tensor({ids})).logits[0].tolist()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-5)
