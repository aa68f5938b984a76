"""Fig. 7 of He et al. (2016): standard deviations of the layer responses.

"The responses are the outputs of each 3x3 layer, after BN and before nonlinearity
(ReLU/addition). Top: the layers are shown in their original order. Bottom: the responses are
ranked in descending order." The paper's finding: residual functions are generally closer to
zero than the plain net's, and deeper ResNets respond less.

    python -m orchestrator.paper.layer_responses --run RUN_ID [--checkpoint best|last] [--images N]
    python -m orchestrator.paper.layer_responses --checkpoint-url URL [--checkpoint-url URL ...] \
        [--output-dir DIR]      # no MLflow: a run trained with tracking.enabled=false

`--checkpoint-url` names a committed step (.../checkpoints/step-NNNNNNNN) or a job's
.../checkpoints folder (`--checkpoint` chooses its best or last step); MLflow is not used at
all: each net's table is printed, and with `--output-dir` the CSV (label, checkpoint_url,
index, layer, std, rank) and one figure of every net are written there; without it, printed only.

What is measured, exactly:

- the layers: every 3x3 conv of the net, in forward order, each read at the BN that follows
  it (a forward hook on that BN: its output is what the ReLU or the shortcut's addition takes).
  The CIFAR nets' first conv is 3x3, so it counts: a 6n+2-layer net has 6n+1 (ResNet-20: 19,
  ResNet-56: 55, ResNet-110: 109; the plain nets the same layers). The ImageNet nets' 7x7 stem
  does not count; a basic block has two 3x3 layers, a bottleneck block one (its middle conv):
  ResNet-34 has 32, ResNet-50 16. A layer is named after its conv (`layer1.0.conv2`);
- the statistic: the population standard deviation over every element of the response, batch,
  channels, height and width together: sqrt(mean((x - mean(x))^2)). Computed in float32 per
  chunk of images and combined exactly in float64 (Chan et al.'s pairwise update), so it does
  not depend on the chunk size;
- the net: the run's committed checkpoint (`best` or `last`), in eval mode (BN normalises with
  its running statistics, as at test time), without gradients;
- the images: the first N of the run's validation split in manifest order (the same images for
  every run on that dataset), the centre view and the manifest's mean/std, as
  orchestrator.evaluation feeds them.

Logged to the run: `layer_responses.csv` (index from 1, layer, std, rank: 1 = largest),
`plots/layer_responses.png` (the paper's two panels), metrics `responses/std_mean`,
`responses/std_max`, `responses/std_min`, `responses/layers`, `responses/images` at the
checkpoint's step, and tags `layer_responses.checkpoint_url`, `layer_responses.images`.
`log_combined_layer_responses` draws several runs on one figure (a study's parent run). The
figure itself is drawn by orchestrator.paper.plots (`plot_layer_responses`), the statistic
computed by orchestrator.paper.response_stats; the run's checkpoint is found and read by
orchestrator.checkpoint_refs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.checkpoint_refs import which_arg
from orchestrator.cli import run_cli
from orchestrator.models import model_info
from orchestrator.paper.response_stats import (
    LayerResponsesError,
    layer_response_stds,
    response_layers,
)
from orchestrator.tracking.tags import (
    CHECKPOINT_TAG,
    RESPONSES_CHECKPOINT_TAG,
    RESPONSES_IMAGES_TAG,
)

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS",
    "LayerResponses",
    "LayerResponsesError",
    "layer_response_stds",
    "log_combined_layer_responses",
    "log_layer_responses",
    "logged_responses",
    "main",
    "measure_once",
    "measured_at_last_checkpoint",
    "response_layers",
    "responses_for_checkpoint",
    "responses_for_run",
    "validation_batch",
]

CHECKPOINTS = ("best", "last")  # `latest` is refused naming `last` (orchestrator.checkpoint_refs)
CSV_ARTIFACT = "layer_responses.csv"
PLOT_ARTIFACT = "plots/layer_responses.png"
DEFAULT_IMAGES = 500


def validation_batch(data: Any, num_images: int = DEFAULT_IMAGES) -> torch.Tensor:
    """The first `num_images` images of `data`'s validation split (a DataConfig), in manifest
    order, as orchestrator.evaluation feeds them: the centre view, normalised as the run's
    data.normalize says (the manifest's mean/std, else ImageNet's; or its mean image).
    Float32 [n, 3, S, S] on the CPU; n < num_images where the split is smaller."""
    from orchestrator.data import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        DeviceNormalize,
        load_manifest,
        load_mean_image,
    )
    from orchestrator.data.eval_split import eval_loader

    if num_images < 1:
        raise LayerResponsesError(f"--images {num_images}: expected >= 1")
    if data.synthetic:
        raise LayerResponsesError(
            "the run trained on synthetic data, which has no validation images: pass "
            "--data-url DATASET (data_url=) with the images to measure on"
        )
    manifest = load_manifest(data.url)
    # the run's own form: per channel, or the paper's per-pixel mean (data.normalize)
    per_pixel = getattr(data, "normalize", "per_channel") == "per_pixel_mean"
    normalize = DeviceNormalize(
        manifest.get("mean") or IMAGENET_MEAN,
        manifest.get("std") or IMAGENET_STD,
        0.0,
        "cpu",
        mean_image=load_mean_image(manifest, data.url) if per_pixel else None,
    )
    # no loader workers: each would start at its own part of the split; in this process the
    # stream is read in order, and no further than the images taken
    cfg = dataclasses.replace(data, num_workers=0)
    chunks, left = [], num_images
    batches = eval_loader(cfg, rank=0, world_size=1, batch_size=min(num_images, 256))
    for images, _ in batches:
        chunks.append(normalize(images[:left], train=False).contiguous())
        left -= len(chunks[-1])
        if left <= 0:
            break
    if not chunks:
        raise LayerResponsesError(f"{data.url}: split {data.val_split!r} has no readable image")
    return torch.cat(chunks)


# ============================================================================================
# a run's responses


@dataclass
class LayerResponses:
    """One net's Fig. 7 series: its 3x3 layers in forward order and their response stds."""

    model: str  # registered name, e.g. cifar_resnet20
    layers: list[str]
    stds: list[float]
    images: int
    run_id: str | None = None
    checkpoint_url: str | None = None
    step: int | None = None

    @property
    def residual(self) -> bool:
        return bool(model_info(self.model)["residual"])

    @property
    def label(self) -> str:
        """The paper's legend: `plain-20`, `ResNet-56`."""
        depth = model_info(self.model)["depth"]
        return f"ResNet-{depth}" if self.residual else f"plain-{depth}"

    def ranks(self) -> list[int]:
        """Each layer's rank by std, 1 = largest (ties: the earlier layer first)."""
        order = sorted(range(len(self.stds)), key=lambda i: (-self.stds[i], i))
        ranks = [0] * len(order)
        for rank, i in enumerate(order, 1):
            ranks[i] = rank
        return ranks

    def csv(self) -> str:
        """`index,layer,std,rank`, one row per layer, index from 1."""
        rows = zip(self.layers, self.stds, self.ranks(), strict=True)
        lines = [f"{i},{name},{std:.6g},{rank}" for i, (name, std, rank) in enumerate(rows, 1)]
        return "\n".join(["index,layer,std,rank", *lines]) + "\n"

    def table(self) -> str:
        """A human-readable table with a heading naming the net, checkpoint and images."""
        where = f"step {self.step} ({self.checkpoint_url})" if self.checkpoint_url else "-"
        heading = (
            f"{self.label} ({self.model}): {len(self.layers)} 3x3 layers, {self.images} "
            f"validation images, checkpoint {where}"
        )
        head = [heading, f"{'index':>5}  {'layer':<24} {'std':>10} {'rank':>5}"]
        rows = zip(self.layers, self.stds, self.ranks(), strict=True)
        body = [f"{i:>5}  {n:<24} {s:>10.4f} {r:>5}" for i, (n, s, r) in enumerate(rows, 1)]
        return "\n".join(head + body)

    def metrics(self) -> dict[str, float]:
        return {
            "responses/std_mean": sum(self.stds) / len(self.stds),
            "responses/std_max": max(self.stds),
            "responses/std_min": min(self.stds),
            "responses/layers": float(len(self.stds)),
            "responses/images": float(self.images),
        }


