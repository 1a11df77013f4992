"""One mapping from how a trial stopped to its outcome, shared by the trial runner and the worker."""

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from ftsearch.outcomes import INTERRUPTED, Outcome, outcome_of


def test_each_exception_maps_to_one_outcome_with_its_reason():
    assert outcome_of(optuna.TrialPruned("pruned by the median pruner after epoch 2")) == Outcome(
        "PRUNED", "pruned by the median pruner after epoch 2")
    assert outcome_of(KeyboardInterrupt()) == Outcome("KILLED", INTERRUPTED)
    assert outcome_of(KeyboardInterrupt()).interrupted
    assert outcome_of(UpdateFinishedTrialError("finished")).state == "ABANDONED"
    assert outcome_of(RuntimeError("disk on fire")) == Outcome("FAIL", "RuntimeError: disk on fire")
