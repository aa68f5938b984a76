"""Trained nets people can use (orchestrator.publish): the tracked smoke job's registered models
load with mlflow.pyfunc and mlflow.pytorch, answer a served HTTP request, and agree with the
project's own evaluation; registering never fails a run; torchvision export of v1.5 nets.

The integration tests reuse the session's tracked smoke job (tests/conftest.tracked_smoke_job),
which test_tracking also reads: no net is trained here.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from orchestrator.checkpoint import CheckpointStore, split_checkpoint_url
from orchestrator.models import count_parameters, create_model
from orchestrator.publish.classifier import (
    OUTPUT_COLUMNS,
    WeightsChangedError,
    as_images,
    load_net,
)
from orchestrator.publish.finished import publish_finished_job
from orchestrator.publish.register import publish_checkpoint, publish_run_models
from orchestrator.publish.torchvision_export import (
    NotTorchvisionEquivalent,
    torchvision_state_dict,
)
from orchestrator.tracking.tags import REGISTRATION_TAG
from tests.conftest import run_script


def client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


# ----------------------------------------------------------------------------- torchvision

# torchvision.models.resnet's layout, written out (torchvision does not import beside the CPU
# torch of the test box): stem conv1/bn1; layer1..4 of `blocks` blocks each; a Bottleneck has
# conv1 (1x1 reduce), conv2 (3x3), conv3 (1x1 expand x4), a BasicBlock conv1/conv2 (3x3); the
# first block of a stage has downsample.0 (1x1 conv) / downsample.1 (BN) where the stride or
# the width changes; every BN has weight, bias, running_mean, running_var, num_batches_tracked.
TORCHVISION_STAGES = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
# torchvision's published sizes (its model docs): parameters, and state-dict entries
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032}
TORCHVISION_ENTRIES = {"resnet18": 122, "resnet50": 320}


def torchvision_layout(name: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    block, blocks = TORCHVISION_STAGES[name]
    expansion = 4 if block == "bottleneck" else 1
    out: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{k}"] = (c,)
        out[f"{prefix}.num_batches_tracked"] = ()

    out["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            stride = 2 if i > 0 and j == 0 else 1
            if block == "bottleneck":
                out[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.bn1", planes)
                out[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                out[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                bn(f"{p}.bn3", planes * 4)
            else:
                out[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                bn(f"{p}.bn1", planes)
                out[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
            if j == 0 and (stride != 1 or inplanes != planes * expansion):
                out[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    out["fc.weight"] = (num_classes, 512 * expansion)
    out["fc.bias"] = (num_classes,)
    return out


@pytest.mark.parametrize("name", sorted(TORCHVISION_STAGES))
def test_a_v15_export_has_torchvisions_keys_and_shapes(name: str) -> None:
    options = {"stride_in_1x1": False} if name == "resnet50" else {}
    net = create_model(name, **options)
    model = {"name": name, "num_classes": 1000, "options": options}
    sd = torchvision_state_dict(model, net.state_dict())
    assert {k: tuple(v.shape) for k, v in sd.items()} == torchvision_layout(name)
    assert len(sd) == TORCHVISION_ENTRIES[name]
    assert count_parameters(net) == TORCHVISION_PARAMS[name]
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - e.g. its C ops built for another torch
        # the keys, shapes and sizes above are checked; only the forward-pass equivalence waits
        pytest.skip(
            f"torchvision does not import beside this torch: {exc!r}; the forward pass against "
            "torchvision's net is not compared (the gpu extra installs it)"
        )
    tv = getattr(torchvision.models, name)()
    tv.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(tv.eval()(x), net.eval()(x))


def test_a_v1_net_is_not_exported_and_says_why() -> None:
    net = create_model("resnet50")  # the paper's v1: the stride in the first 1x1
    v1 = {"name": "resnet50", "num_classes": 1000, "options": {}}
    with pytest.raises(NotTorchvisionEquivalent, match="v1 net .* compute something else"):
        torchvision_state_dict(v1, net.state_dict())
    for model in (
        {"name": "resnet34", "num_classes": 1000, "options": {"shortcut": "C"}},
        {"name": "plain34", "num_classes": 1000, "options": {}},
        {"name": "cifar_resnet20", "num_classes": 10, "options": {}},
    ):
        with pytest.raises(NotTorchvisionEquivalent):
            torchvision_state_dict(model, {})


# ----------------------------------------------------------------------------- units


def _val_images(url: Path) -> list[bytes]:
    """The validation split's encoded images in manifest order (evaluation's positions)."""
    manifest = json.loads((url / "manifest.json").read_text())
    images = []
    for shard in manifest["splits"]["val"]["shards"]:
        with tarfile.open(url / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    images.append(tar.extractfile(member).read())
    return images


@pytest.mark.parametrize("normalize", ["per_channel", "per_pixel_mean"])
def test_a_saved_model_normalizes_as_its_run_did(
    odd_local_shards: Path, tmp_path: Path, normalize: str
) -> None:
    """The model folder publish writes (flavor.save_model), loaded by the pyfunc loader,
    answers as evaluation does under the run's data.normalize; per_pixel_mean models carry the
    dataset's mean image and a format older readers refuse."""
    from mlflow.models import Model

    from orchestrator.data import DataConfig
    from orchestrator.evaluation import evaluate
    from orchestrator.publish import flavor
    from orchestrator.publish.classifier import MEAN_IMAGE_FILE, _load_pyfunc, meta_format
    from orchestrator.publish.register import PublishError, _classes_and_stats

    torch.manual_seed(0)
    net = create_model("cifar_resnet20", 3)
    for m in net.modules():  # BN statistics other than the identity's, as a trained net has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    net.eval()
    data = {"train_transform": "rrc", "image_size": 32, "eval_resize": 36, "normalize": normalize}
    cfg = DataConfig(url=str(odd_local_shards), num_workers=0, **data)
    want = evaluate(net, cfg, protocol="center", return_probs=True).probs
    classes, mean, std, image = _classes_and_stats(str(odd_local_shards), 3, normalize)
    assert (image is not None) == (normalize == "per_pixel_mean")
    meta = {"format": meta_format(data), "model": {"name": "cifar_resnet20", "num_classes": 3}}
    meta.update(classes=classes, data=data, mean=mean, std=std)
    path = tmp_path / "model"
    flavor.save_model(
        str(path),
        Model(),
        net=net,
        meta=meta,
        signature=None,
        input_example=None,
        pip_requirements=[],
        mean_image=image,
    )
    assert (path / "data" / MEAN_IMAGE_FILE).exists() == (normalize == "per_pixel_mean")
    assert meta["format"] == (2 if normalize == "per_pixel_mean" else 1)
    got = _load_pyfunc(str(path / "data")).probabilities(_val_images(odd_local_shards))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    if normalize == "per_pixel_mean":  # a dataset without its mean image: no model, a reason
        older = tmp_path / "older"
        older.mkdir()
        manifest = json.loads((odd_local_shards / "manifest.json").read_text())
        del manifest["mean_image"]
        (older / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(PublishError, match="normalized with the mean image of dataset"):
            _classes_and_stats(str(older), 3, normalize)


def test_images_come_in_every_documented_form() -> None:
    import pandas as pd
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    png = buf.getvalue()
    as_b64 = base64.b64encode(png).decode()
    for given in (
        pd.DataFrame({"image": [png, rgb]}),
        {"image": [png, rgb]},
        [as_b64, rgb],
        np.stack([rgb, rgb]),
    ):
        decoded = [np.array(Image.open(io.BytesIO(b))) for b in as_images(given)]
        assert len(decoded) == 2 and all(np.array_equal(d, rgb) for d in decoded)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        as_images([rgb.astype(np.float32)])


def test_retention_keeps_pinned_steps(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    for step in range(1, 6):
        store.write(step, "trainer.pt", {"step": step})
        store.commit(step, {"val/top1_err": 1.0 / step})
        if step == 2:
            store.pin(step, {"model": "m"})
    store.retain(keep_last=1, best_metric="val/top1_err")
    kept = [(c.step, c.pinned) for c in store.committed()]
    assert kept == [(2, True), (5, False)]


# ----------------------------------------------------------------------------- the stack


def _val_sample(dataset: str) -> tuple[bytes, int]:
    """The first validation sample's encoded image and label (position 0 in the split)."""
    from orchestrator.data import load_manifest, split_shards
    from orchestrator.storage import read_url

    shard = split_shards(load_manifest(dataset), dataset, "val")[0]
    with tarfile.open(fileobj=io.BytesIO(read_url(shard.url))) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        key = members[0].name.split(".", 1)[0]  # a sample: KEY.jpg + KEY.cls, consecutive
        files = {
            m.name.split(".", 1)[1]: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in members
            if m.name.split(".", 1)[0] == key
        }
    image = next(v for k, v in files.items() if k in ("jpg", "jpeg", "png"))
    return image, int(files["cls"])


@pytest.fixture(scope="module")
def registered(tracked_smoke_job: dict[str, str]) -> dict[str, Any]:
    """The tracked job's run, its @best version, and what the project's own evaluation (centre
    protocol) computes for the first validation image with the best checkpoint's net."""
    from orchestrator.evaluation import evaluate_as
    from orchestrator.publish.classifier import build_net
    from orchestrator.publish.register import read_checkpoint
    from orchestrator.spec import JobSpec, from_dict

    job = tracked_smoke_job["job"]
    c = client()
    [run] = c.search_runs([c.get_experiment_by_name(tracked_smoke_job["experiment"]).experiment_id])
    version = c.get_model_version_by_alias(job, "best")
    url = version.tags["checkpoint_url"]
    root, step = split_checkpoint_url(url)
    state = CheckpointStore(root).read(step, "trainer.pt")
    spec = from_dict(JobSpec, state["spec"])
    ck = read_checkpoint(url)
    ev = dataclasses.replace(spec.eval, protocol="center", max_batches=0)
    result = evaluate_as(build_net(ck.model, ck.weights), spec.data, ev, return_probs=True)
    assert result.indices is not None and result.probs is not None and result.indices[0] == 0
    image, label = _val_sample(tracked_smoke_job["dataset"])
    assert result.labels[0] == label
    return {
        "job": job,
        "spec": spec,
        "run": run,
        "version": version,
        "url": url,
        "image": image,
        "expected": result.probs[0],
        "classes": ck.model["num_classes"],
    }


def _answer_matches(row: dict[str, Any], expected: np.ndarray, classes: list[str]) -> None:
    """A pyfunc answer row (top-k ids, names, probabilities) against evaluation's probabilities."""
    k = min(5, len(expected))
    order = np.argsort(-expected, kind="stable")[:k]
    assert list(row["class_ids"]) == order.tolist()
    assert list(row["class_names"]) == [classes[i] for i in order]
    np.testing.assert_allclose(row["probabilities"], expected[order], rtol=0, atol=1e-5)


def _classes(dataset: str) -> list[str]:
    from orchestrator.data import load_manifest

    return [str(c) for c in load_manifest(dataset)["classes"]]


def test_best_loads_as_pyfunc_and_pytorch_and_answers_as_evaluation_does(
    registered: dict[str, Any], tracked_smoke_job: dict[str, str], tmp_path: Path
) -> None:
    import mlflow.pyfunc
    import mlflow.pytorch
    import pandas as pd

    from orchestrator.models import ResNet

    uri = f"models:/{registered['job']}@best"
    classes = _classes(tracked_smoke_job["dataset"])
    model = mlflow.pyfunc.load_model(uri)
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["image"] and sig.outputs.input_names() == list(
        OUTPUT_COLUMNS
    )
    assert model.metadata.saved_input_example_info is not None, "an input example"
    out = model.predict(pd.DataFrame({"image": [registered["image"]]}))
    _answer_matches(out.iloc[0].to_dict(), registered["expected"], classes)
    # a dict of images works too; an array is a lossless image (its PNG gives the same answer)
    from PIL import Image

    pixels = np.array(Image.open(io.BytesIO(registered["image"])).convert("RGB"))
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    both = model.predict({"image": [pixels, png.getvalue()]})
    assert both.iloc[0].to_dict() == both.iloc[1].to_dict()

    assert isinstance(model.get_raw_model(), ResNet)
    net = mlflow.pytorch.load_model(uri)
    assert isinstance(net, ResNet) and not net.training
    assert net.fc.out_features == registered["classes"]
    # the same answer from the plain net, through the run's own eval transform
    import mlflow.artifacts

    from orchestrator.data import DeviceNormalize
    from orchestrator.data.eval_split import eval_transform
    from orchestrator.spec import DataConfig, from_dict

    local = mlflow.artifacts.download_artifacts(f"{uri}", dst_path=str(tmp_path))
    meta = json.loads((Path(local) / "data" / "orchestrator.json").read_text())

    view = eval_transform(from_dict(DataConfig, meta["data"]), "center")(registered["image"])
    x = DeviceNormalize(meta["mean"], meta["std"], 0.0)(torch.from_numpy(view[None]), train=False)
    with torch.no_grad():
        probs = torch.softmax(net(x), 1)[0].numpy()
    np.testing.assert_allclose(probs, registered["expected"], rtol=0, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_a_jpeg_as_evaluation_does(
    registered: dict[str, Any], tracked_smoke_job: dict[str, str], tmp_path: Path
) -> None:
    """A real `mlflow models serve` process with the stack's environment; a base64 JPEG in
    MLflow's JSON input (dataframe_split)."""
    port = _free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    log_file = tmp_path / "serve.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [
                str(mlflow_cli),
                "models",
                "serve",
                "-m",
                f"models:/{registered['job']}@best",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # as from an activated virtualenv: the server runs `uvicorn` from PATH
            env={**os.environ, "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ['PATH']}"},
            start_new_session=True,  # the server's workers go with it
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server exited: {log_file.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"not up in 180 s: {log_file.read_text()[-3000:]}"
            time.sleep(1)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(registered["image"]).decode()]],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    [row] = answer["predictions"]
    _answer_matches(row, registered["expected"], _classes(tracked_smoke_job["dataset"]))


def test_registered_models_hold_no_secret_and_pin_their_checkpoint(
    registered: dict[str, Any], tracked_smoke_job: dict[str, str], tmp_path: Path
) -> None:
    import mlflow.artifacts

    version = registered["version"]
    logged = client().get_logged_model(version.source.removeprefix("models:/"))
    assert logged.experiment_id == registered["run"].info.experiment_id, "in the run's experiment"
    assert logged.source_run_id == registered["run"].info.run_id
    root = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path)))
    secrets = [
        tracked_smoke_job["token"],
        os.environ["AWS_SECRET_ACCESS_KEY"],
        os.environ["MLFLOW_TRACKING_PASSWORD"],
    ]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {"MLmodel", "data/model.pth", "data/orchestrator.json"} <= {
        p.relative_to(root).as_posix() for p in files
    }
    for f in files:
        text = f.read_bytes().decode("utf-8", "replace")
        assert not any(s in text for s in secrets), f"a secret reached {f.name}"
    # the weights stay in the checkpoint: the logged model is small, and its step is pinned
    assert sum(f.stat().st_size for f in files) < 200_000
    root_url, step = split_checkpoint_url(registered["url"])
    assert {c.step: c.pinned for c in CheckpointStore(root_url).committed()}[step]
    meta = json.loads((root / "data/orchestrator.json").read_text())
    with pytest.raises(WeightsChangedError, match="replaced since it was registered"):
        load_net(
            {
                "model": meta["model"],
                "checkpoint_url": meta["checkpoint_url"],
                "trainer_sha256": "0" * 64,
            }
        )


