"""CPU proxies for the GPU path's properties, so they hold before any GPU sees them.

- No device-to-host read between fetching a batch and the optimizer step: each one would make
  the host wait for the GPU's queue to drain, every step. On the CPU a TorchDispatchMode sees
  every `aten._local_scalar_dense` (.item(), float(t), bool(t)) and a TorchFunctionMode every
  tensor method that hands values to the host (.tolist(), .cpu(), .numpy() ...), over the same
  code the GPU runs.
- The compiled step (model.compile=true) is one static-shape graph per batch size: no graph
  break, no recompile when the model switches to eval and back, and an epoch's short last
  batch gets a static graph of its own (not an automatic-dynamic recompile). Checked on
  ResNet-20's graphs (recorded, run eagerly) and through inductor itself (a tiny net).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from orchestrator.runtime import Runtime
from orchestrator.spec import apply_overrides
from orchestrator.train import Trainer
from tests.conftest import load_job_spec, odd_shards_data

TINY = [
    "model.name=cifar_resnet20",
    "model.channels_last=false",
    "data.image_size=32",
    "data.pca_lighting=0",
    "tracking.enabled=false",
    "eval.at_end=false",
    "checkpoint.every_iters=0",
    "checkpoint.at_epoch_end=false",
    "scaling.num_workers=1",
    "scaling.torch_threads=1",
]

HOST_READ_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"}


class HostReads(TorchDispatchMode):
    """Counts the reads that would make the host wait for the device, by op or method name."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class HostReadMethods(TorchFunctionMode):
    """The tensor methods that hand values to the host (seen before dispatch: on a CPU,
    `.cpu()` and `.tolist()` reach no aten op at all)."""

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in HOST_READ_METHODS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def trainer(tmp_path: Path, *overrides: str) -> Trainer:
    spec = apply_overrides(
        load_job_spec("smoke"), [*TINY, f"checkpoint.storage={tmp_path}", *overrides]
    )
    return Trainer(spec, Runtime())


def watch_step(t: Trainer) -> dict[int, list[str]]:
    """Host reads per optimizer step, from the batch's fetch to the optimizer step's end (the
    log steps' own reads, after it, are left out: they read on purpose)."""
    reads: dict[int, list[str]] = {}

    def watched(call: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(call)
        def run(*args: Any, **kwargs: Any) -> None:
            seen = reads.setdefault(t.step + 1, [])  # the step being made
            with HostReads() as by_op, HostReadMethods(by_op.seen):
                call(*args, **kwargs)
            seen.extend(by_op.seen)

        return run

    t._micro_step = watched(t._micro_step)  # type: ignore[method-assign]
    t.strategy.step = watched(t.strategy.step)  # type: ignore[method-assign]
    return reads


def test_the_counter_sees_a_host_read(tmp_path: Path) -> None:
    """The proxy can fail: an .item() and a .tolist() planted in the step are seen at every
    step."""
    t = trainer(tmp_path, "data.source=synthetic", "schedule.max_iters=3")
    reads = watch_step(t)
    add = t.window.add

    def add_and_read(loss: torch.Tensor, hits: torch.Tensor, samples: int) -> None:
        loss.item(), hits.tolist()
        add(loss, hits, samples)

    t.window.add = add_and_read  # type: ignore[method-assign]
    t.fit()
    planted = {"item", "tolist", "aten._local_scalar_dense.default"}
    assert {step: set(r) for step, r in reads.items()} == {1: planted, 2: planted, 3: planted}


@pytest.mark.parametrize("source", ["synthetic", "shards"])
def test_no_host_read_between_the_fetch_and_the_optimizer_step(
    tmp_path: Path, odd_local_shards: Path, source: str
) -> None:
    data = odd_shards_data(odd_local_shards) if source == "shards" else ["data.source=synthetic"]
    t = trainer(
        tmp_path,
        *data,
        "scaling.global_batch=8",
        "schedule.max_iters=8",
        "tracking.log_every=3",
        "eval.every_iters=4",
    )
    reads = watch_step(t)
    t.fit()
    assert sorted(reads) == list(range(1, 9))
    assert {step: r for step, r in reads.items() if r} == {}


class StaticGraphs:
    """A torch.compile backend that records each graph's input shapes, fails on a graph with
    symbolic (dynamic) shapes, then hands the graph to `then` (inductor's compile_fx), or runs
    it eagerly: dynamo decides graph breaks and recompiles whatever the backend."""

    def __init__(self, then: Callable[..., Callable[..., Any]] | None = None) -> None:
        self.then = then
        self.graphs: list[list[tuple[Any, ...]]] = []

    def __call__(self, gm: torch.fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
        self.graphs.append([tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)])
        symbolic = [n.name for n in gm.graph.find_nodes(op="placeholder") if _is_symbolic(n.meta)]
        assert not symbolic, f"a dynamic-shape graph: symbolic inputs {symbolic}"
        return self.then(gm, inputs) if self.then else gm.forward


def _is_symbolic(meta: dict[str, Any]) -> bool:
    value = meta.get("example_value", meta.get("val"))
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape)


