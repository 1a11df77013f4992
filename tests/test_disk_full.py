"""A full disk while writing a resume checkpoint, a feature cache entry, a trial's model folder or
the registered model: the error names the path and what may be freed, nothing is left half
written, and the study goes on (or stops, resumable) with that message.

Tests cannot fill a file system, so each injects the error a full one gives (ENOSPC) at the lowest
write it can reach: torch.save, numpy's writers, the allocation of the cache's memory map,
safetensors, shutil's copies.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from ftsearch import settings
from ftsearch.adaptation import freeze_lowest_blocks
from ftsearch.cli import main
from ftsearch.data.features import cache_root
from ftsearch.data.tokens import tokenize_cached
from ftsearch.disk import DiskFull, writing
from ftsearch.models.text import load_classifier
from ftsearch.problems import problem_type
from ftsearch.train import TrainSettings
from ftsearch.train import fit as train_fit
from tests.helpers import (
    cached_features,
    labelled_reviews,
    optuna_study,
    review_loaders,
    runs,
    seeded_classifier,
    store,
)

CPU = torch.device("cpu")
fit = partial(train_fit, scoring=problem_type("single-label-classification"))
NO_SPACE = os.strerror(errno.ENOSPC)
ONE_EPOCH = {"search.epochs": {"low": 1, "high": 1}}
TWO_EPOCHS = {"search.epochs": {"low": 2, "high": 2}}


def enospc(filename=None, filename2=None) -> OSError:
    return OSError(errno.ENOSPC, NO_SPACE, filename, None, filename2)


def failing_save(monkeypatch, on_calls: set[int], wrapped: bool = False) -> None:
    """Make torch.save write half of its output and then meet a full disk on the ``on_calls``-th
    calls (from 1); ``wrapped``: raised as torch's zip writer does, a RuntimeError while handling
    the OSError."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) not in on_calls:
            return real_save(obj, f, *args, **kwargs)
        whole = io.BytesIO()
        real_save(obj, whole)
        target = open(f, "wb") if isinstance(f, str | os.PathLike) else f  # noqa: SIM115 - closed below
        target.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        if target is not f:
            target.close()
        if not wrapped:
            raise enospc()
        try:
            raise enospc()
        except OSError:
            # As torch raises it: its own error, with the OS error as the one it was handling.
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save)


@pytest.fixture(scope="module")
def loaders(tiny_bert, tmp_path_factory):
    return review_loaders(tiny_bert, tmp_path_factory.mktemp("tokens"), 96, 32, 32)


def model(tiny_bert):
    return seeded_classifier(tiny_bert)


@pytest.mark.parametrize("wrapped", [False, True], ids=["OSError", "torch-RuntimeError"])
def test_a_full_disk_at_the_second_checkpoint_leaves_the_first_whole(tiny_bert, loaders, monkeypatch, wrapped):
    checkpoint = settings.checkpoint_dir() / "tiny" / "resume" / "trial-0.pt"
    first = {}

    def after_epoch(metrics):
        if metrics.epoch == 1:
            first["bytes"] = checkpoint.read_bytes()
        return False

    real_save = torch.save
    failing_save(monkeypatch, on_calls={2}, wrapped=wrapped)
    with pytest.raises(DiskFull) as caught:
        fit(model(tiny_bert), *loaders, TrainSettings(lr=5e-3, epochs=3, seed=1), after_epoch, checkpoint=checkpoint)
    message = str(caught.value)
    assert message.startswith(f"no space left on device writing {checkpoint}: free space on ")
    assert f"the folders under {settings.checkpoint_dir()} of studies you will not resume" in message
    # The previous epoch's file as it was, and no partial file beside it.
    assert checkpoint.read_bytes() == first["bytes"]
    assert list(checkpoint.parent.iterdir()) == [checkpoint]

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the trial resumes after epoch 1
    resumed = fit(model(tiny_bert), *loaders, TrainSettings(lr=5e-3, epochs=3, seed=1), checkpoint=checkpoint)
    assert resumed.resumed_from_epoch == 1 and resumed.status == "completed" and len(resumed.history) == 3


