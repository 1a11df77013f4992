"""Local worker processes: which GPU (and what share of its memory) or how many cores each one
gets, and a study run by two workers sharing one device."""

from __future__ import annotations

import pytest
import torch

from ftsearch import settings
from ftsearch.cli import main
from ftsearch.distributed import parallel
from ftsearch.errors import FtsearchError
from ftsearch.train import resolve_device
from tests.helpers import optuna_study


def test_with_gpus_each_worker_sees_its_own_round_robin(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [parallel.worker_env(i, 3)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0", "1", "0"]
    # Already restricted by the user: the workers share out those GPUs, by their real ids.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [parallel.worker_env(i, 2)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["3", "5"]


def test_on_the_cpu_workers_split_the_cores_unless_told(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = parallel.worker_env(0, 4)
    assert env["OMP_NUM_THREADS"] == "4"
    assert parallel.worker_env(0, 32)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert parallel.worker_env(0, 4)["OMP_NUM_THREADS"] == "2"


def test_trials_per_gpu_puts_that_many_workers_on_each_gpu_each_with_its_share_of_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    count = parallel.worker_count(workers=1, trials_per_gpu=4)
    assert count == 8
    envs = [parallel.worker_env(i, count) for i in range(count)]
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs) == ["3"] * 4 + ["5"] * 4
    assert {e[settings.GPU_MEMORY_SHARE_ENV] for e in envs} == {"0.250000"}
    # Three workers on two GPUs: the GPU with two halves its memory, the one alone keeps all of it.
    assert [parallel.worker_env(i, 3).get(settings.GPU_MEMORY_SHARE_ENV) for i in range(3)] == ["0.500000", None, "0.500000"]
    assert parallel.worker_count(workers=3, trials_per_gpu=1) == 3


def test_without_a_gpu_trials_per_gpu_workers_share_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    count = parallel.worker_count(workers=1, trials_per_gpu=4)
    assert count == 4
    env = parallel.worker_env(0, count)
    assert env["OMP_NUM_THREADS"] == "4" and settings.GPU_MEMORY_SHARE_ENV not in env and "CUDA_VISIBLE_DEVICES" not in env


def test_a_worker_sharing_its_gpu_is_held_to_its_share(monkeypatch):
    held = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share, device=None: held.append(share))
    monkeypatch.setenv(settings.GPU_MEMORY_SHARE_ENV, "0.25")
    assert resolve_device("auto").type == "cuda" and held == [0.25]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu" and held == [0.25]  # no GPU: nothing to share
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(settings.GPU_MEMORY_SHARE_ENV, "4")
    with pytest.raises(FtsearchError, match="FTSEARCH_GPU_MEMORY_SHARE='4': must be a share of the GPU's memory"):
        resolve_device("cuda")


def test_workers_and_trials_per_gpu_are_one_choice(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["search", "imdb", "--workers", "2", "--trials-per-gpu", "2"])
    assert exit_.value.code == 2
    assert "--trials-per-gpu: not allowed with argument --workers" in capsys.readouterr().err


def test_two_trials_per_device_share_the_cpu_and_finish_the_study(write_study, state_dir, capsys):
    path = write_study(n_trials=2, **{"search.epochs": {"low": 1, "high": 1}},
                       selection={"ensemble": False, "blend_baseline": False, "soup": False})
    assert main(["search", str(path), "--trials-per-gpu", "2"]) == 0
    out = capsys.readouterr().out
    assert "starting 2 worker processes" in out
    assert {line.split("]")[0] for line in out.splitlines() if line.startswith("[worker ")} == {"[worker 0", "[worker 1"}
    assert [t.state.name for t in optuna_study("tiny").trials] == ["COMPLETE", "COMPLETE"]
