"""Fine-tuned classifiers saved as folders, their predictors and MLflow pyfunc wrappers.

A text folder holds safetensors weights, the config, the tokenizer and ``ftsearch.json`` (maximum
length, class names, problem type); an image folder safetensors weights and ``ftsearch.json`` (timm
architecture, class names, preprocessing, problem type). An ensemble folder holds its members'
folders (and, for a blend, the TF-IDF baseline as a skops file) and an ``ftsearch.json`` whose
``ensemble`` lists them with their weights (``ftsearch.selection``). Loading any of them never
unpickles anything. What a prediction returns is the problem type's
(``ProblemType.prediction_table``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from ftsearch.data.tokens import encode, pad_right
from ftsearch.problems import ProblemType, problem_type

META_FILE = "ftsearch.json"
ENSEMBLE_KEY = "ensemble"  # in an ensemble folder's ftsearch.json: its members and their weights
BASELINE_FILE = "baseline.skops"
# Models saved before problem types were recorded are single-label classifiers.
DEFAULT_PROBLEM = "single-label-classification"


def saved_problem(meta: dict) -> ProblemType:
    """The problem type a saved model was trained for, with what it learnt (thresholds, target
    scale)."""
    return problem_type(meta.get("problem", DEFAULT_PROBLEM)).restored(meta.get("problem_state", {}))


def read_meta(folder: Path) -> dict:
    """A saved model folder's ``ftsearch.json``."""
    return json.loads((Path(folder) / META_FILE).read_text())


def save_classifier(
    model, tokenizer, folder: Path, max_length: int, labels: tuple[str, ...], problem: dict, pair: bool = False,
    truncation: str = "head",
) -> None:
    """Write ``model`` and ``tokenizer`` to ``folder`` in the Hugging Face layout (safetensors);
    ``problem`` is the problem type's ``meta()``, ``pair`` whether it reads pairs of texts,
    ``truncation`` how it reads a text longer than ``max_length`` (``ftsearch.data.tokens.encode``)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    meta = {"max_length": max_length, "truncation": truncation, "labels": list(labels), "pair": pair, **problem}
    (folder / META_FILE).write_text(json.dumps(meta))


class Network:
    """A saved model's network on ``device``: ``inputs`` turns raw examples into the arrays it
    reads, ``logits`` runs it on tensors of those names, ``forward`` goes from arrays to outputs."""

    device: torch.device

    def logits(self, **tensors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The head's outputs for one batch of ``inputs``: the PyTorch network's (``ftsearch.export``
        gives an ONNX Runtime session's instead)."""
        return self.logits(**{k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}).float().cpu().numpy()


