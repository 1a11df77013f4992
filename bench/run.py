"""Benchmark ftsearch against transformers' Trainer.hyperparameter_search and a bare PyTorch loop.

    .venv/bin/python -m bench.run                 # the issue's setting, 3 repeats (hours on 2 CPU cores)
    .venv/bin/python -m bench.run --smoke         # tiny end-to-end check (seconds)
    .venv/bin/python -m bench.run --help

Same machine, same data subset, backbone, search space, sampler seed and trial budget for all
three; each framework runs in its own fresh process per repeat. Results: bench/results/<timestamp>
.json and .md (the table is printed too). See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/run.py` as well as `python -m bench.run`
    sys.path.insert(0, str(REPO))

from bench import analyze
from bench.common import FRAMEWORKS, LABELS, Space, sample_configs, synthetic_reviews
from tests.helpers import build_tiny_bert

DEFAULT_RESULTS = REPO / "bench" / "results"
SMOKE = {
    "train_size": 64, "val_size": 32, "test_size": 16, "max_length": 32, "epochs": 1, "n_trials": 2,
    "repeats": 1, "target_acc": 0.0, "budget_s": 3600.0, "lr_low": 1e-3, "lr_high": 1e-2, "parallel": True,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset for the test: synthetic reviews, a tiny random BERT built on the fly, "
                        f"{SMOKE['n_trials']} trials of {SMOKE['epochs']} epoch, 1 repeat, target 0, "
                        "workers in parallel (explicit options still win)")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                   help="comma-separated subset of " + ",".join(FRAMEWORKS))
    p.add_argument("--repeats", type=int, default=3, help="runs of each framework; medians are reported")
    data = p.add_argument_group("data")
    data.add_argument("--imdb-dir", default=None,
                      help="folder with IMDB train.parquet / test.parquet "
                           "(default: $FTSEARCH_DATA_DIR/imdb, else data/imdb)")
    data.add_argument("--train-size", type=int, default=2000, help="training reviews, drawn stratified from IMDB train")
    data.add_argument("--val-size", type=int, default=1000, help="validation reviews, drawn stratified from IMDB train "
                      "(must be below --train-size: ftsearch carves it as a fraction < 0.5)")
    data.add_argument("--test-size", type=int, default=200,
                      help="IMDB test reviews ftsearch scores its winner on "
                           "(ftsearch only; Trainer and bare have no such step)")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the stratified draws")
    model = p.add_argument_group("model and training")
    model.add_argument("--backbone", default="minilm-l6", help="ftsearch catalog name or local model folder")
    model.add_argument("--max-length", type=int, default=128)
    model.add_argument("--epochs", type=int, default=2)
    model.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="cuda: bf16 autocast in the bare loop, Trainer bf16=True, ftsearch's own CUDA path")
    model.add_argument("--threads", type=int, default=None, help="OMP/MKL threads per worker (default: torch's choice)")
    search = p.add_argument_group("search space (identical for all three)")
    search.add_argument("--trials", dest="n_trials", type=int, default=4)
    search.add_argument("--sampler-seed", type=int, default=0, help="TPE seed")
    search.add_argument("--startup-trials", type=int, default=10,
                        help="TPE's random startup trials (Optuna's default); "
                             "while random, all three draw the same configs")
    search.add_argument("--lr-low", type=float, default=1e-5)
    search.add_argument("--lr-high", type=float, default=1e-4)
    search.add_argument("--batch-sizes", default="16,32")
    search.add_argument("--weight-decay-low", type=float, default=0.0)
    search.add_argument("--weight-decay-high", type=float, default=0.1)
    search.add_argument("--freeze-low", type=int, default=0)
    search.add_argument("--freeze-high", type=int, default=5,
                        help="deepest freeze (embeddings + lowest N blocks); capped at the backbone's block count")
    report = p.add_argument_group("reporting")
    report.add_argument("--target-acc", type=float, default=0.80,
                        help="report the wall time to reach this val accuracy")
    report.add_argument("--budget-s", type=float, default=600.0,
                        help="report the best val accuracy reached within this many seconds")
    report.add_argument("--out-dir", default=str(DEFAULT_RESULTS), help="where <timestamp>.json and .md go")
    report.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed afterwards)")
    report.add_argument("--keep-workdir", action="store_true", help="keep the scratch folder (worker logs, state dirs)")
    report.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=False,
                        help="run a repeat's workers at the same time (the --smoke default: checks the harness, "
                             "timings are meaningless); the bare loop then runs configurations sampled like the "
                             "others' instead of replaying ftsearch's")
    report.add_argument("--worker-timeout", type=float, default=None, help="seconds before a worker is killed")
    report.add_argument("--ftsearch-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra study override for ftsearch (like `ftsearch search --set`), e.g. to A/B a feature")
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    explicit = {a.dest for a in p._actions for opt in a.option_strings
                if any(arg == opt or arg.startswith(opt + "=") for arg in given)}
    if args.smoke:
        for key, value in SMOKE.items():
            if key not in explicit:
                setattr(args, key, value)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(args.frameworks) - set(FRAMEWORKS)
    if unknown or not args.frameworks:
        p.error(f"--frameworks: unknown {sorted(unknown)}; choose from {', '.join(FRAMEWORKS)}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if not 0 < args.val_size < args.train_size:
        p.error("--val-size must be positive and below --train-size (ftsearch carves validation as a fraction < 0.5)")
    if args.repeats < 1 or args.n_trials < 1 or args.epochs < 1:
        p.error("--repeats, --trials and --epochs must be at least 1")
    return args


# ---- setup ---------------------------------------------------------------------------------------


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_data(args, folder: Path) -> dict:
    """Write the shared subset: train.parquet and val.parquet (Trainer, bare), pool.parquet (the
    same rows, train then val order as ftsearch will split them) and test.parquet (ftsearch)."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    folder.mkdir(parents=True, exist_ok=True)
    n = args.train_size + args.val_size
    if args.smoke:
        source = "synthetic reviews"
        pool, test = synthetic_reviews(n, seed=1), synthetic_reviews(args.test_size, seed=2)
    else:
        imdb = Path(args.imdb_dir or Path(os.environ.get("FTSEARCH_DATA_DIR", "data")) / "imdb")
        files = {split: imdb / f"{split}.parquet" for split in ("train", "test")}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            sys.exit(f"IMDB mirror not found: {', '.join(missing)}; pass --imdb-dir or set FTSEARCH_DATA_DIR")
        source = f"IMDB ({imdb})"
        full = pd.read_parquet(files["train"])[["text", "label"]]
        pool = _draw(full, n, args.data_seed)
        test = _draw(pd.read_parquet(files["test"])[["text", "label"]], args.test_size, args.data_seed)
    pool = pool[["text", "label"]].reset_index(drop=True)
    pool["label"] = pool["label"].astype("int64")
    # ftsearch carves validation from its data set with train_test_split(test_size=fraction,
    # stratify=label, random_state=split_seed): with ceil(fraction * n) == val_size that is exactly
    # this split (sklearn turns both into the same integer sizes). The worker checks it.
    train, val = train_test_split(pool, test_size=args.val_size, random_state=args.data_seed, stratify=pool["label"])
    paths = {name: folder / f"{name}.parquet" for name in ("pool", "train", "val", "test")}
    pool.to_parquet(paths["pool"], index=False)
    train.reset_index(drop=True).to_parquet(paths["train"], index=False)
    val.reset_index(drop=True).to_parquet(paths["val"], index=False)
    test[["text", "label"]].reset_index(drop=True).to_parquet(paths["test"], index=False)
    return {"source": source, "paths": {k: str(v) for k, v in paths.items()}, "val_fraction": (args.val_size - 0.5) / n}