def responses_for_run(
    client: Any,
    run_id: str,
    checkpoint: str = "last",
    num_images: int = DEFAULT_IMAGES,
    *,
    data_url: str | None = None,
    batch_size: int = 100,
    device: str | torch.device | None = None,
) -> LayerResponses:
    """The layer responses of a training run's `best` or `last` committed checkpoint on the
    first `num_images` validation images of its dataset (or of `data_url`). The checkpoint is
    found and read by orchestrator.checkpoint_refs; `device` defaults to CUDA where present.
    Raises LayerResponsesError or CheckpointRefError (both ValueError) with the reason."""
    from orchestrator.checkpoint_refs import check_which, run_checkpoint

    check_which(checkpoint)  # before any call to MLflow
    _check_sizes(num_images, batch_size)
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise LayerResponsesError(f"run {run_id}: not found in MLflow: {err}") from err
    ref = run_checkpoint(run, checkpoint)
    return _measure(
        ref, run_id, num_images, data_url=data_url, batch_size=batch_size, device=device
    )


def responses_for_checkpoint(
    url: str, checkpoint: str = "last", num_images: int = DEFAULT_IMAGES, **options: Any
) -> LayerResponses:
    """responses_for_run (the same `options`) for a checkpoint named by URL, without MLflow: a
    committed step (.../checkpoints/step-NNNNNNNN) or a job's .../checkpoints folder, whose
    `best` or `last` committed step is taken."""
    from orchestrator.checkpoint_refs import check_which
    from orchestrator.ensemble_eval.members import url_checkpoint

    check_which(checkpoint)
    _check_sizes(num_images, options.get("batch_size", 100))
    return _measure(url_checkpoint(url, checkpoint), None, num_images, **options)