class TextClassifier(Network):
    """Predicts for texts (or pairs of texts) from a saved text model folder: what its problem
    type returns (a label and class probabilities, a set of labels, a number)."""

    def __init__(self, folder: str | Path, device: str = "cpu", network: bool = True):
        """``network=False`` reads only what prepares the inputs and reads the outputs (for an
        exported folder, whose network runs elsewhere: ``ftsearch.export.onnx_predictor``)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        meta = read_meta(folder)
        self.max_length = int(meta["max_length"])
        self.truncation = meta.get("truncation", "head")  # folders saved before it was searched read the head
        self.pair = bool(meta.get("pair", False))
        self.labels = tuple(meta["labels"])
        self.problem = saved_problem(meta)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.device = torch.device(device)
        if network:
            self.model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
            self.model.to(self.device).eval()

    def predict(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32) -> pd.DataFrame:
        """One row per text (and its pair's second text), as the problem type's
        ``prediction_table`` says; tokenised as in training."""
        return self.problem.prediction_table(self.outputs(texts, pairs, batch_size), self.labels)

    def outputs(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32) -> np.ndarray:
        """The head's outputs, one row per text."""
        if self.pair and pairs is None:
            raise ValueError("this model reads pairs of texts: give each text its second text (text_pair)")
        outputs = []
        for start in range(0, len(texts), batch_size):
            second = None if not self.pair else pairs[start : start + batch_size]
            outputs.append(self.forward(self.inputs(texts[start : start + batch_size], second)))
        return np.concatenate(outputs)

    def inputs(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        """What the network reads for one batch of texts: token ids, attention mask (and token
        types, for a model that has them), tokenised as in training."""
        encoded = encode(self.tokenizer, texts, pairs, self.max_length, self.truncation)
        ids, mask = pad_right([np.asarray(seq) for seq in encoded["input_ids"]], self.tokenizer.pad_token_id, np.int64)
        batch = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in encoded:
            batch["token_type_ids"] = pad_right([np.asarray(t) for t in encoded["token_type_ids"]], 0, np.int64)[0]
        return batch

    def logits(self, **tensors: torch.Tensor) -> torch.Tensor:
        """The network's outputs for a batch of tensors named as ``inputs`` names them."""
        return self.model(**tensors).logits


def save_text_baseline(features, estimator, path: Path) -> None:
    """Write the TF-IDF features (``ftsearch.baseline.TfidfText``) and the fitted estimator to
    ``path`` with skops, which loads scikit-learn objects without unpickling."""
    import skops.io

    skops.io.dump({"vectorizer": features.vectorizer, "pair": features.pair, "estimator": estimator}, path)


class TextBaseline:
    """The TF-IDF baseline saved by ``save_text_baseline``, giving outputs as a model's head would."""

    def __init__(self, path: str | Path, problem: ProblemType, n_outputs: int):
        import skops.io

        from ftsearch.baseline import TfidfText

        saved = skops.io.load(path)  # only scikit-learn's and numpy's own types: refused otherwise
        self.features = TfidfText(saved["vectorizer"], bool(saved["pair"]))
        self.estimator, self.problem, self.n_outputs = saved["estimator"], problem, n_outputs

    def outputs(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32) -> np.ndarray:
        """The baseline's outputs, one row per text."""
        return self.problem.baseline_outputs(self.estimator, self.features.transform(texts, pairs), self.n_outputs)


class Ensemble:
    """Predicts from an ensemble folder: its members' outputs combined by the problem type
    (``ProblemType.combine``) with their weights, then read as one model's (the decision rule
    tuned on the combined validation outputs)."""

    def __init__(self, folder: str | Path, load_member: Callable[[Path, Ensemble], object]):
        folder = Path(folder)
        meta = read_meta(folder)
        self.labels = tuple(meta["labels"])
        self.problem = saved_problem(meta)
        self.pair = bool(meta.get("pair", False))
        entries = meta[ENSEMBLE_KEY]["members"]
        self.weights = [float(m["weight"]) for m in entries]
        self.members = [load_member(folder / m["path"], self) for m in entries]

    def outputs(self, *inputs, batch_size: int = 32) -> np.ndarray:
        """The combined outputs for ``inputs`` (what each member's ``outputs`` takes)."""
        return self.problem.combine([m.outputs(*inputs, batch_size=batch_size) for m in self.members], self.weights)

    def predict(self, *inputs, batch_size: int = 32) -> pd.DataFrame:
        """One row per example, as the problem type's ``prediction_table`` says."""
        return self.problem.prediction_table(self.outputs(*inputs, batch_size=batch_size), self.labels)


def is_ensemble(folder: str | Path) -> bool:
    """Whether a saved folder is an ensemble (else one model)."""
    return ENSEMBLE_KEY in read_meta(Path(folder))


def _text_member(path: Path, ensemble: Ensemble):
    if path.name == BASELINE_FILE:
        return TextBaseline(path, ensemble.problem, ensemble.problem.head_size(ensemble.labels))
    return TextClassifier(path)


def text_predictor(folder: str | Path) -> TextClassifier | Ensemble:
    """The predictor of a saved text model or text ensemble folder."""
    return Ensemble(folder, _text_member) if is_ensemble(folder) else TextClassifier(folder)


def image_predictor(folder: str | Path) -> ImagePredictor | Ensemble:
    """The predictor of a saved image model or image ensemble folder."""
    return Ensemble(folder, lambda path, ensemble: ImagePredictor(path)) if is_ensemble(folder) else ImagePredictor(folder)


def served_column(model_input, name: str, columns: list[str]) -> list[str]:
    """Column ``name`` of a served model's input (a DataFrame, or for a model of one input column a
    plain list of values, as ``{"inputs": [...]}`` sends), checked to hold strings. Anything else
    is refused with an MLflow error the scoring server answers as 400 Bad Request, naming what the
    model reads: a number or a null is not a text (nor a path) to be read as its string."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    expected = ", ".join(f"'{c}'" for c in columns)
    if isinstance(model_input, pd.DataFrame):
        if name not in model_input.columns:
            raise MlflowException(f"the model reads column(s) {expected}; the input has "
                                  f"{', '.join(repr(str(c)) for c in model_input.columns) or 'none'}",
                                  error_code=INVALID_PARAMETER_VALUE)
        values = model_input[name].tolist()
    elif len(columns) == 1 and isinstance(model_input, list | tuple | np.ndarray | pd.Series):
        values = list(model_input)
    else:
        raise MlflowException(f"the model reads a table with column(s) {expected}, not {type(model_input).__name__}",
                              error_code=INVALID_PARAMETER_VALUE)
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise MlflowException(f"column '{name}' must hold strings: row {row} is {value!r} "
                                  f"({type(value).__name__})", error_code=INVALID_PARAMETER_VALUE)
    return values


class TextClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with a ``text`` column (and ``text_pair`` for a pair model) of
    strings in, the problem type's prediction table out."""

    def load_context(self, context) -> None:
        self.classifier = text_predictor(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        columns = ["text", "text_pair"] if self.classifier.pair else ["text"]
        texts = served_column(model_input, "text", columns)
        pairs = served_column(model_input, "text_pair", columns) if self.classifier.pair else None
        return self.classifier.predict(texts, pairs)


class ImagePredictor(Network):
    """Predicts for image files from a saved image model folder (a label and class probabilities,
    for a classifier)."""

    def __init__(self, folder: str | Path, device: str = "cpu", network: bool = True):
        """``network=False``: as for ``TextClassifier``."""
        from ftsearch.augment import image_eval_transform
        from ftsearch.models.vision import load_image_classifier

        self.device = torch.device(device)
        if network:
            self.model, meta = load_image_classifier(Path(folder))
            self.model.to(self.device)
        else:
            meta = read_meta(Path(folder))
        self.labels = tuple(meta["labels"])
        self.problem = saved_problem(meta)
        self.transform = image_eval_transform(meta["preprocessing"])

    def predict(self, paths: list[str], batch_size: int = 32) -> pd.DataFrame:
        """One row per image, as the problem type's ``prediction_table`` says."""
        return self.problem.prediction_table(self.outputs(paths, batch_size=batch_size), self.labels)

    def outputs(self, paths: list[str], batch_size: int = 32) -> np.ndarray:
        """The head's outputs, one row per image."""
        return np.concatenate([self.forward(self.inputs(paths[start : start + batch_size]))
                               for start in range(0, len(paths), batch_size)])

    def inputs(self, paths: list[str]) -> dict[str, np.ndarray]:
        """What the network reads for one batch of image files: their pixels, decoded, resized,
        cropped and normalised as in evaluation."""
        from PIL import Image

        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(self.transform(image.convert("RGB")))
        return {"pixel_values": torch.stack(images).numpy()}

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The network's outputs for a batch of pixels."""
        return self.model(pixel_values).logits


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with a ``path`` column of image files in, labels and probabilities out."""

    def load_context(self, context) -> None:
        self.predictor = image_predictor(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.predictor.predict(served_column(model_input, "path", ["path"]))
