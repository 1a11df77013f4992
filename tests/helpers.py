"""Helpers the tests share (fixtures live in conftest.py): the tiny vocabulary and BERT, synthetic
reviews and shape images, tiny study files, and reading back what a search left behind.

The benchmark's smoke preset (``bench/``) builds its model and data from here too: one definition
for both, and the tests depend on nothing in ``bench/``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

import pandas as pd

POSITIVE = ["great", "wonderful", "superb", "loved", "brilliant", "moving", "delightful", "excellent"]
NEGATIVE = ["awful", "boring", "terrible", "hated", "dull", "clumsy", "tedious", "dreadful"]
NEUTRAL = ["the", "movie", "film", "plot", "actor", "scene", "was", "and", "a", "story", "ending", "music"]


def make_reviews(n: int, seed: int) -> pd.DataFrame:
    """Short synthetic reviews whose label is carried by a few sentiment words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        cue = POSITIVE if label else NEGATIVE
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(6, 14))]
        for _ in range(2):
            words.insert(rng.randrange(len(words) + 1), rng.choice(cue))
        rows.append({"review": " ".join(words), "sentiment": ["neg", "pos"][label]})
    return pd.DataFrame(rows)


def _words(rng: random.Random, cues: list[str], n_cues: int) -> list[str]:
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(4, 9))]
    for _ in range(n_cues):
        words.insert(rng.randrange(len(words) + 1), rng.choice(cues))
    return words


def make_pairs(n: int, seed: int) -> pd.DataFrame:
    """Sentence pairs (``premise``, ``hypothesis``) judged by the second text's sentiment words
    (``agree`` / ``disagree`` / ``unrelated``) and scored 1-5 by them (``score``)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        judgement = ["agree", "disagree", "unrelated"][i % 3]
        cues = {"agree": POSITIVE, "disagree": NEGATIVE, "unrelated": NEUTRAL}[judgement]
        second = _words(rng, cues, 2)
        rows.append({"premise": " ".join(_words(rng, NEUTRAL, 1)), "hypothesis": " ".join(second),
                     "judgement": judgement, "score": {"agree": 4.5, "unrelated": 3.0, "disagree": 1.5}[judgement]
                     + rng.uniform(-0.5, 0.5)})
    return pd.DataFrame(rows)


def labelled_reviews(n: int, seed: int) -> pd.DataFrame:
    """``make_reviews`` as the ``text`` / ``label`` frame (0 neg, 1 pos) the token cache reads."""
    data = make_reviews(n, seed)
    return pd.DataFrame({"text": data["review"], "label": (data["sentiment"] == "pos").astype(int)})


def make_tagged(n: int, seed: int) -> pd.DataFrame:
    """Texts with a set of tags (``tags``: a list of names): ``praise`` when they hold a positive
    word, ``complaint`` a negative one, ``plot`` the word plot; some hold two or none."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = _words(rng, POSITIVE, 2) if i % 2 else [rng.choice(NEUTRAL) for _ in range(6)]
        if i % 3 == 0:
            words += [rng.choice(NEGATIVE), rng.choice(NEGATIVE)]
        words = [w for w in words if w != "plot"] + (["plot", "plot"] if i % 4 == 1 else [])
        rng.shuffle(words)
        tags = [t for t, hit in (("praise", i % 2), ("complaint", i % 3 == 0), ("plot", i % 4 == 1)) if hit]
        rows.append({"text": " ".join(words), "tags": tags})
    return pd.DataFrame(rows)


