"""The adaptation methods side by side: one study per method, the same space and trial budget.

Each (study, method) pair is a ``ftsearch search`` of its own, in a fresh process (so the peak
resident set it records is that method's alone), with the study's CPU plan (on a CPU), the
overrides below and ``search.method=[<method>]``. The table is read back from the Optuna
storage: best validation value, mean seconds per epoch, trainable parameters of the best trial,
peak memory, and the wall time of the whole search (baseline, test scoring and registration
included).

    FTSEARCH_DATA_DIR=../shared/data .venv/bin/python -m bench.methods --studies imdb sick-entailment

Results: a JSON file under ``bench/results/`` and a Markdown table on stdout (for RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("full", "freeze", "lora", "bitfit")
# The same space for every method: one learning-rate range wide enough for all of them (LoRA and
# BitFit usually want a larger one than full fine-tuning), a frozen prefix for the methods that
# have one, and no token augmentation (it changes the inputs every epoch, which turns the
# frozen-prefix cache off).
COMMON = [
    "search.lr={low: 3.0e-5, high: 3.0e-3, log: true}",
    "search.batch_size=[16]",
    "search.epochs={low: 2, high: 2}",
    "search.augment.token_mask=null",
    "search.augment.token_delete=null",
    "pruner.name=none",
    "sampler={name: tpe, seed: 0, startup_trials: 3}",
]
PER_METHOD = {
    "full": ["search.lr_decay={low: 0.6, high: 1.0}"],
    "freeze": ["search.freeze_depth={low: 0, high: 4}", "search.lr_decay={low: 0.6, high: 1.0}"],
    "lora": ["search.freeze_depth={low: 0, high: 4}", "search.lora_rank={low: 4, high: 32, log: true}",
             "search.lora_targets=[attention, all-linear]"],
    "bitfit": ["search.freeze_depth={low: 0, high: 4}"],
}
STUDY_SETS = {
    "imdb": ["data.train_size=1000", "data.val_size=400", "data.test_size=500", "search.max_length=[128]"],
    "sick-entailment": ["data.train_size=2000", "data.test_size=1000", "search.max_length=[48]"],
}


def run_one(study: str, method: str, trials: int, state: Path) -> dict:
    """One method's search on one study; returns its row of the table."""
    name = f"{study}-{method}"
    sets = [f"name={name}", f"registered_model=bench-{name}", f"n_trials={trials}", "timeout=null",
            f"search.method=[{method}]", *COMMON, *STUDY_SETS.get(study, []), *PER_METHOD[method]]
    command = [sys.executable, "-m", "ftsearch.cli", "search", study, "--quiet"]
    for value in sets:
        command += ["--set", value]
    started = time.monotonic()
    done = subprocess.run(command, env={**os.environ, "FTSEARCH_STATE_DIR": str(state)}, capture_output=True, text=True,
                          check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"study": study, "method": method, "wall_s": round(wall, 1), **_read(name, state), "summary": done.stdout[-600:]}


def _read(name: str, state: Path) -> dict:
    os.environ["FTSEARCH_STATE_DIR"] = str(state)
    import optuna

    from ftsearch.distributed.storage import open_storage
    from ftsearch.generations import EPOCH_SECONDS_ATTR, PEAK_MEMORY_ATTR, TRAINABLE_ATTR

    study = optuna.load_study(study_name=name, storage=open_storage())
    complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    best = study.best_trial
    return {
        "trials": len(complete),
        "best_val": best.value,
        "best_params": best.params,
        "values": [t.value for t in complete],
        "epoch_seconds": round(statistics.mean(t.user_attrs[EPOCH_SECONDS_ATTR] for t in complete), 1),
        "trainable_params": best.user_attrs[TRAINABLE_ATTR],
        "peak_memory_mb": max(t.user_attrs[PEAK_MEMORY_ATTR] for t in complete),
    }


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, GPU: {'yes' if torch.cuda.is_available() else 'none'}"


def markdown(rows: list[dict]) -> str:
    """The results as the RESULTS.md table."""
    lines = ["| study | method | best val | trials' values | s / epoch | trainable params (best) | peak memory MB | wall |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        values = ", ".join(f"{v:.3f}" for v in r["values"])
        lines.append(f"| {r['study']} | {r['method']} | {r['best_val']:.4f} | {values} | {r['epoch_seconds']:.1f} | "
                     f"{r['trainable_params']:,} | {r['peak_memory_mb']:,.0f} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", nargs="+", default=["imdb", "sick-entailment"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--trials", type=int, default=3, help="trials per method (the equal budget)")
    parser.add_argument("--workdir", type=Path, default=None, help="state folder (default: a temporary one)")
    args = parser.parse_args(argv)
    state = args.workdir or Path(tempfile.mkdtemp(prefix="bench-methods-"))
    rows = []
    for study in args.studies:
        for method in args.methods:
            rows.append(run_one(study, method, args.trials, state))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "summary"}), flush=True)
    out = Path(__file__).parent / "results" / f"methods-{time.strftime('%Y%m%d-%H%M%S')}.json"
    # The state folder is left out of the record: it is this machine's, and nothing reads it back.
    command = (f"python -m bench.methods --studies {' '.join(args.studies)} --methods {' '.join(args.methods)} "
               f"--trials {args.trials}")
    out.write_text(json.dumps({"machine": _machine(), "command": command, "rows": rows}, indent=2))
    print(f"\nMachine: {_machine()}\nRaw: {out}\n\n{markdown(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
