"""Batch buffers that DataLoader workers reuse, instead of a fresh shared-memory segment per batch.

torch hands each batch a worker makes to the training process in a new shared-memory segment:
the kernel maps and zeroes every page of it in the worker (0.15 CPU-ms per 224 px image, about
a tenth of a worker's time with the partial JPEG decoder), a file descriptor travels through a
socket per tensor, and the training process maps the segment again. Here each worker writes its
batches into a ring of `slots` buffers made once per epoch; a batch travels as a `SlotRef` (a
few numbers; the ring itself goes with the first one) and unpickles, in the training process,
to tensors that view the slot in place.

A slot is written again only after every tensor viewing it has been freed: the training process
counts each slot's releases in a small shared table (a finalizer on the slot's array, which the
tensors keep alive, views and all), and the worker compares them with what it sent. A worker
whose slots are all still in use (a loop that keeps old batches) waits `wait_s`, then sends that
batch the usual way: nothing waits for long and nothing is overwritten while it is in use.
"""

from __future__ import annotations

import time
import uuid
import weakref
from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 64  # the labels start on their own cache line
_open: dict[str, BatchRing] = {}  # training process: the rings whose slots may arrive


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class BatchRing:
    """One epoch's rings, one per worker: made in the training process before the workers
    start (they inherit the release table), closed when the epoch's iteration ends."""

    def __init__(self, workers: int, slots: int, pixels_shape: tuple[int, ...]):
        self.token = uuid.uuid4().hex
        self.slots, self.pixels_shape = slots, tuple(pixels_shape)  # the largest batch, [B,3,S,S]
        self.released = torch.zeros((max(workers, 1), slots), dtype=torch.int64).share_memory_()
        self.slot_bytes = _aligned(int(np.prod(pixels_shape))) + _aligned(8 * pixels_shape[0])
        self._rings: dict[int, np.ndarray] = {}  # worker -> its ring, [slots, slot_bytes]
        _open[self.token] = self

    def close(self) -> None:
        """Stop accepting slots; tensors still viewing one keep its memory alive."""
        _open.pop(self.token, None)
        self._rings.clear()

    def writer(self, worker: int, wait_s: float = 0.01) -> RingWriter:
        """The ring of worker `worker` (call in that worker)."""
        return RingWriter(self, worker, wait_s)

    def _view(self, ref: SlotRef, ring: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if ring is not None:
            self._rings[ref.worker] = ring.numpy().reshape(self.slots, self.slot_bytes)
        # a fresh ndarray object per batch: the tensors below keep it alive, and its finalizer
        # runs once they are all gone, whatever views of them the loop made
        piece = self._rings[ref.worker][ref.slot]
        weakref.finalize(piece, _release, self.released.numpy(), ref.worker, ref.slot)
        flat = torch.from_numpy(piece)
        pixels = int(np.prod(ref.shape))
        images = flat[:pixels].view(ref.shape)
        start = _aligned(int(np.prod(self.pixels_shape)))
        labels = flat[start : start + 8 * ref.shape[0]].view(torch.int64)
        return images, labels


def _release(released: np.ndarray, worker: int, slot: int) -> None:
    released[worker, slot] += 1


@dataclass
class SlotRef:
    """A batch in a ring slot; unpickles to (images uint8 [B,3,S,S], labels int64 [B])."""

    token: str
    worker: int
    slot: int
    shape: tuple[int, ...]
    ring: torch.Tensor | None = None  # the worker's whole ring, sent with its first batch

    def __reduce__(self) -> tuple:
        return _unpickle, (self.token, self.worker, self.slot, self.shape, self.ring)


def _unpickle(
    token: str, worker: int, slot: int, shape: tuple[int, ...], ring: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    owner = _open.get(token)
    if owner is None:  # the epoch's iteration ended; a DataLoader shutting down may still
        # unpickle what its workers had queued (its pinning thread does), and nothing reads it
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return owner._view(SlotRef(token, worker, slot, shape), ring)


class RingWriter:
    """A worker's side: a free slot to fill for each batch, or None when all are in use."""

    def __init__(self, owner: BatchRing, worker: int, wait_s: float):
        self.owner, self.worker, self.wait_s = owner, worker, wait_s
        self.released = owner.released[worker].numpy()  # written by the training process
        self.sent = np.zeros(owner.slots, dtype=np.int64)
        self.ring = torch.empty(owner.slots * owner.slot_bytes, dtype=torch.uint8).share_memory_()
        self.rows = self.ring.numpy().reshape(owner.slots, owner.slot_bytes)
        self.ring_sent = False
        self.held = False  # the last take found every slot in use

    def _free_slot(self) -> int | None:
        free = np.flatnonzero(self.released == self.sent)
        return int(free[0]) if len(free) else None

    def take(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, SlotRef] | None:
        """(pixels [B,3,S,S], labels [B], its SlotRef) to fill and send, or None: send this
        batch the usual way (every slot is still in use after wait_s)."""
        if any(a > b for a, b in zip(shape, self.owner.pixels_shape, strict=True)):
            raise ValueError(f"batch {shape} larger than the ring's {self.owner.pixels_shape}")
        slot, deadline = self._free_slot(), time.monotonic() + self.wait_s
        while slot is None and not self.held and time.monotonic() < deadline:
            time.sleep(0.0005)
            slot = self._free_slot()
        self.held = slot is None  # the loop keeps its batches: stop waiting until one is back
        if slot is None:
            return None
        self.sent[slot] += 1
        row = self.rows[slot]
        pixels = row[: int(np.prod(shape))].reshape(shape)
        start = _aligned(int(np.prod(self.owner.pixels_shape)))
        labels = row[start : start + 8 * shape[0]].view(np.int64)
        ref = SlotRef(self.owner.token, self.worker, slot, tuple(shape))
        if not self.ring_sent:
            ref.ring, self.ring_sent = self.ring, True
        return pixels, labels, ref
