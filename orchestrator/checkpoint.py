"""Checkpoints on S3 (or a local folder) that count only once committed.

Layout under `{checkpoint.storage}/{job name}/checkpoints/`:

    step-00001000/trainer.pt      replicated state, written by rank 0 (model, optimizer, data
                                  position, ...)
    step-00001000/rank-00000.pt   per-rank state, written by every rank (RNG)
    step-00001000/shards/...      per-rank strategy shards (DeepSpeed ZeRO), every rank
    step-00001000/SHA256-rank-00000.json  every rank, after its files: its shards' sha256
    step-00001000/COMMITTED       written last by rank 0, after a barrier: lists every file
                                  with its size, so a missing or truncated file is detected,
                                  and the shards' sha256 (from the ranks' SHA256 files), so a
                                  replaced shard is; also the metrics measured at that step
                                  and the data position, and the job's resolved spec
                                  (JSON: the pre-flight compares a resubmission with it,
                                  orchestrator.resume_changes)
    step-00001000/PINNED          optional, after the commit: an MLflow model version reads its
                                  weights here (orchestrator.publish), so retention keeps it
    step-00001000/READERS/...     a reader's lease (publish, an ensemble, --resume-from, Fig. 7)
                                  while it reads the step: retention keeps it meanwhile

Uploads run in the background (the loop pays only for serialising the state in memory); a step
is committed when the next checkpoint is taken, or at the end of the run, after every rank's
upload for it has finished.

`Checkpointer` is what the training loop calls (`save`, `commit`, `restore`); `CheckpointStore`
is the layout above on any storage (orchestrator.storage), used also by the ensemble evaluator.

Loading walks the checkpoints newest first and takes the first whose marker exists and whose
files all match it; anything else is skipped with a warning. Saving never overwrites a
committed checkpoint: a step is written once, and retention deletes old steps only after a
newer one is committed, never a pinned one or one a reader holds a lease on.

Stored state is loaded as data: every .pt file holds tensors, numbers, strings and containers
only (RNG states as tensors), and `load_state` reads it with torch's `weights_only=True`, which
refuses anything else (`UnsafeCheckpointError`, naming the file) before any of it runs. The
one exception is DeepSpeed's `shards/`: DeepSpeed's own `load_checkpoint` unpickles them in
full (`weights_only=False`), so `fetch_dir` first checks every shard against the sha256 its
commit marker recorded and refuses one that changed or has none.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.runtime import barrier
from orchestrator.spec import CheckpointConfig
from orchestrator.storage import NotFound, open_storage

# torch and numpy are imported where state is (de)serialised: the driver's pre-flight reads
# the commit markers (JSON) through CheckpointStore without them.

log = logging.getLogger(__name__)
MARKER = "COMMITTED"
PIN = "PINNED"  # a registered model reads this step's weights: retention never deletes it
LEASES = "READERS"  # a folder in a step: one file per reader holding the step
# a lease older than this is a reader that died without releasing it: retention ignores it,
# loudly. Measured against the lease writer's clock: a skew of minutes does not matter here.
LEASE_STALE_S = 24 * 3600.0
_WARNED: set[str] = set()  # stale leases already said, once per process
DIGESTS = re.compile(r"SHA256-rank-\d+\.json")  # a rank's sha256 of its files of the step


class UnsafeCheckpointError(UsageError, RuntimeError):
    """A stored file that is not plain data (it would run code if unpickled), or a file that
    is loaded with full pickle and changed since it was committed: refused, never loaded."""


def load_state(data: bytes, what: str) -> Any:
    """torch.load of stored bytes as data only (`weights_only=True`: tensors, numbers, strings,
    containers); anything else is refused before it runs, naming `what` (the file)."""
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(
            r"(WeightsUnpickler error: [^\n]*|Trying to [^\n]*|Unsupported [^\n]*)", str(err)
        )
        raise UnsafeCheckpointError(
            f"{what}: refused to load: it holds more than tensors, numbers, strings and "
            f"containers ({found.group(0) if found else 'not plain data'}), so unpickling it "
            "could run code. Files this project writes never do: it was replaced, or written by "
            "a release older than the weights-only format; delete that step (or restore the "
            "file) and resume from another"
        ) from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    readers: tuple[str, ...] = ()  # live leases (LEASES/...): a reader holds it, keep it
    sha256: dict[str, str] = field(default_factory=dict)  # file -> digest recorded at commit
    spec: dict[str, Any] | None = None  # the job's resolved spec; None in markers older than it


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

    def write_dir(self, step: int, local: Path, prefix: str) -> dict[str, str]:
        """Upload a local folder under `prefix`; returns each file's sha256 by its name."""
        digests = {}
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = f"{prefix}/{path.relative_to(local).as_posix()}"
            data = path.read_bytes()
            self.storage.put(f"{_step_dir(step)}/{rel}", data)
            digests[rel] = sha256_hex(data)
        return digests

    def write_digests(self, step: int, rank: int, digests: Mapping[str, str]) -> None:
        """A rank's sha256 of the files it wrote, for the commit marker (after the files)."""
        self.put(step, f"SHA256-rank-{rank:05d}.json", json.dumps(dict(digests)).encode())

    def commit(
        self,
        step: int,
        metrics: dict[str, float],
        position: dict[str, Any] | None = None,
        spec: Mapping[str, Any] | None = None,
    ) -> str:
        """Rank 0, after every rank's files are written: the marker makes the step count. It
        holds the data position and the job's resolved `spec` too (JSON), so a driver checks a
        resume without torch, and the ranks' sha256 of their files (SHA256-rank-*.json),
        checked before a full unpickle."""
        files = self.storage.sizes(_step_dir(step))
        files.pop(MARKER, None)
        digests: dict[str, str] = {}
        names = [f"{_step_dir(step)}/{name}" for name in files if DIGESTS.fullmatch(name)]
        with ThreadPoolExecutor(max_workers=min(16, len(names) or 1)) as pool:  # one per rank
            for found in pool.map(self.storage.get, names):
                digests.update(json.loads(found))
        marker = {
            "step": step,
            "files": files,
            "sha256": digests,
            "metrics": metrics,
            "position": position or {},
        }
        if spec is not None:
            marker["spec"] = dict(spec)
        self.storage.put(f"{_step_dir(step)}/{MARKER}", json.dumps(marker).encode())
        return self.storage.url(_step_dir(step))

    # ---- finding
    def _steps(self) -> list[int]:
        """The step folders' steps, committed or not, oldest first."""
        found = (re.fullmatch(r"step-(\d+)", name) for name in self.storage.list_dirs())
        return sorted(int(m.group(1)) for m in found if m)

    def committed(self) -> list[Committed]:
        """Every valid committed checkpoint, oldest first; broken ones are skipped, loudly.
        Two listings (the folders, then every file at once) and the markers read side by side:
        on S3 a handful of requests' time, not two a step one after another."""
        steps = self._steps()
        listed: dict[int, dict[str, int]] = {step: {} for step in steps}
        for rel, size in self.storage.sizes().items():
            m = re.fullmatch(r"step-(\d+)/(.+)", rel)
            if m and int(m.group(1)) in listed:
                listed[int(m.group(1))][m.group(2)] = size
        with ThreadPoolExecutor(max_workers=min(16, len(steps) or 1)) as pool:
            checked = list(pool.map(lambda s: self._committed_at(s, listed[s]), steps))
        out = [found for _, found in checked if found is not None]
        newest = max((c.step for c in out), default=-1)
        for step, (problem, found) in zip(steps, checked, strict=True):
            if found is None and step > newest:  # older debris: a retention delete or a crash
                self._say_skipped(step, problem)
        return out

    def _say_skipped(self, step: int, problem: str) -> None:
        log.warning("skipping checkpoint %s: %s", self.storage.url(_step_dir(step)), problem)

    def _committed_at(
        self, step: int, sizes: Mapping[str, int] | None = None
    ) -> tuple[str, Committed | None]:
        """(why not, None) or ("", the committed checkpoint) of one step folder (its files'
        `sizes`, where already listed)."""
        name = _step_dir(step)
        if sizes is None:
            sizes = self.storage.sizes(name)
        if MARKER not in sizes:
            return "no commit marker (an interrupted save)", None
        marker = json.loads(self.storage.get(f"{name}/{MARKER}"))
        for rel, size in marker["files"].items():
            if sizes.get(rel) != size:
                return f"{rel} is missing or truncated ({sizes.get(rel)} of {size} bytes)", None
        return "", Committed(
            step,
            self.storage.url(name),
            marker.get("metrics", {}),
            marker.get("position") or {},
            PIN in sizes,
            self._live_leases(name, sizes),
            marker.get("sha256") or {},
            marker.get("spec"),
        )

    def _live_leases(self, name: str, sizes: Mapping[str, int]) -> tuple[str, ...]:
        """The readers' leases in step folder `name` (listed in `sizes`), stale ones said."""
        live = []
        for rel in sizes:
            m = re.fullmatch(rf"{LEASES}/(\d+)-[0-9a-f]+\.json", rel)
            if not m:
                continue
            if time.time() - int(m.group(1)) > LEASE_STALE_S:
                if self.storage.url(name, rel) in _WARNED:
                    continue
                _WARNED.add(self.storage.url(name, rel))
                log.warning(
                    "ignoring reader lease %s: older than %.0f h (a reader that died?); delete "
                    "it if so",
                    self.storage.url(name, rel),
                    LEASE_STALE_S / 3600,
                )
            else:
                live.append(rel)
        return tuple(live)

    def pin(self, step: int, why: dict[str, Any]) -> None:
        """Keep committed step `step` for good (retention skips it): a registered model reads
        its weights. `why` (who pinned it) is written into the pin, for whoever cleans up."""
        self.storage.put(f"{_step_dir(step)}/{PIN}", json.dumps(why, indent=1).encode())

    def unpin(self, step: int) -> None:
        """Undo `pin` (a publish that failed before any model version read the step)."""
        self.storage.delete(f"{_step_dir(step)}/{PIN}")

    def lease(self, step: int, who: str) -> str:
        """Hold committed step `step` while reading it: retention keeps a step with a live
        lease. Returns the lease's name, for `release`. NotFound where the step is not (or no
        longer) committed: the lease is written first, then the step checked, so retention
        either sees the lease or deleted the step before it was checked."""
        url = self.storage.url(_step_dir(step))
        gone = f"{url}: not a committed checkpoint (missing, broken, or deleted by retention)"
        if self._committed_at(step)[1] is None:  # no lease on a step that is not there
            raise NotFound(gone)
        name = f"{LEASES}/{int(time.time())}-{uuid.uuid4().hex[:12]}.json"
        holder = {"who": who, "host": socket.gethostname(), "pid": os.getpid()}
        self.put(step, name, json.dumps(holder).encode())
        if self._committed_at(step)[1] is None:
            self.release(step, name)
            raise NotFound(gone)
        return name

    def release(self, step: int, lease: str) -> None:
        self.storage.delete(f"{_step_dir(step)}/{lease}")

    def lease_or_warn(self, step: int, who: str) -> str | None:
        """`lease`, or None where the storage refuses the write (a reader with read-only
        credentials may still read): said out loud, since retention could then delete it."""
        try:
            return self.lease(step, who)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever the store answered, the same
            log.warning(
                "%s: no reader's lease on %s (%s: %s): reading it unheld, so retention could "
                "delete it meanwhile; give this reader write access to the checkpoint storage",
                who,
                self.storage.url(_step_dir(step)),
                type(err).__name__,
                err,
            )
            return None

    @contextlib.contextmanager
    def reading(self, step: int, who: str) -> Iterator[None]:
        """`lease_or_warn` for the duration of a `with` block (`who` names the reader)."""
        lease = self.lease_or_warn(step, who)
        try:
            yield
        finally:
            if lease is not None:
                self.release(step, lease)

    def read_bytes(self, step: int, name: str) -> bytes:
        """A checkpoint file's bytes as stored (to hash them, or load_state them later)."""
        return self.storage.get(f"{_step_dir(step)}/{name}")

    def latest(self) -> Committed | None:
        """The newest valid committed checkpoint: the step folders newest first, up to the
        first valid one (a broken one newer than it is said, as `committed` says it)."""
        for step in reversed(self._steps()):
            problem, found = self._committed_at(step)
            if found is not None:
                return found
            self._say_skipped(step, problem)
        return None

    def find(self, step: int) -> Committed | None:
        """The committed checkpoint at `step`, or None (missing, uncommitted or broken)."""
        return self._committed_at(step)[1]

    def read(self, step: int, name: str) -> Any:
        """A .pt file of the step, loaded as data (`load_state`)."""
        return load_state(self.read_bytes(step, name), self.storage.url(_step_dir(step), name))

    def fetch_dir(self, step: int, prefix: str, sha256: Mapping[str, str] | None = None) -> Path:
        """Download a sub-folder of a checkpoint (DeepSpeed shards) to a local temp folder;
        given the marker's `sha256`, every file must match it (they are unpickled in full)."""
        local = Path(tempfile.mkdtemp(prefix="ckpt-"))
        try:
            for rel in self.storage.sizes(f"{_step_dir(step)}/{prefix}"):
                data = self.storage.get(f"{_step_dir(step)}/{prefix}/{rel}")
                if sha256 is not None:
                    self._check_digest(step, f"{prefix}/{rel}", data, sha256)
                dest = local / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        return local

    def _check_digest(self, step: int, rel: str, data: bytes, sha256: Mapping[str, str]) -> None:
        url = self.storage.url(_step_dir(step), rel)
        if rel not in sha256:
            raise UnsafeCheckpointError(
                f"{url}: refused to load: its commit marker records no sha256 for it (committed "
                "by an older release, or added since), and it is unpickled in full (DeepSpeed's "
                "load_checkpoint), which could run code; resume from a step committed by this "
                "release"
            )
        digest = sha256_hex(data)
        if digest != sha256[rel]:
            raise UnsafeCheckpointError(
                f"{url}: refused to load: sha256 {digest} is not the {sha256[rel]} recorded at "
                "commit (the file was replaced), and it is unpickled in full (DeepSpeed's "
                "load_checkpoint), which could run code; delete that step and resume from another"
            )

    def retain(self, keep_last: int, best_metric: str) -> None:
        """Delete all but the newest `keep_last`, the best by `best_metric` (lower wins), the
        pinned ones (registered model versions read them) and those a reader holds."""
        found = self.committed()
        keep = {c.step for c in found[-keep_last:]} if keep_last > 0 else set()
        keep |= {c.step for c in found if c.pinned or c.readers}
        best = best_checkpoint(found, best_metric)
        if best is not None:
            keep.add(best.step)
        for c in found:
            if c.step in keep:
                continue
            name = _step_dir(c.step)
            if self._live_leases(name, self.storage.sizes(name)):  # a reader came since
                continue
            self.storage.delete_prefix(name)
        # uncommitted leftovers older than the newest commit are debris from crashes
        newest = found[-1].step if found else -1
        for name in self.storage.list_dirs():
            m = re.fullmatch(r"step-(\d+)", name)
            if m and int(m.group(1)) < newest and int(m.group(1)) not in {c.step for c in found}:
                self.storage.delete_prefix(name)