def _check_sizes(num_images: int, batch_size: int) -> None:
    if num_images < 1 or batch_size < 1:
        raise LayerResponsesError(f"--images {num_images}, --batch-size {batch_size}: both >= 1")


def _measure(
    ref: Any,
    run_id: str | None,
    num_images: int,
    *,
    data_url: str | None = None,
    batch_size: int = 100,
    device: str | torch.device | None = None,
) -> LayerResponses:
    """The responses of committed checkpoint `ref` (its url, step and what)."""
    from orchestrator.checkpoint_refs import read_trainer_state, trained_net
    from orchestrator.models import create_model

    # read as data, the step held by a reader's lease meanwhile (retention keeps it)
    trained = trained_net(read_trainer_state(ref.url, ref.what), ref.url, ref.what)
    data = trained.spec.data
    if data_url:
        data = dataclasses.replace(data, url=data_url, source="shards")
    images = validation_batch(data, num_images)
    if len(images) < num_images:
        log.warning(
            "%s has only %d validation images (asked for %d)", data.url, len(images), num_images
        )
    model = trained.spec.model
    net = create_model(model.name, trained.num_classes, **model.options())
    net.load_state_dict(trained.weights)
    del trained  # its weights are in the net now
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stds = layer_response_stds(net.to(device), images, batch_size=batch_size)
    return LayerResponses(
        model=model.name,
        layers=list(stds),
        stds=list(stds.values()),
        images=len(images),
        run_id=run_id,
        checkpoint_url=ref.url,
        step=ref.step,
    )


# ============================================================================================
# logging to MLflow


def _log_figure(client: Any, run_id: str, results: Sequence[LayerResponses], title: str) -> None:
    from orchestrator.paper import plots

    if not plots.available():
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", PLOT_ARTIFACT)
        return
    series = {r.label: r.stds for r in results}
    plain = {r.label for r in results if not r.residual}
    with tempfile.TemporaryDirectory() as tmp:
        local = plots.plot_layer_responses(series, Path(tmp) / PLOT_ARTIFACT, plain, title=title)
        client.log_artifact(run_id, str(local), str(Path(PLOT_ARTIFACT).parent))


