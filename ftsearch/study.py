"""Drives a search: checks inputs, creates or resumes the Optuna study, runs trials, publishes.

Everything a user can get wrong (study file, data, backbones, device) is checked before any
Optuna study or MLflow run exists, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from ftsearch import progress, publish, reevaluation, selection, settings, stopping, tracking, warmstart
from ftsearch.checkpoints import TrialCheckpoints
from ftsearch.config import StudyConfig, load_study
from ftsearch.data.checks import LABEL_ISSUES
from ftsearch.distributed import parallel, storage, worker
from ftsearch.errors import BaselineUnavailable, FtsearchError
from ftsearch.generations import (
    CONFIG_ATTR,
    COST_ATTR,
    DATA_ATTR,
    FINISHED_STATES,
    MODEL_ID_ATTR,
    PARENT_RUN_ATTR,
    REASON_ATTR,
    RUN_ID_ATTR,
    SELECT_ATTR,
    best_trial,
    count_states,
    front,
    generations,
    latest_generation,
    top_trials,
)
from ftsearch.modalities import make_modality
from ftsearch.modalities.base import Modality
from ftsearch.objectives import primary
from ftsearch.outcomes import Outcome, end_run
from ftsearch.predictor import read_meta
from ftsearch.problems.base import Evaluation, ProblemType
from ftsearch.progress import Reporter
from ftsearch.train import resolve_device
from ftsearch.trial import Prepared, TrialRunner, best_info, trial_counts

JOIN_POLL_SECONDS = 2.0
FRONT_ARTIFACT = "pareto_front.json"  # on the parent run of a study with objectives: the front and the chosen trial
CANDIDATES_ARTIFACT = "candidates.json"  # on the parent run: every candidate's validation value, the chosen one's test
SELECTED_FROM_TAG = "ftsearch.selected_from"  # a registered combination: the completed trials it was chosen among


@dataclass(frozen=True)
class SearchOptions:
    """What the user asked for on the command line."""

    study: str
    n_trials: int | None = None
    timeout: float | None = None
    overrides: tuple[str, ...] = ()
    device: str = "auto"
    fresh: bool = False
    storage: str | None = None
    quiet: bool = False
    compile: bool = False
    workers: int = 1
    trials_per_gpu: int = 1  # > 1: that many workers on each GPU (ftsearch.distributed.parallel)
    warm_start: str | None = None  # an earlier study (or generation) whose top trials run first
    warm_start_trials: int | None = None  # default warmstart.DEFAULT_WARM_START_TRIALS


@dataclass
class SearchSummary:
    """What a search did, for the CLI to print and tests to check."""

    study_name: str
    parent_run_id: str
    counts: dict[str, int] = field(default_factory=dict)
    best_trial: int | None = None
    best_value: float | None = None
    model_version: str | None = None
    selection: str = ""  # what is registered: ``trial 3``, an ensemble or a blend (``ftsearch.selection``)
    selection_value: float | None = None  # its validation value
    test_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def prepare(options: SearchOptions, reporter: Reporter | None = None) -> Prepared:
    """Validate everything the user supplied; raises FtsearchError, creates nothing."""
    reporter = reporter if reporter is not None else progress.make_reporter(options.quiet)
    device = resolve_device(options.device)
    overrides = list(options.overrides)
    if options.n_trials is not None:
        overrides.append(f"n_trials={options.n_trials}")
    if options.timeout is not None:
        overrides.append(f"timeout={options.timeout}")
    config = load_study(options.study, overrides, cpu=device.type == "cpu")
    _check_serve_device(config)
    settings.latency_seconds()  # a bad FTSEARCH_LATENCY_SECONDS is refused now, not by the first trial
    reporter.info(f"study {config.name} on {device.type.upper()}: {config.plan_summary()}")
    if note := config.pruning_note():
        reporter.info(note)
    modality = make_modality(config, device)
    reporter.info(modality.describe())
    for note in modality.checks.notes:
        reporter.info(note)
    for warning in modality.checks.warnings:
        reporter.warn(warning)
    warmstart.from_study_file(config, modality.blocks)  # an entry that does not fit is an error now
    return Prepared(config, device, modality, options.compile)


def _check_serve_device(config: StudyConfig) -> None:
    """Latency is measured where ``serve_device`` says: a GPU that this machine lacks is refused
    before any trial, not found missing after the first one trained."""
    name = config.serve_device
    if name == "cpu":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(name.partition(":")[2] or 0)
    if index >= count:
        raise FtsearchError(f"{config.source}: serve_device {name!r}: this machine has "
                            f"{count or 'no'} CUDA GPU{'' if count == 1 else 's'}; use serve_device: cpu, or a GPU it has")


def run_search(options: SearchOptions, reporter: Reporter | None = None) -> SearchSummary:
    """Run (or resume) the study named in ``options`` and register its best model.

    Progress goes to ``reporter`` (by default: live on a terminal, plain lines otherwise, nothing
    with ``options.quiet``), which is closed however the search ends."""
    reporter = reporter if reporter is not None else progress.make_reporter(options.quiet)
    try:
        return _run_search(options, reporter)
    finally:
        reporter.close()  # never leave a live display drawing over the terminal (Ctrl-C, errors)


def _run_search(options: SearchOptions, reporter: Reporter) -> SearchSummary:
    prepared = prepare(options, reporter)
    config = prepared.config
    url = settings.optuna_storage_url(options.storage)
    workers = parallel.worker_count(options.workers, options.trials_per_gpu)
    if workers > 1:
        _refuse_sqlite(url, f"--trials-per-gpu {options.trials_per_gpu}" if options.trials_per_gpu > 1
                       else f"--workers {options.workers}")
    optuna_storage = storage.open_storage(url, on_stale=worker.end_stale_trial)
    first = warmstart.from_study_file(config, prepared.modality.blocks)
    if options.warm_start:  # read before the new study exists: a wrong name leaves nothing behind
        first += warmstart.from_study(optuna_storage, options.warm_start,
                                     options.warm_start_trials or warmstart.DEFAULT_WARM_START_TRIALS)
    study = open_study(config, optuna_storage, options.fresh)
    check_same_data(study, prepared.modality.checks.report["digests"])
    storage.fail_stale_trials(study)  # trials of a process that died while nobody was watching
    parent = tracking.StudyRun.open(
        config.name, study.user_attrs.get(PARENT_RUN_ATTR), tags={"optuna.study": study.study_name}
    )
    start = time.monotonic()
    try:
        study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
        if "config.json" not in _artifact_names(parent):
            parent.log_dict(config.model_dump(), "config.json")
        tracking.log_datasets(parent.mlflow_client, parent.run_id, config.name, prepared.modality.checks.report,
                              ("train", "val", "test"))
        for path, data in prepared.modality.parent_artifacts().items():
            parent.log_dict(data, path)  # rewritten on resume: the data may have changed since
            if path == "skipped_files.json":
                reporter.warn(f"skipped {len(data)} unusable data file(s); they are listed in {path} on the MLflow parent run")
        _log_baseline(prepared.modality, parent, config.metric, reporter)
        # Failed trials do not count: the study runs until n_trials trials completed or were
        # pruned (each failure gives its slot back), the timeout, or too many failures in a row.
        # Workers join once there are slots to run; the configurations to try first take the first.
        warmstart.enqueue_first(study, config, prepared.modality.blocks, first, reporter)
        worker.ensure_slots(study, config.n_trials)
        trials = study.get_trials(deepcopy=False)
        reporter.study_started(
            study.study_name, n_trials=config.n_trials, metric=f"val {config.metric}", counts=trial_counts(trials),
            best=best_info(best_trial(study)), parent_run_id=parent.run_id,
        )
        runner = TrialRunner(prepared, parent, TrialCheckpoints.of(study.study_name), reporter)
        if workers > 1:
            def follow() -> None:
                reporter.trials_updated(trial_counts(study.get_trials(deepcopy=False)), best_info(best_trial(study)))

            parallel.run_workers(workers, _worker_arguments(options, url), reporter, on_poll=follow)
        else:
            done = worker.work(
                study.study_name, optuna_storage, _study_opener(config, optuna_storage, study.study_name),
                runner, runner.after_trial, timeout=config.timeout, warn=reporter.warn,
                should_stop=stop_rule(config),
            )
            if done.stopped_early:
                reporter.warn(f"stopping: {done.stopped_early}")
        _wait_for_other_workers(study, reporter)
        runner.checkpoints.drop_resume_files(study)
        trials = study.get_trials(deepcopy=False)
        reporter.study_ended(trial_counts(trials), best_info(best_trial(study)))
        summary = finish_study(study, prepared, parent, runner)
    except BaseException as err:
        # Ctrl-C or a crash: the parent run is ended, the study stays resumable as it is.
        parent.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    parent.finish("FINISHED")
    summary.seconds = time.monotonic() - start
    return summary


def run_worker(options: SearchOptions, reporter: Reporter | None = None, wait: float = 600.0) -> worker.WorkerResult:
    """Join the study that ``ftsearch search`` started (on this machine or another, through a shared
    storage and tracking server) and run its trials until none is left; waits up to ``wait``
    seconds for the study to be started. Registration is left to the ``search`` process."""
    reporter = reporter if reporter is not None else progress.make_reporter(options.quiet)
    try:
        prepared = prepare(options, reporter)
        config = prepared.config
        url = settings.optuna_storage_url(options.storage)
        _refuse_sqlite(url, "a worker")
        optuna_storage = storage.open_storage(url, on_stale=worker.end_stale_trial)
        study = _join_study(config, optuna_storage, wait, reporter)
        check_same_data(study, prepared.modality.checks.report["digests"])
        parent = tracking.StudyRun.attach(config.name, study.user_attrs[PARENT_RUN_ATTR])
        runner = TrialRunner(prepared, parent, TrialCheckpoints.of(study.study_name), reporter)
        reporter.info(f"worker {worker.worker_name()} joined study {study.study_name}")
        # Different workers must not draw the same random samples: the process id joins the seed.
        done = worker.work(
            study.study_name, optuna_storage, _study_opener(config, optuna_storage, study.study_name, os.getpid()),
            runner, runner.after_trial, timeout=config.timeout, warn=reporter.warn,
            should_stop=stop_rule(config),
        )
        stopped = done.stopped_early or done.converged
        reporter.info(f"worker {worker.worker_name()} ran {done.ran} trial(s)" + (f"; stopped: {stopped}" if stopped else ""))
        return done
    finally:
        reporter.close()


def stop_rule(config: StudyConfig) -> Callable[[optuna.Study], str | None]:
    """The study file's ``stop`` rule as a worker's ``should_stop``: a study -> why it converged."""
    rule = config.stop
    if rule is None:
        return lambda study: None
    return lambda study: stopping.converged(study.get_trials(deepcopy=False), config.direction, rule.patience, rule.min_delta)


def _refuse_sqlite(url: str, who: str) -> None:
    if url.startswith("sqlite:"):
        raise FtsearchError(
            f"{who} cannot share the SQLite storage {url}: SQLite fails with 'database is locked' under "
            "several writers; leave --storage out (a journal file) or use PostgreSQL"
        )


def _join_study(config: StudyConfig, optuna_storage: BaseStorage, wait: float, reporter: Reporter) -> optuna.Study:
    """The study's latest generation, once its search process has set it up and it has trials
    to run. A worker started before the search (or before a --fresh one) waits for it."""
    deadline = time.monotonic() + wait
    said, problem = False, ""
    while True:
        latest = latest_generation(storage.names_in(optuna_storage), config.name)
        study = optuna.load_study(study_name=latest, storage=optuna_storage) if latest else None
        problem, ready = "", False
        if study is not None:
            try:
                _check_identity(study, config)
            except FtsearchError as err:
                problem = str(err)  # maybe a --fresh generation is on its way
            else:
                ready = PARENT_RUN_ATTR in study.user_attrs
                if ready and study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
                    return study
        if time.monotonic() >= deadline:
            if ready:
                return study  # set up, but nothing left to run: the worker has nothing to do
            if problem:
                raise FtsearchError(problem)
            raise FtsearchError(
                f"study {config.name!r} was not started within {wait:.0f} s: run `ftsearch search {config.name}` "
                "with the same --storage (and MLFLOW_TRACKING_URI) first; workers join it"
            )
        if not said:
            reporter.info(f"waiting for `ftsearch search {config.name}` to start the study")
            said = True
        time.sleep(JOIN_POLL_SECONDS)


def _study_opener(config: StudyConfig, optuna_storage: BaseStorage, name: str, salt: int = 0):
    # Offset by the trials already run, so a resumed study does not replay its first samples.
    trials_so_far = len(optuna.load_study(study_name=name, storage=optuna_storage).get_trials(
        deepcopy=False, states=FINISHED_STATES))
    # One sampler for the worker's life (its random stream goes on); a fresh Study object per
    # trial, so the sampler sees the trials other workers finished since.
    sampler, pruner = make_sampler(config, trials_so_far + salt), make_pruner(config)
    return lambda: optuna.load_study(study_name=name, storage=optuna_storage, sampler=sampler, pruner=pruner)


def _worker_arguments(options: SearchOptions, url: str) -> list[str]:
    # --wait 0: the study is set up before any local worker starts; a restarted one with nothing
    # left to run exits at once.
    args = ["worker", options.study, "--storage", url, "--device", options.device, "--wait", "0"]
    for override in options.overrides:
        args += ["--set", override]
    if options.timeout is not None:
        args += ["--timeout", str(options.timeout)]
    if options.compile:
        args.append("--compile")
    return args


def _wait_for_other_workers(study: optuna.Study, reporter: Reporter) -> None:
    """Wait while trials still run in workers elsewhere (failing those that stop beating), so the
    best model is chosen from every trial."""
    said = False
    while running := study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not said:
            reporter.info(f"waiting for {len(running)} trial(s) still running in other workers")
            said = True
        worker.judge(study)
        time.sleep(JOIN_POLL_SECONDS)


def open_study(config: StudyConfig, optuna_storage: BaseStorage, fresh: bool) -> optuna.Study:
    """Resume the study's latest Optuna study, or start a new generation when ``fresh``.

    Generations are named ``<name>``, ``<name>.2``, ... so that ``--fresh`` loses no history.
    """
    names = storage.names_in(optuna_storage)
    latest = latest_generation(names, config.name)
    if latest is not None and not fresh:
        _check_identity(optuna.load_study(study_name=latest, storage=optuna_storage), config)
        name = latest
    elif latest is None:
        name = config.name
    else:
        name = f"{config.name}.{max(generations(names, config.name)) + 1}"
    study = optuna.create_study(
        study_name=name,
        storage=optuna_storage,
        directions=config.objective_directions,
        sampler=make_sampler(config),
        pruner=make_pruner(config),
        load_if_exists=True,
    )
    study.set_user_attr(CONFIG_ATTR, _identity(config))
    if study.metric_names != config.objective_names:  # the dashboard and the Pareto plot name the axes by them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since Optuna 3.2 in all but name
            study.set_metric_names(config.objective_names)
    # Read by whoever asks for the best trial (generations.best_trial): it may change on a resume.
    study.set_user_attr(SELECT_ATTR, config.select.model_dump())
    return study


def _identity(config: StudyConfig) -> str:
    return json.dumps(config.search_identity(), sort_keys=True, default=str)


def _check_identity(study: optuna.Study, config: StudyConfig) -> None:
    identity = _identity(config)
    if study.user_attrs.get(CONFIG_ATTR, identity) != identity:
        changed = _changed_keys(json.loads(study.user_attrs[CONFIG_ATTR]), json.loads(identity))
        raise FtsearchError(
            f"study {study.study_name!r} was started with a different configuration ({', '.join(changed)} "
            "changed); add --fresh to start a new study, or restore those values to resume it"
        )


def check_same_data(study: optuna.Study, digests: dict[str, str]) -> None:
    """Resume (or join) a study only on the data it was started on: trials scored on other splits
    cannot be compared, and the same file path may hold new rows. Records the digests of a study
    that has none (a new one, or one started before they were kept)."""
    started = study.user_attrs.get(DATA_ATTR)
    if started is None:
        study.set_user_attr(DATA_ATTR, digests)
        return
    changed = [split for split, digest in digests.items() if started.get(split) != digest]
    if changed:
        raise FtsearchError(
            f"study {study.study_name!r} was started on other data: the {' / '.join(changed)} split(s) changed "
            "since (new rows, files or subsample); add --fresh to start a new study on this data, or restore "
            "the data to resume it"
        )


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def make_sampler(config: StudyConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = config.sampler.seed + offset
    if config.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # The constant liar keeps parallel workers from sampling next to each other's running trials.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.sampler.startup_trials, constant_liar=True)


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    p = config.pruner
    if config.objectives:
        return optuna.pruners.NopPruner()  # Optuna prunes single-objective studies only (StudyConfig.pruning_note)
    # Epochs are reported as steps 1, 2, ...: a warm-up of n steps lets epoch n be the first pruned.
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.min_epochs)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_epochs)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_epochs, max_resource=config.search.epochs.high)
    return optuna.pruners.NopPruner()


def _artifact_names(run: tracking.StudyRun) -> set[str]:
    return {f.path for f in run.mlflow_client.list_artifacts(run.run_id)}


def finish_study(study: optuna.Study, prepared: Prepared, parent: tracking.StudyRun, runner: TrialRunner) -> SearchSummary:
    """Log the study's plots, choose the model to register (the best trial, or a combination of
    the top trials and the baseline that beats it on validation: ``ftsearch.selection``), score it
    once on the test split and register it."""
    config = prepared.config
    counts = count_states(study.get_trials(deepcopy=False), ("COMPLETE", "PRUNED", "FAIL"))
    summary = SearchSummary(study.study_name, parent.run_id, counts)
    if converged := stop_rule(config)(study):
        # Every worker stopped on the same rule; the parent run says so once, for the report.
        runner.reporter.info(f"study stopped early: {converged}")
        parent.set_tag(tracking.STOPPED_TAG, converged)
    _end_orphaned_runs(study, parent)
    _log_study_plots(study, parent, runner.reporter)
    best = _best_or_why_none(study, counts, config)
    summary.best_trial, summary.best_value = best.number, primary(best)
    parent.log_best(config.metric, primary(best), best.number, best.params)  # workers may have raced on it
    if config.objectives:
        _log_front(study, best, config, parent, runner.reporter)
    selected_from = ",".join(str(t.number) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    version = _registered(study, config.registered_model, parent, selected_from)
    if version is not None:
        runner.reporter.info(f"the chosen model of these trials is already registered as {config.registered_model} "
                             f"v{version.version}")
        return _summary_of(summary, version, best, config.metric)
    try:
        found, chosen, members, baseline, configurations = _select(study, prepared, parent, runner)
    except WeightsGone:
        # The best trial (or the best configuration's seed) went into a model registered before the
        # trials since, none better.
        earlier = _registered(study, config.registered_model, parent, None)
        if earlier is None:
            raise
        runner.reporter.info(f"best trial {best.number} is in {config.registered_model} v{earlier.version} "
                             f"({earlier.tags.get('selection', '')}), registered before; it stays the study's model")
        runner.checkpoints.drop_weights()  # the trials since are not better: their weights are of no use
        return _summary_of(summary, earlier, best, config.metric)
    summary.selection = chosen.description
    first = members[chosen.members[0]]
    plain_best = chosen.kind == "best" and first.seed is None and first.number == best.number
    summary.selection_value = primary(best) if plain_best else chosen.val[config.metric]
    modality = prepared.modality
    # Its inference cost, measured on the validation split on this machine, travels with it.
    tags = {"study": config.name, "optuna_study": study.study_name, "trial_number": str(first.number),
            "selection": chosen.description, f"val_{config.metric}": f"{summary.selection_value:.6f}",
            "models": str(chosen.models), "ms_per_example": f"{1000 * chosen.seconds_per_example:.3f}",
            SELECTED_FROM_TAG: selected_from}
    # What the chosen model costs where it is served, as measured for its trial (a soup or a seed of
    # it has the same architecture); a combination's members were measured one by one.
    if chosen.models == 1 and COST_ATTR in study.trials[first.number].user_attrs:
        tags.update({name: f"{value:.4f}" for name, value in study.trials[first.number].user_attrs[COST_ATTR].items()})
    if configurations and chosen.kind == "best":
        top = configurations[0]
        tags.update({f"val_{config.metric}_mean": f"{top.mean:.6f}", f"val_{config.metric}_std": f"{top.std:.6f}",
                     "seeds": str(len(top.runs))})
    runner.reporter.info(f"scoring {chosen.description} on the test split and registering it as {config.registered_model}")
    if chosen.kind == "best":
        run_id, folder, scored = first.run_id, first.folder, first
    elif chosen.soup is not None:
        run_id, folder, scored = parent.run_id, chosen.soup.folder, chosen.soup
    else:
        run_id, scored = parent.run_id, first
        for number in chosen.members[1:]:
            selection.add_outputs(members[number], modality, prepared.device, "test")
        folder = selection.write_ensemble(chosen, members, baseline, runner.checkpoints.root / "selected",
                                          {"labels": list(modality.labels), "pair": bool(read_meta(first.folder).get("pair", False))})
    selection.add_outputs(scored, modality, prepared.device, "test")
    evaluation = chosen.problem.evaluation(scored.targets["test"],
                                           selection.combined_outputs(chosen, members, baseline, "test"))
    # The best trial itself is registered from its own LoggedModel, whose metrics gain the test
    # split's; anything else (a soup, a seed, a combination) is logged as a model of its run now.
    trial_itself = chosen.kind == "best" and first.seed is None
    model_id = study.trials[first.number].user_attrs.get(MODEL_ID_ATTR) if trial_itself else None
    if model_id is not None and not publish.logged_model_exists(model_id):
        model_id = None  # logged to another tracking store, or deleted since
    summary.test_metrics = log_test(evaluation, chosen.problem, prepared, run_id, model_id)
    if len(found) > 1 or configurations:
        parent.log_dict(selection.report(found, chosen, config.metric, summary.test_metrics,
                                         [c.as_dict(config.metric) for c in configurations]), CANDIDATES_ARTIFACT)
    tags.update({"run_id": run_id, **{k: f"{v:.6f}" for k, v in summary.test_metrics.items()}})
    logged_now = model_id is None
    if logged_now:
        model_id = runner.log_model(run_id, folder, "model")  # linked to the run's step-0 metrics: test_*
    try:
        version = publish.register_best(config.registered_model, model_id, run_id, tags)
    except BaseException:
        if logged_now:  # all or nothing: no model left behind for a version that does not exist
            with contextlib.suppress(Exception):
                publish.delete_model(model_id)
        raise
    summary.model_version = version.version
    runner.checkpoints.drop_weights()  # they now live in the registry
    for left in ("selected", "soup", "baseline"):
        shutil.rmtree(runner.checkpoints.root / left, ignore_errors=True)
    return summary


def _registered(study: optuna.Study, registered_name: str, parent: tracking.StudyRun, selected_from: str | None):
    """The version already registered from these same trials, if any: one chosen among exactly the
    completed trials ``selected_from`` (among any when None), logged on a trial's run, a
    re-evaluation's or the parent run (a soup or a combination)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    runs = [parent.run_id, *(t.user_attrs[RUN_ID_ATTR] for t in trials if RUN_ID_ATTR in t.user_attrs),
            *(r["run_id"] for runs in study.user_attrs.get(reevaluation.REEVALUATIONS_ATTR, {}).values() for r in runs)]
    wanted = {SELECTED_FROM_TAG: selected_from} if selected_from is not None else None
    for run_id in runs:
        if (version := publish.registered_version(registered_name, run_id, wanted)) is not None:
            return version
    # Registered before versions said which trials they were chosen among: the best trial's own.
    best = best_trial(study)
    legacy = publish.registered_version(registered_name, best.user_attrs[RUN_ID_ATTR]) if best is not None else None
    return legacy if legacy is not None and SELECTED_FROM_TAG not in legacy.tags else None


