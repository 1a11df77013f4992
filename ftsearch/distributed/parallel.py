"""Several worker processes on one machine for ``ftsearch search --workers N`` (or
``--trials-per-gpu N``: N workers on each GPU).

Each worker is an ``ftsearch worker`` process on the same storage: its own Python, so a crash,
a leak or an out-of-memory kill stays in it. With GPUs, worker i sees only GPU i (modulo the
count), and workers that share a GPU each get an equal share of its memory
(``settings.GPU_MEMORY_SHARE_ENV``; a trial that outgrows it retries at half the batch); on the
CPU the cores are split between the workers. A worker killed by a signal (the OOM killer, a
preemption, ``kill -9``) is restarted: its trial is retried from its checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ftsearch import settings
from ftsearch.errors import FtsearchError
from ftsearch.progress import Reporter

MAX_RESTARTS = 3  # per worker: a worker that keeps getting killed points at a real problem
STOP_GRACE_SECONDS = 30
POLL_SECONDS = 3.0


@dataclass
class _Worker:
    index: int
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    relay: threading.Thread | None = field(default=None, repr=False)


def visible_gpus() -> list[str]:
    """The ids of the GPUs this process may use (``CUDA_VISIBLE_DEVICES``'s, when it is set)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[:gpus] if visible else [str(i) for i in range(gpus)]


def worker_count(workers: int, trials_per_gpu: int) -> int:
    """How many workers run: ``--workers``, or ``--trials-per-gpu`` on each GPU (on a machine
    without one, that many share the CPU)."""
    return trials_per_gpu * max(1, len(visible_gpus())) if trials_per_gpu > 1 else workers


def worker_env(index: int, count: int) -> dict[str, str]:
    """The environment of worker ``index`` of ``count``: its GPU (and its share of the GPU's memory
    when others share it), or its share of the cores."""
    env = dict(os.environ)
    ids = visible_gpus()
    if ids:
        env["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
        sharing = len(range(index % len(ids), count, len(ids)))
        if sharing > 1:
            env[settings.GPU_MEMORY_SHARE_ENV] = f"{1 / sharing:.6f}"
    else:
        threads = str(max(1, (os.cpu_count() or 1) // count))
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("MKL_NUM_THREADS", threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_workers(count: int, arguments: list[str], reporter: Reporter, on_poll: Callable[[], None] | None = None) -> None:
    """Run ``count`` ``ftsearch worker`` processes with ``arguments`` until all have exited,
    relaying their output line by line, prefixed with the worker's number; ``on_poll`` is called
    every few seconds meanwhile (to follow the study's progress)."""
    workers = [_Worker(i, worker_env(i, count)) for i in range(count)]
    reporter.info(f"starting {count} worker processes")
    for w in workers:
        _start(w, arguments, reporter)
    failed = []
    polled = time.monotonic()
    try:
        while any(w.process is not None for w in workers):
            if on_poll is not None and time.monotonic() - polled > POLL_SECONDS:
                try:
                    on_poll()
                except Exception as err:  # noqa: BLE001 - progress is not worth stopping the workers
                    reporter.warn(f"could not read the study's progress: {type(err).__name__}: {err}")
                polled = time.monotonic()
            for w in workers:
                if w.process is None or (code := w.process.poll()) is None:
                    continue
                # Loader or compiler subprocesses of a killed worker may hold its pipe open.
                w.relay.join(timeout=5)
                w.process = None
                if code < 0 and w.restarts < MAX_RESTARTS:
                    w.restarts += 1
                    reporter.warn(f"worker {w.index} was killed by {_signal_name(-code)}; restarting it "
                                  f"({w.restarts} of {MAX_RESTARTS}); its trial is retried from its last epoch")
                    _start(w, arguments, reporter)
                elif code != 0:
                    failed.append(f"worker {w.index} exited with {_exit_name(code)}")
                    reporter.warn(failed[-1])
            time.sleep(0.5)
    except BaseException:
        _stop(workers)
        raise
    if failed and len(failed) == count:
        raise FtsearchError(f"every worker failed ({'; '.join(failed)}); their output above says why")


def _start(w: _Worker, arguments: list[str], reporter: Reporter) -> None:
    w.process = subprocess.Popen(
        [sys.executable, "-m", "ftsearch.cli", *arguments],
        env=w.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
        start_new_session=True,  # Ctrl-C reaches the coordinator, which stops the workers in order
    )
    w.relay = threading.Thread(target=_relay, args=(w.process, w.index, reporter), daemon=True)
    w.relay.start()


def _relay(process: subprocess.Popen, index: int, reporter: Reporter) -> None:
    for line in process.stdout:
        reporter.info(f"[worker {index}] {line.rstrip()}")


def _stop(workers: list[_Worker]) -> None:
    """SIGTERM (each worker ends its trial and MLflow run), then SIGKILL after a grace period."""
    live = [w.process for w in workers if w.process is not None and w.process.poll() is None]
    for process in live:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in live:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exit_name(code: int) -> str:
    return _signal_name(-code) if code < 0 else f"status {code}"
