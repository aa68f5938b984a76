"""Batch buffers that DataLoader workers reuse, instead of a fresh shared-memory segment per batch.

torch hands each batch a worker makes to the training process in a new shared-memory segment:
the kernel maps and zeroes every page of it in the worker (0.15 CPU-ms per 224 px image, about
a tenth of a worker's time with the partial JPEG decoder), a file descriptor travels through a
socket per tensor, and the training process maps the segment again. Here each worker writes its
batches into a ring of at most `slots` buffers, each made the first time it is needed; a batch
travels as a `SlotRef` (a few numbers; a buffer goes along only with its first batch) and
unpickles, in the training process, to tensors that view the buffer in place.

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
        self.labels_at = _aligned(int(np.prod(pixels_shape)))  # a slot: pixels, then labels
        self.slot_bytes = self.labels_at + _aligned(8 * pixels_shape[0])
        self._buffers: dict[tuple[int, int], np.ndarray] = {}  # (worker, slot) -> its bytes
        _open[self.token] = self

    def close(self) -> None:
        """Stop accepting slots; tensors still viewing one keep its memory alive."""
        _open.pop(self.token, None)
        self._buffers.clear()

    def writer(self, worker: int, wait_s: float = 0.01) -> RingWriter:
        """The ring of worker `worker` (call in that worker)."""
        return RingWriter(self, worker, wait_s)

    def _view(self, ref: SlotRef) -> tuple[torch.Tensor, torch.Tensor]:
        key = (ref.worker, ref.slot)
        if ref.buffer is not None:
            self._buffers[key] = ref.buffer.numpy()
        # a fresh ndarray object per batch, held by the one tensor made from it below (numpy
        # views of it would hold the buffer instead): its finalizer runs once that tensor and
        # every view of it, the two returned included, are gone
        piece = self._buffers[key][:]
        weakref.finalize(piece, _release, self.released.numpy(), *key)
        flat = torch.from_numpy(piece)
        images = flat[: int(np.prod(ref.shape))].view(ref.shape)
        labels = flat[self.labels_at : self.labels_at + 8 * ref.shape[0]].view(torch.int64)
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
    buffer: torch.Tensor | None = None  # the slot's shared memory, sent with its first batch

    def __reduce__(self) -> tuple:
        return _unpickle, (self.token, self.worker, self.slot, self.shape, self.buffer)


def _unpickle(
    token: str, worker: int, slot: int, shape: tuple[int, ...], buffer: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    owner = _open.get(token)
    if owner is None:  # the epoch's iteration ended; a DataLoader shutting down may still
        # unpickle what its workers had queued (its pinning thread does), and nothing reads it
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return owner._view(SlotRef(token, worker, slot, shape, buffer))


class RingWriter:
    """A worker's side: a free slot to fill for each batch, or None when all are in use."""

    def __init__(self, owner: BatchRing, worker: int, wait_s: float):
        self.owner, self.worker, self.wait_s = owner, worker, wait_s
        self.released = owner.released[worker].numpy()  # written by the training process
        self.sent = np.zeros(owner.slots, dtype=np.int64)
        self.buffers: list[torch.Tensor | None] = [None] * owner.slots  # made on first use
        self.held = False  # the last take found every slot in use

    def _free_slot(self) -> int | None:
        free = np.flatnonzero(self.released == self.sent)  # the lowest first: few get made
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
        ref = SlotRef(self.owner.token, self.worker, slot, tuple(shape))
        buffer = self.buffers[slot]
        if buffer is None:
            buffer = self.buffers[slot] = ref.buffer = torch.empty(
                self.owner.slot_bytes, dtype=torch.uint8
            ).share_memory_()
        flat = buffer.numpy()
        pixels = flat[: int(np.prod(shape))].reshape(shape)
        labels = flat[self.owner.labels_at : self.owner.labels_at + 8 * shape[0]].view(np.int64)
        return pixels, labels, ref
