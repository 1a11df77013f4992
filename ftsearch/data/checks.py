"""Checks of a data set before the first trial: duplicates within a split and across splits (a
test example also in train inflates the test score), class balance, and how many texts each
searched ``max_length`` cuts.

Texts are compared after case folding and whitespace collapsing, so "Great  film" and "great film"
are one text; a sentence pair is compared as both of its texts. Images are compared by perceptual
hash: equal, or within ``NEAR_DUPLICATE_BITS`` bits, for a resized, recompressed, slightly cropped
or edited copy. ``data.dedupe`` says what is done with what is
found: ``off`` (not checked), ``warn`` (reported) or ``drop`` (duplicates within train dropped,
then validation rows also in train and test rows also in train or validation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

DEDUPE_MODES = ("off", "warn", "drop")
LABEL_ISSUES = "label_issues.json"  # the likely label errors, on the study's parent run (ProblemType.label_issues)
LABEL_ISSUE_FIGURE = "label_issues.png"  # image studies: their thumbnails, beside LABEL_ISSUES
NEAR_DUPLICATE_BITS = 6  # of 64: a 3% crop moves the hash by 6 (median), distinct photos differ by 14+
_PAIR_CHUNK = 256  # images compared with all others at once: 256 x 50,000 distances is 100 MB
MAJORITY_SHARE = 0.7  # above it, accuracy rewards predicting the majority class
# A leak is a later split's row whose text an earlier split has: the search saw it, or was chosen on it.
_LEAKS = (("val", ("train",)), ("test", ("train", "val")))


def text_keys(frame: pd.DataFrame) -> np.ndarray:
    """A 64-bit hash per row of its normalised text (and second text), equal for texts that
    differ only in case or whitespace."""
    columns = [c for c in ("text", "text_pair") if c in frame.columns]
    normalised = pd.DataFrame(
        {c: frame[c].str.casefold().str.split().str.join(" ") for c in columns}
    )
    return pd.util.hash_pandas_object(normalised, index=False).to_numpy()


@dataclass
class Duplicates:
    """Rows that repeat an earlier row of their split (``within``) and rows of validation / test
    whose text an earlier split has (``leaked``), by split; ``dropped`` by split under ``drop``."""

    within: dict[str, int] = field(default_factory=dict)
    leaked: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"within_split": self.within, "leaked_from_earlier_splits": self.leaked, "dropped": self.dropped}

    def lines(self) -> list[str]:
        """What a user should hear before the search: nothing when the splits are clean."""
        lines = []
        if any(self.within.values()):
            counts = ", ".join(f"{split} {n}" for split, n in self.within.items() if n)
            lines.append(f"duplicated examples within a split: {counts}")
        for split, n in self.leaked.items():
            if n:
                earlier = " or ".join(dict(_LEAKS)[split])
                lines.append(f"{n} {split} example(s) also appear in {earlier}: a leak that inflates the {split} score")
        if self.dropped:
            lines.append("dropped (data.dedupe: drop): " + ", ".join(f"{s} {n}" for s, n in self.dropped.items()))
        elif lines:
            lines.append("set data.dedupe: drop to remove them (off: do not check)")
        return lines


def near_duplicate_keys(hashes: dict[str, list[str]], bits: int = NEAR_DUPLICATE_BITS) -> dict[str, np.ndarray]:
    """A key per image that is equal for images whose perceptual hashes (hex, as ``imagehash``
    writes them) differ in at most ``bits`` bits, chained: a cropped or lightly edited copy, not
    only a resized one. The key is the image's connected component in the graph of such pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    values = np.array([int(h, 16) for split in hashes.values() for h in split], dtype=np.uint64)
    rows, columns = [], []
    for start in range(0, len(values), _PAIR_CHUNK):
        # Every pair once (a row against the rows after it): a chunk's distances to all later ones.
        chunk = values[start:start + _PAIR_CHUNK, None]
        near = np.bitwise_count(chunk ^ values[None, :]) <= bits
        near &= np.arange(len(values))[None, :] > np.arange(start, start + len(chunk))[:, None]
        i, j = np.nonzero(near)
        rows.append(i + start)
        columns.append(j)
    rows, columns = np.concatenate(rows), np.concatenate(columns)
    graph = coo_matrix((np.ones(len(rows)), (rows, columns)), shape=(len(values), len(values)))
    component = connected_components(graph, directed=False)[1]
    ends = np.cumsum([len(split) for split in hashes.values()])
    return dict(zip(hashes, np.split(component, ends[:-1]), strict=True))


