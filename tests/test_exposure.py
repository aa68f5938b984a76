"""Every port the local stack and a `--local` job open refuses strangers (docs/security.md).

The shared test stack and a 2-worker `--local` job: every TCP socket their processes listen on
is listed and probed anonymously: GET listings and APIs, a cross-origin preflight for PUT from
http://evil.example, an anonymous PUT, and for gRPC ports a call without a client certificate
or token. Each must be refused, or be on ALLOWED with the reason docs/security.md gives. The
table is printed (pytest -s shows it)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import psutil
import pytest

from orchestrator.stack import Stack
from tests.conftest import ROOT
from tests.test_train import TINY

pytestmark = pytest.mark.slow

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
PATHS = (
    "/",
    "/buckets/resnet/",
    "/resnet/",
    "/dir/status",
    "/cluster/status",
    "/status",
    "/vol/status",
    "/api/cluster/topology",  # the SeaweedFS admin UI's API
    "/api/s3/buckets",
    "/api/2.0/mlflow/experiments/search?max_results=5",
    "/api/jobs/",  # Ray's job API
)
EVIL = "http://evil.example"
# (service, path) that may answer an anonymous GET with 2xx, and why (docs/security.md says the
# same): status, health and UI pages that show no object, no name of one and accept no write
ALLOWED_GET = {
    ("SeaweedFS master", "/"): "read-only cluster page: volume counts, leader address",
    ("SeaweedFS master", "/cluster/status"): "leader address, largest volume id",
    ("SeaweedFS volume", "/status"): "disk space, volume ids, sizes and file counts",
    ("SeaweedFS S3", "/status"): "empty 200 (health check)",
    ("Ray dashboard", "/"): "the dashboard's static page; its API wants the token",
}
# a Prometheus exporter (Ray's metrics export port) answers every path with its metrics: node
# and process counters, on loopback; Ray has no authentication for it
METRICS = ("# HELP", "# TYPE")
# the volume server answers any Origin with `*` (hard-coded in SeaweedFS); every read and write
# there needs a JWT signed with the stack's key, so the page's request itself gets 401
ALLOWED_PREFLIGHT = {"SeaweedFS volume"}
# real methods of the gRPC servers that may listen (an unknown method says nothing: Ray checks
# its token per method, after routing); an anonymous call must be cut off in the handshake
# (UNAVAILABLE: SeaweedFS's mutual TLS) or refused (UNAUTHENTICATED: Ray's token)
GRPC_METHODS = (
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",  # Ray's GCS
    "/ray.rpc.NodeManagerService/GetNodeStats",  # a raylet
    "/ray.rpc.ObjectManagerService/Pull",  # a raylet's object manager
    "/ray.rpc.RayletDriver/ClusterInfo",  # Ray's client server
    "/ray.rpc.ReporterService/HealthCheck",  # Ray's dashboard agent
    "/ray.rpc.CoreWorkerService/NumPendingTasks",  # a Ray worker
    "/master_pb.Seaweed/Statistics",  # SeaweedFS's master
    "/filer_pb.SeaweedFiler/Statistics",  # SeaweedFS's filer
    "/volume_server_pb.VolumeServer/VolumeServerStatus",  # SeaweedFS's volume server
)
REFUSED_GRPC = {"UNAVAILABLE", "UNAUTHENTICATED"}


def _listening(pids: list[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket these processes and their children
    listen on."""
    found = set()
    for pid in pids:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                conns = p.net_connections(kind="inet")
                name = p.name()
            except psutil.NoSuchProcess:
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    found.add((name, c.laddr.ip, c.laddr.port))
    return sorted(found, key=lambda item: item[2])


