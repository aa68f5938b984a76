"""What a registered model runs when it is loaded: the net, and the pyfunc that classifies images.

The MLflow model's `data/model.pth` is what `mlflow.pytorch.load_model` unpickles. It holds no
pickled module, only a call to one of two functions of this module with plain data: by default
`NetByReference` pickles as `load_net(ref)`, which rebuilds the net from the project's registry
(`create_model`) and reads its weights from the committed checkpoint on S3 (`trainer.pt`,
checked against the sha256 recorded at registration); with `--copy-weights`, `NetCopy` pickles
as `build_net(model, state_dict)` (a self-contained copy in MLflow's artifact store).

Loading: the pyfunc (`_load_pyfunc`: `mlflow.pyfunc.load_model`, `mlflow models serve`) reads
`model.pth` with torch's `weights_only=True`, allowing those two functions and nothing else, and
`trainer.pt` as data too; a file that holds anything else is refused before it runs.
`mlflow.pytorch.load_model` is MLflow's own loader: it unpickles `model.pth` in full (it passes
its `pickle_module` to torch.load, which rules out `weights_only`), so use it only on a registry
you trust; `mlflow.pyfunc.load_model(uri).get_raw_model()` gives the same net as data.

`data/orchestrator.json` (`META_FILE`) holds what the pyfunc needs: the model's spec, class
names, the run's evaluation transform (centre protocol), its normalization and the dataset's
mean/std; a run trained with data.normalize=per_pixel_mean also has the dataset's mean image
beside it (`data/mean_image.npy`, `MEAN_IMAGE_FILE`), and format 2, which older readers refuse
(they would ignore the mean image).
`_load_pyfunc` is the pyfunc flavor's loader (MLmodel `loader_module`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.checkpoint import UnsafeCheckpointError
from orchestrator.errors import OrchestratorError

META_FILE = "orchestrator.json"
FORMAT = 2  # the newest META_FILE format this code reads; a reader refuses a newer one
MEAN_IMAGE_FILE = "mean_image.npy"  # beside META_FILE: data.normalize=per_pixel_mean's image
TOP_K = 5
OUTPUT_COLUMNS = ("class_ids", "class_names", "probabilities")


def meta_format(data: dict[str, Any]) -> int:
    """The META_FILE format a model with this data section needs: 2 where it normalizes with
    the mean image (a format-1 reader would not), else 1 (every reader serves it)."""
    return 2 if data.get("normalize") == "per_pixel_mean" else 1


class WeightsChangedError(OrchestratorError, RuntimeError):
    """The checkpoint a model version reads is no longer the one it was registered with."""


def build_net(model: dict[str, Any], weights: dict[str, torch.Tensor]) -> nn.Module:
    """The net `model` ({name, num_classes, options}) describes, from the project's registry,
    with `weights` loaded strictly, in eval mode."""
    from orchestrator.models import create_model

    net = create_model(model["name"], int(model["num_classes"]), **model.get("options", {}))
    net.load_state_dict(weights, strict=True)
    return net.eval()


def trainer_weights(
    raw: bytes, what: str = "trainer.pt"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(spec dict, model weights) of a committed checkpoint's trainer.pt bytes, loaded as data
    (`what`, the file's URL, names it in a refusal)."""
    from orchestrator.checkpoint import load_state

    state = load_state(raw, what)
    return state["spec"], state["strategy"]["model"]


def load_net(ref: dict[str, Any]) -> nn.Module:
    """Rebuild a registered net from its committed checkpoint (`ref`: model, checkpoint_url,
    trainer_sha256). Raises WeightsChangedError when trainer.pt is not the registered one."""
    from orchestrator.checkpoint import CheckpointStore, split_checkpoint_url

    root, step = split_checkpoint_url(ref["checkpoint_url"])
    raw = CheckpointStore(root).read_bytes(step, "trainer.pt")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != ref["trainer_sha256"]:
        raise WeightsChangedError(
            f"{ref['checkpoint_url']}/trainer.pt has sha256 {digest}, not the registered "
            f"{ref['trainer_sha256']}: the checkpoint was replaced since it was registered"
        )
    _, weights = trainer_weights(raw, f"{ref['checkpoint_url']}/trainer.pt")
    return build_net(ref["model"], weights)


