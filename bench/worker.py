"""One framework, one repeat, in a fresh process: ``python -m bench.worker SPEC.json``.

Reads the job's spec (written by bench/run.py), runs the search, and writes the raw record
(trial windows, optimiser-step times, validation passes, tracking calls, peak memory) to
``spec["result_path"]``. All derived metrics are computed by bench/analyze.py from these raw
records, the same way for every framework.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import sys
import threading
import time
import traceback
from pathlib import Path

from bench.common import EVAL_BATCH_SIZE, LABELS, Probe


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["result_path"])
    imported = time.time()
    runner = {"ftsearch": run_ftsearch, "trainer": run_trainer, "bare": run_bare}[spec["framework"]]
    probe = Probe(sync_cuda=spec["device"] == "cuda")
    record: dict = {"framework": spec["framework"], "ok": False}
    try:
        record.update(runner(spec, probe))
        record["ok"] = True
    except BaseException as err:  # noqa: BLE001 - recorded for the harness, then re-raised as exit 1
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
        print(record["traceback"], file=sys.stderr, flush=True)
    finally:
        record.update(probe.stop())
        record["steps"] = probe.steps
        record["evals"] = probe.evals
        record["tracking_calls"] = probe.tracking_calls
        record["marks"] = probe.marks
        record["worker_started"] = imported
        record["process_started"] = _process_started()
        cuda_peak = _cuda_peak()
        if cuda_peak is not None:
            record["cuda_peak_bytes"] = cuda_peak
        result_path.write_text(json.dumps(record, default=str))
    return 0 if record["ok"] else 1


def _process_started() -> float | None:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001
        return None


def _cuda_peak() -> int | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return None


def _frames(spec: dict):
    import pandas as pd

    return pd.read_parquet(spec["train_file"]), pd.read_parquet(spec["val_file"])


# ---- ftsearch ----------------------------------------------------------------------------------


def run_ftsearch(spec: dict, probe: Probe) -> dict:
    """ftsearch exactly as a user runs it: ``run_search`` on a study file, nothing else changed.

    The harness only listens: MLflow client calls are timed (tracking overhead), and the
    ``val_accuracy`` metric ftsearch logs after each epoch's validation pass marks that pass's end.
    """
    import optuna

    from ftsearch.distributed.storage import open_storage
    from ftsearch.study import SearchOptions, run_search

    _time_mlflow(probe)
    probe.start()
    t0 = time.time()
    options = SearchOptions(
        study=spec["study_file"], device=spec["device"], overrides=tuple(spec["ftsearch_overrides"])
    )
    summary = run_search(options)
    t_end = time.time()
    study = optuna.load_study(study_name=summary.study_name, storage=open_storage())
    # ftsearch seeds trial n with seed + n.
    trials = _trial_records(study, ("lr", "batch_size"), lambda number: spec["sampler_seed"] + number)
    return {
        "t0": t0,
        "t_end": t_end,
        "trials": trials,
        "tracking": "mlflow",
        "framework_summary": {
            "best_trial": summary.best_trial,
            "best_value": summary.best_value,
            "counts": summary.counts,
            "test_metrics": summary.test_metrics,
            "model_version": summary.model_version,
        },
        "data_check": _check_ftsearch_data(spec),
    }


def _time_mlflow(probe: Probe) -> None:
    """Time every MlflowClient method and the module-level MLflow calls ftsearch makes (outermost
    call only: MLflow calls itself), and note each epoch's ``val_accuracy`` as a validation pass."""
    import mlflow
    import mlflow.pyfunc
    from mlflow import MlflowClient

    local = threading.local()

    def timed(fn, name: str):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            depth = getattr(local, "depth", 0)
            if depth == 0 and name == "log_batch":
                _note_val_accuracy(probe, args, kwargs)
            local.depth = depth + 1
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                local.depth = depth
                if depth == 0:
                    probe.tracking_calls.append([name, start, time.time()])

        return inner

    for name, attr in list(vars(MlflowClient).items()):
        if not name.startswith("_") and callable(attr) and not isinstance(attr, (staticmethod, classmethod, type)):
            setattr(MlflowClient, name, timed(attr, name))
    for module, name in ((mlflow, "register_model"), (mlflow.pyfunc, "log_model"), (mlflow, "start_run"),
                         (mlflow, "end_run"), (mlflow, "set_tracking_uri"), (mlflow, "set_registry_uri")):
        if hasattr(module, name):
            setattr(module, name, timed(getattr(module, name), f"mlflow.{name}"))


