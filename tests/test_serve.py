"""Serving that holds up: `ftsearch serve` starts MLflow's scoring server (what `mlflow models serve`
runs) for a study's champion from this environment (not on PATH), answers good requests with
labels and probabilities, refuses bad ones with a 400 that says what was wrong, and takes 100
concurrent requests."""

from __future__ import annotations

import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from ftsearch.cli import main
from ftsearch.errors import FtsearchError
from ftsearch.serve import model_uri
from tests.helpers import free_port, make_reviews, post_json, start_server, stop, tiny_study

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def champion(tmp_path_factory, tiny_bert, tiny_reviews):
    """A tiny study searched and its candidate promoted; its state folder and study file."""
    root = tmp_path_factory.mktemp("served")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_study(tiny_bert, tiny_reviews, n_trials=1)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTSEARCH_STATE_DIR", str(root / "mlruns"))
        patch.setenv("FTSEARCH_LATENCY_SECONDS", "0.1")
        assert main(["search", str(path), "--quiet"]) == 0
        assert main(["promote", str(path)]) == 0
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return root, path


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    """`ftsearch serve STUDY` on a free port, started as a user would without the environment
    activated (its bin folder not on PATH); its invocations URL."""
    root, path = champion
    port, log = free_port(), tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {**os.environ, "FTSEARCH_STATE_DIR": str(root / "mlruns"), "PATH": "/usr/bin:/bin"}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = start_server([str(Path(sys.prefix) / "bin" / "ftsearch"), "serve", str(path), "--port", str(port)], env, log,
                          cwd=REPO)
    try:
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        stop(server)
    assert f"serving models:/tiny-sentiment@champion on http://127.0.0.1:{port}/invocations" in log.read_text()


@pytest.mark.slow  # a search and a model server
def test_a_good_request_gets_labels_and_probabilities(server):
    texts = [["great superb loved film"], ["awful dull hated plot"]]
    status, answer, _ = post_json(server, {"dataframe_split": {"columns": ["text"], "data": texts}})
    assert status == 200, answer
    first, second = answer["predictions"]
    assert (first["label"], second["label"]) == ("pos", "neg")
    for row in (first, second):
        assert set(row) == {"label", "prob_neg", "prob_pos"} and row["prob_neg"] + row["prob_pos"] == pytest.approx(1)


@pytest.mark.slow
def test_a_request_with_a_wrong_column_is_a_400_naming_the_expected_one(server):
    status, answer, _ = post_json(server, {"dataframe_split": {"columns": ["review"], "data": [["great superb film"]]}})
    assert status == 400, answer
    assert "text" in answer["message"] and "review" in answer["message"], answer["message"]


@pytest.mark.slow
def test_a_request_of_numbers_is_refused_not_read_as_texts(server):
    for body in ({"inputs": [1, 2, 3]}, {"dataframe_split": {"columns": ["text"], "data": [[1], [2]]}}):
        status, answer, _ = post_json(server, body)
        assert status == 400, (body, answer)
        assert "strings" in answer["message"] or "string" in answer["message"], answer["message"]


@pytest.mark.slow
def test_100_concurrent_requests_all_succeed(server):
    texts = make_reviews(100, seed=5)["review"].tolist()
    one = [{"dataframe_split": {"columns": ["text"], "data": [[t]]}} for t in texts]
    # Latency alone first (one request at a time), for 1 and for 32 examples per request.
    alone = [post_json(server, body)[2] for body in one[:20]]
    batch = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts[:32]]}}
    batched = [post_json(server, batch)[2] for _ in range(10)]
    with ThreadPoolExecutor(max_workers=100) as pool:
        answers = list(pool.map(lambda body: post_json(server, body), one))
    statuses = [status for status, _, _ in answers]
    assert statuses == [200] * 100, [a for a in answers if a[0] != 200][:3]
    assert all(len(answer["predictions"]) == 1 for _, answer, _ in answers)
    concurrent = [seconds for _, _, seconds in answers]
    print(f"served latency: median {1000 * statistics.median(alone):.1f} ms for 1 example, "
          f"{1000 * statistics.median(batched):.1f} ms for 32; 100 concurrent requests: median "
          f"{1000 * statistics.median(concurrent):.1f} ms, slowest {1000 * max(concurrent):.1f} ms")


def test_serve_names_a_missing_champion_and_what_to_do(write_study):
    path = write_study()
    with pytest.raises(FtsearchError) as err:
        model_uri(str(path))
    assert ("models:/tiny-sentiment@champion: the registered model 'tiny-sentiment' has no version with alias "
            "'champion'") in str(err.value)
    assert f"ftsearch promote {path}" in str(err.value) and "models:/tiny-sentiment@candidate" in str(err.value)
    assert model_uri("models:/any/1") == "models:/any/1"