def _summary_of(summary: SearchSummary, version, best: FrozenTrial, metric: str) -> SearchSummary:
    """``summary`` completed from an already registered version."""
    summary.model_version = version.version
    summary.test_metrics = {k: float(v) for k, v in version.tags.items() if k.startswith("test_")}
    summary.selection = version.tags.get("selection", f"trial {best.number}")
    summary.selection_value = float(version.tags.get(f"val_{metric}", primary(best)))
    return summary


def _select(study: optuna.Study, prepared: Prepared, parent: tracking.StudyRun, runner: TrialRunner):
    """The candidates judged on validation (logged on the parent run as ``candidates.json``), the
    chosen one with the members and baseline it needs, and the top configurations re-evaluated
    over seeds (empty unless ``selection.seeds`` > 1), best first."""
    config, modality, reporter = prepared.config, prepared.modality, runner.reporter
    wanted = config.selection
    if config.objectives and (wanted.ensemble or wanted.blend_baseline or wanted.seeds > 1):
        # They are judged on the metric alone: the front's trade-off would be lost. The soup keeps
        # the chosen trial's architecture, so its cost.
        wanted = wanted.model_copy(update={"ensemble": False, "blend_baseline": False, "seeds": 1})
        reporter.info("objectives: the trial chosen from the Pareto front is registered (or a weight soup with its "
                      "backbone's other top trials); the ensemble, the blend with the baseline and re-evaluation over "
                      "seeds are not candidates (they are judged on the metric alone)")
    elif config.constraints and (wanted.ensemble or wanted.blend_baseline):
        # A combination costs its members' latency together, which no trial measured: only single
        # models (a trial, a seed, the soup of one backbone's weights) are judged within the bounds.
        wanted = wanted.model_copy(update={"ensemble": False, "blend_baseline": False})
        reporter.info("constraints: the ensemble and the blend with the baseline are not candidates (each is "
                      "several models, measured one by one)")
    top = top_trials(study, wanted.top_k if wanted.ensemble or wanted.soup or wanted.seeds > 1 else 1)
    configurations = reevaluation.reevaluate(study, top, runner, wanted.seeds) if wanted.seeds > 1 else []
    if configurations:  # each configuration is represented by its best seed, in the order of their means
        by_number = {t.number: t for t in top}
        top = [by_number[c.trial] for c in configurations]
        chosen_runs = {c.trial: c.best_run(modality.problem, config.metric) for c in configurations}
    members: dict[int, selection.Member] = {}
    for trial in top:
        run_id, seed = trial.user_attrs[RUN_ID_ATTR], None
        if configurations and chosen_runs[trial.number].run_id != run_id:
            run_id, seed = chosen_runs[trial.number].run_id, chosen_runs[trial.number].seed
        try:
            folder = (_reevaluation_weights(runner, trial.number, seed) if seed is not None
                      else _trial_weights(runner.checkpoints, trial.number, run_id, parent))
        except FtsearchError:
            if trial.number == top[0].number:
                raise
            reporter.warn(f"trial {trial.number}'s weights are gone; it is left out of the ensemble")
            continue
        members[trial.number] = selection.trial_member(modality, prepared.device, trial.number, folder, run_id, seed)
    baseline = None
    # Only where the search could fit one (a baseline that is unavailable said why already).
    if wanted.blend_baseline and f"baseline_val_{config.metric}" in parent.mlflow_client.get_run(parent.run_id).data.metrics:
        baseline = modality.baseline_member(runner.checkpoints.root / "baseline")
    ranked = list(members.values())
    souping = wanted.soup and len(ranked) >= 2
    combining = souping or (wanted.ensemble and len(ranked) >= 2) or baseline is not None
    if combining:
        reporter.info("judging " + ", ".join(filter(None, (
            "the best trial", "the greedy weight soup" if souping else "",
            f"the ensemble of the top {len(ranked)}" if wanted.ensemble and len(ranked) >= 2 else "",
            "the blend with the baseline" if baseline is not None else ""))) + " on the validation split")
    soup = None
    if souping:
        backbones = {t.number: t.params.get("backbone") for t in top}
        soup = selection.greedy_soup(ranked, backbones, modality, prepared.device, modality.problem, config.metric,
                                     runner.checkpoints.root / "soup", reporter.info)
    found = selection.candidates(ranked, ranked[0].targets["val"], modality.problem, config.metric,
                                 ensemble=wanted.ensemble, baseline=baseline, soup=soup)
    chosen = selection.choose(found, modality.problem, config.metric)
    if combining:
        for candidate in found:
            reporter.info(f"  {candidate.description}: val {config.metric} {candidate.val[config.metric]:.4f}, "
                          f"{1000 * candidate.seconds_per_example:.2f} ms per example"
                          + ("  <- chosen" if candidate is chosen else ""))
    return found, chosen, members, baseline, configurations


