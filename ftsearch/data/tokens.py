"""Tokenisation cached on disk, and batches with dynamic padding.

The cache is keyed by the tokenizer's own definition, the maximum length and the data's
fingerprint, so trials (and later studies) that share them never tokenise again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ftsearch import settings
from ftsearch.augment import TokenAugment
from ftsearch.data.text import fingerprint, target_array
from ftsearch.disk import DiskFull, replacing

# How a text longer than ``max_length`` tokens is read: its first tokens, its last, or a quarter
# of them from its start and the rest from its end (Sun et al. 2019, "How to fine-tune BERT for
# text classification?": head and tail read IMDB best, the end of a review deciding it often).
TRUNCATIONS = ("head", "tail", "head_tail")


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids per example (unpadded, truncated to max length), their targets (class ids,
    multi-hot rows or numbers) and, for a pair on a model with segments, their token type ids."""

    ids: list[np.ndarray]
    labels: np.ndarray
    type_ids: list[np.ndarray] | None = None

    def example(self, index: int) -> tuple:
        """``(ids, target)``, or ``(ids, target, type ids)``: what ``PadCollator`` batches."""
        if self.type_ids is None:
            return self.ids[index], self.labels[index]
        return self.ids[index], self.labels[index], self.type_ids[index]

    def lengths(self) -> np.ndarray:
        """Each example's number of tokens."""
        return np.fromiter((len(ids) for ids in self.ids), dtype=np.int64, count=len(self.ids))


def tokenizer_key(tokenizer) -> str:
    """A hash of everything that decides how the tokenizer splits text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Truncation and padding are call-time state that tokenising itself changes, not identity.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        definition = json.dumps(definition, sort_keys=True)
    else:
        definition = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{definition}".encode()).hexdigest()[:16]


def encode(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int, truncation: str = "head") -> dict:
    """Token ids (``input_ids``, with ``token_type_ids`` where the tokenizer gives them) of texts
    (or pairs of texts) at most ``max_length`` long with the model's special tokens; a longer text
    is read as ``truncation`` says (``TRUNCATIONS``). Training, evaluation and the served model
    all tokenise here, so they read a long text alike."""
    if truncation == "head" or pairs is not None:
        # longest_first trims the longer text of a pair token by token, so neither is dropped whole.
        return tokenizer(texts, pairs, truncation="longest_first" if pairs else True, max_length=max_length)
    encoded = tokenizer(texts, verbose=False, return_special_tokens_mask=True)  # whole: cut below
    cut = []
    for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True):
        if len(ids) > max_length:
            # The model's own special tokens ([CLS] ... [SEP], <s> ... </s>) stay at both ends.
            start = next(i for i, s in enumerate(special) if not s)
            end = len(ids) - next(i for i, s in enumerate(reversed(special)) if not s)
            keep = max_length - (len(ids) - (end - start))
            head = keep // 4 if truncation == "head_tail" else 0
            ids = ids[:start] + ids[start : start + head] + ids[end - (keep - head) : end] + ids[end:]
        cut.append(ids)
    return {"input_ids": cut}


def tokenize_cached(tokenizer, frame: pd.DataFrame, max_length: int, cache: Path | None = None, *,
                    truncation: str = "head") -> TokenizedSplit:
    """Tokenise ``frame['text']`` (with ``frame['text_pair']`` as the second text of a pair, when
    the frame has one) to at most ``max_length`` tokens read as ``truncation`` says (``encode``),
    reusing the on-disk cache."""
    cache = cache or settings.cache_dir() / "tokens"
    read = "" if truncation == "head" else f"-{truncation}"
    path = cache / f"{tokenizer_key(tokenizer)}-{max_length}{read}-{fingerprint(frame)}.npz"
    if path.is_file():
        with np.load(path) as stored:
            cut = stored["offsets"][1:-1]
            types = np.split(stored["types"], cut) if "types" in stored else None
            return TokenizedSplit(np.split(stored["flat"], cut), stored["labels"], types)
    pairs = frame["text_pair"].tolist() if "text_pair" in frame else None
    encoded = encode(tokenizer, frame["text"].tolist(), pairs, max_length, truncation)
    ids = [np.asarray(seq, dtype=np.int32) for seq in encoded["input_ids"]]
    # Models without segments (RoBERTa) return no token type ids, nor do single texts need them.
    types = [np.asarray(seq, dtype=np.int8) for seq in encoded["token_type_ids"]] if pairs and "token_type_ids" in encoded else None
    offsets = np.cumsum([0] + [len(seq) for seq in ids])
    labels = target_array(frame)
    arrays = {"flat": np.concatenate(ids), "offsets": offsets, "labels": labels}
    try:
        with replacing(path) as partial:  # concurrent workers never read a partial file
            np.savez(partial, **arrays, **({"types": np.concatenate(types)} if types is not None else {}))
    except DiskFull as err:
        # The cache only saves time: a full disk costs tokenising again next time, not the trial.
        print(f"warning: {err}; the tokens are not cached", file=sys.stderr, flush=True)
    return TokenizedSplit(ids, labels, types)


class _Examples(Dataset):
    def __init__(self, split: TokenizedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.ids)

    def __getitem__(self, index: int) -> tuple:
        return self.split.example(index)


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of examples of similar length, so dynamic padding pads little.

    Each epoch shuffles the examples, cuts them into chunks of ``batch_size * group`` (the
    randomness of the order), sorts each chunk by length and shuffles the resulting batches (the
    randomness of which lengths come when). Without ``shuffle``, examples are batched longest
    first, which keeps evaluation's padding minimal and its memory peak at the start.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0, group: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.shuffle, self.seed, self.group = batch_size, shuffle, seed, group
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def state_dict(self) -> dict:
        """How many epochs were drawn (each epoch's order depends on it), for checkpoints."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])

    def __iter__(self):
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            yield from (order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size))
            return
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        order = rng.permutation(len(self.lengths))
        chunk = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches += [part[i : i + self.batch_size].tolist() for i in range(0, len(part), self.batch_size)]
        yield from (batches[i] for i in rng.permutation(len(batches)))


