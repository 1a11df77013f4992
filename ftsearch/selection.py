"""Choosing the model a search registers: the best trial alone, or a combination of the top trials
(and the classical baseline) that does better on validation.

The candidates (study file ``selection:``) are judged on the validation split, each from the
saved models' own outputs, so that they compare like with like:

- ``best``: the single best trial;
- ``ensemble``: the top ``top_k`` trials (any backbones), their predictions averaged
  (``ProblemType.combine``: class or label probabilities, or numbers);
- ``blend``: the best trial averaged with the baseline, the baseline's weight tuned on validation
  over ``BLEND_WEIGHTS`` (a fine-tuned model and a TF-IDF model make different mistakes).

A combination is chosen only if it beats the single best on validation; among equals the one
with fewer members. The test split is then used once, for the chosen candidate only. A chosen
combination is saved as one folder (``write_ensemble``) that ``ftsearch.predictor.Ensemble``
serves, its members inside.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ftsearch.disk import writing
from ftsearch.modalities.base import BaselineMember, Modality
from ftsearch.predictor import ENSEMBLE_KEY, META_FILE, read_meta, saved_problem
from ftsearch.problems.base import ProblemType
from ftsearch.train import evaluate

# The baseline's share in a blend: a coarse grid, so that tuning it on validation picks a real
# difference rather than the validation split's noise.
BLEND_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Member:
    """A saved trial model's outputs on validation (and, once chosen, test), with its measured
    inference time."""

    number: int
    folder: Path
    problem: ProblemType  # as saved with the model (tuned on its own validation outputs)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    seconds_per_example: float = 0.0


@dataclass
class Candidate:
    """One model the search could register, judged on validation."""

    kind: str  # best | ensemble | blend
    members: list[int]  # trial numbers, best first
    weights: list[float]  # per member, then the baseline's for a blend; they sum to 1
    problem: ProblemType  # the decision rule tuned on the combined validation outputs
    val: dict[str, float]
    seconds_per_example: float  # the members' measured inference time, added up

    @property
    def with_baseline(self) -> bool:
        return self.kind == "blend"

    @property
    def models(self) -> int:
        """How many models it runs per prediction (the baseline counts as one)."""
        return len(self.members) + int(self.with_baseline)

    @property
    def description(self) -> str:
        """``trial 3``, ``ensemble of trials 3, 5, 1``, ``trial 3 + baseline (weight 0.40)``."""
        if self.kind == "best":
            return f"trial {self.members[0]}"
        if self.kind == "ensemble":
            return f"ensemble of trials {', '.join(map(str, self.members))}"
        return f"trial {self.members[0]} + baseline (weight {self.weights[-1]:.2f})"

    def as_dict(self, metric: str) -> dict:
        """For the parent run's ``candidates.json`` and the report."""
        return {"kind": self.kind, "description": self.description, "members": self.members,
                "weights": [round(w, 4) for w in self.weights], f"val_{metric}": self.val[metric],
                "val": self.val, "ms_per_example": round(1000 * self.seconds_per_example, 3),
                "models": self.models}


def trial_member(modality: Modality, device: torch.device, number: int, folder: Path) -> Member:
    """Trial ``number``'s saved model scored on the validation split, timed."""
    member = Member(number, folder, saved_problem(read_meta(folder)))
    add_outputs(member, modality, device, "val")
    return member


def add_outputs(member: Member, modality: Modality, device: torch.device, split: str) -> None:
    """The member's outputs on ``split`` and the split's targets, kept on it, in the split's own
    row order (that of the baseline's outputs and of every other member)."""
    model, loader = modality.eval_setup(member.folder, split)
    model.to(device)
    start = time.perf_counter()
    evaluation = evaluate(model, loader, device, member.problem)
    if split == "val":
        member.seconds_per_example = (time.perf_counter() - start) / max(1, len(evaluation.y_true))
    # Text loaders batch by length: row i of the evaluation is example order[i] of the split.
    order = np.fromiter(itertools.chain.from_iterable(loader.batch_sampler), dtype=np.int64)
    outputs, targets = np.empty_like(evaluation.outputs), np.empty_like(evaluation.y_true)
    outputs[order], targets[order] = evaluation.outputs, evaluation.y_true
    member.outputs[split], member.targets[split] = outputs, targets


