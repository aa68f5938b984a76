"""The SGD momentum forms (optim.momentum_form) against a hand computation of the authors' Caffe
rule, v = m*v + lr*(g + wd*w), w -= v, parameter by parameter, across the warm-up's lr rise
and the lr drops: torch's DDP optimizer, a checkpoint resume at an lr change, and DeepSpeed
ZeRO-1/2 on 2 gloo ranks (each rank holds the momentum of its own partition)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrator.spec import OptimConfig, ScalingConfig
from orchestrator.strategy import Strategy, build_strategy

LRS = [0.01, 0.01, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]  # warm-up, rise, two drops
MOMENTUM, DECAY = 0.9, 0.05  # a large decay, so that its place in the rule shows
X = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def caffe_reference(lrs: list[float], nesterov: bool = False) -> list[dict[str, np.ndarray]]:
    """The weights after each step under Caffe's SGD (or its Nesterov solver), in numpy; the
    gradients come from autograd at the reference's own weights."""
    net = tiny()
    w = {k: v.detach().double().numpy().copy() for k, v in net.state_dict().items()}
    v = {k: np.zeros_like(a) for k, a in w.items()}
    out = []
    for lr in lrs:
        net.load_state_dict({k: torch.from_numpy(a).float() for k, a in w.items()})
        net.zero_grad()
        loss_of(net, X, Y).backward()
        grads = {k: p.grad.double().numpy() for k, p in net.named_parameters()}
        for k, weight in w.items():
            g = grads[k] + DECAY * weight  # weight decay inside the gradient, as Caffe does it
            old = v[k].copy()
            v[k] = MOMENTUM * v[k] + lr * g
            w[k] = weight - ((1 + MOMENTUM) * v[k] - MOMENTUM * old if nesterov else v[k])
        out.append({k: a.copy() for k, a in w.items()})
    return out


def strategy_for(
    form: str, nesterov: bool = False, scaling: ScalingConfig | None = None
) -> tuple[Strategy, nn.Module]:
    model = tiny()
    optim = OptimConfig(
        lr=0.1, momentum=MOMENTUM, weight_decay=DECAY, nesterov=nesterov, momentum_form=form
    )
    scaling = scaling or ScalingConfig(strategy="ddp", global_batch=8)
    strategy = build_strategy(
        scaling,
        optim,
        model,
        lr=0.1,
        micro_batch=len(X),
        accumulation=1,
        device=torch.device("cpu"),
        bf16=False,
    )
    return strategy, model


def step(strategy: Strategy, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
    strategy.set_lr(lr)
    with strategy.micro_batch(True):
        strategy.backward(loss_of(strategy.model, x, y), 1.0)
    strategy.step()


def assert_weights(model: nn.Module, want: dict[str, np.ndarray], where: str) -> None:
    for name, p in model.state_dict().items():
        np.testing.assert_allclose(
            p.double().numpy(), want[name], rtol=1e-5, atol=1e-7, err_msg=f"{where}: {name}"
        )


def worst_gap(model: nn.Module, want: dict[str, np.ndarray]) -> float:
    return max(
        float(np.abs(p.double().numpy() - want[k]).max()) for k, p in model.state_dict().items()
    )


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_caffe_form_is_the_caffe_rule_across_lr_changes(nesterov: bool) -> None:
    want = caffe_reference(LRS, nesterov)
    strategy, model = strategy_for("caffe", nesterov)
    for i, lr in enumerate(LRS):
        step(strategy, X, Y, lr)
        assert_weights(model, want[i], f"step {i} (lr {lr})")
    # torch's own form is the same rule until the first change of lr, then it is not
    torch_form, torch_model = strategy_for("pytorch", nesterov)
    gaps = []
    for i, lr in enumerate(LRS):
        step(torch_form, X, Y, lr)
        gaps.append(worst_gap(torch_model, want[i]))
    assert max(gaps[:2]) < 1e-6 and gaps[2] > 1e-3, gaps


def test_a_resume_at_an_lr_change_keeps_the_caffe_velocity() -> None:
    """Saved after the warm-up's last step, resumed at the first step at the full lr: the
    rescale needs the lr of the step before the checkpoint, which travels in its state."""
    want = caffe_reference(LRS)
    strategy, _ = strategy_for("caffe")
    for lr in LRS[:2]:
        step(strategy, X, Y, lr)
    buf = io.BytesIO()
    torch.save(strategy.state_dict(), buf)
    resumed, model = strategy_for("caffe")
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for i, lr in enumerate(LRS[2:], start=2):
        step(resumed, X, Y, lr)
        assert_weights(model, want[i], f"resumed, step {i} (lr {lr})")


def test_caffe_form_refuses_a_zero_lr() -> None:
    strategy, _ = strategy_for("caffe")
    step(strategy, X, Y, 0.1)
    with pytest.raises(ValueError, match="optim.momentum_form=caffe: lr 0.0"):
        strategy.set_lr(0.0)


# ---------------------------------------------------------------- DeepSpeed ZeRO, 2 ranks


def _zero_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        half = slice(rank * 4, rank * 4 + 4)  # each rank its half of the batch
        result = {}
        for stage in (1, 2):
            scaling = ScalingConfig(
                strategy="deepspeed", num_workers=2, global_batch=8, zero_stage=stage
            )
            strategy, model = strategy_for("caffe", scaling=scaling)
            trajectory = []
            for lr in LRS:
                step(strategy, X[half], Y[half], lr)
                trajectory.append({k: v.clone() for k, v in model.state_dict().items()})
            result[stage] = trajectory
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_deepspeed_zero_caffe_form_is_the_caffe_rule(tmp_path: Path) -> None:
    want = caffe_reference(LRS)  # the mean loss of both halves is the loss of the whole batch
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_zero_worker, args=args, nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for stage, trajectory in result.items():
            for i, weights in enumerate(trajectory):
                for name, p in weights.items():
                    np.testing.assert_allclose(
                        p.double().numpy(),
                        want[i][name],
                        rtol=1e-5,
                        atol=1e-7,
                        err_msg=f"ZeRO-{stage} rank {rank} step {i}: {name}",
                    )