def pad_right(seqs: list[np.ndarray], fill, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Sequences (of ids, or of hidden-state rows) padded after their end to the longest, and the
    attention mask (1 = real position)."""
    width = max(len(seq) for seq in seqs)
    padded = np.full((len(seqs), width, *seqs[0].shape[1:]), fill, dtype=dtype)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        padded[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return padded, mask


class PadCollator:
    """Pads a batch to its longest sequence (dynamic padding), augmenting training examples."""

    def __init__(self, pad_id: int, augment: TokenAugment | None = None, seed: int = 0):
        self.pad_id = pad_id
        self.augment = augment
        self.seed = seed
        self._rngs: dict[int, np.random.Generator] = {}

    def _rng(self) -> np.random.Generator:
        # Each DataLoader worker holds its own copy of this collator: its stream comes from the
        # worker's torch seed, which differs per worker (and per epoch unless the workers
        # persist). Only the in-process stream is checkpointed: with loader workers (on a GPU) a
        # resumed run draws different, equally random, augmentations.
        info = get_worker_info()
        worker = info.id if info is not None else -1
        if worker not in self._rngs:
            self._rngs[worker] = np.random.default_rng(self.seed if info is None else (self.seed, info.seed))
        return self._rngs[worker]

    def state_dict(self) -> dict:
        """The in-process augmentation stream, for checkpoints."""
        return {"main": self._rngs[-1].bit_generator.state} if -1 in self._rngs else {}

    def load_state_dict(self, state: dict) -> None:
        if "main" in state:
            rng = np.random.default_rng(self.seed)
            rng.bit_generator.state = state["main"]
            self._rngs[-1] = rng

    def __call__(self, batch: list[tuple]) -> dict[str, torch.Tensor]:
        """``(ids, target)`` or ``(ids, target, type ids)`` examples -> a padded batch (with
        ``token_type_ids`` when the examples have them)."""
        rng = self._rng() if self.augment is not None and self.augment.active else None
        seqs = [(example[0], example[2] if len(example) > 2 else None) for example in batch]
        if rng is not None:
            seqs = [self.augment.apply(ids, types, rng) for ids, types in seqs]
        input_ids, mask = pad_right([ids for ids, _ in seqs], self.pad_id, np.int64)
        out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if seqs[0][1] is not None:
            out["token_type_ids"] = torch.from_numpy(pad_right([types for _, types in seqs], 0, np.int64)[0])
        out["labels"] = torch.from_numpy(np.stack([example[1] for example in batch]))
        return out


def loader_workers(pin_memory: bool) -> int:
    """DataLoader worker processes: on a GPU, collating in parallel keeps it fed; on the CPU the
    cores are better spent on the model itself."""
    return min(4, os.cpu_count() or 1) if pin_memory else 0


def batched_loader(
    dataset: Dataset, lengths: np.ndarray, batch_size: int, collate, *, shuffle: bool, seed: int, pin_memory: bool
) -> DataLoader:
    """A DataLoader over length-grouped batches (see LengthGroupedBatches)."""
    workers = loader_workers(pin_memory)
    return DataLoader(
        dataset,
        batch_sampler=LengthGroupedBatches(lengths, batch_size, shuffle=shuffle, seed=seed),
        collate_fn=collate,
        pin_memory=pin_memory,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def make_loader(
    split: TokenizedSplit,
    batch_size: int,
    pad_id: int,
    *,
    shuffle: bool,
    seed: int = 0,
    augment: TokenAugment | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over a tokenised split with length-grouped, dynamically padded batches;
    shuffling and augmentation are seeded."""
    return batched_loader(
        _Examples(split), split.lengths(), batch_size, PadCollator(pad_id, augment, seed),
        shuffle=shuffle, seed=seed, pin_memory=pin_memory,
    )
