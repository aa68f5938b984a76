"""The evaluation protocols (orchestrator.evaluation) on tiny local shards.

Small nets (cifar_resnet20, resnet18 at <= 96 px) and a few dozen images keep this fast on
2 cores. The multi-rank test runs 2 real gloo processes over the 21-sample odd split.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn

from orchestrator.data import (
    DataConfig,
    DeviceNormalize,
    eval_loader,
    load_manifest,
    load_mean_image,
)
from orchestrator.evaluation import (
    PROTOCOLS,
    EvalResult,
    UnknownProtocolError,
    combine_probs,
    evaluate,
    recalibrate_bn,
    recalibrate_bn_on_data,
    topk_errors,
)
from orchestrator.models import create_model


def odd_cfg(url: Path | str, **kw) -> DataConfig:
    """odd_local_shards (64x48 images, 3 classes, 21 val samples) shrunk to 32 px views."""
    base = {
        "url": str(url),
        "train_transform": "rrc",
        "image_size": 32,
        "eval_resize": 36,
        "scale_range": (36, 48),
        "num_workers": 1,
        "shuffle_buffer": 8,
        "pca_lighting": 0.0,
    }
    return DataConfig(**{**base, **kw})


def tiny_net(name: str = "cifar_resnet20", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = create_model(name, 3)
    # random BN statistics, so eval mode differs from an identity and nets differ per seed
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


# ------------------------------------------------------------------------------- protocols


def test_unknown_protocol_lists_the_valid_choices(odd_local_shards: Path) -> None:
    with pytest.raises(UnknownProtocolError) as err:
        evaluate(tiny_net(), odd_cfg(odd_local_shards), protocol="five_crop")
    assert "'five_crop'" in str(err.value)
    assert "center, ten_crop, multiscale" in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("normalize", ["per_channel", "per_pixel_mean"])
def test_center_matches_a_plain_forward_pass(odd_local_shards: Path, normalize: str) -> None:
    """Top-1/top-5, loss and per-class accuracy against a loop written out here, under either
    normalization (per_pixel_mean: the converter's 224 px mean image, resized to the 32 px
    views)."""
    cfg = odd_cfg(odd_local_shards, num_workers=0, normalize=normalize)
    net = tiny_net(seed=1)
    res = evaluate(net, cfg, protocol="center", batch_size=4, return_probs=True, progress=True)
    manifest = load_manifest(str(odd_local_shards))
    image = None
    if normalize == "per_pixel_mean":
        image = load_mean_image(manifest, str(odd_local_shards))
        assert image.shape == (3, 224, 224)
        other = evaluate(net, odd_cfg(odd_local_shards, num_workers=0), return_probs=True)
        assert np.abs(other.probs - res.probs).max() > 1e-3  # the two forms differ
    norm = DeviceNormalize(manifest["mean"], manifest["std"], 0.0, mean_image=image)
    logits, labels = [], []
    with torch.no_grad():
        for x, y in eval_loader(cfg, rank=0, world_size=1, batch_size=8):
            logits.append(net(norm(x, train=False)))
            labels.append(y)
    logits_t, y_t = torch.cat(logits), torch.cat(labels)
    assert res.samples == len(y_t) == 21
    np.testing.assert_array_equal(res.indices, np.arange(21))
    np.testing.assert_array_equal(res.labels, y_t.numpy())
    np.testing.assert_allclose(res.probs, F.softmax(logits_t, 1).numpy(), rtol=1e-4, atol=1e-6)
    hit = logits_t.argmax(1) == y_t
    assert res.top1_err == pytest.approx(1 - hit.float().mean().item())
    assert res.top5_err == 0.0  # 3 classes: the top 5 always holds the answer
    assert res.loss == pytest.approx(F.cross_entropy(logits_t, y_t).item(), rel=1e-4)
    np.testing.assert_array_equal(res.class_total, [7, 7, 7])
    want = [hit[y_t == c].float().mean().item() for c in range(3)]
    np.testing.assert_allclose(res.per_class_accuracy, want)
    assert res.metrics()["val/samples"] == 21 and res.metrics()["val/top1_err"] == res.top1_err


def _write_one_image_dataset(root: Path, arr: np.ndarray, label: int, classes: int) -> Path:
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")  # lossless: the pixels are known exactly
    with wds.TarWriter(str(root / "val-000000.tar"), encoder=False) as tw:
        tw.write({"__key__": "img0", "png": buf.getvalue(), "cls": str(label).encode()})
    manifest = {
        "format": "webdataset",
        "version": 1,
        "num_classes": classes,
        "classes": [str(i) for i in range(classes)],
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "splits": {"val": {"samples": 1, "shards": [{"name": "val-000000.tar", "samples": 1}]}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


class ViewProbe(nn.Module):
    """Records every input; view v of a 10-crop batch votes for class v % 3."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        votes = torch.arange(x.shape[0]) % 10 % 3
        return F.one_hot(votes, 3).float() * 100.0


