"""Checkpoints on S3 (or a local folder) that count only once committed.

Layout under `{checkpoint.storage}/{job name}/checkpoints/`:

    step-00001000/trainer.pt      replicated state, written by rank 0 (model, optimizer, data
                                  position, ...)
    step-00001000/rank-00000.pt   per-rank state, written by every rank (RNG)
    step-00001000/shards/...      per-rank strategy shards (DeepSpeed ZeRO), every rank
    step-00001000/COMMITTED       written last by rank 0, after a barrier: lists every file
                                  with its size, so a missing or truncated file is detected;
                                  also the metrics and the data position (JSON, torch-free)
    step-00001000/PINNED          optional, after the commit: an MLflow model version reads its
                                  weights here (orchestrator.publish), so retention keeps it

Uploads run in the background (the loop pays only for serialising the state in memory); a step
is committed when the next checkpoint is taken, or at the end of the run, after every rank's
upload for it has finished.

`Checkpointer` is what the training loop calls (`save`, `commit`, `restore`); `CheckpointStore`
is the layout above on any storage (orchestrator.storage), used also by the ensemble evaluator.

Loading walks the checkpoints newest first and takes the first whose marker exists and whose
files all match it; anything else is skipped with a warning. Saving never overwrites a
committed checkpoint: a step is written once, and retention deletes old steps only after a
newer one is committed.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.runtime import barrier
from orchestrator.spec import CheckpointConfig
from orchestrator.storage import open_storage

# torch and numpy are imported where state is (de)serialised: the driver's pre-flight reads
# the commit markers (JSON) through CheckpointStore without them.

log = logging.getLogger(__name__)
MARKER = "COMMITTED"
PIN = "PINNED"  # a registered model reads this step's weights: retention never deletes it


def to_bytes(obj: Any) -> bytes:
    """torch.save into memory: a snapshot that later training steps cannot change."""
    import torch

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
    # where the data stream stood (Trainer.data_position); empty in markers older than it
    position: dict[str, Any] = field(default_factory=dict)
    pinned: bool = False  # a registered model version reads it (PIN): retention keeps it


class CheckpointStore:
    """Save and find committed checkpoints of one job."""

    def __init__(self, root: str) -> None:
        self.storage = open_storage(root)

    @property
    def root(self) -> str:
        return self.storage.root

    # ---- saving: every rank puts its files, then rank 0 commits
    def write(self, step: int, name: str, obj: Any) -> None:
        self.put(step, name, to_bytes(obj))

    def put(self, step: int, name: str, data: bytes) -> None:
        self.storage.put(f"{_step_dir(step)}/{name}", data)

    def write_dir(self, step: int, local: Path, prefix: str) -> None:
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local)
            self.storage.put(f"{_step_dir(step)}/{prefix}/{rel.as_posix()}", path.read_bytes())

    def commit(
        self, step: int, metrics: dict[str, float], position: dict[str, Any] | None = None
    ) -> str:
        """Rank 0, after every rank's files are written: the marker makes the step count. It
        holds the data position too, so a driver can check a resume without torch."""
        files = self.storage.sizes(_step_dir(step))
        files.pop(MARKER, None)
        marker = {"step": step, "files": files, "metrics": metrics, "position": position or {}}
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
            problem, marker, sizes = self._check(name)
            if problem:
                broken.append((int(m.group(1)), name, problem))
            else:
                metrics = marker.get("metrics", {})
                url, position = self.storage.url(name), marker.get("position") or {}
                out.append(Committed(int(m.group(1)), url, metrics, position, PIN in sizes))
        newest = max((c.step for c in out), default=-1)
        for step, name, problem in broken:
            if step > newest:  # older debris is a retention delete or crash already superseded
                log.warning("skipping checkpoint %s: %s", self.storage.url(name), problem)
        return sorted(out, key=lambda c: c.step)

    def _check(self, name: str) -> tuple[str | None, dict[str, Any], dict[str, int]]:
        sizes = self.storage.sizes(name)
        if MARKER not in sizes:
            return "no commit marker (an interrupted save)", {}, sizes
        marker = json.loads(self.storage.get(f"{name}/{MARKER}"))
        for rel, size in marker["files"].items():
            if sizes.get(rel) != size:
                problem = f"{rel} is missing or truncated ({sizes.get(rel)} of {size} bytes)"
                return problem, marker, sizes
        return None, marker, sizes

    def pin(self, step: int, why: dict[str, Any]) -> None:
        """Keep committed step `step` for good (retention skips it): a registered model reads
        its weights. `why` (who pinned it) is written into the pin, for whoever cleans up."""
        self.storage.put(f"{_step_dir(step)}/{PIN}", json.dumps(why, indent=1).encode())

    def read_bytes(self, step: int, name: str) -> bytes:
        """A checkpoint file's bytes as stored (to hash them, or torch.load them later)."""
        return self.storage.get(f"{_step_dir(step)}/{name}")

    def latest(self) -> Committed | None:
        found = self.committed()
        return found[-1] if found else None

    def find(self, step: int) -> Committed | None:
        """The committed checkpoint at `step`, or None (missing, uncommitted or broken)."""
        return next((c for c in self.committed() if c.step == step), None)

    def read(self, step: int, name: str) -> Any:
        import torch

        return torch.load(
            io.BytesIO(self.storage.get(f"{_step_dir(step)}/{name}")),
            map_location="cpu",
            weights_only=False,
        )

    def fetch_dir(self, step: int, prefix: str) -> Path:
        """Download a sub-folder of a checkpoint (DeepSpeed shards) to a local temp folder."""
        local = Path(tempfile.mkdtemp(prefix="ckpt-"))
        for rel in self.storage.sizes(f"{_step_dir(step)}/{prefix}"):
            dest = local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.storage.get(f"{_step_dir(step)}/{prefix}/{rel}"))
        return local

    def retain(self, keep_last: int, best_metric: str) -> None:
        """Delete all but the newest `keep_last`, the best by `best_metric` (lower wins) and
        the pinned ones (registered model versions read them)."""
        found = self.committed()
        keep = {c.step for c in found[-keep_last:]} if keep_last > 0 else set()
        keep |= {c.step for c in found if c.pinned}
        best = best_checkpoint(found, best_metric)
        if best is not None:
            keep.add(best.step)
        for c in found:
            if c.step not in keep:
                self.storage.delete_prefix(_step_dir(c.step))
        # uncommitted leftovers older than the newest commit are debris from crashes
        newest = found[-1].step if found else -1
        for name in self.storage.list_dirs():
            m = re.fullmatch(r"step-(\d+)", name)
            if m and int(m.group(1)) < newest and int(m.group(1)) not in {c.step for c in found}:
                self.storage.delete_prefix(name)


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
        raise ValueError(
            f"--resume-from {url!r}: expected a checkpoint folder ending in /step-NNNNNNNN"
        )
    return m.group(1), int(m.group(2))