def _note_val_accuracy(probe: Probe, args: tuple, kwargs: dict) -> None:
    metrics = kwargs.get("metrics")
    if metrics is None and len(args) >= 3:  # (self, run_id, metrics, ...)
        metrics = args[2]
    for metric in metrics or ():
        # A metric with a model id is a trial's LoggedModel linking a validation already counted.
        if getattr(metric, "key", None) == "val_accuracy" and getattr(metric, "model_id", None) is None:
            probe.eval_done(metric.value, metric.step)


def _check_ftsearch_data(spec: dict) -> str:
    """Best effort: did ftsearch train and validate on exactly the bench's rows, in the same order?

    The bench writes train+val as one file and has ftsearch carve the validation split itself
    (stratified, seeded), predicting that split; this asks ftsearch's loader which rows it used."""
    try:
        from ftsearch.config import load_study
        from ftsearch.data.text import load_text_splits

        config = load_study(spec["study_file"], list(spec["ftsearch_overrides"]))
        splits = load_text_splits(config.data, Path(spec["study_file"]).parent)
        train, val = _frames(spec)
        same = (splits.train["text"].tolist() == train["text"].tolist()
                and splits.val["text"].tolist() == val["text"].tolist()
                and splits.train["label"].tolist() == train["label"].tolist())
        return "identical" if same else "DIFFERENT"
    except Exception as err:  # noqa: BLE001 - a check, never a reason to lose the measurement
        return f"unchecked ({type(err).__name__}: {err})"


# ---- transformers Trainer ----------------------------------------------------------------------


def run_trainer(spec: dict, probe: Probe) -> dict:
    """``Trainer.hyperparameter_search(backend="optuna")`` written as its documentation shows:
    a ``model_init(trial)``, an ``hp_space(trial)`` returning suggestions, ``compute_metrics``,
    ``n_trials``, and the sampler (and pruner) passed through to ``optuna.create_study``."""
    import datasets
    import numpy as np
    import optuna
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new-head load report, as ftsearch does
    datasets.disable_progress_bars()
    space = spec["space"]
    folder = spec["backbone_folder"]

    # Harness only: keep the study run_hp_search_optuna creates, to read its trials' times.
    captured: dict = {}
    create_study = optuna.create_study

    @functools.wraps(create_study)
    def capture(*args, **kwargs):
        captured["study"] = create_study(*args, **kwargs)
        return captured["study"]

    optuna.create_study = capture

    class ValidationProbe(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            probe.eval_done(metrics["eval_accuracy"], round(state.epoch or 0))

    probe.start()
    t0 = time.time()
    train_df, val_df = _frames(spec)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=spec["max_length"])

    train_ds = datasets.Dataset.from_pandas(train_df).map(tokenize, batched=True)
    val_ds = datasets.Dataset.from_pandas(val_df).map(tokenize, batched=True)

    def model_init(trial):
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
            label2id={name: i for i, name in enumerate(LABELS)},
        )
        # Trainer calls model_init(None) once when it is built, and model_init(trial) at the
        # start of each trial (before hp_space), so a model hyperparameter is suggested here.
        depth = 0 if trial is None else trial.suggest_int("freeze_depth", space["freeze_low"], space["freeze_high"])
        if depth > 0:
            model.base_model.embeddings.requires_grad_(False)
            for layer in model.base_model.encoder.layer[:depth]:
                layer.requires_grad_(False)
        return model

    def hp_space(trial):
        return {
            "learning_rate": trial.suggest_float("learning_rate", space["lr_low"], space["lr_high"], log=True),
            "per_device_train_batch_size": trial.suggest_categorical(
                "per_device_train_batch_size", space["batch_sizes"]
            ),
            "weight_decay": trial.suggest_float("weight_decay", space["weight_decay_low"], space["weight_decay_high"]),
        }

    def compute_metrics(eval_pred):
        predictions = np.argmax(eval_pred.predictions, axis=-1)
        return {"accuracy": float((predictions == eval_pred.label_ids).mean())}

    cuda = spec["device"] == "cuda"
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / "trainer-output"),
        num_train_epochs=spec["epochs"],
        per_device_eval_batch_size=EVAL_BATCH_SIZE,
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="no",
        report_to="none",
        seed=spec["sampler_seed"],
        use_cpu=not cuda,
        bf16=cuda,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model_init=model_init,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),  # dynamic padding
        compute_metrics=compute_metrics,
        callbacks=[ValidationProbe()],
    )
    best = trainer.hyperparameter_search(
        direction="maximize",
        backend="optuna",
        hp_space=hp_space,
        compute_objective=lambda metrics: metrics["eval_accuracy"],
        n_trials=spec["n_trials"],
        sampler=optuna.samplers.TPESampler(seed=spec["sampler_seed"], n_startup_trials=spec["startup_trials"]),
        pruner=optuna.pruners.NopPruner(),  # ftsearch's bench study prunes nothing either
    )
    t_end = time.time()
    # Trainer seeds every trial with args.seed.
    trials = _trial_records(captured["study"], ("learning_rate", "per_device_train_batch_size"),
                            lambda number: spec["sampler_seed"])
    return {
        "t0": t0,
        "t_end": t_end,
        "trials": trials,
        "tracking": "none (report_to='none')",
        "framework_summary": {
            "best_run": best.run_id, "best_objective": best.objective, "best_params": best.hyperparameters,
        },
    }