def _log_front(study: optuna.Study, chosen: FrozenTrial, config: StudyConfig, parent: tracking.StudyRun,
               reporter: Reporter) -> None:
    """Say and log (``pareto_front.json`` on the parent run) the Pareto front of a study with
    several objectives and which trial its ``select`` rule chose from it."""
    names = config.objective_names
    trials = sorted(front(study), key=lambda t: t.number)
    rule = config.select.rule + (f" (tolerance {config.select.tolerance:g})" if config.select.rule == "within" else "")
    reporter.info(f"Pareto front of {', '.join(names)}: {len(trials)} trial(s); select {rule} chose trial {chosen.number}")
    for trial in trials:
        values = ", ".join(f"{name} {value:.4g}" for name, value in zip(names, trial.values, strict=True))
        reporter.info(f"  trial {trial.number}: {values}" + ("  <- chosen" if trial.number == chosen.number else ""))
    parent.log_dict({"objectives": names, "directions": config.objective_directions,
                     "select": config.select.model_dump(), "chosen": chosen.number,
                     "front": [{"trial": t.number, **dict(zip(names, t.values, strict=True))} for t in trials]},
                    FRONT_ARTIFACT)


def _best_or_why_none(study: optuna.Study, counts: dict[str, int], config: StudyConfig) -> FrozenTrial:
    best = best_trial(study)
    if best is None and counts["COMPLETE"]:
        # Trials completed, none within the constraints: nothing is registered rather than an
        # infeasible model; the least infeasible trial says how far off the search got.
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        nearest = min(completed, key=lambda t: sum(max(v, 0.0) for v in t.constraints.values()))
        cost = nearest.user_attrs.get(COST_ATTR, {})
        measured = ", ".join(f"{name} {cost[name]:.4g} (max {bound.max:g})" for name, bound in config.constraints.items()
                             if name in cost)
        raise FtsearchError(
            f"{config.source}: none of the {counts['COMPLETE']} completed trials meets the constraints, so nothing is "
            f"registered; the nearest, trial {nearest.number}, measured {measured} on {config.serve_device}. Loosen "
            "`constraints` or search smaller models (backbones, max_length), then rerun with --fresh"
        )
    if best is None:
        reasons = [t.user_attrs.get(REASON_ATTR, "") for t in study.trials if t.user_attrs.get(REASON_ATTR)]
        raise FtsearchError(
            f"no trial completed ({', '.join(f'{n} {s.lower()}' for s, n in counts.items())}), so there is "
            f"no model to register; first reason: {reasons[0] if reasons else 'none recorded'}"
        )
    return best


