"""The REST app ``ftsearch serve`` runs under uvicorn, one per worker process: MLflow's scoring
server (``mlflow.pyfunc.scoring_server``, the app ``mlflow models serve`` runs) for the model named
by MLflow's ``_SERVER_MODEL_PATH`` variable, with one check in front of it.

MLflow parses ``{"inputs": [...]}`` and ``{"instances": [...]}`` bodies by the model's signature
before the model sees them, and casts them to its column type: ``{"inputs": [1, 2, 3]}`` reaches a
text model as the texts "1", "2" and "3". This app refuses such a body with ``400 Bad Request``
(MLflow's own error format) before it is parsed. Tables (``dataframe_split`` and
``dataframe_records``) keep their values' types, and the model itself refuses anything but
strings (``ftsearch.predictor.served_column``).

Imported by uvicorn only (``uvicorn ftsearch.rest_app:app``): importing it loads the model.
"""

from __future__ import annotations

import json
import os

from fastapi import Request
from fastapi.responses import JSONResponse
from mlflow.pyfunc import scoring_server

LISTS = ("inputs", "instances")  # the request keys whose values MLflow casts to the signature's types

model = scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])
app = scoring_server.init(model)
_COLUMNS = model.metadata.get_input_schema().input_names()


def not_texts(body: object) -> str | None:
    """What in an ``inputs`` / ``instances`` request body is not a string where the model reads
    strings (a sentence saying where), or None when there is nothing to refuse."""
    if not isinstance(body, dict):
        return None
    for key in LISTS:
        if key not in body:
            continue
        value = body[key]
        if isinstance(value, dict):  # {"inputs": {"text": [...], "text_pair": [...]}}
            columns = {name: v if isinstance(v, list) else [v] for name, v in value.items()}
        elif isinstance(value, list) and all(isinstance(row, dict) for row in value):  # [{"text": ...}, ...]
            columns = {name: [row[name] for row in value if name in row] for name in _COLUMNS}
        elif isinstance(value, list):  # the one column of a model that reads one
            columns = {_COLUMNS[0]: value}
        else:
            columns = {_COLUMNS[0]: [value]}
        for name, values in columns.items():
            for row, item in enumerate(values):
                if not isinstance(item, str):
                    return (f"'{key}' column '{name}' must hold strings: row {row} is {item!r} "
                            f"({type(item).__name__}); the model reads {', '.join(map(repr, _COLUMNS))} as text")
    return None


@app.middleware("http")
async def refuse_non_text(request: Request, call_next):
    if request.method == "POST" and request.url.path == "/invocations" and \
            request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
        try:
            problem = not_texts(json.loads(await request.body()))
        except ValueError:
            problem = None  # not JSON: MLflow's parser answers it
        if problem is not None:
            return JSONResponse({"error_code": "INVALID_PARAMETER_VALUE", "message": problem}, status_code=400)
    return await call_next(request)
