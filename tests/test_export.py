"""`ftsearch export MODEL_URI --format onnx` (ftsearch.export): the ONNX model matches PyTorch on the
study's validation examples, serves alone with what is copied beside it, is timed beside PyTorch,
and is logged to the registered version's run, where the report finds it."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import yaml

from ftsearch.cli import main
from ftsearch.export import onnx_predictor
from tests.helpers import store
from tests.test_images import image_study


def exported_files(folder):
    return {p.name for p in folder.iterdir()}


def test_a_text_model_exports_matches_pytorch_serves_alone_and_is_logged(write_study, tmp_path, capsys):
    path = write_study(n_trials=1)
    assert main(["search", str(path), "--quiet"]) == 0
    out = tmp_path / "exported"
    assert main(["export", "models:/tiny-sentiment@candidate", "--format", "onnx", "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert "its outputs match PyTorch's on 64 validation examples" in said and "ONNX Runtime" in said
    # The network, its weights and what reads a text: the tokenizer and ftsearch.json (max length, labels).
    assert {"model.onnx", "ftsearch.json", "tokenizer_config.json"} <= exported_files(out)
    assert not any(name.endswith(".safetensors") for name in exported_files(out))
    # From the exported folder alone, ONNX Runtime reads texts (a long one cut as in training) and
    # predicts as the registered model serves them.
    version = store().get_model_version_by_alias("tiny-sentiment", "candidate")
    onnx = onnx_predictor(out)
    texts = ["great superb loved film", "awful boring plot " * 20, "the movie"]
    served = mlflow.pyfunc.load_model("models:/tiny-sentiment@candidate").predict(pd.DataFrame({"text": texts}))
    predicted = onnx.predict(texts)
    assert predicted["label"].tolist() == served["label"].tolist()
    assert np.allclose(predicted["prob_pos"], served["prob_pos"], atol=1e-4)
    # Logged to the version's run: the folder, the comparison and both latencies; the version points to it.
    run = store().get_run(version.tags["run_id"])
    assert {"onnx/model.onnx", "onnx/ftsearch.json"} <= {a.path for a in store().list_artifacts(run.info.run_id, "onnx")}
    metrics = run.data.metrics
    assert metrics["onnx_max_abs_diff"] < 1e-4 and metrics["onnx_checked_examples"] == 64
    assert all(metrics[k] > 0 for k in ("torch_latency_ms", "torch_latency_ms_b32", "onnx_latency_ms", "onnx_latency_ms_b32"))
    assert store().get_model_version("tiny-sentiment", version.version).tags["onnx"] == f"runs:/{run.info.run_id}/onnx"
    # The report shows the ONNX latency beside PyTorch's.
    assert main(["report", str(path), "--output", str(tmp_path / "report.html")]) == 0
    report = capsys.readouterr().out
    assert "ONNX Runtime" in report and "PyTorch" in report
    assert "ONNX Runtime" in (tmp_path / "report.html").read_text()


def test_an_image_model_exports_and_matches_pytorch(tmp_path, tiny_images, tiny_cnn, capsys):
    path = tmp_path / "shapes.yaml"
    path.write_text(yaml.safe_dump(image_study(tiny_images, tiny_cnn, n_trials=1, selection={"soup": False,
                                                                                            "ensemble": False,
                                                                                            "blend_baseline": False})))
    assert main(["search", str(path), "--quiet"]) == 0
    out = tmp_path / "exported"
    assert main(["export", "models:/tiny-shapes/1", "--output", str(out)]) == 0
    assert {"model.onnx", "ftsearch.json"} <= exported_files(out)
    images = sorted(str(p) for p in (tiny_images / "val").rglob("*.png"))[:6]
    served = mlflow.pyfunc.load_model("models:/tiny-shapes/1").predict(pd.DataFrame({"path": images}))
    predicted = onnx_predictor(out).predict(images)
    assert predicted["label"].tolist() == served["label"].tolist()
    assert np.allclose(predicted.filter(like="prob_"), served.filter(like="prob_"), atol=1e-4)


def test_what_cannot_be_exported_is_refused_with_the_reason(write_study, monkeypatch, capsys):
    from ftsearch import selection

    assert main(["export", "models:/nothing@champion"]) == 2
    assert "models:/nothing@champion: no such registered version" in capsys.readouterr().err
    # An ensemble of the two trials, registered whatever validation says.
    monkeypatch.setattr(selection, "choose", lambda found, problem, metric: next(c for c in found if c.kind == "ensemble"))
    path = write_study(n_trials=2, selection={"ensemble": True, "soup": False, "blend_baseline": False, "top_k": 2})
    assert main(["search", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", "models:/tiny-sentiment@candidate", "--output", str(path.parent / "never")]) == 2
    err = capsys.readouterr().err
    assert "models:/tiny-sentiment@candidate is a combination of 2 models" in err and "ONNX export takes one network" in err
    assert not (path.parent / "never").exists()
