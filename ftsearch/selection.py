"""Choosing the model a search registers: the best trial alone, or a combination of the top trials
(and the classical baseline) that does better on validation.

The candidates (study file ``selection:``) are judged on the validation split, each from the
saved models' own outputs, so that they compare like with like:

- ``best``: the single best trial (with ``seeds``: the best seed of the configuration with the best
  mean, ``ftsearch.reevaluation``);
- ``soup``: a greedy weight soup (Wortsman et al. 2022) of the top trials that share the best one's
  backbone: starting from the best, each next trial's weights join the average only if the averaged
  model does better on validation. One model, served as cheaply as the best;
- ``ensemble``: the top ``top_k`` trials (any backbones), their predictions averaged
  (``ProblemType.combine``: class or label probabilities, or numbers);
- ``blend``: the best trial averaged with the baseline, the baseline's weight tuned on validation
  over ``BLEND_WEIGHTS`` (a fine-tuned model and a TF-IDF model, or a linear probe on frozen
  features, make different mistakes).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ftsearch.disk import writing
from ftsearch.modalities.base import BaselineMember, Modality
from ftsearch.models.vision import WEIGHTS_FILE
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

    number: int  # the trial (whose configuration trained it)
    folder: Path
    problem: ProblemType  # as saved with the model (tuned on its own validation outputs)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    seconds_per_example: float = 0.0
    run_id: str = ""  # the MLflow run that trained it
    seed: int | None = None  # set when a re-evaluation of the trial trained it (ftsearch.reevaluation)


@dataclass
class Candidate:
    """One model the search could register, judged on validation."""

    kind: str  # best | soup | ensemble | blend
    members: list[int]  # trial numbers, best first
    weights: list[float]  # per member, then the baseline's for a blend; they sum to 1
    problem: ProblemType  # the decision rule tuned on the combined validation outputs
    val: dict[str, float]
    seconds_per_example: float  # the members' measured inference time, added up
    soup: Member | None = None  # a soup's averaged model, saved as a plain model folder
    seed: int | None = None  # ``best``: the re-evaluation seed that trained it, if not the trial's own

    @property
    def with_baseline(self) -> bool:
        return self.kind == "blend"

    @property
    def models(self) -> int:
        """How many models it runs per prediction (the baseline counts as one; a soup is one)."""
        return 1 if self.kind == "soup" else len(self.members) + int(self.with_baseline)

    @property
    def description(self) -> str:
        """``trial 3``, ``ensemble of trials 3, 5, 1``, ``trial 3 + baseline (weight 0.40)``."""
        if self.kind == "best":
            return f"trial {self.members[0]}" + (f" (its configuration with seed {self.seed})" if self.seed is not None else "")
        if self.kind == "ensemble":
            return f"ensemble of trials {', '.join(map(str, self.members))}"
        if self.kind == "soup":
            return f"weight soup of trials {', '.join(map(str, self.members))}"
        return f"trial {self.members[0]} + baseline (weight {self.weights[-1]:.2f})"

    def as_dict(self, metric: str) -> dict:
        """For the parent run's ``candidates.json`` and the report."""
        return {"kind": self.kind, "description": self.description, "members": self.members,
                "weights": [round(w, 4) for w in self.weights], f"val_{metric}": self.val[metric],
                "val": self.val, "ms_per_example": round(1000 * self.seconds_per_example, 3),
                "models": self.models}


def trial_member(modality: Modality, device: torch.device, number: int, folder: Path, run_id: str = "",
                 seed: int | None = None) -> Member:
    """Trial ``number``'s saved model (trained in ``run_id``, by a re-evaluation with ``seed`` if
    given) scored on the validation split, timed."""
    member = Member(number, folder, saved_problem(read_meta(folder)), run_id=run_id, seed=seed)
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
               ensemble: bool, baseline: BaselineMember | None, soup: Candidate | None = None) -> list[Candidate]:
    """The single best (``members[0]``), the ``soup`` (when given: ``greedy_soup``), the ensemble
    of every member (when asked and there are two or more) and the blend of the best with
    ``baseline`` (when given), judged on validation. ``problem`` is the study's problem type
    before any tuning on validation."""
    best = members[0]
    found = [Candidate("best", [best.number], [1.0], best.problem, best.problem.score(y_val, best.outputs["val"]),
                       best.seconds_per_example, seed=best.seed)]
    if soup is not None:
        found.append(soup)
    if ensemble and len(members) >= 2:
        weights = [1.0 / len(members)] * len(members)
        found.append(_combined("ensemble", members, [m.outputs["val"] for m in members], weights, y_val, problem,
                               sum(m.seconds_per_example for m in members)))
    if baseline is not None:
        blends = [_combined("blend", [best], [best.outputs["val"], baseline.outputs["val"]], [1 - w, w], y_val, problem,
                            best.seconds_per_example + baseline.seconds_per_example) for w in BLEND_WEIGHTS]
        found.append(_best_of(blends, problem, metric))
    return found