def _draw(frame, size: int, seed: int):
    from sklearn.model_selection import train_test_split

    if size >= len(frame):
        return frame
    kept, _ = train_test_split(frame, train_size=size, random_state=seed, stratify=frame["label"])
    return kept


def resolve_backbone(args, workdir: Path) -> tuple[str, str, int]:
    """(name for the ftsearch study, folder for Trainer and bare, number of blocks)."""
    if args.smoke and args.backbone == "minilm-l6":
        folder = build_tiny_bert(workdir / "tiny-bert")
        return str(folder), str(folder), _blocks(folder)
    from ftsearch.catalog import TEXT_BACKBONES  # the catalog's public names, nothing else

    spec = TEXT_BACKBONES.get(args.backbone)
    if spec is not None:
        folder = spec.local_folder()
        return args.backbone, str(folder) if folder else spec.hub_id, _blocks(folder or spec.hub_id)
    folder = Path(args.backbone).resolve()
    return str(folder), str(folder), _blocks(folder)


def _blocks(source) -> int:
    config = Path(source) / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["num_hidden_layers"])
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(source)).num_hidden_layers)


def write_study(args, space: Space, backbone: str, data: dict, path: Path) -> None:
    """The ftsearch study: the bench's values, nothing else (no cpu_plan, no augmentation, no pruning)."""
    import yaml

    study = {
        "name": "bench-ftsearch",
        "task": "text-classification",
        "data": {
            "dataset": data["paths"]["pool"],
            "test_file": data["paths"]["test"],
            "text_column": "text",
            "label_column": "label",
            "labels": LABELS,
            "val_fraction": data["val_fraction"],
            "split_seed": args.data_seed,
        },
        "metric": "accuracy",
        "direction": "maximize",
        "backbones": [backbone],
        "search": {
            "lr": {"low": space.lr_low, "high": space.lr_high, "log": True},
            "batch_size": list(space.batch_sizes),
            "freeze_depth": {"low": space.freeze_low, "high": space.freeze_high},
            "weight_decay": {"low": space.weight_decay_low, "high": space.weight_decay_high},
            "epochs": {"low": args.epochs, "high": args.epochs},
            "warmup_ratio": {"low": 0.0, "high": 0.0},
            "max_length": [args.max_length],
        },
        "sampler": {"name": "tpe", "seed": args.sampler_seed, "startup_trials": args.startup_trials},
        "pruner": {"name": "none"},
        "n_trials": args.n_trials,
        "registered_model": "bench-ftsearch",
    }
    path.write_text(yaml.safe_dump(study, sort_keys=False))