def test_ten_crop_gives_the_expected_ten_crops_of_a_known_image(tmp_path: Path) -> None:
    """A 48x40 image whose pixels encode their position; eval_resize = its shorter side (no
    resampling), 24 px crops: the net sees the 4 corners, the centre, then their mirrors."""
    w, h, s = 48, 40, 24
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 5) % 256, (yy * 6) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    root = _write_one_image_dataset(tmp_path / "known", img, label=0, classes=3)
    cfg = DataConfig(url=str(root), image_size=s, eval_resize=h, scale_range=(h, h), num_workers=0)
    probe = ViewProbe()
    res = evaluate(probe, cfg, protocol="ten_crop", return_probs=True, device="cpu")
    assert len(probe.inputs) == 1 and probe.inputs[0].shape == (10, 3, s, s)
    seen = probe.inputs[0].round().to(torch.uint8).numpy()  # mean 0, std 1: raw pixels
    chw = img.transpose(2, 0, 1)
    cy, cx = (h - s) // 2, (w - s) // 2  # 8, 12
    corners = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), (cy, cx)]
    expected = [chw[:, y : y + s, x : x + s] for y, x in corners]
    expected += [e[:, :, ::-1] for e in expected]
    for v in range(10):
        np.testing.assert_array_equal(seen[v], expected[v], err_msg=f"view {v}")
    # softmax averaged over the 10 views: classes 0,1,2 got 4,3,3 votes
    np.testing.assert_allclose(res.probs[0], [0.4, 0.3, 0.3], atol=1e-6)
    assert res.views == 10 and res.samples == 1 and res.top1_err == 0.0


def test_multiscale_runs_fully_convolutionally_at_several_sizes(odd_local_shards: Path) -> None:
    """resnet18 on whole 64x48 images at shorter sides 24, 32, 48: each scale is the mean
    score map (= the net's own output at that size) with its flip; scales are averaged,
    sample by sample, however the loader workers batched each pass."""
    net = tiny_net("resnet18", seed=2)
    scales = (24, 32, 48)
    cfg = odd_cfg(odd_local_shards, num_workers=2)
    res = evaluate(net, cfg, protocol="multiscale", scales=scales, batch_size=5, return_probs=True)
    assert res.views == 6 and res.samples == 21
    np.testing.assert_array_equal(res.indices, np.arange(21))
    manifest = load_manifest(str(odd_local_shards))
    norm = DeviceNormalize(manifest["mean"], manifest["std"], 0.0)
    per_scale, sizes = [], set()
    in_order = odd_cfg(odd_local_shards, num_workers=0)  # one process: samples in split order
    with torch.no_grad():
        for scale in scales:
            probs = []
            for x, _ in eval_loader(
                in_order, rank=0, world_size=1, batch_size=7, views="full", scale=scale
            ):
                sizes.add(tuple(x.shape[-2:]))
                xn = norm(x, train=False)
                probs.append((F.softmax(net(xn), 1) + F.softmax(net(xn.flip(3)), 1)) / 2)
            per_scale.append(torch.cat(probs))
    assert sizes == {(24, 32), (32, 42), (48, 64)}  # the whole image, at every scale
    manual = torch.stack(per_scale).mean(0).numpy()
    np.testing.assert_allclose(res.probs, manual, rtol=1e-4, atol=1e-6)
    assert topk_errors(res.probs, res.labels, (1,))[0] == pytest.approx(res.top1_err)


# ---------------------------------------------------------------- exact counts across ranks


