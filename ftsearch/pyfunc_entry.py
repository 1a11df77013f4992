"""Model code logged with every registered model (MLflow "models from code"), so that loading a
model imports this file instead of unpickling an object."""

from mlflow.models import set_model

from ftsearch.predictor import TextClassifierModel

set_model(TextClassifierModel())
