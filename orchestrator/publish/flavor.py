"""The MLflow flavor module `mlflow.models.Model.log` is given: an MLflow model folder with the
`pytorch` flavor (so `mlflow.pytorch.load_model` returns the net) whose `python_function`
flavor loads orchestrator.publish.classifier instead of mlflow.pytorch's tensor-in, tensor-out
wrapper (so `mlflow.pyfunc.load_model(...).predict` and `mlflow models serve` take images).

`Model.log` is MLflow's public way to log a model with a custom flavor; it creates the logged
model (`models:/m-...`), calls `save_model` here and uploads the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from orchestrator.publish.classifier import MEAN_IMAGE_FILE, META_FILE, NetByReference, NetCopy

LOADER_MODULE = "orchestrator.publish.classifier"


def save_model(
    path: str,
    mlflow_model: Any,
    *,
    net: nn.Module,
    meta: dict[str, Any],
    signature: Any,
    input_example: Any,
    pip_requirements: list[str],
    metadata: dict[str, Any] | None = None,
    mean_image: np.ndarray | None = None,
    **_: Any,  # Model.log's own options (validate_serving_input, serialization_format, ...)
) -> None:
    """Write the model folder at `path`: mlflow.pytorch's layout (data/model.pth: a pickled
    call to load_net or build_net with plain data, never a pickled module, so the pyfunc loads
    it with weights_only), META_FILE beside it (and MEAN_IMAGE_FILE, given a `mean_image`), and
    the pyfunc flavor pointed at LOADER_MODULE. A plain net is saved as its state dict
    (`NetCopy` of `meta["model"]`)."""
    import mlflow.pytorch

    if not isinstance(net, NetByReference | NetCopy):
        net = NetCopy(meta["model"], net.state_dict())
    mlflow.pytorch.save_model(
        net,
        path,
        mlflow_model=mlflow_model,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        metadata=metadata,
        serialization_format="pickle",
    )
    (Path(path) / "data" / META_FILE).write_text(json.dumps(meta, indent=1))
    if mean_image is not None:
        np.save(Path(path) / "data" / MEAN_IMAGE_FILE, mean_image.astype(np.float32))
    pyfunc = mlflow_model.flavors["python_function"]
    pyfunc["loader_module"] = LOADER_MODULE
    pyfunc.pop("pickle_module_name", None)  # mlflow.pytorch's loader option, not ours
    pyfunc["model_config"] = {"device": None}  # None: a GPU where there is one
    mlflow_model.save(str(Path(path) / "MLmodel"))