def greedy_soup(members: list[Member], backbones: dict[int, str], modality: Modality, device: torch.device,
                problem: ProblemType, metric: str, folder: Path, say: Callable[[str], None]) -> Candidate | None:
    """The greedy weight soup of ``members`` (best first) that share the best one's backbone (and
    so its weights' names and shapes): each next member's weights join the average only if the
    averaged model scores strictly better on validation than the soup before it. Saved in
    ``folder`` as a plain model folder (the best member's, its weights replaced, its decision rule
    tuned on the soup's validation outputs); None when no member joined the best. Each try is
    told to ``say``."""
    best = members[0]
    shapes = _tensor_shapes(best.folder)
    ingredients = [m for m in members[1:] if backbones.get(m.number) == backbones.get(best.number)
                   and shapes is not None and _tensor_shapes(m.folder) == shapes]
    if not ingredients:
        say(f"  no weight soup: no other top trial has trial {best.number}'s backbone and weight shapes")
        return None
    y_val = best.targets["val"]
    soup, score = [best], best.problem.score(y_val, best.outputs["val"])[metric]
    kept: Candidate | None = None
    trying = folder.with_name(folder.name + ".trying")
    for member in ingredients:
        tried = _averaged([*soup, member], trying, modality, device, problem, metric, y_val)
        joins = problem.better(metric, tried.val[metric], score)
        say(f"  weight soup + trial {member.number}: val {metric} {tried.val[metric]:.4f} against {score:.4f} "
            f"without it: {'joins' if joins else 'left out'}")
        if joins:
            soup, score, kept = [*soup, member], tried.val[metric], tried
            shutil.rmtree(folder, ignore_errors=True)
            trying.rename(folder)
            tried.soup.folder = folder
    shutil.rmtree(trying, ignore_errors=True)
    return kept


def _tensor_shapes(folder: Path) -> dict[str, tuple] | None:
    """A saved model's weights by name: shape and type (models with the same can be averaged);
    None when its weights are not one file (sharded). Image folders name their weights file as
    Hugging Face's ``save_pretrained`` names a text model's."""
    from safetensors import safe_open

    file = Path(folder) / WEIGHTS_FILE
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as weights:
        return {key: (tuple(weights.get_slice(key).get_shape()), weights.get_slice(key).get_dtype())
                for key in weights.keys()}  # noqa: SIM118 - safe_open is not a mapping


def _averaged(members: list[Member], folder: Path, modality: Modality, device: torch.device, problem: ProblemType,
              metric: str, y_val: np.ndarray) -> Candidate:
    """``members``' weights averaged into a copy of the first one's folder, scored on validation."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.rmtree(folder, ignore_errors=True)
    with writing(folder):
        shutil.copytree(members[0].folder, folder)
        states = [load_file(str(m.folder / WEIGHTS_FILE)) for m in members]
        averaged = {}
        for key, first in states[0].items():
            # Integer buffers (position ids, batch-norm counters) are the first member's.
            averaged[key] = (torch.stack([s[key].double() for s in states]).mean(0).to(first.dtype)
                             if first.is_floating_point() else first)
        with safe_open(str(members[0].folder / WEIGHTS_FILE), framework="pt") as weights:
            metadata = weights.metadata()  # transformers reads the format from it
        save_file(averaged, str(folder / WEIGHTS_FILE), metadata=metadata)
    soup = Member(members[0].number, folder, members[0].problem)
    add_outputs(soup, modality, device, "val")
    tuned = problem.tuned(problem.evaluation(y_val, soup.outputs["val"]))
    soup.problem = tuned
    (folder / META_FILE).write_text(json.dumps({**read_meta(folder), **tuned.meta()}))
    return Candidate("soup", [m.number for m in members], [1.0 / len(members)] * len(members), tuned,
                     tuned.score(y_val, soup.outputs["val"]), soup.seconds_per_example, soup)


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
    if candidate.soup is not None:
        return candidate.soup.outputs[split]
    outputs = [members[n].outputs[split] for n in candidate.members]
    if candidate.kind == "best":
        return outputs[0]
    if candidate.with_baseline:
        outputs.append(baseline.outputs[split])
    return candidate.problem.combine(outputs, candidate.weights)


def write_ensemble(candidate: Candidate, members: dict[int, Member], baseline: BaselineMember | None,
                   folder: Path, extra_meta: dict) -> Path:
    """Save a combination as one servable folder: the members' model folders, the baseline's file
    or folder for a blend, and ``ftsearch.json`` listing them with their weights. ``extra_meta`` is what
    every saved model of the modality records (class names, ``pair``)."""
    shutil.rmtree(folder, ignore_errors=True)
    with writing(folder):
        folder.mkdir(parents=True)
        entries = []
        for number, weight in zip(candidate.members, candidate.weights, strict=False):
            shutil.copytree(members[number].folder, folder / f"trial-{number}")
            entries.append({"path": f"trial-{number}", "weight": weight, "trial": number})
        if candidate.with_baseline:
            saved = baseline.path
            (shutil.copytree if saved.is_dir() else shutil.copy2)(saved, folder / saved.name)
            entries.append({"path": saved.name, "weight": candidate.weights[-1], "trial": None})
        meta = {**extra_meta, **candidate.problem.meta(),
                ENSEMBLE_KEY: {"kind": candidate.kind, "description": candidate.description, "members": entries}}
        (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def report(found: list[Candidate], chosen: Candidate, metric: str, test: dict[str, float],
           reevaluation: list[dict] | None = None) -> dict:
    """``candidates.json``: every candidate on validation, which was chosen, its test metrics and,
    with ``seeds``, each top configuration's values over its seeds (``reevaluation``)."""
    return {"metric": metric, "chosen": found.index(chosen), "test": test,
            "candidates": [c.as_dict(metric) for c in found], "reevaluation": reevaluation or []}
