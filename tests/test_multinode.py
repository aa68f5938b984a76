"""Two Ray nodes on one machine: a second raylet joins the test head with its own resources,
the job's 2 workers are spread across the nodes (STRICT_SPREAD), and the result agrees with a
1-worker run of the same global batch (2 micro-batches accumulated)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from orchestrator.stack import Stack, _stop_tree
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("chaos", ROOT / "bench" / "chaos.py")
chaos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chaos)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


@pytest.fixture
def second_node(stack: Stack, tmp_path: Path) -> Iterator[None]:
    """A second raylet (1 CPU) joined to the test stack's head, stopped afterwards."""
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, **stack.env()}
    env.pop("RAY_ADDRESS")
    log = (tmp_path / "node2.log").open("wb")
    proc = subprocess.Popen(
        [str(ray_bin), "start", f"--address={stack.gcs_address}", "--num-cpus=1", "--block",
         f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    import ray

    ray.init(address=stack.gcs_address, logging_level="ERROR")
    try:
        deadline = time.monotonic() + 120
        while _alive_nodes() < 2:
            assert proc.poll() is None, (tmp_path / "node2.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "second node did not join"
            time.sleep(1)
        yield
    finally:
        ray.shutdown()
        _stop_tree(proc.pid)


def test_workers_spread_over_two_nodes_match_one_worker(stack: Stack, second_node: None) -> None:
    common = ["data.source=synthetic", "data.image_size=32", "data.synthetic_classes=10", "data.pca_lighting=0",
              "scaling.global_batch=16", "scaling.micro_batch=8", "schedule.max_iters=4", "tracking.enabled=false",
              "eval.every_iters=0", "eval.at_end=false", "checkpoint.every_iters=4", "checkpoint.at_epoch_end=false",
              "checkpoint.storage=s3://resnet/runs", "scaling.torch_threads=1"]  # fmt: skip
    spread, single = f"mn-spread-{uuid.uuid4().hex[:6]}", f"mn-one-{uuid.uuid4().hex[:6]}"
    job = chaos.submit([f"name={spread}", "scaling.num_workers=2", "scaling.placement=STRICT_SPREAD", *common])
    assert chaos.wait(job) == "SUCCEEDED", chaos.logs(job)[-3000:]
    job1 = chaos.submit([f"name={single}", "scaling.num_workers=1", *common])
    assert chaos.wait(job1) == "SUCCEEDED", chaos.logs(job1)[-3000:]
    st = chaos.store("s3://resnet/runs", spread)
    nodes = {st.read(4, f"rank-{r:05d}.pt")["node"] for r in (0, 1)}
    assert len(nodes) == 2 and "" not in nodes, "the two ranks must run on different nodes"
    a = chaos.final_weights(st)
    b = chaos.final_weights(chaos.store("s3://resnet/runs", single))
    for key in a:  # BN running stats move once per micro-batch: compare the weights
        if a[key].is_floating_point() and "running_" not in key:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