def build_tiny_bert(folder: Path, blocks: int = 2, hidden: int = 32, positions: int = 64) -> Path:
    """A randomly initialised BERT (by default 2 blocks, hidden 32) with a word-level vocabulary."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=positions,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def tiny_study(tiny_bert: Path, reviews: dict[str, Path], **changes) -> dict:
    """A study mapping over the tiny data and BERT: 2 trials of 4 short epochs."""
    study = {
        "data": {
            "dataset": str(reviews["train"]),
            "test_file": str(reviews["test"]),
            "text_column": "review",
            "label_column": "sentiment",
            "labels": ["neg", "pos"],
            "val_fraction": 0.25,
        },
        "metric": "accuracy",
        "backbones": [str(tiny_bert)],
        "search": {
            "lr": {"low": 4.0e-3, "high": 1.0e-2, "log": True},
            "batch_size": [16],
            "freeze_depth": {"low": 0, "high": 0},
            "epochs": {"low": 4, "high": 4},
            "warmup_ratio": {"low": 0.1, "high": 0.1},
            "max_length": [32],
            "augment": {"token_mask": {"low": 0.0, "high": 0.1}},
        },
        "sampler": {"name": "tpe", "seed": 0, "startup_trials": 2},
        "pruner": {"name": "none"},
        "n_trials": 2,
        "registered_model": "tiny-sentiment",
    }
    for key, value in changes.items():
        node = study
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return study


def draw_shapes(folder: Path, per_class: int, seed: int) -> None:
    """folder/circle/*.png and folder/square/*.png: a filled shape on a noisy dark background."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for shape in ("circle", "square"):
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background = rng.integers(0, 80, size=(48, 48, 3), dtype=np.uint8)
            image = Image.fromarray(background)
            draw = ImageDraw.Draw(image)
            x, y = (int(v) for v in rng.integers(12, 36, size=2))
            r = int(rng.integers(7, 11))
            # Circles are reddish and squares bluish, so a tiny CNN learns them in a few epochs.
            bright, dim = int(rng.integers(180, 256)), int(rng.integers(0, 90))
            colour = (bright, dim, dim) if shape == "circle" else (dim, dim, bright)
            box = (x - r, y - r, x + r, y + r)
            draw.ellipse(box, fill=colour) if shape == "circle" else draw.rectangle(box, fill=colour)
            image.save(folder / shape / f"{i}.png")


# Servers the tests start (`mlflow ui`, `mlflow models serve`).
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """End the server and everything it started (its uvicorn process and workers)."""
    if server.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    # Whatever of the group is left (workers outlive a parent that died first), killed outright.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=5)


def post_json(url: str, body: dict, timeout: float = 120) -> tuple[int, dict | str, float]:
    """POST ``body`` as JSON: the status, the parsed answer (or its text) and the seconds it took."""
    import json
    import time
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read()
    seconds = time.perf_counter() - start
    try:
        return status, json.loads(text), seconds
    except ValueError:
        return status, text.decode(errors="replace"), seconds


def start_server(command: list[str], env: dict, log: Path, cwd: Path | None = None, timeout: float = 180) -> subprocess.Popen:
    """Start a model server (``ftsearch serve``) in its own session and wait until its ``/ping``
    answers; its output goes to ``log``. Stop it with ``stop``."""
    import time
    import urllib.request

    port = command[command.index("--port") + 1]
    with log.open("w") as out:
        server = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop(server)
                raise RuntimeError(f"the server did not start: {log.read_text()[-3000:]}") from None
            time.sleep(1)


# Reading back what a search left: the MLflow store and the Optuna storage of the test's state dir.
PARENT = "mlflow.parentRunId"


def store():
    """An MLflow client on the test's tracking store."""
    from mlflow import MlflowClient

    from ftsearch import settings

    uri = settings.tracking_uri()
    return MlflowClient(uri, registry_uri=uri)


def runs(experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of an experiment."""
    client = store()
    exp = client.get_experiment_by_name(experiment)
    everything = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in everything if PARENT not in r.data.tags]
    children = [r for r in everything if PARENT in r.data.tags]
    return parents, children


def optuna_study(name: str):
    """The Optuna study ``name`` in the test's state dir."""
    import optuna

    from ftsearch.distributed.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage())


# Training loops on the tiny reviews (test_train.py, test_disk_full.py).
def review_loaders(tiny_bert: Path, cache: Path, train_rows: int, val_rows: int, val_batch: int) -> tuple:
    """(train, validation) loaders over tiny labelled reviews, tokenised to 32 tokens."""
    from transformers import AutoTokenizer

    from ftsearch.data.tokens import make_loader, tokenize_cached

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train = tokenize_cached(tokenizer, labelled_reviews(train_rows, 1), 32, cache)
    val = tokenize_cached(tokenizer, labelled_reviews(val_rows, 3), 32, cache)
    return make_loader(train, 16, 0, shuffle=True), make_loader(val, val_batch, 0, shuffle=False)


def seeded_classifier(tiny_bert: Path):
    """The tiny BERT with a two-class head drawn from seed 0."""
    import torch

    from ftsearch.models.text import load_classifier

    torch.manual_seed(0)
    return load_classifier(tiny_bert, ("neg", "pos"))


def cached_features(model, depth: int, split, max_length: int = 32):
    """``(entry, how)``: the split's frozen-prefix cache entry, written (when it is not cached
    yet) by one pass of the loader that writes it during a trial's first epoch."""
    from functools import partial

    import torch

    from ftsearch.data.features import FeatureFill, PrefixStates, feature_loader, open_entry
    from ftsearch.data.tokens import LengthGroupedBatches

    cpu = torch.device("cpu")
    entry, how = open_entry(model, depth, split, max_length, cpu)
    if isinstance(entry, FeatureFill):
        states = PrefixStates(entry, split, 0, model, depth, cpu, partial(feature_loader, batch_size=64, shuffle=False),
                              LengthGroupedBatches(split.lengths(), 64, shuffle=False))
        for _ in states:
            pass
        entry = states.entry
    return entry, how
