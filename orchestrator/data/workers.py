"""What both loaders' DataLoader workers share, and the training process's tally of them.

In a worker: `plan_samples` reads the worker's plan (orchestrator.data.epochs) shard by shard,
`decode_or_error` decodes a sample or logs why it cannot, `batch_tensor` allocates a batch in
shared memory, and `batch_info` describes the batch (samples seen, bad ones, bytes read) for
the training process. There, `Totals.add` sums those descriptions: once `bad_check_after`
samples have been seen, a rank whose bad fraction exceeds `max_bad_fraction` stops with a
`DataError` naming the shards. A worker that dies, or sends nothing for `timeout_s`, raises in
the training process (`dataloader`'s timeout): never a silent hang. Importing this module (both
loaders do) makes webdataset open s3:// URLs through our streams (`register_webdataset_handler`).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from orchestrator.data.epochs import WorkerPlan
from orchestrator.data.manifest import DataError, Shard
from orchestrator.data.streams import register_webdataset_handler
from orchestrator.data.tar import RawSample, read_segment
from orchestrator.spec import DataConfig

log = logging.getLogger(__name__)

register_webdataset_handler()  # here, with the loaders: webdataset imports torch


def plan_samples(
    plan: WorkerPlan, shards: Sequence[Shard], counter: list[int], cfg: DataConfig
) -> Iterator[RawSample | None]:
    """The worker's stream: one item per stream position, bytes only for positions emitted
    after `plan.skip` (None for the others). A segment that ends a shard checks its count and,
    with data.verify_shards, its sha256 against the manifest (orchestrator.data.tar)."""
    needed = np.zeros(len(plan.order), dtype=bool)
    needed[plan.order[plan.skip :]] = True
    base = 0  # stream position of the current segment's first sample
    for seg in plan.segments:

        def want(index: int, base: int = base, start: int = seg.start) -> bool:
            return bool(needed[base + index - start])

        shard = shards[seg.shard]
        yield from read_segment(
            seg,
            shard.url,
            want,
            counter,
            layout=shard.layout,
            retry_s=cfg.io_retry_s,
            samples=shard.samples,
            sha256=shard.sha256 if cfg.verify_shards else "",
        )
        base += seg.stop - seg.start


def decode_or_error(fn: Callable[[], np.ndarray], sample: RawSample) -> np.ndarray | None:
    """fn()'s pixels, or None with `sample.error` set (and logged) when the sample is bad."""
    if sample.error is None:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds for corrupt data
            sample.error = f"decode failed: {type(err).__name__}: {err}"
    if not sample.error.startswith(("unreadable", "shard holds")):  # truncation: logged per shard
        log.warning("bad sample %s in %s: %s", sample.key, sample.url, sample.error)
    return None


