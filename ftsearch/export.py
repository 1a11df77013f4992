"""Exporting a registered model to ONNX: the network through ``torch.onnx`` (with its tokenizer or
image preprocessing beside it, as ftsearch serves it), checked against the PyTorch model on the
study's validation examples, timed under ONNX Runtime beside PyTorch on this machine's CPU, and
logged to the registered version's run (``onnx/``, metrics ``onnx_*``) for the report.

The export is refused, with nothing written, when the two disagree beyond ``ATOL`` / ``RTOL``.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ftsearch import cost, settings, tracking
from ftsearch.catalog import TASKS
from ftsearch.config import DataConfig
from ftsearch.errors import FtsearchError
from ftsearch.predictor import ImagePredictor, Network, TextClassifier, is_ensemble, read_meta
from ftsearch.problems import problem_type

FORMATS = ("onnx",)
ONNX_ARTIFACT = "onnx"  # the folder on the version's run: model.onnx (+ its weights), tokenizer, ftsearch.json
ONNX_FILE = "model.onnx"
CHECKED = 64  # validation examples whose outputs are compared
ATOL, RTOL = 1e-4, 1e-3  # how close ONNX Runtime's outputs must be to PyTorch's (float32 both)
OPSET = 18


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote and measured."""

    uri: str
    folder: Path  # the ONNX model with what serving it needs
    run_id: str | None  # the registered version's run, where it was logged (None: a model folder)
    checked: int  # validation examples compared
    max_abs_diff: float
    latency: dict[str, float]  # torch_latency_ms, torch_latency_ms_b32, onnx_latency_ms, onnx_latency_ms_b32

    def metrics(self) -> dict[str, float]:
        """What is logged on the version's run."""
        return {"onnx_max_abs_diff": self.max_abs_diff, "onnx_checked_examples": float(self.checked), **self.latency}


class OnnxForward:
    """An ONNX Runtime session in a predictor's place: arrays named as its ``inputs`` in, the
    head's outputs out, on the CPU."""

    def __init__(self, path: Path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {name: batch[name] for name in self.names})[0]


class _Logits(torch.nn.Module):
    """The predictor's network as a module of positional tensors, as the exporter traces it."""

    def __init__(self, network: Network, names: list[str]):
        super().__init__()
        self.model, self.network, self.names = network.model, network, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.network.logits(**dict(zip(self.names, tensors, strict=True)))


def export(uri: str, fmt: str, output: Path | None = None) -> Exported:
    """Export the model at ``uri`` (a registered version, ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``) to ``fmt``, check and time it, log it to the version's run and copy
    it to ``output`` (default ``<state dir>/exports/<name>-v<version>-onnx``)."""
    import mlflow

    if fmt not in FORMATS:
        raise FtsearchError(f"--format {fmt!r}: ftsearch exports to {', '.join(FORMATS)}")
    version = _version(uri)
    target = output or settings.state_dir() / "exports" / f"{version.name}-v{version.version}-{fmt}"
    with tempfile.TemporaryDirectory(prefix="ftsearch-onnx-") as staging:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(Path(staging) / "registered"),
                                                    tracking_uri=settings.tracking_uri())
        folder = _model_folder(Path(local))
        if is_ensemble(folder):
            members = [m["path"] for m in read_meta(folder)["ensemble"]["members"]]
            raise FtsearchError(f"{uri} is a combination of {len(members)} models ({', '.join(members)}): ONNX export "
                                "takes one network; register a single model (selection: {ensemble: false, "
                                "blend_baseline: false}) to export it")
        inputs = _validation_inputs(version.run_id, folder)
        network = TextClassifier(folder) if "max_length" in read_meta(folder) else ImagePredictor(folder)
        onnx_folder = Path(staging) / ONNX_ARTIFACT
        _write_onnx(network, [column[:2] for column in inputs], onnx_folder / ONNX_FILE)
        for path in folder.iterdir():  # what reads the inputs: the tokenizer, ftsearch.json, the config
            if path.is_file() and path.suffix not in cost.WEIGHT_SUFFIXES:
                shutil.copy2(path, onnx_folder / path.name)
        onnx = onnx_predictor(onnx_folder)
        checked = [column[:CHECKED] for column in inputs]
        expected, got = network.outputs(*checked), onnx.outputs(*checked)
        diff = float(np.max(np.abs(expected - got)))
        if not np.allclose(got, expected, atol=ATOL, rtol=RTOL):
            raise FtsearchError(f"{uri}: the ONNX model's outputs differ from PyTorch's by up to {diff:.3g} on "
                                f"{len(expected)} validation examples (allowed {ATOL:g} + {RTOL:g} x |output|); "
                                "nothing was written")
        torch_ms, onnx_ms = cost.latency_ms(network, inputs), cost.latency_ms(onnx, inputs)
        exported = Exported(uri, target, version.run_id, len(expected), diff, {
            "torch_latency_ms": torch_ms[0], "torch_latency_ms_b32": torch_ms[1],
            "onnx_latency_ms": onnx_ms[0], "onnx_latency_ms_b32": onnx_ms[1]})
        client = tracking.client()
        client.log_artifacts(version.run_id, str(onnx_folder), ONNX_ARTIFACT)
        run = tracking.TrialRun(client, version.run_id)
        run.log_metrics(exported.metrics(), step=0)
        run.flush()
        client.set_model_version_tag(version.name, version.version, "onnx", f"runs:/{version.run_id}/{ONNX_ARTIFACT}")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(onnx_folder, target)
    return exported