def test_ensemble_eval_resolves_new_and_url_only_versions(registered: dict[str, Any]) -> None:
    from orchestrator.ensemble_eval import member_from_version

    c = client()
    member = member_from_version(c, f"{registered['job']}@best")
    assert member.checkpoint_url == registered["url"]
    old = f"old-{uuid.uuid4().hex[:8]}"  # as versions were registered before models were logged
    c.create_registered_model(old)
    c.create_model_version(old, registered["url"])
    assert member_from_version(c, f"{old}/1").checkpoint_url == registered["url"]


def test_copy_weights_makes_a_standalone_model(registered: dict[str, Any]) -> None:
    import mlflow.pytorch

    name = f"copy-{uuid.uuid4().hex[:8]}"
    published = publish_checkpoint(
        client(), registered["url"], name, run_id=registered["run"].info.run_id, copy_weights=True
    )
    assert published.weights == "copy" and not published.reused
    net = mlflow.pytorch.load_model(f"models:/{name}@best")
    weights = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    assert published.artifact_bytes > weights, "the weights are in MLflow's artifact store"
    root, step = split_checkpoint_url(registered["url"])
    saved = CheckpointStore(root).read(step, "trainer.pt")["strategy"]["model"]
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())


def test_registering_reads_no_metric_history_and_links_the_model_to_its_run(
    registered: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's Model.log, given a run, reads the whole history of every metric of it (to copy
    one step's values to the model): registration does not give it the run, and links the
    logged model to the run itself, at the checkpoint's step."""
    from mlflow import MlflowClient

    from orchestrator.tracking.tags import STEP_TAG

    read: list[str] = []
    history = MlflowClient.get_metric_history

    def counted(self: Any, run_id: str, key: str) -> Any:
        read.append(key)
        return history(self, run_id, key)

    monkeypatch.setattr(MlflowClient, "get_metric_history", counted)
    run_id = registered["run"].info.run_id
    name = f"nohistory-{uuid.uuid4().hex[:8]}"
    published = publish_checkpoint(client(), registered["url"], name, run_id=run_id)
    assert not published.reused and read == [], read
    version = client().get_model_version(name, published.version.version)
    outputs = client().get_run(run_id).outputs.model_outputs
    model_id = version.source.removeprefix("models:/")  # the server gives no version.model_id
    step = int(version.tags[STEP_TAG])
    assert any(o.model_id == model_id and o.step == step for o in outputs), outputs


def test_the_command_line_registers_a_finished_runs_checkpoint(registered: dict[str, Any]) -> None:
    """On demand, for a run already finished: the same version again, alias `last` moved."""
    run_id = registered["run"].info.run_id
    out = run_script("-m", "orchestrator.publish", "--run", run_id, "--checkpoint", "last")
    [info] = [json.loads(line) for line in out.splitlines() if line.startswith('{"model"')]
    last = client().get_model_version_by_alias(registered["job"], "last")
    assert info["version"] == last.version and info["aliases"] == ["last"] and info["reused"]


class FlakyRegistry:
    """The real client, whose create_model_version fails `failures` times (a registry outage)."""

    def __init__(self, failures: int) -> None:
        self.real, self.failures, self.calls = client(), failures, 0

    def create_model_version(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("registry unreachable (test)")
        return self.real.create_model_version(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_registry_outage_is_retried(registered: dict[str, Any]) -> None:
    name = f"flaky-{uuid.uuid4().hex[:8]}"
    from orchestrator.tracking.runs import experiment_id

    # a run of its own (publishing tags the run with its versions), in an experiment of its own
    run_id = client().create_run(experiment_id(client(), f"publish-{name}")).info.run_id
    flaky = FlakyRegistry(failures=2)
    done = publish_run_models(
        flaky,
        run_id,
        name,
        best_url=registered["url"],
        latest_url=None,
        metric="",
        tags={},
        backoff_s=0.1,
    )
    assert flaky.calls == 3 and done["best"].version.tags["checkpoint_url"] == registered["url"]
    logged = client().search_logged_models(
        experiment_ids=[client().get_run(run_id).info.experiment_id]
    )
    assert len(logged) == 1, "a retry registers the model already logged, not another"
    assert client().get_model_version_by_alias(name, "best").version == done["best"].version.version


class RefusingRegistry(FlakyRegistry):
    """The real client, whose registry refuses every new version (permission denied)."""

    def __init__(self) -> None:
        super().__init__(failures=10**6)

    def create_model_version(self, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

        self.calls += 1
        raise MlflowException("not allowed (test)", error_code=PERMISSION_DENIED)


def test_a_refusing_registry_is_asked_once_and_reported(registered: dict[str, Any]) -> None:
    """A refusal a retry would only repeat (FINAL_ERRORS): one attempt, one problem on the run."""
    from orchestrator.tracking.runs import experiment_id

    name = f"refused-{uuid.uuid4().hex[:8]}"
    run_id = client().create_run(experiment_id(client(), f"publish-{name}")).info.run_id
    refusing = RefusingRegistry()
    done = publish_run_models(
        refusing,
        run_id,
        name,
        best_url=registered["url"],
        latest_url=None,
        metric="",
        tags={},
        backoff_s=0.1,
    )
    assert done == {} and refusing.calls == 1
    problem = client().get_run(run_id).data.tags[REGISTRATION_TAG]
    assert problem.count("not allowed (test)") == 1, problem


class DownRegistry(FlakyRegistry):
    """The real client, whose model registry never answers (the tracking server does)."""

    def __init__(self) -> None:
        super().__init__(failures=10**6)

    def create_registered_model(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("registry unreachable (test)")

    def search_model_versions(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("registry unreachable (test)")


def finished_run(spec: Any) -> str:
    """A FINISHED run of `spec` (its experiment's own), validated at step 6; its id."""
    from orchestrator.tracking.tracker import MlflowTracker

    tracker = MlflowTracker(spec, {}, system_metrics_interval_s=None)
    tracker.log_metrics({"val/top1_err": 0.5, "val/top5_err": 0.25}, 6)
    tracker.finish("FINISHED")
    return tracker.run_id


def test_a_registry_that_stays_down_never_fails_the_run(
    registered: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The driver's publishing of a finished job: the run stays FINISHED with its paper report;
    the warning and the run's tag say what was not registered."""
    # the tracked job's checkpoints, its run in an experiment of its own
    spec = registered["spec"]
    spec = dataclasses.replace(
        spec, tracking=dataclasses.replace(spec.tracking, experiment=f"down-{uuid.uuid4().hex}")
    )
    run_id = finished_run(spec)
    with caplog.at_level(logging.WARNING, logger="orchestrator.publish.register"):
        done = publish_finished_job(spec, client=DownRegistry())
    assert done is not None and done.run_id == run_id and done.models == {}
    run = client().get_run(run_id)
    assert run.info.status == "FINISHED" and done.report["achieved/top1_err"] == 50.0
    assert "registry unreachable" in run.data.tags[REGISTRATION_TAG]
    assert "could not register" in caplog.text and "python -m orchestrator.publish" in caplog.text
    assert open_committed(registered["url"]), "the checkpoint on S3 is untouched"


def test_a_finished_job_published_again_registers_and_reports_nothing_twice(
    registered: dict[str, Any],
) -> None:
    """What the driver did at the tracked job's end, done again: the same versions (reused),
    the report's table still one."""
    job, run_id = registered["job"], registered["run"].info.run_id
    versions = {v.version for v in client().search_model_versions(f"name='{job}'")}
    done = publish_finished_job(registered["spec"])
    assert done is not None and done.run_id == run_id
    assert set(done.models) == {"best", "last"} and all(p.reused for p in done.models.values())
    assert {v.version for v in client().search_model_versions(f"name='{job}'")} == versions
    table = Path(client().download_artifacts(run_id, "paper/comparison.csv")).read_text()
    assert len(table.splitlines()) == 3, "the report's table rewritten, not appended to"


def test_a_job_with_publish_off_registers_and_reports_nothing_and_says_so(
    registered: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """tracking.publish=false: the tracked job's spec under a new name, its run finished in an
    experiment of its own; publishing it registers no model and writes no report."""
    spec = registered["spec"]
    name = f"nopub-{uuid.uuid4().hex[:6]}"
    tracking = dataclasses.replace(
        spec.tracking, experiment=f"nopub-{uuid.uuid4().hex}", publish=False
    )
    spec = dataclasses.replace(spec, name=name, tracking=tracking)
    run_id = finished_run(spec)
    assert publish_finished_job(spec) is None
    out = capsys.readouterr().out
    assert f"job {name}: tracking.publish=false: no models registered, no paper report" in out
    assert "python -m orchestrator.publish --run RUN_ID" in out
    assert client().search_model_versions(f"name='{name}'") == []
    assert not client().list_artifacts(run_id, "paper")


def open_committed(url: str) -> bool:
    root, step = split_checkpoint_url(url)
    return step in {c.step for c in CheckpointStore(root).committed()}
