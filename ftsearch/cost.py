"""What a trained model costs where it will be served: latency per example at batch 1 and at a
batch of 32, its parameters, and the size of its saved weights.

Latency is timed through the served predictor (``ftsearch.predictor``: tokenising or image
decoding included, as a request pays for them) on validation inputs, on ``serve_device``; each
figure is the median of repeated calls after a warm-up (``torch.utils.benchmark``), so one slow
call (a page fault, another process) does not decide it. The names are the ones a study file's ``constraints`` use.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import benchmark

from ftsearch import settings

BATCH = 32  # the batched figure's batch size, ``latency_ms_b32``
# torch.utils.benchmark's adaptive_autorange: blocks of calls are timed until their spread (IQR /
# median) is under NOISE, after at least a tenth of settings.latency_seconds() of timed calls and
# at most all of it: a quiet machine is measured quickly, a busy one for longer, so that one burst
# of another process's work does not decide a trial's latency.
NOISE = 0.1
WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class Cost:
    """A model's measured cost; ``latency_ms*`` are milliseconds per example."""

    latency_ms: float  # one example per call: a single request
    latency_ms_b32: float  # per example, in calls of 32: batched requests
    params_m: float  # millions of parameters
    size_mb: float  # saved weights, megabytes (10^6 bytes)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def measure(predictor, inputs: Sequence[list], folder: Path, device: str | torch.device) -> Cost:
    """The cost of the model saved in ``folder``, served by ``predictor`` (its ``outputs(*inputs,
    batch_size=)`` and ``model``) on ``device``; ``inputs``: validation inputs as ``outputs``
    takes them (texts, or texts and their pairs, or image paths)."""
    single, batched = latency_ms(predictor, inputs)
    params = sum(p.numel() for p in predictor.model.parameters())
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.suffix in WEIGHT_SUFFIXES)
    return Cost(latency_ms=single, latency_ms_b32=batched, params_m=params / 1e6, size_mb=size / 1e6)


def latency_ms(predictor, inputs: Sequence[list]) -> tuple[float, float]:
    """Milliseconds per example of ``predictor.outputs`` on ``inputs``: one example per call, and
    in calls of ``BATCH`` examples."""
    count = len(inputs[0])
    if count == 0:
        raise ValueError("no validation inputs to time the model on")

    def call(indices: list[int]) -> None:
        predictor.outputs(*[[column[i] for i in indices] for column in inputs], batch_size=len(indices))

    single = _median_seconds(call, [[i] for i in range(count)])
    batched = _median_seconds(call, [[(start + k) % count for k in range(BATCH)] for start in range(0, count, BATCH)])
    return 1000 * single, 1000 * batched / BATCH


def _median_seconds(call: Callable[[list[int]], None], batches: list[list[int]]) -> float:
    """The median seconds of a ``call`` on one of ``batches`` (each call takes the next, round
    robin), with as many threads as this process serves with (torch.utils.benchmark's own default
    is one); its warm-up calls are not timed, and on a GPU it waits for the kernels to finish."""
    batches = itertools.cycle(batches)
    timer = benchmark.Timer(stmt="call(next(batches))", globals={"call": call, "batches": batches},
                            num_threads=torch.get_num_threads())
    most = settings.latency_seconds()
    return timer.adaptive_autorange(NOISE, min_run_time=most / 10, max_run_time=most).median
