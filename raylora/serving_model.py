"""The models-from-code file of raylora's caption model (see :mod:`raylora.serving`).

MLflow copies this file into every caption model it logs and runs it when the model is loaded:
it names the model class, so nothing is pickled. Not imported by raylora itself.
"""

import mlflow

from raylora.serving import CaptionModel

mlflow.models.set_model(CaptionModel())
