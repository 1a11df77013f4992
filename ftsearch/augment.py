"""Text augmentations applied to token ids of training batches, each with a searched strength."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenAugment:
    """Random token masking and deletion on one tokenised example.

    The first and last tokens ([CLS]/[SEP] or their equivalents) are never touched, so the
    model always sees a well-formed sequence.
    """

    mask_prob: float = 0.0
    delete_prob: float = 0.0
    mask_id: int | None = None

    @property
    def active(self) -> bool:
        return self.delete_prob > 0 or (self.mask_prob > 0 and self.mask_id is not None)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.active or len(ids) <= 2:
            return ids
        head, body, tail = ids[:1], ids[1:-1], ids[-1:]
        if self.delete_prob > 0:
            body = body[rng.random(len(body)) >= self.delete_prob]
        if self.mask_prob > 0 and self.mask_id is not None:
            body = np.where(rng.random(len(body)) < self.mask_prob, self.mask_id, body)
        return np.concatenate([head, body.astype(ids.dtype), tail])