class NetByReference(nn.Module):
    """Stands for a net whose weights stay in its checkpoint: pickled, it is a call to
    `load_net(ref)`, so unpickling (`mlflow.pytorch.load_model`) returns the real net."""

    def __init__(self, ref: dict[str, Any]) -> None:
        super().__init__()
        self.ref = dict(ref)

    def __reduce_ex__(self, protocol: Any) -> tuple[Callable[..., nn.Module], tuple[Any, ...]]:
        return load_net, (self.ref,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never unpickled
        raise RuntimeError("NetByReference is a placeholder: load it with mlflow.pytorch")


class NetCopy(nn.Module):
    """Stands for a net whose weights are copied into the model: pickled, it is a call to
    `build_net(model, weights)` with the state dict (tensors) as its argument, not a pickled
    module, so it loads with `weights_only=True`."""

    def __init__(self, model: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.spec, self.weights = dict(model), weights

    def __reduce_ex__(self, protocol: Any) -> tuple[Callable[..., nn.Module], tuple[Any, ...]]:
        return build_net, (self.spec, self.weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never unpickled
        raise RuntimeError("NetCopy is a placeholder: load it with mlflow.pytorch")


# ------------------------------------------------------------------------------ the pyfunc


def _png(pixels: np.ndarray) -> bytes:
    """A uint8 HxWx3 (or HxW) array as lossless PNG bytes: arrays then take the very path
    encoded images take, so both give the evaluation's pixels."""
    from PIL import Image

    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(
            f"an image array must be uint8 HxWx3 (or HxW grey), got {arr.dtype} {arr.shape}"
        )
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _encoded(item: Any) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):  # base64, as in MLflow's JSON input
        return base64.b64decode(item)
    if isinstance(item, np.ndarray):
        return _png(item)
    raise TypeError(
        f"an image is encoded bytes (JPEG/PNG), base64 text or a uint8 array, not {item!r:.80}"
    )


def as_images(model_input: Any) -> list[bytes]:
    """Every image of a pyfunc input as encoded bytes. Takes a DataFrame (column `image`, else
    its first), a dict {"image": [...]}, a list, one image, or a uint8 array HxWx3 / NxHxWx3."""
    import pandas as pd

    items: Iterable[Any]
    if isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        items = model_input[column].tolist()
    elif isinstance(model_input, pd.Series):
        items = model_input.tolist()
    elif isinstance(model_input, dict):
        items = model_input["image"]
        items = [items] if isinstance(items, (bytes, str, np.ndarray)) else items
    elif isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
        items = list(model_input) if model_input.ndim == 4 else [model_input]
    elif isinstance(model_input, np.ndarray):  # an object array of encoded images
        items = model_input.ravel().tolist()
    elif isinstance(model_input, (bytes, bytearray, str)):
        items = [model_input]
    else:
        items = list(model_input)
    return [_encoded(item) for item in items]


class ImageClassifier:
    """The pyfunc: images in, the top-5 classes (ids, names, probabilities) out, through the
    run's own centre-protocol evaluation transform and normalization (the dataset's mean/std,
    or its `mean_image` where the run used data.normalize=per_pixel_mean)."""

    def __init__(
        self,
        net: nn.Module,
        meta: dict[str, Any],
        device: str | None = None,
        mean_image: np.ndarray | None = None,
    ) -> None:
        from orchestrator.data import DeviceNormalize
        from orchestrator.data.eval_split import eval_transform
        from orchestrator.spec import DataConfig, from_dict

        self.meta = meta
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.to(self.device).eval()
        self.classes = list(meta["classes"])
        data = from_dict(DataConfig, meta["data"])
        self.view = eval_transform(data, "center")
        if data.normalize != "per_pixel_mean":
            mean_image = None
        elif mean_image is None:
            raise ValueError(
                f"this model normalizes with its dataset's mean image ({MEAN_IMAGE_FILE}), "
                "which was not given"
            )
        self.normalize = DeviceNormalize(
            meta["mean"], meta["std"], 0.0, self.device, mean_image=mean_image
        )

    def get_raw_model(self) -> nn.Module:
        """The net itself (what `PyFuncModel.get_raw_model()` returns)."""
        return self.net

    @torch.no_grad()
    def probabilities(self, images: list[bytes], batch_size: int = 64) -> np.ndarray:
        """Softmax probabilities [N, C] of encoded images, as the centre protocol computes
        them (orchestrator.evaluation: one view, softmax of the logits)."""
        out = []
        for i in range(0, len(images), batch_size):
            views = np.stack([self.view(data) for data in images[i : i + batch_size]])
            x = self.normalize(torch.from_numpy(views), train=False)
            out.append(F.softmax(self.net(x).float(), dim=1).cpu().numpy())
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(out)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """One row per image: `class_ids`, `class_names`, `probabilities` of its top 5 classes
        (fewer where the net has fewer), most probable first."""
        import pandas as pd

        probs = self.probabilities(as_images(model_input))
        k = min(TOP_K, probs.shape[1])
        top = torch.from_numpy(probs).topk(k, dim=1)  # the order evaluation's top-5 uses
        ids, values = top.indices.tolist(), top.values.tolist()
        return pd.DataFrame(
            {
                "class_ids": ids,
                "class_names": [[self.classes[c] for c in row] for row in ids],
                "probabilities": values,
            },
            columns=list(OUTPUT_COLUMNS),
        )


def read_meta(data_path: str | Path) -> dict[str, Any]:
    """The model's META_FILE; refuses a format newer than this code."""
    meta = json.loads((Path(data_path) / META_FILE).read_text())
    if int(meta.get("format", 0)) > FORMAT:
        raise RuntimeError(
            f"this model was written by a newer orchestrator (format {meta['format']}); "
            "upgrade the project to load it"
        )
    return meta


def load_torch_net(data_path: str | Path) -> nn.Module:
    """`data/model.pth` loaded as data (`weights_only=True`), read in place: the only calls it
    may make are `load_net` and `build_net` (what `NetByReference` and `NetCopy` pickle as);
    anything else, a pickled module of an older release included, is refused before it runs."""
    path = Path(data_path) / "model.pth"
    try:
        with torch.serialization.safe_globals([load_net, build_net]):
            net = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        why = next((line for line in str(err).splitlines() if "GLOBAL" in line), "not data")
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds more than a call to load_net or build_net with "
            f"plain data ({why.strip()}), so unpickling it could run code. A model published "
            "by an older release with --copy-weights holds a pickled net: publish it again "
            "(python -m orchestrator.publish)"
        ) from None
    if not isinstance(net, nn.Module):
        raise WeightsChangedError(f"{path}: holds a {type(net).__name__}, not a net")
    return net.eval()


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> ImageClassifier:
    """The pyfunc flavor's loader (MLmodel: loader_module orchestrator.publish.classifier)."""
    device = (model_config or {}).get("device")
    image = Path(data_path) / MEAN_IMAGE_FILE
    mean_image = np.load(image, allow_pickle=False) if image.is_file() else None
    return ImageClassifier(load_torch_net(data_path), read_meta(data_path), device, mean_image)