def log_layer_responses(
    client: Any,
    run_id: str,
    responses: LayerResponses | None = None,
    *,
    checkpoint: str = "last",
    num_images: int = DEFAULT_IMAGES,
    **options: Any,
) -> LayerResponses:
    """Log a run's layer responses to it (`layer_responses.csv`, `plots/layer_responses.png`,
    metrics `responses/*` at the checkpoint's step, tags); `responses` measured here by
    `responses_for_run(client, run_id, checkpoint, num_images, **options)` unless given."""
    from mlflow.entities import Metric, RunTag

    from orchestrator.tracking.redaction import redact_tags

    if responses is None:
        responses = responses_for_run(client, run_id, checkpoint, num_images, **options)
    client.log_text(run_id, responses.csv(), CSV_ARTIFACT)
    step = responses.step or 0
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in responses.metrics().items()]
    tags = {RESPONSES_IMAGES_TAG: str(responses.images)}
    if responses.checkpoint_url:
        tags[RESPONSES_CHECKPOINT_TAG] = responses.checkpoint_url
    items = [RunTag(k, v) for k, v in redact_tags(tags).items()]
    client.log_batch(run_id, metrics=metrics, tags=items)
    title = f"{responses.label}: std of layer responses ({responses.images} images)"
    _log_figure(client, run_id, [responses], title)
    return responses


def measured_at_last_checkpoint(tags: Mapping[str, str]) -> bool:
    """A run's tags say its logged responses are of its last checkpoint."""
    url = tags.get(RESPONSES_CHECKPOINT_TAG)
    return bool(url) and url == tags.get(CHECKPOINT_TAG)


def logged_responses(client: Any, run_id: str, model: str) -> LayerResponses | None:
    """The responses already logged to a run (`layer_responses.csv`), or None where there are
    none or they were measured at an older checkpoint than the run's last."""
    import mlflow.artifacts

    tags = client.get_run(run_id).data.tags
    if not measured_at_last_checkpoint(tags):
        return None
    url = tags[RESPONSES_CHECKPOINT_TAG]
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/{CSV_ARTIFACT}")
    rows = [line.split(",") for line in text.strip().splitlines()[1:]]
    return LayerResponses(
        model=model,
        layers=[row[1] for row in rows],
        stds=[float(row[2]) for row in rows],
        images=int(tags.get(RESPONSES_IMAGES_TAG, "0")),
        run_id=run_id,
        checkpoint_url=url,
    )


def measure_once(client: Any, run_id: str, model: str) -> tuple[LayerResponses, bool]:
    """A run's responses at its last checkpoint: read back where they are logged already, else
    measured and logged now. Returns them and whether they were measured now."""
    responses = logged_responses(client, run_id, model)
    if responses is not None:
        return responses, False
    return log_layer_responses(client, run_id, checkpoint="last"), True


def _series_csv(results: Sequence[LayerResponses], key: str) -> str:
    """`label,KEY,index,layer,std,rank` for every series; KEY: run_id or checkpoint_url."""
    lines = [f"label,{key},index,layer,std,rank"]
    for r in results:
        rows = zip(r.layers, r.stds, r.ranks(), strict=True)
        where = getattr(r, key) or ""
        lines += [
            f"{r.label},{where},{i},{n},{std:.6g},{rank}"
            for i, (n, std, rank) in enumerate(rows, 1)
        ]
    return "\n".join(lines) + "\n"


def log_combined_layer_responses(
    client: Any,
    run_id: str,
    results: Sequence[LayerResponses],
    *,
    title: str = "Standard deviations of layer responses",
) -> None:
    """Several nets on one Fig. 7 (plain dashed, residual solid; labels as the paper's legend),
    logged to `run_id` (a study's parent run) as `plots/layer_responses.png`, with
    `layer_responses.csv` holding every series (`label,run_id,index,layer,std,rank`)."""
    if not results:
        raise LayerResponsesError("log_combined_layer_responses: no results")
    labels = [r.label for r in results]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise LayerResponsesError(
            f"log_combined_layer_responses: several results are labelled {dupes} (one per net: "
            "average seeds first, or draw them on separate figures)"
        )
    client.log_text(run_id, _series_csv(results, "run_id"), CSV_ARTIFACT)
    _log_figure(client, run_id, results, title)