def _http(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> str:
    """'STATUS' plus the allowed origin if any, 'refused' (no connection) or 'not HTTP'."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        r = conn.getresponse()
        text = r.read(200_000).decode(errors="replace")
        origin = r.getheader("Access-Control-Allow-Origin")
        return f"{r.status}{' ACAO=' + origin if origin else ''}" + ("" if not text else f"|{text}")
    except ConnectionRefusedError:
        return "refused"
    except (http.client.HTTPException, OSError):
        return "not HTTP"
    finally:
        conn.close()


def _grpc(port: int) -> str:
    """Anonymous gRPC calls (plain text, no certificate, no token) to GRPC_METHODS: the codes
    that are not UNIMPLEMENTED (the server has no such method)."""
    import grpc

    codes = set()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for method in GRPC_METHODS:
            try:
                channel.unary_unary(method)(b"", timeout=3)
                codes.add("OK")
            except grpc.RpcError as err:
                codes.add(err.code().name)  # type: ignore[attr-defined]
            if "UNAVAILABLE" in codes:  # no connection: every method would say the same
                break
    return ",".join(sorted(codes - {"UNIMPLEMENTED"})) or "UNIMPLEMENTED"


def _label(st: Stack, port: int, process: str) -> str:
    for service in ("s3", "mlflow", "ray"):
        for known, label in st.cfg.ports(service).items():
            if known == port:
                return label.split(" (setting")[0]
    return f"{process} (Ray-chosen)"


def _probe(st: Stack, port: int, label: str, canary: str) -> tuple[list[str], list[str]]:
    """The probe results for one port, and the problems among them."""
    results, problems = [], []
    first = _http(port, "GET", "/", {})
    if first == "not HTTP":
        codes = _grpc(port)
        results.append(f"gRPC {codes}")
        if not set(codes.split(",")) <= REFUSED_GRPC:
            problems.append(f"{label} :{port} took an anonymous gRPC call ({codes})")
        return results, problems
    if first.split("|", 1)[-1].startswith(METRICS):
        results.append("Prometheus metrics (any path)")
        if canary in first:
            problems.append(f"{label} :{port} metrics show the canary object's name")
        return results, problems
    for path in PATHS:
        got = _http(port, "GET", path, {})
        status = got.split("|")[0]
        results.append(f"GET {path} {status}")
        if canary in got:
            problems.append(f"{label} :{port} GET {path} shows the canary object's name")
        if status[0] in "23" and (label, path) not in ALLOWED_GET:
            problems.append(f"{label} :{port} GET {path} answered {status}")
    pre = _http(
        port,
        "OPTIONS",
        "/buckets/resnet/x",
        {"Origin": EVIL, "Access-Control-Request-Method": "PUT"},
    ).split("|")[0]
    results.append(f"OPTIONS(PUT from evil) {pre}")
    if ("ACAO=*" in pre or EVIL in pre) and label not in ALLOWED_PREFLIGHT:
        problems.append(f"{label} :{port} allows a cross-origin PUT ({pre})")
    for path in ("/buckets/resnet/exposure-evil", "/resnet/exposure-evil", "/1,0123456789"):
        put = _http(port, "PUT", path, {"Origin": EVIL}, b"evil").split("|")[0]
        results.append(f"PUT {path} {put}")
        if put[0] in "23":
            problems.append(f"{label} :{port} took an anonymous PUT {path} ({put})")
    return results, problems


def _local_job(tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "jobs/smoke.py",
            "--local",
            "name=exposure",
            f"checkpoint.storage={tmp_path}",
            *TINY,
            "scaling.num_workers=2",
            "scaling.global_batch=16",
            "scaling.micro_batch=8",
            "schedule.max_iters=3000",  # ends by itself should the test die too
            "checkpoint.every_iters=100000",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=(tmp_path / "job.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_a_local_jobs_rendezvous_and_collectives_listen_on_loopback_only(tmp_path: Path) -> None:
    """torchrun's rendezvous store, the ranks' store and gloo's sockets: 127.0.0.1 only (torch's
    own store would listen on every interface: orchestrator.launch hosts it on loopback)."""
    job = _local_job(tmp_path)
    try:
        deadline = time.monotonic() + 90
        while not re.search(r"step \d+ of \d+", (tmp_path / "job.log").read_text()):
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the job logged no step in 90 s"
            time.sleep(0.5)
        sockets = _listening([job.pid])
    finally:
        # torchrun starts each rank in a session of its own: stop the whole tree
        tree = [job.pid, *(p.pid for p in psutil.Process(job.pid).children(recursive=True))]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.wait()
    print("\n--local job (2 workers): listening sockets")
    for name, ip, port in sockets:
        print(f"  {name:12s} {ip}:{port}")
    assert len(sockets) >= 3, sockets  # the store, and gloo's pairs in each rank
    outside = [s for s in sockets if s[1] not in LOOPBACK]
    assert not outside, f"the job listens beyond loopback: {outside}"


def test_every_port_of_the_stack_refuses_strangers(stack: Stack) -> None:
    """The shared test stack, after the tests before it ran their jobs on it: the actors they
    left (Ray Train's, Ray Data's) listen too, and are probed with the rest."""
    st = stack
    env = st.env()
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    canary = f"exposure-canary-{uuid.uuid4().hex[:8]}"
    s3.put_object(Bucket="resnet", Key=canary, Body=b"secret")  # a listing would show its name
    pids = [pid for s in ("s3", "mlflow", "ray") if (pid := st._running_pid(s))]
    sockets = _listening(pids)
    rows, problems = [], []
    for name, ip, port in sockets:
        label = _label(st, port, name)
        if ip not in LOOPBACK:
            problems.append(f"{label} ({name}) listens on {ip}:{port}, beyond loopback")
        results, found = _probe(st, port, label, canary)
        rows.append(f"{port:6d} {ip:15s} {label:32s} " + "; ".join(results))
        problems += found
    print("\nthe stack's listening sockets and the anonymous probes:\n" + "\n".join(rows))
    weed_ports = {p for p in st.cfg.ports("s3")}
    assert weed_ports <= {port for *_, port in sockets}, "a SeaweedFS port was not found"
    # nothing an anonymous PUT sent landed in the bucket
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="resnet").get("Contents", [])]
    assert not [k for k in keys if "exposure-evil" in k], keys
    assert not problems, "\n".join(problems)
