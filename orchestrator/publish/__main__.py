"""python -m orchestrator.publish: register a finished run's checkpoint as an MLflow model, or
export a net's weights for torchvision.

    python -m orchestrator.publish --run ID [--checkpoint best|last] [--copy-weights]
    python -m orchestrator.publish --checkpoint-url s3://.../step-NNNNNNNN --name NAME [--run ID]
    python -m orchestrator.publish --model NAME@best --torchvision resnet50.pth
    python -m orchestrator.publish --run ID --checkpoint best --torchvision resnet50.pth

Exit code 2, with the reason, on bad input (no such run, no committed checkpoint, a net that
has no torchvision equivalent).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.checkpoint_refs import which_arg
from orchestrator.cli import run_cli
from orchestrator.errors import UsageError
from orchestrator.publish.register import publish_checkpoint, read_checkpoint
from orchestrator.publish.torchvision_export import export_torchvision
from orchestrator.storage import check_url
from orchestrator.tracking.redaction import scrub
from orchestrator.tracking.uri import tracking_client

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.publish",
        description="Log a committed checkpoint as an MLflow model and register it under the "
        "job's name (aliases best/last), or export its weights for torchvision.",
    )
    src = p.add_argument_group("which checkpoint (one of)")
    src.add_argument("--run", help="MLflow run id of a training job")
    src.add_argument("--model", help="a registered version, NAME@ALIAS or NAME/VERSION")
    src.add_argument("--checkpoint-url", help=".../checkpoints/step-NNNNNNNN (with --name)")
    p.add_argument(
        "--checkpoint",
        type=which_arg,
        metavar="best|last",
        default="best",
        help="with --run: the best committed step (by checkpoint.best_metric, alias best) or "
        "the newest (alias last; 'latest' is refused: MLflow reserves it)",
    )
    p.add_argument("--name", help="registered model name (default: the run's job name)")
    p.add_argument(
        "--alias", action="append", help="aliases to set (default: the --checkpoint choice)"
    )
    p.add_argument(
        "--copy-weights",
        action="store_true",
        help="copy the weights into MLflow's artifact store (default: read from the checkpoint)",
    )
    p.add_argument("--torchvision", type=Path, help="write torchvision weights here instead")
    return p


def _run_checkpoint(client: Any, run_id: str, which: str) -> tuple[str, str, str]:
    """(checkpoint URL, job name, best metric) of a training run's best or last step."""
    from orchestrator.checkpoint_refs import run_checkpoint

    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise UsageError(f"run {run_id}: not found in MLflow: {scrub(err)[:300]}") from err
    found = run_checkpoint(run, which)  # a CheckpointRefError is a UsageError: exit 2
    return found.url, found.job, found.metric


def _model_checkpoint(client: Any, ref: str) -> str:
    """The committed checkpoint URL of registered version `ref` (NAME@ALIAS or NAME/VERSION)."""
    from orchestrator.checkpoint_refs import version_checkpoint

    return version_checkpoint(client, ref).url


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; prints what it did as JSON on the last line."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)  # before importing MLflow: --help answers at once
    # --run names the checkpoint, or (beside --checkpoint-url) only the run to log the model to
    given = [
        bool(args.model),
        bool(args.checkpoint_url),
        bool(args.run and not args.checkpoint_url),
    ]
    if sum(given) != 1:
        raise UsageError("give one of --run, --model or --checkpoint-url")
    if args.checkpoint_url:  # read through the checkpoint store: a folder or s3://, no http
        check_url(args.checkpoint_url, "--checkpoint-url", write=False, http=False)
    client = None  # a URL exported for torchvision needs no MLflow
    if not (args.checkpoint_url and args.torchvision):
        client = tracking_client("python -m orchestrator.publish")
    metric = ""
    if args.checkpoint_url:
        url, job = args.checkpoint_url, args.name
        if not job:
            raise UsageError("--checkpoint-url needs --name (the registered model's name)")
    elif args.model:
        url, job = _model_checkpoint(client, args.model), args.name
    else:
        url, job, metric = _run_checkpoint(client, args.run, args.checkpoint)
        job = args.name or job
    if args.torchvision:
        ck = read_checkpoint(url)
        out = export_torchvision(ck.model, ck.weights, args.torchvision)
        print(json.dumps({"torchvision": str(out), "model": ck.model, "checkpoint_url": ck.url}))
        return 0
    if not job:
        raise UsageError("--model needs --name to register again (or use --torchvision)")
    from orchestrator.tracking.tags import JOB_TAG

    published = publish_checkpoint(
        client,
        url,
        job,
        run_id=args.run,
        aliases=args.alias or [args.checkpoint],  # the word is the registered alias
        copy_weights=args.copy_weights,
        tags={JOB_TAG: job},
        metric=metric,
    )
    print(
        json.dumps(
            {
                "model": job,
                "version": published.version.version,
                "aliases": published.aliases,
                "model_uri": published.model_uri,
                "checkpoint_url": published.checkpoint_url,
                "weights": published.weights,
                "seconds": round(published.seconds, 2),
                "artifact_bytes": published.artifact_bytes,
                "reused": published.reused,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
