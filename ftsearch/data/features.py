"""The frozen-prefix feature cache: hidden states after a backbone's frozen lowest blocks.

A trial that freezes the embeddings and the lowest k blocks, and does not augment its inputs,
computes the same hidden states after block k for every example in every epoch; so do all trials
that share the backbone, k and the tokenised data. They are computed once, by the first such
trial's first epoch as it trains (``PrefixStates``), stored in half precision on disk
(memory-mapped, so the OS keeps hot entries in memory), and every later epoch and trial trains
only the blocks above k from them.

An entry is keyed by a hash of the frozen weights themselves, k, the maximum length, the token
ids and the precision they were computed in, so any change of those misses the cache. The cache
has a size budget (``$FTSEARCH_FEATURE_CACHE_GB``, default 8) and evicts least recently used
entries to stay within it. An entry that meets a full disk is not left half written: the trial
trains without the cache, and its log says why.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ftsearch import settings
from ftsearch.data.tokens import LengthGroupedBatches, PadCollator, TokenizedSplit, batched_loader, pad_right
from ftsearch.disk import DiskFull, writing
from ftsearch.errors import FtsearchError
from ftsearch.models.text import frozen_prefix_modules, prefix_hidden_states

BUDGET_ENV = "FTSEARCH_FEATURE_CACHE_GB"
DEFAULT_BUDGET_GB = 8.0
FEATURES_FILE = "features.npy"
STALE_PARTIAL_SECONDS = 6 * 3600  # a partial entry this old belongs to a writer that died
INDEX_FILE = "index.npz"


@dataclass(frozen=True)
class FeatureSplit:
    """Hidden states per example (rows ``offsets[i]:offsets[i + 1]`` of ``features``) and labels."""

    features: np.ndarray  # (total tokens, hidden), float16, memory-mapped
    offsets: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def budget_bytes() -> int:
    """The cache's size limit in bytes, from ``$FTSEARCH_FEATURE_CACHE_GB``."""
    raw = os.environ.get(BUDGET_ENV, str(DEFAULT_BUDGET_GB))
    try:
        gigabytes = float(raw)
    except ValueError:
        gigabytes = -1.0
    if gigabytes < 0:
        raise FtsearchError(f"{BUDGET_ENV}={raw!r} is not a size in GB; use a number >= 0 (0 turns the cache off)")
    return int(gigabytes * 1024**3)


def feature_bytes(split: TokenizedSplit, hidden: int) -> int:
    """What an entry for ``split`` takes on disk: float16 states of every token, and the index."""
    return sum(len(ids) for ids in split.ids) * hidden * 2 + 16 * (len(split.ids) + 1)


def budget_shortfall(needed: int) -> str:
    """Why ``needed`` bytes are not cached, for the trial's log."""
    budget = budget_bytes()
    if budget == 0:
        return f"{BUDGET_ENV}=0 turns the cache off"
    return (f"needs {needed / 1024**3:.2f} GB, more than the cache's budget of {budget / 1024**3:.2f} GB "
            f"(raise {BUDGET_ENV})")


def cache_root() -> Path:
    return settings.cache_dir() / "features"