def _trial_records(study, names: tuple[str, str], seed_of) -> list[dict]:
    """Each Optuna trial's window, value and configuration; ``names`` are the framework's own
    names for the learning rate and the batch size."""
    lr_name, batch_name = names
    records = []
    for t in study.trials:
        params = dict(t.params)
        records.append({
            "number": t.number,
            "state": t.state.name,
            "start": t.datetime_start.timestamp() if t.datetime_start else None,
            "end": t.datetime_complete.timestamp() if t.datetime_complete else None,
            "value": t.value,
            "config": {
                "freeze_depth": params.get("freeze_depth"),
                "lr": params.get(lr_name),
                "batch_size": params.get(batch_name),
                "weight_decay": params.get("weight_decay"),
                "seed": seed_of(t.number),
            },
        })
    return records


# ---- bare PyTorch --------------------------------------------------------------------------------


def run_bare(spec: dict, probe: Probe) -> dict:
    """A plain loop over the given configurations: no Optuna, no tracking, no checkpoints.

    Same recipe as ftsearch's trials (AdamW without decay on biases and norms, linear decay to 0,
    gradient clipping at 1.0, validation after each epoch, dynamic padding); bf16 autocast on CUDA.
    """
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch.device(spec["device"])
    folder = spec["backbone_folder"]

    def pad(batch):
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in batch])}

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    @torch.inference_mode()
    def evaluate(model, loader) -> float:
        model.eval()
        right = total = 0
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            with autocast():
                logits = model(**batch).logits
            right += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        return right / max(1, total)

    probe.start()
    t0 = time.time()
    train_df, val_df = _frames(spec)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pad_id = tokenizer.pad_token_id

    def encode(frame) -> list[tuple[list[int], int]]:
        ids = tokenizer(frame["text"].tolist(), truncation=True, max_length=spec["max_length"])["input_ids"]
        return list(zip(ids, frame["label"].astype(int).tolist(), strict=True))

    train_items, val_items = encode(train_df), encode(val_df)
    val_loader = DataLoader(val_items, batch_size=EVAL_BATCH_SIZE, shuffle=False, collate_fn=pad)

    trials = []
    for config in spec["configs"]:
        start = time.time()
        seed = int(config["seed"])
        torch.manual_seed(seed)
        np.random.seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(LABELS))
        depth = int(config["freeze_depth"])
        if depth > 0:
            model.base_model.embeddings.requires_grad_(False)
            for layer in model.base_model.encoder.layer[:depth]:
                layer.requires_grad_(False)
        model.to(device)
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config["lr"], fused=device.type == "cuda",
        )
        loader = DataLoader(train_items, batch_size=int(config["batch_size"]), shuffle=True, collate_fn=pad,
                            generator=torch.Generator().manual_seed(seed))
        total = spec["epochs"] * len(loader)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step, total=total: max(0.0, (total - step) / total)
        )
        trainable = decay + no_decay
        accuracies = []
        for epoch in range(1, spec["epochs"] + 1):
            model.train()
            for batch in loader:
                with autocast():
                    loss = model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).loss
                loss.backward()
                nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            accuracy = evaluate(model, val_loader)
            probe.eval_done(accuracy, epoch)
            accuracies.append(accuracy)
        del model, optimizer, scheduler, trainable, decay, no_decay
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        best = max(accuracies) if accuracies else math.nan
        kept = {k: config[k] for k in ("freeze_depth", "lr", "batch_size", "weight_decay", "seed")}
        trials.append({"number": config["number"], "state": "COMPLETE", "start": start, "end": time.time(),
                       "value": best, "config": kept})
    return {"t0": t0, "t_end": time.time(), "trials": trials, "tracking": "none"}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