def find_duplicates(keys: dict[str, np.ndarray]) -> Duplicates:
    """Count duplicates within and leaks across the ``train`` / ``val`` / ``test`` splits, from a
    key per row (``text_keys``, or an image's perceptual hash)."""
    found = Duplicates(within={split: int(pd.Series(k).duplicated().sum()) for split, k in keys.items()})
    for split, earlier in _LEAKS:
        found.leaked[split] = int(np.isin(keys[split], np.concatenate([keys[e] for e in earlier])).sum())
    return found


def kept_rows(keys: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What ``data.dedupe: drop`` keeps, as a boolean mask per split: train without its repeats
    (the first copy kept), validation without rows whose key train has, test without rows whose
    key train or validation has."""
    kept = {split: np.ones(len(k), dtype=bool) for split, k in keys.items()}
    kept["train"] = ~pd.Series(keys["train"]).duplicated().to_numpy()
    for split, earlier in _LEAKS:
        kept[split] = ~np.isin(keys[split], np.concatenate([keys[e] for e in earlier]))
    return kept


def unsplittable(err: ValueError, labels) -> str:
    """Why scikit-learn could not split or subsample rows stratified by ``labels``, in one short
    clause: its own message lists every class with too few rows, thousands of them for a column
    of ids mistaken for labels."""
    counts = pd.Series(list(labels)).value_counts()
    single = int((counts < 2).sum())
    if single:
        return (f"{single} of the {len(counts)} classes have a single row, and a stratified split needs two "
                "of each (is the label column an id?)")
    reason = str(err)
    return reason if len(reason) <= 300 else reason[:300] + "..."


def class_balance(targets: dict[str, np.ndarray], labels: tuple[str, ...], metric: str) -> tuple[dict, list[str]]:
    """Examples per class and the majority class's share, by split (multi-label: examples per
    label and the mean labels per example); and the warnings they call for."""
    balance, warnings = {}, []
    for split, y in targets.items():
        if y.ndim == 2:
            balance[split] = {"per_label": dict(zip(labels, y.sum(axis=0).astype(int).tolist())),
                              "labels_per_example": round(float(y.sum(axis=1).mean()), 3)}
            continue
        counts = np.bincount(y, minlength=len(labels))
        majority = int(counts.argmax())
        share = float(counts[majority] / max(1, len(y)))
        balance[split] = {"per_class": dict(zip(labels, counts.tolist())), "majority": labels[majority],
                          "majority_share": round(share, 4)}
        if split == "train" and metric == "accuracy" and share > MAJORITY_SHARE:
            warnings.append(f"{share:.0%} of train is {labels[majority]!r}: accuracy rewards always predicting it; "
                            "consider metric: f1 (macro-averaged)")
    return balance, warnings


def truncation(lengths: np.ndarray, max_lengths: list[int]) -> dict:
    """Token-length quantiles and the share of texts longer than each searched ``max_length``."""
    return {
        "tokens": {"median": int(np.median(lengths)), "p90": int(np.quantile(lengths, 0.9)), "max": int(lengths.max())},
        "truncated_share": {str(m): round(float((lengths > m).mean()), 4) for m in sorted(max_lengths)},
    }


def truncation_line(report: dict, split: str) -> str:
    tokens, shares = report["tokens"], report["truncated_share"]
    cut = ", ".join(f"{share:.0%} at {m}" for m, share in shares.items())
    return (f"{split} texts: median {tokens['median']} tokens, 90% under {tokens['p90']}, longest {tokens['max']}; "
            f"cut: {cut}")


@dataclass
class DataChecks:
    """What the checks found: ``report`` (logged as ``data_report.json`` on the study's parent
    run), ``notes`` (printed) and ``warnings`` (printed as warnings)."""

    report: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
