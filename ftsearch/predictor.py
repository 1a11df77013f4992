"""Fine-tuned classifiers saved as folders, their predictors and MLflow pyfunc wrappers.

A text folder holds safetensors weights, the config, the tokenizer and ``ftsearch.json`` (maximum
length and class names); an image folder safetensors weights and ``ftsearch.json`` (timm
architecture, class names, preprocessing). Loading either never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import torch

META_FILE = "ftsearch.json"


def save_classifier(model, tokenizer, folder: Path, max_length: int, labels: tuple[str, ...]) -> None:
    """Write ``model`` and ``tokenizer`` to ``folder`` in the Hugging Face layout (safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / META_FILE).write_text(json.dumps({"max_length": max_length, "labels": list(labels)}))


class TextClassifier:
    """Predicts a label and class probabilities for texts, from a saved classifier folder."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        self.max_length = int(meta["max_length"])
        self.labels = list(meta["labels"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def predict(self, texts: list[str], batch_size: int = 32) -> pd.DataFrame:
        """One row per text: ``label`` and ``prob_<class>`` for each class."""
        probs = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            probs.append(torch.softmax(self.model(**batch).logits.float(), dim=-1).cpu())
        return _label_table(torch.cat(probs).numpy(), self.labels)


def _label_table(probs, labels: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(probs, columns=[f"prob_{name}" for name in labels])
    frame.insert(0, "label", [labels[i] for i in probs.argmax(axis=1)])
    return frame


class TextClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with a ``text`` column in, labels and probabilities out."""

    def load_context(self, context) -> None:
        self.classifier = TextClassifier(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            texts = model_input["text"].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
        return self.classifier.predict(texts)


class ImagePredictor:
    """Predicts a label and class probabilities for image files, from a saved image classifier."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from ftsearch.augment import image_eval_transform
        from ftsearch.models.vision import load_image_classifier

        self.model, meta = load_image_classifier(Path(folder))
        self.labels = list(meta["labels"])
        self.transform = image_eval_transform(meta["preprocessing"])
        self.device = torch.device(device)
        self.model.to(self.device)

    @torch.inference_mode()
    def predict(self, paths: list[str], batch_size: int = 32) -> pd.DataFrame:
        """One row per image: ``label`` and ``prob_<class>`` for each class."""
        from PIL import Image

        probs = []
        for start in range(0, len(paths), batch_size):
            images = []
            for path in paths[start : start + batch_size]:
                with Image.open(path) as image:
                    images.append(self.transform(image.convert("RGB")))
            logits = self.model(torch.stack(images).to(self.device)).logits
            probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        return _label_table(torch.cat(probs).numpy(), self.labels)


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with a ``path`` column of image files in, labels and probabilities out."""

    def load_context(self, context) -> None:
        self.predictor = ImagePredictor(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.predictor.predict(model_input["path"].astype(str).tolist())
