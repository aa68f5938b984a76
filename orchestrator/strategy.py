"""DDP and DeepSpeed behind one small interface, so the loop has no `if deepspeed` branches.

    strategy = build_strategy(spec.scaling, spec.optim, model, lr=..., accumulation=...)
    strategy.set_lr(lr)                                # before each optimizer step's micro-batches
    for each micro-batch:
        with strategy.micro_batch(last=...):           # gradients reduce on the last one only
            loss = criterion(strategy.model(x), y)     # the micro-batch's mean loss
            strategy.backward(loss, weight)            # weight: its share of the global batch
    strategy.step()                                    # once per optimizer step
    strategy.state_dict() / load_state_dict(...)       # replicated state (rank 0 writes it)
    strategy.save_shards(dir) / load_shards(dir)       # per-rank state (DeepSpeed's ZeRO shards)

The loop weighs each micro-batch by its share of the step (orchestrator.data.epochs, item 6), so
the gradient is the global batch's mean at any world size. The strategy also owns the momentum
form (optim.momentum_form, `MomentumForm`): torch's SGD, or the authors' Caffe
SGD on top of it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.runtime import distributed
from orchestrator.spec import OptimConfig, ScalingConfig


class Strategy(Protocol):
    model: nn.Module  # the wrapped model, for forward passes

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager: ...
    def set_lr(self, lr: float) -> None: ...
    def backward(self, loss: torch.Tensor, weight: float) -> None: ...
    def step(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def save_shards(self, directory: Path) -> None: ...
    def load_shards(self, directory: Path) -> None: ...


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """The paper applies weight decay to every weight; one group keeps that exact."""
    return [
        {
            "params": [p for p in model.parameters() if p.requires_grad],
            "weight_decay": cfg.weight_decay,
        }
    ]


class MomentumForm:
    """optim.momentum_form on top of torch's SGD.

    torch: b = m*b + g, w -= lr*b. Caffe (the authors' solver): v = m*v + lr*g, w -= v, with
    weight decay inside g in both. At a constant lr, v = lr*b: the two are the same. When the
    lr changes from lr_old to lr_new, Caffe's velocity still holds lr_old's steps while torch
    rescales them by lr_new at once (a 10x smaller or larger step at each change). Scaling
    every momentum buffer by lr_old / lr_new before the first step at lr_new keeps v = lr*b
    exact, so torch's update is Caffe's (nesterov too: its correction term obeys the same
    identity). The last lr is part of the strategy's state, so a resume scales from the right
    one."""

    def __init__(self, form: str) -> None:
        self.caffe = form == "caffe"
        self.last_lr: float | None = None  # the lr of the newest step (None: no step yet)

    def before_step_at(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """Call before the lr of the next step is set to `lr`; `optimizer` holds the momentum
        buffers (for DeepSpeed its torch SGD, whose parameters are ZeRO's partitions)."""
        if self.caffe and self.last_lr is not None and lr != self.last_lr:
            if not lr > 0:
                raise ValueError(
                    f"optim.momentum_form=caffe: lr {lr} cannot carry Caffe's velocity (it "
                    "needs lr > 0); use optim.momentum_form=pytorch, or a schedule with min_lr > 0"
                )
            scale = self.last_lr / lr
            for group in optimizer.param_groups:
                for p in group["params"]:
                    buf = optimizer.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        buf.mul_(scale)
        self.last_lr = lr


def make_sgd(
    model: nn.Module, cfg: OptimConfig, lr: float, device: torch.device
) -> torch.optim.SGD:
    # fused SGD on CUDA saves a kernel launch per parameter; foreach is the CPU fast path
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(
        param_groups(model, cfg), lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fast
    )


class DDPStrategy:
    """torch DDP (NCCL on GPU, gloo on CPU); a single process skips the wrapper."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        lr: float,
        accumulation: int,
        device: torch.device,
    ) -> None:
        self.optimizer = make_sgd(model, optim, lr, device)
        self.momentum = MomentumForm(optim.momentum_form)
        self.accumulation = accumulation
        self._base = model
        if distributed():
            ids = [device.index] if device.type == "cuda" else None
            self.model: nn.Module = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.model = model

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP reads the flag in forward: the forward pass belongs inside this context."""
        if last or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()  # skip the all-reduce until the last micro-batch

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        """`weight`: the micro-batch's share of the step (1 / accumulation for equal shares)."""
        (loss * weight).backward()

    def set_lr(self, lr: float) -> None:
        self.momentum.before_step_at(self.optimizer, lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self._base.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "last_lr": self.momentum.last_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._base.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.momentum.last_lr = state["last_lr"]

    def save_shards(self, directory: Path) -> None:
        """DDP state is replicated: rank 0's state_dict is the whole of it."""

    def load_shards(self, directory: Path) -> None:
        """Nothing per rank beyond what state_dict restored."""


class DeepSpeedStrategy:
    """DeepSpeed ZeRO 0/1/2 with a config generated from the spec; every rank saves its shard."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        scaling: ScalingConfig,
        lr: float,
        micro_batch: int,
        accumulation: int,
        device: torch.device,
        bf16: bool,
    ) -> None:
        import deepspeed
        import deepspeed.ops

        if device.type == "cpu":
            # DeepSpeed's CPU backend compiles a shared-memory all-reduce (C++: 1-2.5 min on 2
            # cores, once per environment) when it starts; only its inference all-reduce calls
            # that op, never ZeRO training, which all-reduces through torch.distributed
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():  # one process: DeepSpeed still wants a process group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1
            )
        os.environ.setdefault("LOCAL_RANK", str(device.index or 0))  # DeepSpeed insists on it
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accumulation,
            "zero_optimization": {"stage": scaling.zero_stage},
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,  # our torch SGD is the paper's optimizer
            # DeepSpeed clips the gradient norm at 1.0 unless told otherwise (its default); the
            # paper does not clip, nor does the DDP strategy
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        optimizer = torch.optim.SGD(
            param_groups(model, optim), lr=lr, momentum=optim.momentum, nesterov=optim.nesterov
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config
        )
        self.model: nn.Module = self.engine
        self._base = model
        self.momentum = MomentumForm(optim.momentum_form)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        # We say where the boundary is (DeepSpeed's documented alternative to counting
        # micro-steps), so `step()` runs once per optimizer step, as it does for DDP.
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself: undone, so that `weight`
        # (the micro-batch's share of the step) is the whole scale, as for DDP
        self.engine.backward(loss * (weight * self.engine.gradient_accumulation_steps()))

    def set_lr(self, lr: float) -> None:
        # the torch SGD DeepSpeed wraps holds the momentum (under ZeRO, of this rank's partition)
        self.momentum.before_step_at(self.engine.basic_optimizer, lr)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.engine.step()  # the update, then zeroed gradients

    def state_dict(self) -> dict[str, Any]:
        # the optimizer lives in the shards
        return {"model": self._base.state_dict(), "last_lr": self.momentum.last_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._base.load_state_dict(state["model"])
        self.momentum.last_lr = state["last_lr"]

    def save_shards(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state")

    def load_shards(self, directory: Path) -> None:
        # DeepSpeed's load_checkpoint unpickles its files in full (torch.load with
        # weights_only=False, in its checkpoint engine): the Checkpointer checks each against
        # the sha256 recorded at commit before handing the folder here (CheckpointStore.fetch_dir)
        self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_strategy(
    scaling: ScalingConfig,
    optim: OptimConfig,
    model: nn.Module,
    *,
    lr: float,
    micro_batch: int,
    accumulation: int,
    device: torch.device,
    bf16: bool,
) -> Strategy:
    if scaling.strategy == "deepspeed":
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return DeepSpeedStrategy(model, optim, scaling, lr, micro_batch, accumulation, device, bf16)
    return DDPStrategy(model, optim, lr, accumulation, device)
