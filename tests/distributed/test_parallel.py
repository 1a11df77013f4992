"""Local worker processes: which GPU or how many cores each one gets."""

from __future__ import annotations

import torch

from ftsearch.distributed import parallel


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