class WeightsGone(FtsearchError):
    """A top trial's weights are not on disk (nor on the tracking server)."""


def _trial_weights(checkpoints: TrialCheckpoints, number: int, run_id: str, parent: tracking.StudyRun) -> Path:
    folder = checkpoints.weights(number)
    if not folder.is_dir() and tracking.is_shared():
        # Trained by a worker on another machine: it uploaded the weights when it entered the top trials.
        checkpoints.download(run_id, number, parent.mlflow_client.tracking_uri)
    if not folder.is_dir():
        raise WeightsGone(f"trial {number}'s weights are missing from {folder}; rerun with --fresh")
    return folder


def _reevaluation_weights(runner: TrialRunner, number: int, seed: int) -> Path:
    folder = runner.checkpoints.reevaluation_weights(number, seed)
    if not folder.is_dir():
        raise WeightsGone(f"the weights of trial {number}'s configuration with seed {seed} are missing from {folder}; "
                          "rerun with --fresh")
    return folder


def _log_baseline(modality: Modality, parent: tracking.StudyRun, metric: str, reporter: Reporter) -> None:
    """Train the classical baseline once per study, for context next to the fine-tuned trials, and
    list the train examples whose label it finds unlikely (``label_issues.json``)."""
    if f"baseline_val_{metric}" in parent.mlflow_client.get_run(parent.run_id).data.metrics:
        return
    try:
        scores = modality.baseline()
    except BaselineUnavailable as err:
        # Context, not the search: said, tagged, and the trials run without it.
        reporter.warn(f"no baseline: {err}")
        parent.mlflow_client.set_tag(parent.run_id, tracking.BASELINE_SKIPPED_TAG, str(err))
        return
    # Before the scores, which mark the baseline done: a resume after a failure here checks again.
    found = modality.label_issues()
    if found is not None:
        parent.log_dict(found.report, LABEL_ISSUES)
        for path, figure in found.figures.items():
            parent.log_figure(figure, path)
        for line in found.lines():
            reporter.info(line)
    parent.mlflow_client.set_tag(parent.run_id, "baseline", modality.baseline_name)
    for key, value in scores.items():
        parent.mlflow_client.log_metric(parent.run_id, key, value)
    reporter.info(f"baseline ({modality.baseline_name}): val {metric} {scores[f'baseline_val_{metric}']:.4f}, "
                  f"test {metric} {scores[f'baseline_test_{metric}']:.4f}")


