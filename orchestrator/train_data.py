"""The trainer's data: a rank's loader, its ledger, and the position a checkpoint keeps.

The data order is a function of (dataset, seed, epoch, step), the global batch and the
canonical streams (orchestrator/data/epochs.py), never of this attempt's world size: a job
resumes any step exactly at any world size in its range.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from orchestrator.checkpoint_refs import spec_checkpoints_url
from orchestrator.data import TrainLoader
from orchestrator.data.epochs import check_layout, default_streams
from orchestrator.data.ledger import Ledger
from orchestrator.runtime import Runtime, all_reduce
from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)


def train_loader(spec: JobSpec, rt: Runtime) -> TrainLoader:
    """The rank's loader; the data order depends on the streams, never on this attempt's
    world size (data.streams=0: the most workers x the loader workers)."""
    streams = spec.data.streams or default_streams(spec.data.num_workers, spec.scaling.num_workers)
    return TrainLoader(
        spec.data,
        rank=rt.rank,
        world_size=rt.world_size,
        global_batch=spec.scaling.global_batch,
        streams=streams,
        seed=spec.seed,
        device=rt.device,
    )


def open_ledger(spec: JobSpec, rt: Runtime, loader: TrainLoader) -> Ledger:
    """data.ledger=true: this attempt's ledger (the attempt number is rank 0's clock)."""
    attempt = torch.tensor([time.time_ns() if rt.rank == 0 else 0], dtype=torch.int64)
    all_reduce(attempt)  # a sum: rank 0's number everywhere
    return Ledger(
        spec_checkpoints_url(spec),
        rt.rank,
        int(attempt.item()),
        split_size=loader.num_samples,
        epoch_mode=spec.data.epoch_mode,
        world_size=rt.world_size,
        steps_per_epoch=loader.batches_per_epoch,
    )


def data_position(
    spec: JobSpec, loader: TrainLoader, epoch: int, step_in_epoch: int, rt: Runtime
) -> dict[str, Any]:
    """Where the data stream stands and what its plan depends on: a mid-epoch resume is exact
    at any world size, with the same global batch, streams, shuffle buffer and seed."""
    d = spec.data
    return {
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "steps_per_epoch": loader.batches_per_epoch,
        "global_batch": spec.scaling.global_batch,
        "streams": loader.streams,
        "shuffle_buffer": d.shuffle_buffer,
        "seed": spec.seed,
        "epoch_mode": d.epoch_mode,
        "samples_per_epoch": d.samples_per_epoch,
        "source": "synthetic" if d.synthetic else "shards",
        "world_size": rt.world_size,  # for people: the plan does not depend on these
        "loader_workers": d.num_workers,
    }


def adopt_streams(spec: JobSpec, loader: TrainLoader, saved: dict[str, Any], rank: int) -> None:
    """data.streams=0 resolves from the most workers and the loader workers; a resubmission
    that changed either keeps the checkpoint's streams, so that its position stays exact."""
    was = saved.get("streams")
    if spec.data.streams or was is None or was == loader.streams:
        return
    if rank == 0:
        log.warning(
            "data.streams=0 now means %d, but the checkpoint's data order has %d streams: "
            "keeping %d so the resume is exact (set data.streams=%d to say so)",
            loader.streams, was, was, was,
        )  # fmt: skip
    loader.streams = int(was)
    if not spec.data.synthetic:  # every worker still needs a stream of its own
        d = spec.data
        check_layout(
            loader.num_samples, loader.global_batch, loader.streams, loader.world_size,
            d.epoch_mode, d.samples_per_epoch,
        )  # fmt: skip
