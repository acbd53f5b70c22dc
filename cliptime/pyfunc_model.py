"""The pyfunc flavour of a registered cliptime model, logged as an MLflow model from code.

MLflow copies this file into each registered version and runs it to load the model (no pickle), for MLflow's own
tools: `mlflow.pyfunc.load_model(uri).predict(frame)`, `mlflow models serve`. It needs cliptime installed where
it runs. The model itself comes from the version's plain files (cliptime.registry.load_files).
"""

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class TaskModel(PythonModel):
    """A registered cliptime model, predicted through its task's `predict`."""

    def load_context(self, context) -> None:
        from cliptime.registry import load_files

        self.task, self.model = load_files(Path(context.artifacts["config"]).parent)

    def predict(self, context, model_input, params=None):
        return self.task.predict(self.model, model_input)


mlflow.models.set_model(TaskModel())
