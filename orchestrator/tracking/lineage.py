"""Where a training run came from, as its MLflow run records it: the code's git commit and the
dataset (its manifest as the run's input dataset: digest = the manifest's sha256, source = the
dataset URL without credentials)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
from pathlib import Path
from typing import Any

from orchestrator.spec import DataConfig
from orchestrator.tracking.redaction import has_credentials, scrub
from orchestrator.tracking.tags import DATA_CONTEXT_TAG

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent


def git_commit(path: Path = PACKAGE_DIR) -> str | None:
    """The commit checked out where the orchestrator's code lives; None outside a git work tree."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """The dataset's identity: the same hash the loop records in its checkpoints."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def read_manifest(url: str) -> dict[str, Any] | None:
    """The dataset's manifest, or None (with a warning) where it cannot be read. A URL with
    credentials in it is not read: they belong in AWS_* variables, not in a logged URL."""
    if has_credentials(url):
        log.warning(
            "data.url carries credentials (pass them as AWS_* variables): manifest not read"
        )
        return None
    try:
        from orchestrator.data import load_manifest

        return load_manifest(url)
    except Exception as err:  # noqa: BLE001
        log.warning("could not read the manifest of dataset %s: %s", scrub(url), scrub(err)[:500])
        return None


def dataset_input(data: DataConfig, digest: str | None, manifest: dict[str, Any] | None) -> Any:
    """The dataset of a run whose spec's data section is `data`, as an MLflow DatasetInput, or
    None (synthetic data, no manifest, no digest). `digest`: the manifest hash the loop
    recorded; `manifest`: the one it read (None: read it here)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    if data.synthetic:
        return None
    url = data.url
    if manifest is None:
        manifest = read_manifest(url)
    profile: dict[str, Any] = {}
    if manifest is not None:
        full = manifest_sha256(manifest)
        if digest and digest != full:
            log.warning("dataset %s: manifest changed since the job started", scrub(url))
        digest = full
        splits = {
            split: {"samples": info.get("samples"), "shards": len(info.get("shards", []))}
            for split, info in manifest.get("splits", {}).items()
        }
        profile = {
            "manifest_sha256": full,
            "num_classes": manifest.get("num_classes"),
            "created": manifest.get("created"),
            "splits": splits,
        }
    if not digest:
        return None
    name = (manifest or {}).get("name") or url.rstrip("/").rsplit("/", 1)[-1]
    if url.startswith("s3://"):
        source_type = "s3"
    else:
        source_type = "http" if url.startswith("http") else "local"
    dataset = Dataset(
        name=scrub(name)[:500],
        digest=digest[:36],  # MLflow's digest column holds 36
        source_type=source_type,
        source=json.dumps({"uri": scrub(url)}),
        profile=json.dumps(profile) if profile else None,
    )
    return DatasetInput(dataset, tags=[InputTag(DATA_CONTEXT_TAG, "train")])