def batch_info(seen: int, bad: list[RawSample], nbytes: int) -> dict[str, Any]:
    """What a worker sends along with a batch, for `Totals.add`."""
    return {
        "seen": seen,
        "bad": len(bad),
        "bytes": nbytes,
        "bad_shards": sorted({s.url for s in bad}),
        "bad_examples": [f"{s.key} in {s.url}: {s.error}" for s in bad[:3]],
    }


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch tensor; in a DataLoader worker, allocated in shared memory at once.

    A tensor made in private memory is copied to shared memory when it is sent to the main
    process, and workers then kept the private pages: +2 MB of RSS per batch, measured. (The
    default collate function allocates in shared memory for the same reason.)
    """
    tensor = torch.empty(shape, dtype=dtype)
    return tensor.share_memory_() if get_worker_info() is not None else tensor


# a preemption notice is the training process's to act on (orchestrator.preemption): torchrun
# stops its ranks by process group, so a loader worker in the rank's group got the notice too,
# died of it and failed the rank before it could commit. In a group of its own it gets only
# what is sent to it by pid (the DataLoader's own shutdown, multiprocessing's exit), and still
# ends with its parent (torch's workers watch it). A worker leaves the group in its init, after
# torch's own start; a notice sent to the group before that (the next epoch's workers start
# near a step boundary) killed it, torch's SIGTERM handler taking any sender but the parent as
# fatal. So workers start with SIGTERM blocked, and unblock it once out of the group, dropping
# a notice that reached them there.
_BLOCKED_AT_START = {signal.SIGTERM}


def own_process_group(worker_id: int = 0) -> None:
    """A loader worker's start: leave the rank's process group (see above)."""
    os.setpgid(0, 0)
    if signal.SIGTERM in signal.sigpending():  # the rank's notice, sent to its group before
        signal.sigwait(_BLOCKED_AT_START)  # this worker left it: taken, so it does not act
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _BLOCKED_AT_START)


class _Loader(DataLoader):
    """A DataLoader whose workers start with SIGTERM blocked (see own_process_group)."""

    def __iter__(self) -> Any:
        if not self.num_workers:
            return super().__iter__()
        # this thread's mask, which the workers forked now inherit; a SIGTERM meanwhile waits
        # for the restore, or goes to another of this process's threads, as before
        before = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_AT_START)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


def dataloader(dataset: IterableDataset, cfg: DataConfig, workers: int | None = None) -> DataLoader:
    """The DataLoader over a dataset whose workers yield whole batches (`workers` of them,
    default data.num_workers)."""
    workers = cfg.num_workers if workers is None else workers
    return _Loader(
        dataset,
        batch_size=None,  # workers hand over whole batches
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        timeout=cfg.timeout_s if workers else 0,  # a dead or stuck worker: an error, not a hang
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=False,  # each epoch has its own plan
        worker_init_fn=own_process_group if workers else None,
    )


@dataclass
class Totals:
    """A loader's running sums of its workers' `batch_info`, and of its time waiting."""

    samples: int = 0
    bytes: int = 0
    seen: int = 0
    bad: int = 0
    batches: int = 0
    seconds: float = 0.0
    bad_shards: set[str] = field(default_factory=set)
    bad_examples: list[str] = field(default_factory=list)

    def add(self, cfg: DataConfig, info: dict[str, Any], n: int, what: str) -> None:
        """Count a batch of n samples; DataError once the bad fraction is over the limit."""
        self.samples += n
        self.batches += 1
        self.bytes += info["bytes"]
        self.seen += info["seen"]
        self.bad += info["bad"]
        self.bad_shards.update(info["bad_shards"])
        self.bad_examples.extend(info["bad_examples"][: max(0, 5 - len(self.bad_examples))])
        self._check(cfg, what)

    def add_bad(self, cfg: DataConfig, n: int, what: str) -> None:
        """Count n more bad samples among those already seen (found after the workers)."""
        self.bad += n
        self.bad_examples.extend([what] * min(n, max(0, 5 - len(self.bad_examples))))
        self._check(cfg, what)

    def _check(self, cfg: DataConfig, what: str) -> None:
        if self.seen >= cfg.bad_check_after and self.bad > cfg.max_bad_fraction * self.seen:
            raise DataError(
                f"{what}: {self.bad} of {self.seen} samples bad ({self.bad / self.seen:.1%} > "
                f"max_bad_fraction {cfg.max_bad_fraction:.1%}) in shards: "
                f"{', '.join(sorted(self.bad_shards))}"
                f"; e.g. {'; '.join(self.bad_examples)}"
            )

    def stats(self) -> dict[str, float]:
        """samples, batches, seconds, samples_per_s, bytes, bytes_per_s, bad_samples,
        bad_fraction."""
        secs = max(self.seconds, 1e-9)
        return {
            "samples": float(self.samples),
            "batches": float(self.batches),
            "seconds": self.seconds,
            "samples_per_s": self.samples / secs,
            "bytes": float(self.bytes),
            "bytes_per_s": self.bytes / secs,
            "bad_samples": float(self.bad),
            "bad_fraction": self.bad / self.seen if self.seen else 0.0,
        }