# ------------------------------------------------------------------ what the training loop calls


def rng_state() -> dict[str, Any]:
    """Every random stream of this process, to resume augmentation and shuffling exactly."""
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Restored:
    """A committed checkpoint read back for one rank."""

    step: int
    root: str
    trainer: dict[str, Any]  # the replicated state rank 0 wrote (Trainer.state_dict)
    rank: dict[str, Any] | None  # this rank's own state; None after a change of world size


class Checkpointer:
    """Saves and restores one job's checkpoints for one rank (torchtitan's CheckpointManager
    is the model): `save` snapshots the state and uploads it in the background, `commit`
    makes the last save count once every rank's upload is done, `restore` reads the newest
    committed checkpoint (or `checkpoint.resume_from`'s, for a fork)."""

    def __init__(self, cfg: CheckpointConfig, root: str, rank: int) -> None:
        """`root`: the job's checkpoint folder (orchestrator.checkpoint_refs says where)."""
        self.cfg, self.rank = cfg, rank
        self.store = CheckpointStore(root)
        self.saved_step = -1  # the step of the last save (committed or pending)
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: tuple[int, dict[str, float], dict[str, Any], Future] | None = None

    def save(
        self,
        step: int,
        states: dict[str, Any],
        write_shards: Callable[[Path], None],
        metrics: dict[str, float],
        position: dict[str, Any] | None = None,
    ) -> float:
        """Snapshot this rank's `states` (file name -> object) and the strategy's shards, and
        upload them in the background; returns the stall (s) training paid. The previous save
        is committed first; this one is committed at the next save or at `commit()`, its
        marker holding `metrics` and the data `position`."""
        t0 = time.perf_counter()
        self.commit()
        files = {name: to_bytes(obj) for name, obj in states.items()}  # later steps can't alter it
        shards = Path(tempfile.mkdtemp(prefix="shards-"))
        write_shards(shards)  # collective for DeepSpeed; local files
        upload = self._uploader.submit(self._upload, step, files, shards)
        self._pending = (step, dict(metrics), dict(position or {}), upload)
        self.saved_step = step
        return time.perf_counter() - t0

    def _upload(self, step: int, files: dict[str, bytes], shards: Path) -> None:
        try:
            for name, data in files.items():
                self.store.put(step, name, data)
            self.store.write_dir(step, shards, "shards")
        finally:
            shutil.rmtree(shards, ignore_errors=True)

    def commit(self) -> None:
        """Wait for this rank's upload; rank 0 writes the marker once every rank is done."""
        if self._pending is None:
            return
        step, metrics, position, upload = self._pending
        self._pending = None
        upload.result()  # an upload that failed for good raises here, before any marker
        barrier()  # every rank's files exist before the marker says so
        if self.rank == 0:
            self.store.commit(step, metrics, position)
            self.store.retain(self.cfg.keep_last, self.cfg.best_metric)
        barrier()

    def restore(
        self, load: Callable[[dict[str, Any]], None], load_shards: Callable[[Path], None]
    ) -> Restored | None:
        """Load the latest committed checkpoint of this job, else `resume_from`'s (a fork: only
        until the job has one of its own); None if there is neither. `load` gets the replicated
        state, then `load_shards` the strategy's shards as a local folder (deleted after)."""
        fork = split_checkpoint_url(self.cfg.resume_from) if self.cfg.resume_from else None
        store, latest = self.store, self.store.latest()
        if latest is not None:
            step = latest.step
        elif fork is not None:
            store, step = CheckpointStore(fork[0]), fork[1]
        else:
            return None
        trainer = store.read(step, "trainer.pt")
        load(trainer)
        shards = store.fetch_dir(step, "shards")
        try:
            load_shards(shards)
        finally:
            shutil.rmtree(shards, ignore_errors=True)
        try:
            rank = store.read(step, f"rank-{self.rank:05d}.pt")
        except FileNotFoundError:  # a different world size: the data position still resumes
            rank = None
        self.saved_step = step
        return Restored(step, store.root, trainer, rank)