def candidates(members: list[Member], y_val: np.ndarray, problem: ProblemType, metric: str, *,
               ensemble: bool, baseline: BaselineMember | None) -> list[Candidate]:
    """The single best (``members[0]``), the ensemble of every member (when asked and there are
    two or more) and the blend of the best with ``baseline`` (when given), judged on validation.
    ``problem`` is the study's problem type before any tuning on validation."""
    best = members[0]
    found = [Candidate("best", [best.number], [1.0], best.problem, best.problem.score(y_val, best.outputs["val"]),
                       best.seconds_per_example)]
    if ensemble and len(members) >= 2:
        weights = [1.0 / len(members)] * len(members)
        found.append(_combined("ensemble", members, [m.outputs["val"] for m in members], weights, y_val, problem,
                               sum(m.seconds_per_example for m in members)))
    if baseline is not None:
        blends = [_combined("blend", [best], [best.outputs["val"], baseline.outputs["val"]], [1 - w, w], y_val, problem,
                            best.seconds_per_example + baseline.seconds_per_example) for w in BLEND_WEIGHTS]
        found.append(_best_of(blends, problem, metric))
    return found


def _combined(kind: str, members: list[Member], outputs: list[np.ndarray], weights: list[float], y_val: np.ndarray,
              problem: ProblemType, seconds: float) -> Candidate:
    combined = problem.combine(outputs, weights)
    tuned = problem.tuned(problem.evaluation(y_val, combined))
    return Candidate(kind, [m.number for m in members], weights, tuned, tuned.score(y_val, combined), seconds)


def _best_of(found: list[Candidate], problem: ProblemType, metric: str) -> Candidate:
    """The first candidate that no later one beats strictly."""
    best = found[0]
    for candidate in found[1:]:
        if problem.better(metric, candidate.val[metric], best.val[metric]):
            best = candidate
    return best


def choose(found: list[Candidate], problem: ProblemType, metric: str) -> Candidate:
    """The single best unless a combination beats it on validation; among combinations that tie,
    the one with fewer models (cheaper to serve)."""
    return _best_of([found[0], *sorted(found[1:], key=lambda c: c.models)], problem, metric)


def combined_outputs(candidate: Candidate, members: dict[int, Member], baseline: BaselineMember | None,
                     split: str) -> np.ndarray:
    """The candidate's outputs on ``split`` (every member's ``outputs[split]`` computed)."""
    outputs = [members[n].outputs[split] for n in candidate.members]
    if candidate.kind == "best":
        return outputs[0]
    if candidate.with_baseline:
        outputs.append(baseline.outputs[split])
    return candidate.problem.combine(outputs, candidate.weights)


def write_ensemble(candidate: Candidate, members: dict[int, Member], baseline: BaselineMember | None,
                   folder: Path, extra_meta: dict) -> Path:
    """Save a combination as one servable folder: the members' model folders, the baseline's file
    for a blend, and ``ftsearch.json`` listing them with their weights. ``extra_meta`` is what
    every saved model of the modality records (class names, ``pair``)."""
    shutil.rmtree(folder, ignore_errors=True)
    with writing(folder):
        folder.mkdir(parents=True)
        entries = []
        for number, weight in zip(candidate.members, candidate.weights, strict=False):
            shutil.copytree(members[number].folder, folder / f"trial-{number}")
            entries.append({"path": f"trial-{number}", "weight": weight, "trial": number})
        if candidate.with_baseline:
            baseline.save(folder)
            entries.append({"path": baseline.file_name, "weight": candidate.weights[-1], "trial": None})
        meta = {**extra_meta, **candidate.problem.meta(),
                ENSEMBLE_KEY: {"kind": candidate.kind, "description": candidate.description, "members": entries}}
        (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def report(found: list[Candidate], chosen: Candidate, metric: str, test: dict[str, float]) -> dict:
    """``candidates.json``: every candidate on validation, which was chosen, and its test metrics."""
    return {"metric": metric, "chosen": found.index(chosen), "test": test,
            "candidates": [c.as_dict(metric) for c in found]}
