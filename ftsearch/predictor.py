"""Fine-tuned classifiers saved as folders, their predictors and MLflow pyfunc wrappers.

A text folder holds safetensors weights, the config, the tokenizer and ``ftsearch.json`` (maximum
length, class names, problem type); an image folder safetensors weights and ``ftsearch.json`` (timm
architecture, class names, preprocessing, problem type). Loading either never unpickles anything.
What a prediction returns is the problem type's (``ProblemType.prediction_table``).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import torch

from ftsearch.problems import ProblemType, problem_type

META_FILE = "ftsearch.json"
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
    model, tokenizer, folder: Path, max_length: int, labels: tuple[str, ...], problem: dict, pair: bool = False
) -> None:
    """Write ``model`` and ``tokenizer`` to ``folder`` in the Hugging Face layout (safetensors);
    ``problem`` is the problem type's ``meta()``, ``pair`` whether it reads pairs of texts."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    meta = {"max_length": max_length, "labels": list(labels), "pair": pair, **problem}
    (folder / META_FILE).write_text(json.dumps(meta))


class TextClassifier:
    """Predicts for texts (or pairs of texts) from a saved text model folder: what its problem
    type returns (a label and class probabilities, a set of labels, a number)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        meta = read_meta(folder)
        self.max_length = int(meta["max_length"])
        self.pair = bool(meta.get("pair", False))
        self.labels = tuple(meta["labels"])
        self.problem = saved_problem(meta)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def predict(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32) -> pd.DataFrame:
        """One row per text (and its pair's second text), as the problem type's
        ``prediction_table`` says; tokenised as in training."""
        if self.pair and pairs is None:
            raise ValueError("this model reads pairs of texts: give each text its second text (text_pair)")
        outputs = []
        for start in range(0, len(texts), batch_size):
            second = None if not self.pair else pairs[start : start + batch_size]
            batch = self.tokenizer(
                texts[start : start + batch_size], second,
                truncation="longest_first" if self.pair else True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            outputs.append(self.model(**batch).logits.float().cpu())
        return self.problem.prediction_table(torch.cat(outputs).numpy(), self.labels)


class TextClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with a ``text`` column (and ``text_pair`` for a pair model) in,
    the problem type's prediction table out."""

    def load_context(self, context) -> None:
        self.classifier = TextClassifier(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame({"text": [str(t) for t in model_input]})
        pairs = model_input["text_pair"].astype(str).tolist() if "text_pair" in model_input else None
        return self.classifier.predict(model_input["text"].astype(str).tolist(), pairs)


class ImagePredictor:
    """Predicts for image files from a saved image model folder (a label and class probabilities,
    for a classifier)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from ftsearch.augment import image_eval_transform
        from ftsearch.models.vision import load_image_classifier

        self.model, meta = load_image_classifier(Path(folder))
        self.labels = tuple(meta["labels"])
        self.problem = saved_problem(meta)
        self.transform = image_eval_transform(meta["preprocessing"])
        self.device = torch.device(device)
        self.model.to(self.device)

    @torch.inference_mode()
    def predict(self, paths: list[str], batch_size: int = 32) -> pd.DataFrame:
        """One row per image, as the problem type's ``prediction_table`` says."""
        from PIL import Image

        outputs = []
        for start in range(0, len(paths), batch_size):
            images = []
            for path in paths[start : start + batch_size]:
                with Image.open(path) as image:
                    images.append(self.transform(image.convert("RGB")))
            outputs.append(self.model(torch.stack(images).to(self.device)).logits.float().cpu())
        return self.problem.prediction_table(torch.cat(outputs).numpy(), self.labels)


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with a ``path`` column of image files in, labels and probabilities out."""

    def load_context(self, context) -> None:
        self.predictor = ImagePredictor(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.predictor.predict(model_input["path"].astype(str).tolist())
