"""Model code logged with every registered image model (MLflow "models from code"), so that
loading it imports this file instead of unpickling an object."""

from mlflow.models import set_model

from ftsearch.predictor import ImageClassifierModel

set_model(ImageClassifierModel())
