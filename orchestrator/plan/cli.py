"""The command line: `python -m orchestrator.plan JOB --nodes N [overrides] [flags]`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace

from orchestrator.cli import run_cli
from orchestrator.plan.calibrate import read_run
from orchestrator.plan.job import (
    IMAGENET_TRAIN_IMAGES,
    count_model_parameters,
    load_job_spec,
    resolve_for_cluster,
)
from orchestrator.plan.numbers import (
    DEFAULT_INTERCONNECT_GBPS,
    DEFAULT_INTRA_NODE_GBPS,
    DEFAULT_KB_PER_IMAGE,
    DEFAULT_STORAGE_GBPS,
    GRAD_DTYPE_BYTES,
    ClusterInputs,
    compute,
)
from orchestrator.plan.report import format_table, notes, plan_rows


def _number(kind: type[int | float], minimum: float) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind`, at least `minimum`."""

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
        return value

    return convert


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.plan",
        description="What a job asks of a cluster: batch, communication, predicted step time and "
        "scaling efficiency, object-store reads, shards, checkpoints, time to train. Formulas: "
        "orchestrator/plan/__init__.py and docs/scaling-model.md; measured figures: "
        "docs/performance-anchors.md.",
    )
    parser.add_argument("job", help="a job file, e.g. jobs/imagenet_r152.py")
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value, as the job file takes them"
    )
    parser.add_argument(
        "--nodes", type=_number(int, 1), required=True, help="number of nodes (>= 1)"
    )
    parser.add_argument(
        "--gpus-per-node", type=_number(int, 1), default=8, help="GPUs per node (default 8)"
    )
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument(
        "--img-per-s-per-gpu",
        type=_number(float, 1e-9),
        help="training images/s one GPU computes, communication excluded (default: the model's "
        "anchor, docs/performance-anchors.md)",
    )
    rate.add_argument(
        "--from-run",
        metavar="RUN_ID",
        help="calibrate from a training run in MLflow (MLFLOW_TRACKING_URI): its "
        "system/images_per_s and system/step_time_s, communication taken out",
    )
    parser.add_argument(
        "--interconnect-gbps",
        type=_number(float, 1e-9),
        default=DEFAULT_INTERCONNECT_GBPS,
        help="network bandwidth per node between nodes, Gbit/s, all NICs together (default "
        f"{DEFAULT_INTERCONNECT_GBPS:g}: 8 x 400 Gbit/s, a p5.48xlarge's EFA or a DGX H100)",
    )
    parser.add_argument(
        "--intra-node-gbps",
        type=_number(float, 1e-9),
        default=DEFAULT_INTRA_NODE_GBPS,
        help="bandwidth per GPU inside a node, one direction, Gbit/s (default "
        f"{DEFAULT_INTRA_NODE_GBPS:g}: NVLink 4 on H100/H200 SXM, 900 GB/s both ways)",
    )
    parser.add_argument(
        "--grad-dtype",
        choices=sorted(GRAD_DTYPE_BYTES),
        help="dtype of the reduced gradients (default: what the job's strategy and precision "
        "reduce: fp32 under DDP, bf16 under DeepSpeed bf16)",
    )
    parser.add_argument(
        "--storage-gbps",
        type=_number(float, 1e-9),
        default=DEFAULT_STORAGE_GBPS,
        help="bandwidth for writing a checkpoint, Gbit/s "
        f"(default {DEFAULT_STORAGE_GBPS:g}, an assumption)",
    )
    parser.add_argument(
        "--kb-per-image",
        type=_number(float, 1e-9),
        default=DEFAULT_KB_PER_IMAGE,
        help=f"average stored image size, KB (default {DEFAULT_KB_PER_IMAGE:g}: an ImageNet JPEG)",
    )
    parser.add_argument(
        "--train-images",
        type=_number(int, 1),
        default=IMAGENET_TRAIN_IMAGES,
        help=f"images in the train split (default {IMAGENET_TRAIN_IMAGES:,}: ImageNet)",
    )
    # overrides may come before or after the flags
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line: prints the plan's table and notes; exit code 2, with the reason, on bad
    input (orchestrator.cli.run_cli)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    inputs = ClusterInputs(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        img_per_s_per_gpu=args.img_per_s_per_gpu,
        interconnect_gbps=args.interconnect_gbps,
        intra_node_gbps=args.intra_node_gbps,
        grad_dtype=args.grad_dtype,
        storage_gbps=args.storage_gbps,
        kb_per_image=args.kb_per_image,
        train_images=args.train_images,
    )
    if args.from_run:
        inputs = replace(inputs, from_run=read_run(args.from_run))
    base = load_job_spec(args.job)
    num_gpus = inputs.nodes * inputs.gpus_per_node
    resolved = resolve_for_cluster(base, list(args.overrides), num_gpus, inputs.train_images)
    numbers = compute(resolved, count_model_parameters(resolved.spec), inputs)
    print(format_table(plan_rows(args.job, resolved, numbers, inputs)))
    print()
    for line in notes(args.job, resolved, numbers, inputs):
        print(f"note: {line}")
    return 0
