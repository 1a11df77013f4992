"""GPU memory under ftsearch's training loop, on a real CUDA device:

1. a real CUDA out-of-memory error (the process capped with ``set_per_process_memory_fraction``)
   at a batch size found by doubling, the memory freed afterwards, and the retry at half the batch
   with twice the gradient accumulation that ftsearch's trial runner does;
2. device and resident memory after each of ten trials in one process.

A BERT-base-sized classifier (random weights: no download) on random token ids, bf16 autocast.
``python -m bench.gpu_memory --out bench/results/gpu-memory.json`` on a machine with a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ftsearch.data.tokens import TokenizedSplit, make_loader
from ftsearch.models.text import load_classifier
from ftsearch.problems import problem_type
from ftsearch.train import TrainSettings, fit, free_memory

GIB = 2**30


def _backbone(folder: Path, layers: int) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=layers)  # BERT-base sizes: hidden 768, 12 heads, vocab 30522
    BertModel(config).save_pretrained(folder)
    return folder


def _split(n: int, length: int, seed: int) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    ids = [np.concatenate([[101], rng.integers(1000, 30000, length - 2), [102]]).astype(np.int64) for _ in range(n)]
    return TokenizedSplit(ids=ids, labels=rng.integers(0, 2, n))


def _fit(backbone: Path, batch: int, examples: int, length: int, accumulation: int = 1):
    model = load_classifier(backbone, ("neg", "pos"))
    train = make_loader(_split(examples, length, 0), batch, 0, shuffle=True)
    val = make_loader(_split(256, length, 1), 256, 0, shuffle=False)
    settings = TrainSettings(lr=2e-5, epochs=1, device="cuda", grad_accumulation=accumulation)
    try:
        return fit(model, train, val, settings, scoring=problem_type("single-label-classification"))
    finally:
        del model


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def out_of_memory(backbone: Path, length: int, fraction: float) -> dict:
    torch.cuda.set_per_process_memory_fraction(fraction)
    cap = fraction * torch.cuda.get_device_properties(0).total_memory
    baseline = torch.cuda.memory_allocated()
    batch, fits = 16, []
    while True:  # double until a real CUDA OOM: that batch size is the trial's
        try:
            _fit(backbone, batch, 2 * batch, length)
            fits.append(batch)
            free_memory()
            batch *= 2
        except torch.OutOfMemoryError as err:
            message = str(err).splitlines()[0]
            break
    # What ftsearch's trial runner does next: leave the except block, free, retry at half.
    free_memory()
    after_free = torch.cuda.memory_allocated()
    start = time.monotonic()
    result = _fit(backbone, batch // 2, 4 * batch, length, accumulation=2)
    retry_s = time.monotonic() - start
    free_memory()
    torch.cuda.set_per_process_memory_fraction(1.0)
    return {
        "cap_gib": round(cap / GIB, 2), "fitted_batches": fits, "oom_batch": batch, "oom_message": message,
        "allocated_before_gib": round(baseline / GIB, 3), "allocated_after_free_gib": round(after_free / GIB, 3),
        "retry_batch": batch // 2, "retry_accumulation": 2, "retry_status": result.status,
        "retry_epoch_s": round(retry_s, 1), "retry_val_accuracy": result.history[-1].value("accuracy"),
    }


def ten_trials(backbone: Path, length: int, batch: int, examples: int) -> list[dict]:
    rows = []
    for trial in range(10):
        start = time.monotonic()
        result = _fit(backbone, batch, examples, length)
        del result
        free_memory()
        rows.append({
            "trial": trial + 1, "seconds": round(time.monotonic() - start, 1),
            "allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1),
            "reserved_mib": round(torch.cuda.memory_reserved() / 2**20, 1),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "rss_mib": round(_rss() / 2**20),
        })
        torch.cuda.reset_peak_memory_stats()
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--fraction", type=float, default=0.15, help="share of GPU memory the OOM part may use")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the ten trials")
    parser.add_argument("--examples", type=int, default=2048, help="training examples per trial")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        backbone = _backbone(Path(tmp), args.layers)
        report = {
            "machine": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version()},
            "settings": vars(args) | {"out": str(args.out)},
            "out_of_memory": out_of_memory(backbone, args.length, args.fraction),
        }
        print(json.dumps(report["out_of_memory"]), flush=True)
        report["ten_trials"] = ten_trials(backbone, args.length, args.batch, args.examples)
    first, last = report["ten_trials"][0], report["ten_trials"][-1]
    report["summary"] = {
        "allocated_after_first_mib": first["allocated_mib"], "allocated_after_tenth_mib": last["allocated_mib"],
        "rss_after_first_mib": first["rss_mib"], "rss_after_tenth_mib": last["rss_mib"],
        "rss_ratio": round(last["rss_mib"] / first["rss_mib"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"]))


if __name__ == "__main__":
    main()