def test_a_trial_whose_checkpoint_meets_a_full_disk_fails_naming_it_and_the_study_goes_on(write_study, monkeypatch):
    failing_save(monkeypatch, on_calls={2})  # trial 0's second epoch
    assert main(["search", str(write_study(n_trials=1, **TWO_EPOCHS))]) == 0
    failed, completed = optuna_study("tiny").trials
    assert (failed.state.name, completed.state.name) == ("FAIL", "COMPLETE")
    path = settings.checkpoint_dir() / "tiny" / "resume" / "trial-0.pt"
    reason = failed.user_attrs["reason"]
    assert reason.startswith(f"DiskFull: no space left on device writing {path}: free space on ")
    run = store().get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["ftsearch.reason"] == reason
    assert not list(settings.checkpoint_dir().rglob(".*partial*"))


def _frozen(tiny_bert, depth):
    torch.manual_seed(0)
    frozen = load_classifier(tiny_bert, ("neg", "pos"))
    freeze_lowest_blocks(frozen, depth)
    return frozen


def fail_cache_writes(monkeypatch, where: str) -> None:
    """A full disk when the cache allocates an entry's features file, or writes its index (after
    half of it)."""
    if where == "features":
        def allocate(fd, offset, length):
            raise enospc()

        monkeypatch.setattr(os, "posix_fallocate", allocate)
        return
    real_savez = np.savez

    def savez(file, *args, **kwargs):
        if not Path(file).is_relative_to(cache_root()):  # the tokenised data's cache writes as usual
            return real_savez(file, *args, **kwargs)
        Path(file).write_bytes(b"PK\x03\x04 half an index")
        raise enospc()

    monkeypatch.setattr(np, "savez", savez)


@pytest.mark.parametrize("where", ["features", "index"])
def test_a_full_disk_while_caching_features_leaves_no_partial_entry(tiny_bert, monkeypatch, capsys, where):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tokens = tokenize_cached(tokenizer, labelled_reviews(32, 3), 32, settings.cache_dir() / "tokens")
    frozen = _frozen(tiny_bert, 1)
    with monkeypatch.context() as patch:
        fail_cache_writes(patch, where)
        entry, why = cached_features(frozen, 1, tokens)
    assert entry is None
    if where == "features":  # allocating, before the first epoch: the trial trains without the cache
        message = why
        assert why.endswith("; the trial trains without the cache")
    else:  # publishing, after the first epoch: the states are computed again, as without the cache
        message = capsys.readouterr().err
        assert message.rstrip().endswith("; the states are computed again each epoch")
    assert f"no space left on device writing {cache_root()}/d1-len32-" in message and "free space on " in message
    assert list(cache_root().iterdir()) == []  # neither the entry nor its partial folder
    # With space again, the entry is written and read back as usual.
    assert cached_features(frozen, 1, tokens)[1] == "written by the first epoch"
    assert cached_features(frozen, 1, tokens)[1] == "hit"


@pytest.mark.parametrize("where", ["features", "index"])
def test_a_trial_whose_feature_cache_meets_a_full_disk_trains_without_it(write_study, monkeypatch, capsys, where):
    fail_cache_writes(monkeypatch, where)
    path = write_study("cached", n_trials=1, **{"search.freeze_depth": {"low": 1, "high": 1}, "search.augment": {},
                                                "search.epochs": {"low": 2, "high": 2}})
    assert main(["search", str(path)]) == 0
    [trial] = optuna_study("cached").trials
    assert trial.state.name == "COMPLETE" and len(trial.intermediate_values) == 2
    [child] = runs("cached")[1]
    note = child.data.tags["ftsearch.feature_cache"]
    out, err = capsys.readouterr()
    assert f"frozen-prefix cache: {note}" in out
    if where == "features":
        assert note.startswith(f"off (train: no space left on device writing {cache_root()}/d1-len32-")
        assert note.endswith("; the trial trains without the cache)")
    else:  # found out when the first epoch publishes what it wrote
        assert note == "depth 1: train written by the first epoch, val written by the first epoch"
        assert f"frozen-prefix cache: no space left on device writing {cache_root()}/d1-len32-" in err
    assert list(cache_root().iterdir()) == []