def _end_orphaned_runs(study: optuna.Study, parent: tracking.StudyRun) -> None:
    """End the MLflow run of any finished trial whose process died before it could end the run."""
    for trial in study.get_trials(deepcopy=False, states=FINISHED_STATES):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id and parent.mlflow_client.get_run(run_id).info.status == "RUNNING":
            reason = trial.user_attrs.get(REASON_ATTR, "its process stopped before ending the run")
            end_run(tracking.TrialRun(parent.mlflow_client, run_id), Outcome(trial.state.name, reason))


def log_test(evaluation: Evaluation, problem: ProblemType, prepared: Prepared, run_id: str,
             model_id: str | None = None) -> dict[str, float]:
    """Log the chosen model's one scoring on the held-out test split to ``run_id``: its metrics
    (``test_<metric>`` for every metric of the problem type; with ``model_id``, that LoggedModel's
    too, measured on the test dataset), figures and tables. ``problem`` is the one saved with the
    model: thresholds tuned on validation are applied to test as they are."""
    modality = prepared.modality
    metrics = {f"test_{name}": value for name, value in evaluation.metrics.items()}
    run = tracking.TrialRun(tracking.client(), run_id)
    run.log_metrics(metrics, step=0, model_id=model_id,
                    dataset=tracking.dataset_of(prepared.config.name, modality.checks.report, "test") if model_id else None)
    figures = problem.figures(evaluation, modality.labels)
    try:
        for path, figure in figures.items():
            run.log_figure(figure, f"test_{path}")
    finally:
        tracking.close_figures(figures.values())
    for path, rows in problem.tables(evaluation, modality.labels).items():
        run.log_dict(rows, f"test_{path}")
    run.flush()  # the version is registered only once its run holds the test metrics
    return metrics


def _log_study_plots(study: optuna.Study, parent: tracking.StudyRun, reporter: Reporter) -> None:
    from optuna.visualization import matplotlib as optuna_plots

    plots = {"optimization_history.png": optuna_plots.plot_optimization_history}
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
        plots["param_importances.png"] = optuna_plots.plot_param_importances
    # Of the study's metric: with several objectives Optuna asks which one to plot.
    target = primary if len(study.directions) > 1 else None
    with warnings.catch_warnings():
        # Optuna flags its matplotlib plots experimental and warns on ties in importances.
        warnings.simplefilter("ignore")
        for path, plot in plots.items():
            try:
                parent.log_figure(plot(study, target=target).figure, path)
            except Exception as err:  # noqa: BLE001 - a plot is not worth losing the study's model
                reporter.warn(f"skipped the study plot {path}: {type(err).__name__}: {err}")
