"""Two Ray nodes on one machine: a second raylet joins a Ray head with its own resources,
the job's 2 workers are spread across the nodes (STRICT_SPREAD), and the result agrees with a
1-worker run of the same global batch (2 micro-batches accumulated).

The shared test stack's Ray listens on loopback only (the default), and such a head cannot be
joined: the run's multi-node tests (here and test_spot) share one head of their own in cluster
mode (`ray_loopback_only=false`, conftest's joinable_ray_head), which uses the test stack's S3,
MLflow and secrets."""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from orchestrator.stack import Stack
from tests.conftest import LOOPBACK_SWITCH, ROOT, joined_node, run_script

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("chaos", ROOT / "bench" / "chaos.py")
chaos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chaos)


def _alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


@pytest.fixture
def second_node(cluster_head: Stack, tmp_path: Path) -> Iterator[None]:
    """A second raylet (1 CPU) joined to the run's joinable head, stopped afterwards."""
    with joined_node(cluster_head, 1, tmp_path / "node2.log"):
        yield


def test_the_test_stacks_ray_is_the_default_loopback_one(stack: Stack) -> None:
    """The suite's other Ray jobs run on the default configuration users get."""
    assert stack.cfg.ray_loopback_only and stack.env()[LOOPBACK_SWITCH] == "0"


def test_workers_spread_over_two_nodes_match_one_worker(second_node: None, tmp_path: Path) -> None:
    common = [
        "data.source=synthetic",
        "data.image_size=32",
        "data.synthetic_classes=10",
        "data.pca_lighting=0",
        "scaling.global_batch=16",
        "scaling.micro_batch=8",
        "schedule.max_iters=4",
        "tracking.enabled=false",
        "eval.every_iters=0",
        "eval.at_end=false",
        "checkpoint.every_iters=4",
        "checkpoint.at_epoch_end=false",
        "checkpoint.storage=s3://resnet/runs",
        "scaling.torch_threads=1",
    ]
    spread = f"mn-spread-{uuid.uuid4().hex[:6]}"
    job = chaos.submit(
        [f"name={spread}", "scaling.num_workers=2", "scaling.placement=STRICT_SPREAD", *common]
    )
    assert chaos.wait(job) == "SUCCEEDED", chaos.logs(job)[-3000:]
    # the reference, one worker accumulating 2 micro-batches, through --local: the same loop
    # (run_worker) as a Ray worker runs, without a second Ray job's start-up
    local = [o for o in common if not o.startswith("checkpoint.storage=")]
    local.append(f"checkpoint.storage={tmp_path}")
    run_script("jobs/smoke.py", "--local", "name=one", "scaling.num_workers=1", *local)
    st = chaos.store("s3://resnet/runs", spread)
    nodes = {st.read(4, f"rank-{r:05d}.pt")["node"] for r in (0, 1)}
    assert len(nodes) == 2 and "" not in nodes, "the two ranks must run on different nodes"
    a = chaos.final_weights(st)
    b = chaos.final_weights(chaos.store(str(tmp_path), "one"))
    for key in a:  # BN running stats move once per micro-batch: compare the weights
        if a[key].is_floating_point() and "running_" not in key:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
