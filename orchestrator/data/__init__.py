"""The input pipeline: WebDataset shards (local, http(s) or s3://) -> uint8 batches per rank.

    loader = TrainLoader(cfg, rank=r, world_size=w, global_batch=256, seed=0)   # cfg: DataConfig
    for images, labels in loader: ...                # a step's share: uint8 [n,3,S,S], int64 [n]
    x = DeviceNormalize(loader.mean, loader.std, device="cuda", mean_image=loader.mean_image)(
        images, train=True
    )

Which file owns what, from the dataset inwards:
    manifest.py      the dataset's manifest.json, its shards per split, its mean image,
                     DataError, ImageNet mean/std
    streams.py       shard streams (s3, http(s), local) that reopen a dropped connection
    tar.py           the forward-only tar reader: shard bytes -> RawSample, a segment at a time;
                     each shard's count and sha256 checked against the manifest at its end
    epochs.py        epoch plans: each step's samples (canonical streams), who reads them
    ledger.py        data.ledger: each step's sample ids kept with the checkpoints, checked
    workers.py       what both loaders' workers share; the bad-sample accounting
    transforms.py    CPU decode and augmentation (the C partial decoder: orchestrator._jpeg_region)
    batch_ring.py    reused shared-memory batch buffers between workers and the training process
    train_loader.py  TrainLoader, MixedBatch (decode=gpu/split), SplitBalancer, synthetic data
    eval_split.py   eval_loader: the validation split once across ranks, views, multiscale
    gpu_augment.py   decode (nvJPEG) and augmentation on the training device
    normalize.py     DeviceNormalize: uint8 -> normalised float on the device, PCA lighting
    device_copy.py   the next batch's host-to-device copy, on a side CUDA stream

The names below are imported from their module on first use (module `__getattr__`), so that
`import orchestrator.data.manifest` does not import torch, PIL or webdataset.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DataConfig": "orchestrator.spec",
    **dict.fromkeys(
        [
            "IMAGENET_MEAN",
            "IMAGENET_STD",
            "IMAGE_EXTS",
            "BadShard",
            "DataError",
            "DataUnavailable",
            "SampleLayout",
            "Shard",
            "check_decodable",
            "load_manifest",
            "load_mean_image",
            "sample_layout",
            "split_shards",
        ],
        "orchestrator.data.manifest",
    ),
    **dict.fromkeys(
        ["ReopeningStream", "gopen_s3", "open_url", "register_webdataset_handler"],
        "orchestrator.data.streams",
    ),
    **dict.fromkeys(
        ["RawSample", "Segment", "read_segment", "tar_files", "tar_groups"],
        "orchestrator.data.tar",
    ),
    **dict.fromkeys(
        [
            "PiecesPlan",
            "WorkerPlan",
            "augmentation_rng",
            "batch_sizes",
            "check_layout",
            "plan_pieces",
            "rank_shares",
            "rank_slice",
            "segments_for",
            "shard_order",
            "shuffle_order",
            "spread",
            "step_sizes",
            "worker_streams",
        ],
        "orchestrator.data.epochs",
    ),
    **dict.fromkeys(
        [
            "MixedBatch",
            "SplitBalancer",
            "TrainLoader",
            "join_batches",
            "split_batch",
            "synthetic_batches",
            "train_transform",
        ],
        "orchestrator.data.train_loader",
    ),
    **dict.fromkeys(
        ["batches_by_shape", "eval_loader", "eval_samples", "eval_transform"],
        "orchestrator.data.eval_split",
    ),
    "DeviceNormalize": "orchestrator.data.normalize",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