# ---- running -----------------------------------------------------------------------------------


class Worker:
    """One framework's run of one repeat, in a fresh Python process."""

    def __init__(self, framework: str, repeat: int, base: dict, workdir: Path, args, configs: list[dict] | None):
        self.framework, self.args = framework, args
        job = workdir / f"r{repeat}-{framework}"
        job.mkdir(parents=True, exist_ok=True)
        spec = {**base, "framework": framework, "workdir": str(job), "result_path": str(job / "result.json"),
                "configs": configs}
        spec_path = job / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        self.result_path = Path(spec["result_path"])
        env = os.environ.copy()
        env.pop("MLFLOW_TRACKING_URI", None)
        env.update({
            "FTSEARCH_STATE_DIR": str(job / "state"),  # a fresh MLflow store, Optuna storage and cache
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "MPLBACKEND": "Agg",
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        })
        if args.threads:
            env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
        self.log = job / "worker.log"
        print(f"[bench] repeat {repeat + 1}/{args.repeats}: {analyze.NAMES[framework]} started", flush=True)
        self.started = time.time()
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "bench.worker", str(spec_path)], cwd=job, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def wait(self) -> dict:
        try:
            code = self.proc.wait(timeout=self.args.worker_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = f"timeout after {self.args.worker_timeout} s"
        path = self.result_path
        record = json.loads(path.read_text()) if path.is_file() else {"framework": self.framework, "ok": False}
        name = analyze.NAMES[self.framework]
        if code != 0 or not record.get("ok"):
            tail = self.log.read_text(errors="replace")[-3000:]
            record["ok"] = False
            record.setdefault("error", f"worker exited with {code}")
            print(f"[bench]   {name} FAILED ({record['error']}); log tail:\n{tail}", flush=True)
        else:
            finished = path.stat().st_mtime
            print(f"[bench]   {name} done in {finished - self.started:.1f} s", flush=True)
        record["log"] = str(self.log)
        return record


def machine_info() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
            listed = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False).stdout
            gpu = listed.strip().replace("\n", "; ") or None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    return {
        "cpu": cpu,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": psutil.virtual_memory().total / 2**30,
        "gpu": gpu,
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "optuna", "mlflow", "accelerate", "datasets", "ftsearch"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        if commit:
            found["ftsearch"] += f" ({commit}{', uncommitted changes' if dirty else ''})"
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def command_line() -> str:
    entry = ["-m", "bench.run"] if __package__ else [sys.argv[0]]
    return shlex.join([sys.executable, *entry, *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    device = resolve_device(args.device)
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="ftsearch-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data = prepare_data(args, workdir / "data")
        study_backbone, folder, blocks = resolve_backbone(args, workdir)
        space = Space(args.lr_low, args.lr_high, tuple(args.batch_sizes), args.weight_decay_low,
                      args.weight_decay_high, min(args.freeze_low, blocks), min(args.freeze_high, blocks))
        study_file = workdir / "bench-ftsearch.yaml"
        write_study(args, space, study_backbone, data, study_file)
        settings = {
            "data": data["source"], "train_size": args.train_size, "val_size": args.val_size,
            "test_size": args.test_size, "data_seed": args.data_seed, "backbone": args.backbone if not args.smoke
            else "tiny random BERT (2 blocks)", "backbone_folder": folder, "blocks": blocks,
            "max_length": args.max_length, "epochs": args.epochs, "n_trials": args.n_trials,
            "sampler_seed": args.sampler_seed, "startup_trials": args.startup_trials, "space": space.__dict__ | {
                "batch_sizes": list(space.batch_sizes)},
            "device": device, "threads": args.threads, "repeats": args.repeats, "frameworks": args.frameworks,
            "target_acc": args.target_acc, "budget_s": args.budget_s, "smoke": args.smoke,
            "ftsearch_overrides": args.ftsearch_set, "ftsearch_study": study_file.read_text(),
            "parallel": args.parallel,
        }
        base = {
            "device": device, "train_file": data["paths"]["train"], "val_file": data["paths"]["val"],
            "study_file": str(study_file), "backbone_folder": folder, "max_length": args.max_length,
            "epochs": args.epochs, "n_trials": args.n_trials, "sampler_seed": args.sampler_seed,
            "startup_trials": args.startup_trials, "space": settings["space"],
            "ftsearch_overrides": args.ftsearch_set,
        }
        fallback = None
        order = [fw for fw in FRAMEWORKS if fw in args.frameworks]  # ftsearch first: bare replays its configs
        repeats = []
        for r in range(args.repeats):
            records = {}
            if args.parallel:
                fallback = fallback or sample_configs(space, args.n_trials, args.sampler_seed, args.startup_trials)
                workers = [Worker(fw, r, base, workdir, args, fallback if fw == "bare" else None) for fw in order]
                records = {w.framework: w.wait() for w in workers}
            else:
                for fw in order:
                    configs = None
                    if fw == "bare":
                        configs = _replay(records.get("ftsearch"))
                        if configs is None:
                            fallback = fallback or sample_configs(space, args.n_trials, args.sampler_seed,
                                                                  args.startup_trials)
                            configs = fallback
                    records[fw] = Worker(fw, r, base, workdir, args, configs).wait()
            frameworks = {}
            for fw, record in records.items():
                if record.get("ok"):
                    record.update(analyze.run_metrics(record, settings))
                frameworks[fw] = _slim(record)
            repeats.append({"repeat": r, "frameworks": frameworks})
        result = {
            "started": started, "command": command_line(), "machine": machine_info(), "versions": versions(),
            "settings": settings, "repeats": repeats,
        }
        result["summary"] = analyze.summarise(repeats, settings)
        table = analyze.markdown(result)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / f"{stamp}.json", out / f"{stamp}.md"
        json_path.write_text(json.dumps(result, indent=1, default=str))
        md_path.write_text(table)
        print(table)
        print(f"[bench] wrote {json_path} and {md_path}", flush=True)
        ok = all(run.get("ok") for rep in repeats for run in rep["frameworks"].values())
        return 0 if ok else 1
    finally:
        if args.keep_workdir or args.workdir:
            print(f"[bench] scratch folder kept: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _replay(ftsearch: dict | None) -> list[dict] | None:
    """ftsearch's completed trials' configurations, for the bare loop to run the very same ones."""
    if not ftsearch or not ftsearch.get("ok"):
        return None
    configs = [t["config"] | {"number": t["number"]} for t in ftsearch["trials"]
               if t.get("state") == "COMPLETE" and t["config"].get("lr") is not None]
    return configs or None


def _slim(record: dict) -> dict:
    """The record as stored in the results: raw per-step times are summarised, not kept."""
    record = dict(record)
    record["optimizer_steps_total"] = len(record.pop("steps", []))
    record["tracking_calls_total"] = len(record.pop("tracking_calls", []))
    record.pop("traceback", None) if record.get("ok") else None
    return record


if __name__ == "__main__":
    sys.exit(main())
