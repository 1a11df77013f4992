"""What a study keeps on disk for its trials: per-epoch resume files, the weights of finished
trials until the best is known, and their copy on a shared tracking server.

Layout, under ``<state dir>/checkpoints/<optuna study>/``: ``resume/trial-<n>.pt`` (the training
state after the last finished epoch, named after the trial a retry repeats, so the retry finds
it) and ``trial-<n>/`` (a finished trial's servable model folder); for a re-evaluation over seeds
(``ftsearch.reevaluation``) ``reevaluations/trial-<n>-seed-<seed>.pt`` and
``trial-<n>-seed-<seed>/``. Resume files live until the trial's (or re-evaluation's) end is
recorded; weights of the top trials (``selection.top_k``) and their re-evaluations until the
chosen model is registered.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState

from ftsearch import settings, tracking
from ftsearch.disk import DiskFull, writing
from ftsearch.errors import FtsearchError
from ftsearch.generations import RETRY_OF_ATTR

WEIGHTS_ARTIFACT = "weights"  # a new best trial's weights, on a shared tracking server


@dataclass(frozen=True)
class TrialCheckpoints:
    """The checkpoint folder of one Optuna study."""

    root: Path

    @classmethod
    def of(cls, study_name: str) -> TrialCheckpoints:
        """The folder of the Optuna study ``study_name`` in the state directory."""
        return cls(settings.checkpoint_dir() / study_name)

    def resume_file(self, trial: optuna.Trial | FrozenTrial) -> Path:
        """Per-epoch training state, named after the trial a retry repeats so it finds it."""
        origin = trial.user_attrs.get(RETRY_OF_ATTR, trial.number)
        return self.root / "resume" / f"trial-{origin}.pt"

    def weights(self, number: int) -> Path:
        """The saved model folder of trial ``number``."""
        return self.root / f"trial-{number}"

    def reevaluation_resume_file(self, number: int, seed: int) -> Path:
        """Per-epoch training state of trial ``number``'s configuration with ``seed``: apart from
        the trials' resume files, which go once no trial is left to run."""
        return self.root / "reevaluations" / f"trial-{number}-seed-{seed}.pt"

    def reevaluation_weights(self, number: int, seed: int) -> Path:
        """The saved model folder of trial ``number``'s configuration trained with ``seed``."""
        return self.root / f"trial-{number}-seed-{seed}"

    def keep_only(self, finished: set[int], top: set[int]) -> None:
        """Delete the weights of finished trials not in ``top`` (the best few, the candidates for
        an ensemble: a finished trial outside them now never will be in them); trials still
        running elsewhere keep theirs."""
        for folder in self.root.glob("trial-*"):
            number = folder.name.removeprefix("trial-")
            if number.isdecimal() and int(number) in finished and int(number) not in top:
                shutil.rmtree(folder, ignore_errors=True)

    def drop_resume_files(self, study: optuna.Study) -> None:
        """Delete the resume files left by workers killed between recording a trial's end and
        deleting its file, once no trial is waiting or running to resume from them."""
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
            shutil.rmtree(self.root / "resume", ignore_errors=True)

    def drop_weights(self) -> None:
        """Delete every trial's weights (once the best is registered), and the study's checkpoint
        folder unless resume files are left in it for trials still to run."""
        for folder in self.root.glob("trial-*"):
            shutil.rmtree(folder, ignore_errors=True)
        if not any(self.root.glob("resume/*")):
            shutil.rmtree(self.root, ignore_errors=True)

    def upload(self, run: tracking.TrialRun, number: int) -> None:
        """Copy trial ``number``'s weights to its run on a shared tracking server, for the search
        process (maybe on another machine) to register them."""
        run.mlflow_client.log_artifacts(run.run_id, str(self.weights(number)), WEIGHTS_ARTIFACT)

    def download(self, run_id: str, number: int, tracking_uri: str) -> Path:
        """Fetch trial ``number``'s weights uploaded to ``run_id``; written beside, then renamed,
        so an interrupted download never looks like weights."""
        folder = self.weights(number)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            with writing(folder):
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=WEIGHTS_ARTIFACT,
                                                    dst_path=str(partial), tracking_uri=tracking_uri)
        except DiskFull:  # it already says what to free
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except Exception as err:  # noqa: BLE001 - said below, with what to do
            shutil.rmtree(partial, ignore_errors=True)
            raise FtsearchError(f"cannot download the best trial's weights from run {run_id}: {err}") from None
        (partial / WEIGHTS_ARTIFACT).rename(folder)
        shutil.rmtree(partial, ignore_errors=True)
        return folder