def weights_hash(modules: list[nn.Module]) -> str:
    """A hash of every parameter and buffer of ``modules``: the cache's notion of 'same weights'."""
    digest = hashlib.blake2b(digest_size=16)
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            digest.update(f"{index}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tokens_hash(split: TokenizedSplit) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray([len(ids) for ids in split.ids], dtype=np.int64).tobytes())
    for ids in split.ids:
        digest.update(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
    labels = np.asarray(split.labels)
    digest.update(labels.tobytes())
    if labels.dtype != np.int64:  # class ids hash as they always did, so existing entries still hit
        digest.update(f"{labels.dtype.str}{labels.shape}".encode())
    if split.type_ids is not None:  # a pair's segments change the hidden states
        digest.update(b"types")
        for types in split.type_ids:
            digest.update(np.ascontiguousarray(types, dtype=np.int8).tobytes())
    return digest.hexdigest()


def cache_key(model: nn.Module, depth: int, max_length: int, split: TokenizedSplit, device: torch.device) -> str:
    """The entry's name: frozen weights, depth, max length, token ids, and the compute precision."""
    precision = "cuda-bf16" if device.type == "cuda" else f"{device.type}-fp32"
    weights = weights_hash(frozen_prefix_modules(model, depth))
    return f"d{depth}-len{max_length}-{precision}-{weights[:16]}-{_tokens_hash(split)[:16]}"


def _entry_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _open(folder: Path) -> FeatureSplit | None:
    """The entry in ``folder``, or None when another process evicted it meanwhile."""
    try:
        os.utime(folder)  # marks it recently used, for eviction
        with np.load(folder / INDEX_FILE) as index:
            offsets, labels = index["offsets"], index["labels"]
        # A memory map stays readable even if the file is deleted afterwards (POSIX).
        return FeatureSplit(np.load(folder / FEATURES_FILE, mmap_mode="r"), offsets, labels)
    except FileNotFoundError:
        return None


def _size_and_age(folder: Path) -> tuple[int, float] | None:
    try:
        return _entry_size(folder), folder.stat().st_mtime
    except FileNotFoundError:  # evicted by another process while we looked
        return None


def _make_room(root: Path, needed: int, budget: int) -> None:
    """Delete least recently used entries until ``needed`` more bytes fit in ``budget``, and the
    leftovers of writers that died (their partial entries are not counted otherwise)."""
    entries = []
    for folder in root.iterdir():
        stats = _size_and_age(folder)
        if stats is None:
            continue
        if folder.name.startswith("."):
            if time.time() - stats[1] > STALE_PARTIAL_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
            continue
        entries.append((stats[1], stats[0], folder))
    entries.sort()
    used = sum(size for _, size, _ in entries)
    while entries and used + needed > budget:
        _, size, oldest = entries.pop(0)
        used -= size
        shutil.rmtree(oldest, ignore_errors=True)


def open_entry(
    model: nn.Module, depth: int, split: TokenizedSplit, max_length: int, device: torch.device,
) -> tuple[FeatureSplit | FeatureFill | None, str]:
    """The split's entry for the hidden states after the lowest ``depth`` blocks of ``model``.

    ``(features, 'hit')`` when it is cached; ``(fill, 'written by the first epoch')`` when it is not, with room made
    and the disk allocated for it: a ``FeatureFill`` that the first pass of training writes
    (``PrefixStates``); ``(None, why)`` when it cannot fit in the cache's budget or on the disk
    (the trial then trains without the cache; nothing partial is left).
    """
    hidden = model.config.hidden_size
    needed = feature_bytes(split, hidden)
    budget = budget_bytes()
    if needed > budget:
        return None, budget_shortfall(needed)
    root = cache_root()
    folder = root / cache_key(model, depth, max_length, split, device)
    if folder.is_dir():
        entry = _open(folder)
        if entry is not None:
            return entry, "hit"
    # Written under a private name, then renamed: a concurrent worker never sees a partial entry.
    partial = root / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with writing(folder):
            try:
                root.mkdir(parents=True, exist_ok=True)
                _make_room(root, needed, budget)
                partial.mkdir()
                return FeatureFill(folder, partial, split, hidden), "written by the first epoch"
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)  # before ``writing`` measures the free space
                raise
    except DiskFull as full:
        return None, f"{full}; the trial trains without the cache"


class FeatureFill:
    """A cache entry being written as its split passes once through the frozen prefix.

    Training's first epoch computes these hidden states anyway, so it ``record``s them batch by
    batch instead of the cache computing them in a pass of its own before training. ``finish``
    publishes the entry once every example is recorded. An entry that is never finished (the
    epoch was cut short, the trial failed) is deleted, never read: ``abandon``, or when the fill
    is garbage collected.
    """

    def __init__(self, folder: Path, partial: Path, split: TokenizedSplit, hidden: int):
        self.folder, self.partial = folder, partial
        self.offsets = np.cumsum([0] + [len(ids) for ids in split.ids]).astype(np.int64)
        self.labels = np.asarray(split.labels)
        self._missing = np.ones(len(split.ids), dtype=bool)
        self._cleanup = weakref.finalize(self, shutil.rmtree, partial, True)
        self._store = _allocate(partial / FEATURES_FILE, (int(self.offsets[-1]), hidden))

    @property
    def complete(self) -> bool:
        """Whether every example's states are recorded."""
        return not self._missing.any()

    def record(self, rows: list[int], states: np.ndarray) -> None:
        """Store ``states`` (batch, padded length, hidden) of examples ``rows`` of the split."""
        for row, i in enumerate(rows):
            self._store[self.offsets[i] : self.offsets[i + 1]] = states[row, : self.offsets[i + 1] - self.offsets[i]]
        self._missing[rows] = False

    def finish(self) -> tuple[FeatureSplit | None, str]:
        """Publish the complete entry under its key: ``(features, '')``, or ``(None, why)`` when it
        could not be (the caller goes on without it)."""
        try:
            with writing(self.folder):
                self._store.flush()
                del self._store
                np.savez(self.partial / INDEX_FILE, offsets=self.offsets, labels=self.labels)
        except DiskFull as full:
            self.abandon()
            return None, str(full)
        try:
            os.rename(self.partial, self.folder)
        except OSError:  # another worker finished the same entry first; theirs is as good
            shutil.rmtree(self.partial, ignore_errors=True)
        self._cleanup.detach()
        entry = _open(self.folder)
        if entry is None:
            return None, "evicted by another process as soon as it was written (raise the budget)"
        return entry, ""

    def abandon(self) -> None:
        """Delete the partial entry."""
        self._cleanup()


def _allocate(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A float16 ``.npy`` file of ``shape`` with all its blocks allocated, mapped for writing.

    Allocated before it is mapped: on a full disk, writing a page of a sparse map kills the process
    (SIGBUS), while allocating fails with ENOSPC, before anything is computed.
    """
    with open(path, "wb") as file:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(file, header)
        file.flush()
        size = file.tell() + shape[0] * shape[1] * np.dtype(np.float16).itemsize
        try:
            os.posix_fallocate(file.fileno(), 0, size)
        except OSError as err:
            if err.errno != errno.EOPNOTSUPP:
                raise
            file.truncate(size)  # a file system that cannot allocate ahead: sparse, as before
    return np.lib.format.open_memmap(path, mode="r+")


class PrefixStates:
    """Batches of a split's hidden states after the frozen prefix, for ``UpperBlocksClassifier``.

    Until the split's entry is complete, each pass batches its tokens, runs them through the
    lowest ``depth`` blocks of ``model`` and records the states in ``fill``; the pass that
    completes it publishes the entry (``entry``), and later passes read it (``features``, a
    ``feature_loader``). So the first epoch costs what an uncached one does and trains on exactly
    what later epochs read (float16 states; bf16 autocast on a GPU, as in training). The batch
    order is the same either way: the length-grouped sampler's state carries over.
    """

    generator = None  # what ``ftsearch.train`` checkpoints of a DataLoader

    def __init__(self, fill: FeatureFill, split: TokenizedSplit, pad_id: int, model: nn.Module, depth: int,
                 device: torch.device, features: Callable[[FeatureSplit], DataLoader], sampler: LengthGroupedBatches):
        self.fill, self.split, self.model, self.depth, self.device = fill, split, model, depth, device
        self.features = features
        self.collate = PadCollator(pad_id)
        self.batch_sampler = sampler
        self.entry: FeatureSplit | None = None
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        if self._loader is not None:
            yield from self._loader
            return
        for rows in self.batch_sampler:
            batch = self.collate([self.split.example(i) for i in rows])
            states = self._states(batch)
            if self.fill is not None:
                self.fill.record(rows, states.to("cpu").numpy())
            yield {"inputs_embeds": states, "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
        if self.fill is not None and self.fill.complete:
            self._publish()

    def _states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        types = batch["token_type_ids"].to(self.device) if "token_type_ids" in batch else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return prefix_hidden_states(self.model, self.depth, ids, mask, types).to(torch.float16)

    def _publish(self) -> None:
        self.entry, how = self.fill.finish()
        self.fill = None
        if self.entry is None:  # later passes compute the states again, as without the cache
            print(f"warning: frozen-prefix cache: {how}; the states are computed again each epoch",
                  file=sys.stderr, flush=True)
            return
        self._loader = self.features(self.entry)
        self._loader.batch_sampler.load_state_dict(self.batch_sampler.state_dict())
        self.batch_sampler = self._loader.batch_sampler


class _FeatureExamples(Dataset):
    def __init__(self, split: FeatureSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = self.split.offsets[index], self.split.offsets[index + 1]
        return self.split.features[start:stop], self.split.labels[index]


def _pad_features(batch: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    # Kept in float16 up to the model, which casts on its own device: half the bytes to copy.
    embeds, mask = pad_right([states for states, _ in batch], 0, np.float16)
    return {
        "inputs_embeds": torch.from_numpy(embeds),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(np.stack([label for _, label in batch])),
    }


def feature_loader(split: FeatureSplit, batch_size: int, *, shuffle: bool, seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """Length-grouped, dynamically padded batches of cached hidden states (float16)."""
    return batched_loader(
        _FeatureExamples(split), split.lengths(), batch_size, _pad_features,
        shuffle=shuffle, seed=seed, pin_memory=pin_memory,
    )