def _rank_worker(rank: int, world: int, init: str, url: str, state: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        net = create_model("cifar_resnet20", 3)
        net.load_state_dict(torch.load(state))
        cfg = odd_cfg(url, num_workers=2)
        results = {
            p: evaluate(net, cfg, protocol=p, scales=(32, 48), batch_size=4, return_probs=True)
            for p in PROTOCOLS
        }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_count_an_odd_split_exactly_once(odd_local_shards: Path, tmp_path: Path) -> None:
    """21 samples over 2 ranks (10 + 11): every protocol counts 21, each sample once, and the
    numbers are those of one process."""
    net = tiny_net(seed=3)
    torch.save(net.state_dict(), tmp_path / "state.pt")
    args = (
        2,
        str(tmp_path / "init"),
        str(odd_local_shards),
        str(tmp_path / "state.pt"),
        str(tmp_path),
    )
    # forked, like torchrun's workers' own loader processes: no re-import of torch per rank
    mp.start_processes(_rank_worker, args=args, nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    cfg = odd_cfg(odd_local_shards, num_workers=0)
    for protocol in PROTOCOLS:
        one: EvalResult = evaluate(net, cfg, protocol=protocol, scales=(32, 48), return_probs=True)
        for r in (0, 1):
            res: EvalResult = ranks[r][protocol]
            assert res.samples == 21, (protocol, r)
            np.testing.assert_array_equal(res.indices, np.arange(21))
            np.testing.assert_array_equal(res.class_total, [7, 7, 7])
            np.testing.assert_array_equal(res.labels, one.labels)
            np.testing.assert_allclose(res.probs, one.probs, rtol=1e-4, atol=1e-6, err_msg=protocol)
            assert res.top1_err == pytest.approx(one.top1_err), protocol
            np.testing.assert_array_equal(res.class_correct, one.class_correct)
            assert res.loss == pytest.approx(one.loss, rel=1e-5)


# ------------------------------------------------------------------------ BN recalibration


def test_bn_recalibration_is_the_exact_average_over_batches() -> None:
    bn = nn.BatchNorm2d(3, momentum=0.1)
    net = nn.Sequential(bn).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 5, 5, generator=gen) * (i + 1) + i, None) for i in range(5)]
    used = recalibrate_bn(net, batches, 3)
    assert used == 3
    means = torch.stack([x.mean((0, 2, 3)) for x, _ in batches[:3]])
    variances = torch.stack(
        [x.transpose(0, 1).reshape(3, -1).var(1, unbiased=True) for x, _ in batches[:3]]
    )
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.momentum == 0.1 and not net.training  # restored
    assert int(bn.num_batches_tracked) == 3


def test_bn_recalibration_over_training_batches(odd_local_shards: Path) -> None:
    net = tiny_net(seed=4)
    before = net.bn1.running_mean.clone()
    used = recalibrate_bn_on_data(net, odd_cfg(odd_local_shards), 3, batch_size=8, device="cpu")
    assert used == 3
    assert int(net.bn1.num_batches_tracked) == 3
    assert not torch.allclose(net.bn1.running_mean, before)
    assert not net.training and net.bn1.momentum == 0.1


# ------------------------------------------------------------------------------- ensembles


def test_combine_probs_and_topk_errors() -> None:
    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    b = np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]], dtype=np.float32)
    np.testing.assert_allclose(combine_probs([a, b]), (a + b) / 2)
    np.testing.assert_allclose(combine_probs([a, b], [3, 1]), (3 * a + b) / 4, rtol=1e-6)
    assert topk_errors(combine_probs([a, b]), np.array([1, 1]), (1, 2)) == [0.0, 0.0]
    assert topk_errors(a, np.array([1, 1]), (1, 2)) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 non-negative"):
        combine_probs([a, b], [1.0])


# ------------------------------------------------------------------- in the training loop


def test_training_loop_validates_with_the_specs_protocol(
    odd_local_shards: Path, tmp_path: Path
) -> None:
    """eval.protocol=ten_crop in a job: the metrics in the commit marker are those of
    evaluate(..., "ten_crop") on the checkpoint it commits, normalized as the job says
    (data.normalize=per_pixel_mean: the dataset's mean image)."""
    from tests.conftest import run_script

    run_script(
        "jobs/smoke.py",
        "--local",
        "name=tc",
        f"checkpoint.storage={tmp_path}",
        f"data.url={odd_local_shards}",
        "data.scale_range=[36,48]",
        "data.eval_resize=36",
        "data.num_workers=1",
        "data.shuffle_buffer=16",
        "data.normalize=per_pixel_mean",
        "tracking.enabled=false",
        "scaling.num_workers=1",
        "scaling.global_batch=8",
        "schedule.max_iters=2",
        "schedule.milestones=[1]",
        "eval.every_iters=2",
        "eval.protocol=ten_crop",
        "eval.batch_size=4",
        "checkpoint.every_iters=2",
        env={"OMP_NUM_THREADS": "1"},
    )
    step = tmp_path / "tc" / "checkpoints" / "step-00000002"
    marker = json.loads((step / "COMMITTED").read_text())["metrics"]
    state = torch.load(step / "trainer.pt", weights_only=True)
    net = create_model("cifar_resnet20", 3)
    net.load_state_dict(state["strategy"]["model"])
    cfg = odd_cfg(odd_local_shards, normalize="per_pixel_mean")
    res = evaluate(net, cfg, protocol="ten_crop", device="cpu")
    assert marker["val/samples"] == 21
    assert marker["val/top1_err"] == pytest.approx(res.top1_err)
    assert marker["val/loss"] == pytest.approx(res.loss, rel=1e-4)
    center = evaluate(net, cfg, protocol="center", device="cpu")
    assert marker["val/loss"] != pytest.approx(center.loss, rel=1e-4)  # not the centre crop
    channel = evaluate(net, odd_cfg(odd_local_shards), protocol="ten_crop", device="cpu")
    assert marker["val/loss"] != pytest.approx(channel.loss, rel=1e-4)  # nor per-channel