def best_checkpoint(found: list[Committed], metric: str) -> Committed | None:
    """The committed checkpoint with the lowest `metric` in its marker; a tie goes to the older
    step (the one measured: a marker holds only the figures measured at its step, but older
    markers repeated the last validation's). None if no marker has the metric. Training's
    report, retention and the ensemble's `--checkpoint best` all choose through here."""
    scored = [c for c in found if metric in c.metrics]
    return min(scored, key=lambda c: (c.metrics[metric], c.step)) if scored else None


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
    """Every random stream of this process, to resume augmentation and shuffling exactly; as
    tensors, numbers and strings (python's and numpy's states are converted), so the rank's
    file loads as data."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": torch.tensor(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    import numpy as np
    import torch

    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
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

    def __init__(
        self, cfg: CheckpointConfig, root: str, rank: int, spec: Mapping[str, Any] | None = None
    ) -> None:
        """`root`: the job's checkpoint folder (orchestrator.checkpoint_refs says where);
        `spec`: the job's resolved spec (JobSpec.to_dict), recorded in every commit marker."""
        self.cfg, self.rank = cfg, rank
        self.spec = dict(spec) if spec is not None else None
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
            # digests of the shards only: the .pt files load as data, the shards in full; sha256
            # runs at ~1.1 GB/s a core here (0.4 s of CPU for a 483 MB ResNet-152 trainer.pt)
            digests = self.store.write_dir(step, shards, "shards")
            self.store.write_digests(step, self.rank, digests)  # last: after the files
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
            self.store.commit(step, metrics, position, self.spec)
            self.store.retain(self.cfg.keep_last, self.cfg.best_metric)
        barrier()

    def restore(
        self, load: Callable[[dict[str, Any]], None], load_shards: Callable[[Path], None]
    ) -> Restored | None:
        """Load the latest committed checkpoint of this job, else `resume_from`'s (a fork: only
        until the job has one of its own, held by a lease while it is read); None if there is
        neither. `load` gets the replicated state, then `load_shards` the strategy's shards as
        a local folder (deleted after), each checked against its sha256 first."""
        fork = split_checkpoint_url(self.cfg.resume_from) if self.cfg.resume_from else None
        store, latest = self.store, self.store.latest()
        if latest is not None:
            return self._restore_from(store, latest, load, load_shards)
        if fork is None:
            return None
        store = CheckpointStore(fork[0])
        with store.reading(fork[1], f"--resume-from of rank {self.rank} ({self.store.root})"):
            committed = store.find(fork[1])
            if committed is None:  # the lease holds it now; it went between the two checks
                raise NotFound(f"{self.cfg.resume_from}: not a committed checkpoint")
            return self._restore_from(store, committed, load, load_shards)

    def _restore_from(
        self,
        store: CheckpointStore,
        committed: Committed,
        load: Callable[[dict[str, Any]], None],
        load_shards: Callable[[Path], None],
    ) -> Restored:
        step = committed.step
        trainer = store.read(step, "trainer.pt")
        try:
            rank = store.read(step, f"rank-{self.rank:05d}.pt")
        except FileNotFoundError:  # a different world size: the data position still resumes
            rank = None
        shards = store.fetch_dir(step, "shards", committed.sha256)  # before anything is loaded
        try:
            load(trainer)
            load_shards(shards)
        finally:
            shutil.rmtree(shards, ignore_errors=True)
        self.saved_step = step
        return Restored(step, store.root, trainer, rank)
