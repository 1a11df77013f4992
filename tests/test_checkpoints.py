"""What a study keeps on disk for its trials."""

from ftsearch.checkpoints import TrialCheckpoints


def test_the_top_trials_keep_their_weights_and_running_ones_are_never_touched(tmp_path):
    checkpoints = TrialCheckpoints(tmp_path / "study")
    for number in range(5):
        checkpoints.weights(number).mkdir(parents=True)
    # Trials 0-3 finished, 1 and 3 are the top two (the ensemble's candidates); 4 still runs.
    checkpoints.keep_only({0, 1, 2, 3}, {1, 3})
    assert sorted(p.name for p in checkpoints.root.iterdir()) == ["trial-1", "trial-3", "trial-4"]
    checkpoints.drop_weights()
    assert not checkpoints.root.exists()