# ============================================================================================
# the command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.paper.layer_responses",
        description="The paper's Fig. 7 for a training run: the std of each 3x3 layer's "
        "response (after BN, before ReLU/addition) on validation images; printed, and logged "
        f"to the run ({CSV_ARTIFACT}, {PLOT_ARTIFACT}, metrics responses/*).",
    )
    p.add_argument("--run", metavar="RUN_ID", help="MLflow run id of a training job")
    p.add_argument(
        "--checkpoint-url",
        dest="checkpoint_urls",
        action="append",
        metavar="URL",
        help="instead of --run, without MLflow: a committed checkpoint (.../checkpoints/step-N) "
        "or a job's .../checkpoints folder (--checkpoint chooses); repeatable, one figure",
    )
    p.add_argument(
        "--output-dir",
        metavar="DIR",
        help=f"with --checkpoint-url: write {CSV_ARTIFACT} and {PLOT_ARTIFACT} here",
    )
    p.add_argument(
        "--checkpoint",
        type=which_arg,
        metavar="best|last",
        default="last",
        help="the run's best committed checkpoint (by checkpoint.best_metric) or its last "
        "(default)",
    )
    p.add_argument(
        "--images",
        type=int,
        default=DEFAULT_IMAGES,
        metavar="N",
        help=f"the first N validation images (default {DEFAULT_IMAGES})",
    )
    p.add_argument("--batch-size", type=int, default=100, help="images per forward pass")
    p.add_argument("--data-url", help="measure on this dataset instead of the run's own")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda where present)")
    p.add_argument("--no-log", action="store_true", help="print only; log nothing to the run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: prints the table; exit code 2, with the reason, on bad input."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    from orchestrator.storage import check_url
    from orchestrator.tracking.uri import tracking_client

    if args.data_url:
        check_url(args.data_url, "--data-url", write=False)
    options = {"data_url": args.data_url, "batch_size": args.batch_size, "device": args.device}
    if bool(args.run) == bool(args.checkpoint_urls):
        raise LayerResponsesError("name a training run (--run RUN_ID) or --checkpoint-url URL")
    if args.checkpoint_urls:
        _urls_main(args, options)
        return
    if args.output_dir:
        raise LayerResponsesError("--output-dir goes with --checkpoint-url (--run logs to it)")
    client = tracking_client("python -m orchestrator.paper.layer_responses --run")
    responses = responses_for_run(client, args.run, args.checkpoint, args.images, **options)
    print(responses.table())
    if not args.no_log:
        log_layer_responses(client, args.run, responses)
        print(f"logged {CSV_ARTIFACT} and {PLOT_ARTIFACT} to run {args.run}")


def _urls_main(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """--checkpoint-url: measured, printed, and written to --output-dir; MLflow is not used."""
    results = [
        responses_for_checkpoint(url, args.checkpoint, args.images, **options)
        for url in args.checkpoint_urls
    ]
    for r in results:
        print(r.table())
    if not args.output_dir:
        print("not logged to MLflow (a checkpoint URL has no run): printed only (--output-dir DIR)")
        return
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CSV_ARTIFACT).write_text(_series_csv(results, "checkpoint_url"))
    print(f"not logged to MLflow (a checkpoint URL has no run): wrote {out / CSV_ARTIFACT}")
    from orchestrator.paper import plots

    if not plots.available():
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", PLOT_ARTIFACT)
        return
    labels = [r.label for r in results]  # the legend; two nets of one depth: numbered as given
    keys = [x if labels.count(x) == 1 else f"{x} ({i})" for i, x in enumerate(labels, 1)]
    series = {k: r.stds for k, r in zip(keys, results)}
    plain = {k for k, r in zip(keys, results) if not r.residual}
    title = f"Std of layer responses ({results[0].images} images)"
    print(f"wrote {plots.plot_layer_responses(series, out / PLOT_ARTIFACT, plain, title=title)}")


if __name__ == "__main__":
    raise SystemExit(main())
