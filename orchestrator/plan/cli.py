"""The command line: `python -m orchestrator.plan JOB --nodes N [overrides] [flags]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from orchestrator.plan.job import (
    PlanError,
    count_model_parameters,
    load_job_spec,
    resolve_for_cluster,
)
from orchestrator.plan.report import (
    DEFAULT_KB_PER_IMAGE,
    DEFAULT_STORAGE_GBPS,
    IMAGENET_TRAIN_IMAGES,
    ClusterInputs,
    compute,
    format_table,
    notes,
    plan_rows,
)


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
        description="What a job asks of a cluster: batch, all-reduce, object-store reads, shards, "
        "checkpoints, time to train. Formulas: orchestrator/plan/__init__.py and "
        "docs/operators-guide.md; measured figures: docs/performance-anchors.md.",
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
    parser.add_argument(
        "--img-per-s-per-gpu",
        type=_number(float, 1e-9),
        help="training images/s one GPU sustains (default: the model's anchor, "
        "docs/performance-anchors.md)",
    )
    parser.add_argument(
        "--interconnect-gbps",
        type=_number(float, 1e-9),
        help="network bandwidth per GPU for the all-reduce, Gbit/s "
        "(p5.48xlarge: 3200 per node with EFA = 400 per GPU)",
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
    args = parse_args(sys.argv[1:] if argv is None else argv)
    inputs = ClusterInputs(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        img_per_s_per_gpu=args.img_per_s_per_gpu,
        interconnect_gbps=args.interconnect_gbps,
        storage_gbps=args.storage_gbps,
        kb_per_image=args.kb_per_image,
        train_images=args.train_images,
    )
    try:
        base = load_job_spec(args.job)
        resolved = resolve_for_cluster(
            base, list(args.overrides), inputs.nodes * inputs.gpus_per_node
        )
        numbers = compute(resolved, count_model_parameters(resolved.spec), inputs)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(plan_rows(args.job, resolved, numbers, inputs)))
    print()
    for line in notes(args.job, resolved, numbers):
        print(f"note: {line}")
    return 0