def test_a_trial_whose_model_folder_meets_a_full_disk_fails_naming_it(write_study, monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    real_save_file, calls = transformers.modeling_utils.safe_save_file, []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 1:
            Path(filename).write_bytes(b"half a model")
            # What safetensors raises: the OS error's text, in its own exception type.
            raise SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error {errno.ENOSPC})")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    assert main(["search", str(write_study(n_trials=1, **ONE_EPOCH))]) == 0
    failed, completed = optuna_study("tiny").trials
    assert (failed.state.name, completed.state.name) == ("FAIL", "COMPLETE")
    folder = settings.checkpoint_dir() / "tiny" / "trial-0"
    assert failed.user_attrs["reason"].startswith(f"DiskFull: no space left on device writing {folder}: free space on ")
    assert not folder.exists()  # a failed trial's folder is not kept


def test_a_full_disk_while_registering_stops_the_search_and_leaves_nothing_half_registered(write_study, monkeypatch,
                                                                                           capsys):
    real_copyfile = shutil.copyfile

    def copyfile(src, dst, *args, **kwargs):
        # The weights meet a full disk on their way into the artifact store, half copied.
        if Path(dst).is_relative_to(settings.artifact_root()) and Path(src).name == "model.safetensors":
            Path(dst).write_bytes(Path(src).read_bytes()[:100])
            raise enospc(str(src), str(dst))  # as shutil raises it: the source first, then the destination
        return real_copyfile(src, dst, *args, **kwargs)

    path = str(write_study(n_trials=1, **ONE_EPOCH))
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "copyfile", copyfile)
        assert main(["search", path]) == 2
    err = capsys.readouterr().err
    assert f"error: no space left on device writing {settings.artifact_root()}" in err
    assert "free space on " in err and "make room there" in err
    assert store().search_model_versions("name = 'tiny-sentiment'") == []
    parents, children = runs("tiny")
    assert [p.info.status for p in parents] == ["FAILED"] and all(c.info.status == "FINISHED" for c in children)
    assert not list(settings.artifact_root().rglob("model.safetensors"))  # no half-copied model left

    # Space freed: the same command registers the same best trial, whose weights were kept.
    assert main(["search", path]) == 0
    [version] = store().search_model_versions("name = 'tiny-sentiment'")
    assert version.tags["ftsearch.registration"] == "complete"


def test_a_full_disk_while_downloading_the_best_weights_leaves_no_partial_folder(tmp_path, monkeypatch):
    import mlflow

    from ftsearch.checkpoints import TrialCheckpoints

    def download(*, dst_path, **kwargs):
        (Path(dst_path) / "weights").mkdir()
        (Path(dst_path) / "weights" / "model.safetensors").write_bytes(b"half")
        raise enospc(str(Path(dst_path) / "weights" / "model.safetensors"))

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    checkpoints = TrialCheckpoints(tmp_path / "checkpoints" / "tiny")
    with pytest.raises(DiskFull, match=f"^no space left on device writing {checkpoints.weights(3)}: free space on "):
        checkpoints.download("run-id", 3, "http://tracking.invalid")
    assert list(checkpoints.root.iterdir()) == []


def test_a_full_quota_says_so_and_other_errors_pass_unchanged(tmp_path):
    quota = f"^disk quota exceeded writing {tmp_path / 'x'}: free space on "
    with pytest.raises(DiskFull, match=quota), writing(tmp_path / "x"):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(PermissionError), writing(tmp_path / "x"):
        raise PermissionError(errno.EACCES, "Permission denied")
