"""orchestrator.paper.layer_responses: the paper's Fig. 7 (std of each 3x3 layer's response).

Unit tests build nets from the registry (on the meta device where only their layout matters)
and check the measurement against forward passes written out by hand. The integration tests
reuse the session's tracked smoke job (tests/conftest.tracked_smoke_job: cifar_resnet20,
checkpoints on the test stack's S3), run the command line on its run and read back what it
logged to MLflow.
"""

from __future__ import annotations

import io
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from orchestrator.checkpoint_refs import CheckpointRefError
from orchestrator.models import create_model
from orchestrator.models.resnet import BasicBlock, ResNet
from orchestrator.paper.layer_responses import (
    CSV_ARTIFACT,
    PLOT_ARTIFACT,
    LayerResponses,
    LayerResponsesError,
    layer_response_stds,
    log_combined_layer_responses,
    logged_responses,
    main,
    measure_once,
    response_layers,
    responses_for_run,
    validation_batch,
)
from orchestrator.paper.plots import layer_responses_figure, plot_layer_responses
from tests.conftest import odd_shards_config, run_script

# ----------------------------------------------------------------------------- which layers


def meta_net(name: str) -> nn.Module:
    with torch.device("meta"):  # the layout only: no weights are initialised
        return create_model(name)


@pytest.mark.parametrize(
    ("name", "count"),
    [
        # CIFAR: the first 3x3 conv and two per basic block, 6n+1
        ("cifar_resnet20", 19),
        ("cifar_plain20", 19),
        ("cifar_resnet56", 55),
        ("cifar_plain56", 55),
        ("cifar_resnet110", 109),
        ("cifar_plain110", 109),
        # ImageNet: the 7x7 stem does not count; basic blocks two, bottlenecks one
        ("resnet18", 16),
        ("resnet34", 32),
        ("plain34", 32),
        ("resnet50", 16),
        ("resnet152", 50),
    ],
)
def test_every_3x3_conv_is_read_at_the_bn_after_it(name: str, count: int) -> None:
    net = meta_net(name)
    layers = response_layers(net)
    assert len(layers) == count
    modules = dict(net.named_modules())
    convs_3x3 = [
        n for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert [conv for conv, _ in layers] == convs_3x3  # all of them, in forward order
    for conv, bn in layers:
        parent, _, leaf = conv.rpartition(".")
        sibling = f"{parent}.bn{leaf.removeprefix('conv')}".lstrip(".")
        assert bn is modules[sibling], f"{conv} is read at {bn}, not at {sibling}"


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_plain_and_residual_nets_have_the_same_layers(depth: int) -> None:
    plain = [conv for conv, _ in response_layers(meta_net(f"cifar_plain{depth}"))]
    residual = [conv for conv, _ in response_layers(meta_net(f"cifar_resnet{depth}"))]
    assert plain == residual
    assert plain[0] == "conv1" and plain[-1] == f"layer3.{(depth - 2) // 6 - 1}.conv2"


def test_a_net_the_layers_cannot_be_found_in_is_refused() -> None:
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(LayerResponsesError, match=r"^0 is a 3x3 conv without a BatchNorm2d"):
        response_layers(no_bn)
    with pytest.raises(LayerResponsesError, match="no 3x3 conv followed by BN"):
        response_layers(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    # a Sequential's conv -> BN pair is found like a block's conv<k>/bn<k>
    [(conv, bn)] = response_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert conv == "0" and isinstance(bn, nn.BatchNorm2d)


# ----------------------------------------------------------------------------- the statistic


def randomise_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters away from their initial 0/1, so that eval mode
    (running statistics) and train mode (batch statistics) give different outputs."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.3)
    return net


def population_std(x: torch.Tensor) -> float:
    return float(np.std(x.double().numpy()))  # numpy's default: ddof=0, over every element


@torch.no_grad()
def cifar_forward_by_hand(net: ResNet, x: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """The CIFAR net's forward pass written out: the std of each BN output right after the
    BN (before the ReLU and before the shortcut's addition), and the logits."""
    stds = []
    h = net.bn1(net.conv1(x))
    stds.append(population_std(h))
    h = F.relu(h)
    for stage in (net.layer1, net.layer2, net.layer3):
        for block in stage:
            a = block.bn1(block.conv1(h))
            stds.append(population_std(a))
            b = block.bn2(block.conv2(F.relu(a)))
            stds.append(population_std(b))
            if block.residual:
                b = b + (h if block.downsample is None else block.downsample(h))
            h = F.relu(b)
    return stds, net.forward_head(h)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_plain20"])
def test_stds_are_of_the_bn_outputs_before_relu_and_addition(name: str) -> None:
    torch.manual_seed(0)
    net = randomise_bn(create_model(name)).eval()
    x = torch.randn(6, 3, 32, 32)
    expected, logits = cifar_forward_by_hand(net, x)
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x), rtol=1e-4, atol=1e-4)  # the same net
    got = layer_response_stds(net, x, batch_size=4)
    assert list(got) == [conv for conv, _ in response_layers(net)]
    np.testing.assert_allclose(list(got.values()), expected, rtol=1e-5)


def test_std_over_every_element_matches_a_hand_computation_on_a_tiny_net() -> None:
    torch.manual_seed(1)
    net = randomise_bn(ResNet(BasicBlock, (1,), widths=(2,), stem="cifar", num_classes=2), 3)
    x = torch.randn(5, 3, 4, 4)

    def bn_by_hand(y: torch.Tensor, bn: nn.BatchNorm2d) -> np.ndarray:
        y, shape = y.double().numpy(), (1, -1, 1, 1)
        mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        w, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
        return (y - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + bn.eps) * w.reshape(
            shape
        ) + b.reshape(shape)

    def conv(h: np.ndarray, c: nn.Conv2d) -> torch.Tensor:
        return F.conv2d(torch.from_numpy(h).float(), c.weight.detach(), padding=1)

    with torch.no_grad():
        r0 = bn_by_hand(conv(x.double().numpy(), net.conv1), net.bn1)
        block = net.layer1[0]
        r1 = bn_by_hand(conv(np.maximum(r0, 0), block.conv1), block.bn1)
        r2 = bn_by_hand(conv(np.maximum(r1, 0), block.conv2), block.bn2)
    # sqrt(mean((x - mean(x))^2)) over batch, channels, height and width together
    expected = [math.sqrt(((r - r.mean()) ** 2).mean()) for r in (r0, r1, r2)]
    net.train()  # handed in training: measured in eval mode, handed back in training
    before = [m.running_mean.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for batch_size in (1, 2, 5):  # chunks are combined exactly
        got = layer_response_stds(net, x, batch_size=batch_size)
        assert list(got) == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
        np.testing.assert_allclose(list(got.values()), expected, rtol=1e-5)
    assert net.training
    after = [m.running_mean for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # eval: untouched
    assert not any(m._forward_hooks for m in net.modules())  # the hooks are gone


def test_bad_images_are_refused() -> None:
    net = create_model("cifar_resnet20")
    with pytest.raises(LayerResponsesError, match=r"non-empty \[N, 3, H, W\]"):
        layer_response_stds(net, torch.zeros(3, 32, 32))
    with pytest.raises(LayerResponsesError, match="batch_size=0"):
        layer_response_stds(net, torch.zeros(1, 3, 32, 32), batch_size=0)
    with pytest.raises(CheckpointRefError, match="checkpoint 'first': expected one of best"):
        responses_for_run(None, "RUN", checkpoint="first")  # before any call to MLflow
    with pytest.raises(LayerResponsesError, match="--images 0"):
        responses_for_run(None, "RUN", num_images=0)


# ----------------------------------------------------------------------------- the images


def test_the_validation_batch_is_the_first_images_in_manifest_order(
    odd_local_shards: Path,
) -> None:
    from orchestrator.data import DeviceNormalize, eval_loader, load_manifest

    cfg = odd_shards_config(odd_local_shards, num_workers=2)  # two workers: interleaved
    manifest = load_manifest(cfg.url)
    positions, images = [], []
    for x, _, index in eval_loader(cfg, rank=0, world_size=1, batch_size=4, with_index=True):
        positions.append(index)
        images.append(x)
    by_position = torch.cat(images)[torch.cat(positions).argsort()]
    expected = DeviceNormalize(manifest["mean"], manifest["std"], 0.0)(by_position, train=False)
    got = validation_batch(cfg, 9)
    assert got.shape == (9, 3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected[:9])
    assert len(validation_batch(cfg, 500)) == 21  # the whole split, when it is smaller


def test_synthetic_data_has_no_validation_images() -> None:
    from orchestrator.spec import DataConfig

    with pytest.raises(LayerResponsesError, match="synthetic data.*--data-url"):
        validation_batch(DataConfig(source="synthetic"), 10)


# ----------------------------------------------------------------------------- results, figure


def test_ranks_csv_and_label() -> None:
    r = LayerResponses("cifar_plain20", ["conv1", "a", "b", "c"], [0.5, 2.0, 0.5, 1.0], 8)
    assert r.ranks() == [3, 1, 4, 2]  # 1 = largest; a tie goes to the earlier layer
    assert r.label == "plain-20" and not r.residual
    assert r.csv().splitlines() == [
        "index,layer,std,rank",
        "1,conv1,0.5,3",
        "2,a,2,1",
        "3,b,0.5,4",
        "4,c,1,2",
    ]
    assert LayerResponses("cifar_resnet110", ["x"], [1.0], 1).label == "ResNet-110"
    assert r.metrics()["responses/std_max"] == 2.0 and r.metrics()["responses/layers"] == 4


def test_the_figure_has_the_papers_two_panels() -> None:
    series = {"plain-20": [3.0, 1.0, 2.0], "ResNet-20": [0.5, 1.5, 1.0, 0.2]}
    fig = layer_responses_figure(series, plain={"plain-20"})
    top, bottom = fig.axes
    assert "original" in top.get_xlabel() and "sorted" in bottom.get_xlabel()
    for ax, order in ((top, lambda v: v), (bottom, lambda v: sorted(v, reverse=True))):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == set(series)
        assert lines["plain-20"].get_linestyle() == "--"  # plain dashed
        assert lines["ResNet-20"].get_linestyle() == "-"  # residual solid
        for label, stds in series.items():
            assert list(lines[label].get_xdata()) == list(range(1, len(stds) + 1))
            assert list(lines[label].get_ydata()) == order(stds)


def test_plot_writes_a_png_and_refuses_bad_series(tmp_path: Path) -> None:
    path = plot_layer_responses({"ResNet-20": [1.0, 0.5]}, tmp_path / "f" / "fig.png")
    with Image.open(path) as img:
        img.verify()
        assert img.format == "PNG"
    with pytest.raises(ValueError, match="no series"):
        plot_layer_responses({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"series \['a'\] have no values"):
        plot_layer_responses({"a": []}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"plain=\['plain-56'\] are not series"):
        plot_layer_responses({"a": [1.0]}, tmp_path / "x.png", plain={"plain-56"})


# ----------------------------------------------------------------------------- a real run


def client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


@pytest.fixture(scope="module")
def smoke_run(tracked_smoke_job: dict[str, str]) -> str:
    c = client()
    [run] = c.search_runs([c.get_experiment_by_name(tracked_smoke_job["experiment"]).experiment_id])
    return run.info.run_id


def _artifact(run_id: str, path: str, tmp_path: Path) -> Path:
    return Path(client().download_artifacts(run_id, path, str(tmp_path)))


def test_the_command_line_logs_fig_7_to_the_run(smoke_run: str, tmp_path: Path) -> None:
    argv = ["--run", smoke_run, "--checkpoint", "best", "--images", "24", "--batch-size", "10"]
    out = run_script("-m", "orchestrator.paper.layer_responses", *argv)
    assert "ResNet-20 (cifar_resnet20): 19 3x3 layers, 24 validation images" in out
    assert f"logged {CSV_ARTIFACT} and {PLOT_ARTIFACT} to run {smoke_run}" in out

    rows = _artifact(smoke_run, CSV_ARTIFACT, tmp_path).read_text().splitlines()
    assert rows[0] == "index,layer,std,rank"
    table = [line.split(",") for line in rows[1:]]
    assert len(table) == 19  # cifar_resnet20: conv1 and 2 x 9 blocks
    assert [int(r[0]) for r in table] == list(range(1, 20))
    assert table[0][1] == "conv1" and table[-1][1] == "layer3.2.conv2"
    assert sorted(int(r[3]) for r in table) == list(range(1, 20))
    stds = [float(r[2]) for r in table]
    assert all(s > 0 and math.isfinite(s) for s in stds)

    with Image.open(_artifact(smoke_run, PLOT_ARTIFACT, tmp_path)) as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 400

    # the same numbers as measuring in this process, on the same checkpoint and images
    here = responses_for_run(client(), smoke_run, "best", 24)
    np.testing.assert_allclose(stds, here.stds, rtol=1e-5)
    run = client().get_run(smoke_run)
    assert run.data.metrics["responses/layers"] == 19
    assert run.data.metrics["responses/images"] == 24
    assert run.data.tags["layer_responses.checkpoint_url"] == here.checkpoint_url
    [point] = client().get_metric_history(smoke_run, "responses/std_max")
    assert point.step == here.step and point.value == pytest.approx(max(stds), rel=1e-5)


def test_last_is_the_newest_committed_checkpoint(smoke_run: str) -> None:
    from orchestrator.checkpoint import CheckpointStore

    last = responses_for_run(client(), smoke_run, "last", 4)
    root = last.checkpoint_url.rsplit("/", 1)[0]
    assert last.step == CheckpointStore(root).committed()[-1].step == 6
    assert last.images == 4 and len(last.stds) == 19


def test_a_combined_figure_for_a_study(smoke_run: str, tmp_path: Path) -> None:
    c = client()
    exp = c.create_experiment(f"responses-{uuid.uuid4().hex[:8]}")
    parent = c.create_run(exp).info.run_id
    residual = responses_for_run(c, smoke_run, "last", 8)
    plain = LayerResponses("cifar_plain20", residual.layers, [s * 2 for s in residual.stds], 8)
    log_combined_layer_responses(c, parent, [plain, residual])
    rows = _artifact(parent, CSV_ARTIFACT, tmp_path).read_text().splitlines()
    assert rows[0] == "label,run_id,index,layer,std,rank" and len(rows) == 1 + 2 * 19
    assert rows[1].startswith("plain-20,,1,conv1,") and rows[20].startswith(
        f"ResNet-20,{smoke_run},1,conv1,"
    )
    with Image.open(io.BytesIO(_artifact(parent, PLOT_ARTIFACT, tmp_path).read_bytes())) as img:
        img.verify()
    with pytest.raises(LayerResponsesError, match=r"labelled \['ResNet-20'\]"):
        log_combined_layer_responses(c, parent, [residual, residual])


def test_bad_runs_get_a_reason_and_exit_code_2(
    smoke_run: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--run", "0" * 32]) == 2
    assert "not found in MLflow" in capsys.readouterr().err
    c = client()
    exp = c.create_experiment(f"responses-{uuid.uuid4().hex[:8]}")
    untracked = c.create_run(exp).info.run_id  # not a training run: no job, no checkpoints
    assert main(["--run", untracked, "--no-log"]) == 2
    assert "not an orchestrator training run" in capsys.readouterr().err


def test_measure_once_reads_back_what_was_logged(smoke_run: str) -> None:
    """A study's trial measures its own Fig. 7; the study's driver reads it back, and measures
    again only where it was taken at an older checkpoint than the run's last."""
    c = client()
    first, _ = measure_once(c, smoke_run, "cifar_resnet20")
    tags = c.get_run(smoke_run).data.tags
    assert tags["layer_responses.checkpoint_url"] == tags["checkpoint_url"]
    again, measured_now = measure_once(c, smoke_run, "cifar_resnet20")
    assert not measured_now
    assert again.layers == first.layers and again.images == first.images
    np.testing.assert_allclose(again.stds, first.stds, rtol=1e-5)
    c.set_tag(smoke_run, "layer_responses.checkpoint_url", "s3://resnet/older/step-2")
    assert logged_responses(c, smoke_run, "cifar_resnet20") is None
    _, measured_now = measure_once(c, smoke_run, "cifar_resnet20")
    assert measured_now
