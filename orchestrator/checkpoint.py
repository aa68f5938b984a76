"""Checkpoints on S3 (or a local folder) that count only once committed.

Layout under `{checkpoint.storage}/{job name}/checkpoints/`:

    step-00001000/trainer.pt      replicated state, written by rank 0 (model, optimizer, ...)
    step-00001000/rank-00000.pt   per-rank state, written by every rank (RNG, data position)
    step-00001000/shards/...      per-rank strategy shards (DeepSpeed ZeRO), every rank
    step-00001000/COMMITTED       written last by rank 0, after a barrier: lists every file
                                  with its size, so a missing or truncated file is detected

Uploads run in the background (the loop pays only for serialising the state in memory); a step
is committed when the next checkpoint is taken, or at the end of the run, after every rank's
upload for it has finished.

Loading walks the checkpoints newest first and takes the first whose marker exists and whose
files all match it; anything else is skipped with a warning. Saving never overwrites a
committed checkpoint: a step is written once, and retention deletes old steps only after a
newer one is committed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator import s3

log = logging.getLogger(__name__)
MARKER = "COMMITTED"


class Storage:
    """Just enough of an object store over s3:// URLs or a local folder."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.remote = s3.is_s3(root)

    def url(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def put(self, rel: str, data: bytes) -> None:
        if self.remote:
            s3.write_bytes(self.url(rel), data)
            return
        path = Path(self.url(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see half a file

    def get(self, rel: str) -> bytes:
        return s3.read_bytes(self.url(rel)) if self.remote else Path(self.url(rel)).read_bytes()

    def sizes(self, rel_prefix: str) -> dict[str, int]:
        """Relative path -> size for every object under a prefix."""
        if self.remote:
            bucket, key = s3.split_url(self.url(rel_prefix))
            out: dict[str, int] = {}
            pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/")
            for page in pages:
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(key) + 1 :]] = obj["Size"]
            return out
        base = Path(self.url(rel_prefix))
        if not base.exists():
            return {}
        return {str(p.relative_to(base)): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def list_dirs(self) -> list[str]:
        """Names of the immediate sub-folders of the root."""
        if self.remote:
            bucket, key = s3.split_url(self.root)
            pages = s3.client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=key + "/", Delimiter="/"
            )
            return [p["Prefix"][len(key) + 1 :].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]
        root = Path(self.root)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []

    def delete(self, rel_prefix: str) -> None:
        if self.remote:
            s3.delete_prefix(self.url(rel_prefix) + "/")
        else:
            shutil.rmtree(self.url(rel_prefix), ignore_errors=True)


def to_bytes(obj: Any) -> bytes:
    """torch.save into memory: a snapshot that later training steps cannot change."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _step_dir(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class Committed:
    step: int
    url: str
    metrics: dict[str, float]


class CheckpointStore:
    """Save and find committed checkpoints of one job."""

    def __init__(self, root: str) -> None:
        self.storage = Storage(root)

    @property
    def root(self) -> str:
        return self.storage.root

    # ---- saving: every rank calls write_rank (and rank 0 write_trainer), then rank 0 commits
    def write(self, step: int, name: str, obj: Any) -> None:
        self.put(step, name, to_bytes(obj))

    def put(self, step: int, name: str, data: bytes) -> None:
        self.storage.put(f"{_step_dir(step)}/{name}", data)

    def write_dir(self, step: int, local: Path, prefix: str) -> None:
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local)
            self.storage.put(f"{_step_dir(step)}/{prefix}/{rel}", path.read_bytes())

    def commit(self, step: int, metrics: dict[str, float]) -> str:
        """Rank 0, after every rank's files are written: the marker makes the step count."""
        files = self.storage.sizes(_step_dir(step))
        files.pop(MARKER, None)
        marker = {"step": step, "files": files, "metrics": metrics}
        self.storage.put(f"{_step_dir(step)}/{MARKER}", json.dumps(marker).encode())
        return self.storage.url(_step_dir(step))

    # ---- finding
    def committed(self) -> list[Committed]:
        """Every valid committed checkpoint, oldest first; broken ones are skipped, loudly."""
        out, broken = [], []
        for name in self.storage.list_dirs():
            m = re.fullmatch(r"step-(\d+)", name)
            if not m:
                continue
            problem, marker = self._check(name)
            if problem:
                broken.append((int(m.group(1)), name, problem))
            else:
                out.append(Committed(int(m.group(1)), self.storage.url(name), marker.get("metrics", {})))
        newest = max((c.step for c in out), default=-1)
        for step, name, problem in broken:
            if step > newest:  # older debris is a retention delete or crash already superseded
                log.warning("skipping checkpoint %s: %s", self.storage.url(name), problem)
        return sorted(out, key=lambda c: c.step)

    def _check(self, name: str) -> tuple[str | None, dict[str, Any]]:
        sizes = self.storage.sizes(name)
        if MARKER not in sizes:
            return "no commit marker (an interrupted save)", {}
        marker = json.loads(self.storage.get(f"{name}/{MARKER}"))
        for rel, size in marker["files"].items():
            if sizes.get(rel) != size:
                return f"{rel} is missing or truncated ({sizes.get(rel)} of {size} bytes)", marker
        return None, marker

    def latest(self) -> Committed | None:
        found = self.committed()
        return found[-1] if found else None

    def read(self, step: int, name: str) -> Any:
        return torch.load(io.BytesIO(self.storage.get(f"{_step_dir(step)}/{name}")), map_location="cpu", weights_only=False)

    def fetch_dir(self, step: int, prefix: str) -> Path:
        """Download a sub-folder of a checkpoint (DeepSpeed shards) to a local temp folder."""
        local = Path(tempfile.mkdtemp(prefix="ckpt-"))
        for rel in self.storage.sizes(f"{_step_dir(step)}/{prefix}"):
            dest = local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.storage.get(f"{_step_dir(step)}/{prefix}/{rel}"))
        return local

    def retain(self, keep_last: int, best_metric: str) -> None:
        """Delete all but the newest `keep_last` and the best by `best_metric` (lower wins)."""
        found = self.committed()
        keep = {c.step for c in found[-keep_last:]} if keep_last > 0 else set()
        best = best_checkpoint(found, best_metric)
        if best is not None:
            keep.add(best.step)
        for c in found:
            if c.step not in keep:
                self.storage.delete(_step_dir(c.step))
        # uncommitted leftovers older than the newest commit are debris from crashes
        newest = found[-1].step if found else -1
        for name in self.storage.list_dirs():
            m = re.fullmatch(r"step-(\d+)", name)
            if m and int(m.group(1)) < newest and int(m.group(1)) not in {c.step for c in found}:
                self.storage.delete(name)


def best_checkpoint(found: list[Committed], metric: str) -> Committed | None:
    """The committed checkpoint with the lowest `metric` in its marker; a tie goes to the newer
    step (it trained longer). None if no marker has the metric. Training's report, retention
    and the ensemble's `--checkpoint best` all choose through here, so they agree."""
    scored = [c for c in found if metric in c.metrics]
    return min(scored, key=lambda c: (c.metrics[metric], -c.step)) if scored else None


def split_checkpoint_url(url: str) -> tuple[str, int]:
    """`.../checkpoints/step-00001000` -> (store root, step), for --resume-from."""
    m = re.fullmatch(r"(.+)/step-(\d+)/?", url)
    if not m:
        raise ValueError(f"--resume-from {url!r}: expected a checkpoint folder ending in /step-NNNNNNNN")
    return m.group(1), int(m.group(2))