def _version(uri: str):
    """The registered version ``uri`` names."""
    from mlflow.exceptions import MlflowException

    client = tracking.client()
    name, at, rest = uri.removeprefix("models:/").partition("@")
    try:
        if uri.startswith("models:/") and at:
            return client.get_model_version_by_alias(name, rest)
        name, slash, number = uri.removeprefix("models:/").partition("/")
        if uri.startswith("models:/") and slash and number.isdigit():
            return client.get_model_version(name, number)
    except MlflowException as err:
        raise FtsearchError(f"{uri}: no such registered version in {settings.tracking_uri()} "
                            f"({str(err).splitlines()[0]})") from None
    raise FtsearchError(f"{uri}: name a registered version, models:/NAME@ALIAS or models:/NAME/VERSION "
                        "(its run is where the export is logged, its study where the examples come from)")


def _model_folder(local: Path) -> Path:
    """The saved model folder inside a downloaded pyfunc model (its ``model`` artifact)."""
    from mlflow.models import Model

    artifacts = Model.load(str(local)).flavors["python_function"].get("artifacts", {})
    if "model" not in artifacts:
        raise FtsearchError(f"{local} is not a model ftsearch registered (no 'model' artifact)")
    return local / artifacts["model"]["path"]


def _validation_inputs(run_id: str, folder: Path) -> list[list[str]]:
    """The validation split of the search that registered the version of ``run_id`` (its parent
    run's ``config.json``: the resolved data keys, CPU plan included), as the saved model's
    predictor takes it: texts (and their pairs) or image paths."""
    client = tracking.client()
    run = client.get_run(run_id)
    parent = run.data.tags.get(tracking.PARENT_TAG, run_id)
    with tempfile.TemporaryDirectory() as downloaded:
        try:
            raw = json.loads(Path(client.download_artifacts(parent, "config.json", downloaded)).read_text())
            data, task, source = DataConfig.model_validate(raw["data"]), TASKS[raw["task"]], raw["source"]
        except Exception as err:  # noqa: BLE001 - said with what it means
            raise FtsearchError(f"run {parent} has no readable config.json ({err}): the study's validation examples, "
                                "which the export is checked on, cannot be found") from None
    if task.modality == "image":
        from ftsearch.data.images import load_image_splits

        return [[path for path, _ in load_image_splits(data, Path(source).parent).val]]
    from ftsearch.data.text import load_text_splits

    val = load_text_splits(data, Path(source).parent, problem_type(task.problem).target_kind).val
    return [val[c].astype(str).tolist() for c in (["text", "text_pair"] if read_meta(folder).get("pair") else ["text"])]


def _write_onnx(network: Network, example: list[list[str]], path: Path) -> None:
    """Trace the network on an example batch and write it with a dynamic batch (and, for text, a
    dynamic sequence length)."""
    batch = network.inputs(*example)
    names = list(batch)
    batch_dim, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # One spec per positional tensor (the exporter names the module's *tensors "tensors").
    shapes = {"tensors": tuple({0: batch_dim, **({1: sequence} if batch[n].ndim == 2 else {})} for n in names)}
    path.parent.mkdir(parents=True)
    network.model.eval()
    # The exporter prints its steps and warns about its own internals: not the user's concern.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(network, names), tuple(torch.from_numpy(batch[n]) for n in names), str(path),
                          input_names=names, output_names=["logits"], dynamic_shapes=shapes, opset_version=OPSET,
                          dynamo=True, verbose=False)


def onnx_predictor(folder: Path) -> Network:
    """The predictor of an exported folder: the inputs prepared as the registered model prepares
    them (its tokenizer and ``ftsearch.json``, or its image preprocessing), the network run by
    ONNX Runtime; ``predict`` and ``outputs`` as the PyTorch predictor's. Needs no PyTorch weights."""
    folder = Path(folder)
    reader = TextClassifier if "max_length" in read_meta(folder) else ImagePredictor
    predictor = reader(folder, network=False)
    predictor.forward = OnnxForward(folder / ONNX_FILE)
    return predictor