def tiny_net(name: str, num_classes: int, **options: Any) -> torch.nn.Module:
    """Conv, batch norm (its train/eval switch is what a guard sees), pooling, linear."""
    from torch import nn

    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8, num_classes))


@pytest.mark.parametrize("backend", ["recorded", "inductor"])
def test_compiled_step_has_static_graphs_and_no_recompile(
    tmp_path: Path, odd_local_shards: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """48 training images at batch 10: three batches of 10 and two of 9 per epoch (as a real
    epoch ends, 4,892 x 256 then 113 x 255), two epochs, an evaluation (eval mode and back)
    every 3 steps. `recorded`: ResNet-20's graphs, run eagerly; `inductor`: a tiny net's,
    compiled by inductor (ResNet-20 takes inductor minutes on a CPU)."""
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    import orchestrator.train

    graphs = StaticGraphs(then=compile_fx if backend == "inductor" else None)
    compile_calls: list[dict[str, Any]] = []
    real_compile = torch.compile

    def compile_with_recorder(model: Any, **kwargs: Any) -> Any:
        compile_calls.append(kwargs)
        return real_compile(model, backend=graphs, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_recorder)
    if backend == "inductor":
        monkeypatch.setattr(orchestrator.train, "create_model", tiny_net)
    torch._dynamo.reset()
    counters.clear()
    t = trainer(
        tmp_path,
        *odd_shards_data(odd_local_shards),
        "model.compile=true",
        "scaling.global_batch=10",
        "schedule.max_iters=10",
        "eval.every_iters=3",
    )
    sizes = batch_sizes(t)
    t.fit()
    assert compile_calls == [{"dynamic": False}]
    assert sizes == [10, 10, 10, 9, 9] * 2, sizes  # each epoch ends in shorter batches
    assert dict(counters["graph_break"]) == {}
    # one static graph per batch size, made the first time that size came: none after
    images = [shape for graph in graphs.graphs for shape in graph if shape[1:] == (3, 32, 32)]
    assert sorted(images) == [(9, 3, 32, 32), (10, 3, 32, 32)], graphs.graphs
    assert counters["stats"]["unique_graphs"] == 2 and counters["frames"]["ok"] == 2


def batch_sizes(t: Trainer) -> list[int]:
    """The batch sizes the trainer's steps see, in order (recorded as it fetches them)."""
    sizes: list[int] = []
    fetch = t._next_step

    def recorded() -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = fetch()
        sizes.append(len(labels))
        return images, labels

    t._next_step = recorded  # type: ignore[method-assign]
    return sizes


def test_nvjpeg_fallback_is_logged_once_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    from orchestrator.data import gpu_augment

    count = gpu_augment._FallbackCount()
    with caplog.at_level("WARNING", logger=gpu_augment.__name__):
        for _ in range(3):
            count.count(RuntimeError("Unsupported color conversion request"))
    assert count.images == 3
    (warning,) = caplog.records  # once, not per image
    assert "system/nvjpeg_fallback_images" in warning.getMessage()
    assert "data.decode=cpu" in warning.getMessage()  # the fix


def test_batches_pass_through_untouched_on_a_cpu() -> None:
    from orchestrator.data.device_copy import ahead_to_device

    batches = [(torch.full((2, 3), float(i)), torch.tensor([i, i])) for i in range(3)]
    out = list(ahead_to_device(iter(batches), torch.device("cpu")))
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(out, batches, strict=True))


def test_the_loop_reports_to_ray_once_at_the_end_with_every_metric(tmp_path: Path) -> None:
    """Ray Train's report is a barrier of every worker that waits for its 2 s health check to
    fetch the report before: one per logged step held fast steps 2 s. The loop reports once,
    at the run's end (every rank alike), with every metric's newest value."""
    reports: list[dict[str, float]] = []
    spec = apply_overrides(
        load_job_spec("smoke"),
        [
            *TINY,
            f"checkpoint.storage={tmp_path}",
            "data.source=synthetic",
            "data.synthetic_classes=10",
            "scaling.global_batch=4",
            "schedule.max_iters=6",
            "tracking.log_every=1",
        ],
    )
    Trainer(spec, Runtime(report=reports.append)).fit()
    assert [r["train/step"] for r in reports] == [6.0]
    assert "train/loss" in reports[-1] and "system/checkpoint_stall_s" in reports[-1]
