"""Two Ray nodes on one machine: a second raylet joins a Ray head with its own resources,
the job's 2 workers are spread across the nodes (STRICT_SPREAD), and the result agrees with a
1-worker run of the same global batch (2 micro-batches accumulated).

The shared test stack's Ray listens on loopback only (the default), and such a head cannot be
joined; this test starts a head of its own in cluster mode (`ray_loopback_only=false`), which
uses the test stack's S3, MLflow and secrets."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from orchestrator.stack import Stack, _stop_tree
from tests.conftest import ROOT, port_is_free, test_stack_config

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("chaos", ROOT / "bench" / "chaos.py")
chaos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chaos)

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


@pytest.fixture
def cluster_head(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """A joinable Ray head of this test's own (free ports below the ephemeral range, a short
    state folder for Ray's socket paths), sharing the test stack's secrets: the same S3 keys
    and Ray token. Its client variables replace the test stack's for the test."""
    state = Path(tempfile.mkdtemp(prefix="orch-mn-"))
    ports = iter(p for p in range(22800, 23390, 7) if port_is_free(p))
    names = ("ray_port", "ray_dashboard_port", "ray_client_port", "ray_agent_port")
    cfg = test_stack_config(state, ray_loopback_only=False, **{name: next(ports) for name in names})
    (state / "secrets").symlink_to(stack.dir / "secrets")
    head = Stack(cfg)
    try:
        head.up(("ray",))
        monkeypatch.delenv(LOOPBACK_SWITCH, raising=False)  # set by the loopback test stack
        for key, value in head.env().items():
            monkeypatch.setenv(key, value)
        yield head
    finally:
        head.down()
        (state / "secrets").unlink()  # the test stack's: never purged through the link
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def second_node(cluster_head: Stack, tmp_path: Path) -> Iterator[None]:
    """A second raylet (1 CPU) joined to that head, stopped afterwards."""
    ray_bin = Path(sys.executable).parent / "ray"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    agent_port = next(p for p in range(23391, 23600, 7) if port_is_free(p))
    log = (tmp_path / "node2.log").open("wb")
    proc = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            f"--address={cluster_head.gcs_address}",
            "--num-cpus=1",
            "--block",
            f"--dashboard-agent-listen-port={agent_port}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    import ray

    ray.init(address=cluster_head.gcs_address, logging_level="ERROR")
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


def test_the_test_stacks_ray_is_the_default_loopback_one(stack: Stack) -> None:
    """The suite's other Ray jobs run on the default configuration users get."""
    assert stack.cfg.ray_loopback_only and stack.env()[LOOPBACK_SWITCH] == "0"


def test_workers_spread_over_two_nodes_match_one_worker(second_node: None) -> None:
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
    spread, single = f"mn-spread-{uuid.uuid4().hex[:6]}", f"mn-one-{uuid.uuid4().hex[:6]}"
    job = chaos.submit(
        [f"name={spread}", "scaling.num_workers=2", "scaling.placement=STRICT_SPREAD", *common]
    )
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
