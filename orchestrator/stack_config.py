"""The local stack's settings: ports, state folder, buckets (orchestrator.stack runs it).

Defaults come from cluster/local.toml, then STACK_<KEY> environment variables, then the
overrides `StackConfig.load` is given (the command line's flags). A port is refused where Ray
would hand it to a worker.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = REPO_ROOT / "cluster" / "local.toml"
SERVICES = ("s3", "mlflow", "ray")


class StackError(UsageError, RuntimeError):
    """A problem the user can fix; the message says how."""


@dataclass
class StackConfig:
    host: str = "127.0.0.1"
    state_dir: Path = Path(".stack")
    buckets: list[str] = field(default_factory=lambda: ["resnet", "mlflow"])
    s3_port: int = 8333
    weed_master_port: int = 9333
    weed_volume_port: int = 9340
    weed_filer_port: int = 8888
    weed_admin_port: int = 22700
    mlflow_port: int = 5000
    ray_port: int = 6379
    ray_dashboard_port: int = 8265
    ray_client_port: int = 10001
    ray_agent_port: int = 23365
    # Ray hands the ports of this range to its worker processes; none of the ports above (nor
    # SeaweedFS's gRPC ports, each port + 10000) may lie in it
    ray_min_worker_port: int = 10002
    ray_max_worker_port: int = 17999
    # Ray swaps a loopback node address for the machine's outward one and listens there, so
    # that other machines can join; True keeps a loopback `host`'s Ray on loopback too (no other
    # node can join then: turn it off for a second node, as the multi-node test does)
    ray_loopback_only: bool = True
    ray_num_cpus: int = 0
    timeout_s: float = 120.0

    @classmethod
    def load(cls, **overrides: object) -> StackConfig:
        """Defaults from cluster/local.toml, then STACK_* variables, then `overrides`."""
        values: dict[str, object] = {}
        if DEFAULTS_FILE.exists():
            values.update(tomllib.loads(DEFAULTS_FILE.read_text()))
        for f in dataclasses.fields(cls):
            env = os.environ.get(f"STACK_{f.name.upper()}")
            if env is not None:
                values[f.name] = env.split(",") if f.name == "buckets" else env
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise StackError(
                f"unknown stack settings {sorted(unknown)} (in {DEFAULTS_FILE} or STACK_*)"
            )
        cfg = cls(**values)  # type: ignore[arg-type]
        for f in dataclasses.fields(cls):
            if f.name.endswith("_port") or f.name == "ray_num_cpus":
                setattr(cfg, f.name, int(getattr(cfg, f.name)))
        cfg.timeout_s = float(cfg.timeout_s)
        if isinstance(cfg.ray_loopback_only, str):
            cfg.ray_loopback_only = cfg.ray_loopback_only.strip().lower() in ("1", "true", "yes")
        cfg.state_dir = Path(cfg.state_dir).resolve()
        cfg.check_ports()
        return cfg

    def check_ports(self) -> None:
        """Refuse a port in Ray's worker-port range: Ray would give it to a worker, and
        whichever of the two starts second fails."""
        low, high = self.ray_min_worker_port, self.ray_max_worker_port
        if not 0 < low <= high:
            raise StackError(
                f"ray_min_worker_port {low}, ray_max_worker_port {high}: expected 0 < min <= max"
            )
        for port, label in self.all_ports():
            if low <= port <= high:
                raise StackError(
                    f"port {port} for {label} lies in Ray's worker-port range {low}-{high} "
                    "(settings ray_min_worker_port, ray_max_worker_port): choose a port "
                    f"outside it, or narrow the range, in {DEFAULTS_FILE} or STACK_*"
                )

    def ephemeral_clashes(self) -> list[str]:
        """The ports inside the kernel's ephemeral range, where any outgoing connection may hold
        one when the stack starts (Linux only; empty where the range cannot be read)."""
        try:
            text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
            low, high = (int(v) for v in text.split())
        except (OSError, ValueError):
            return []
        return [f"{port} ({label})" for port, label in self.all_ports() if low <= port <= high]

    def all_ports(self) -> list[tuple[int, str]]:
        """(port, label) of every service's ports, gRPC twins included."""
        return [item for service in SERVICES for item in self.ports(service).items()]

    def ports(self, service: str) -> dict[int, str]:
        """Every port a service listens on, with a label naming its setting; SeaweedFS serves
        gRPC on each of its ports + 10000."""
        names = {
            "s3": {
                "s3_port": "SeaweedFS S3",
                "weed_master_port": "SeaweedFS master",
                "weed_volume_port": "SeaweedFS volume",
                "weed_filer_port": "SeaweedFS filer",
                "weed_admin_port": "SeaweedFS admin",
            },
            "mlflow": {"mlflow_port": "MLflow server"},
            "ray": {
                "ray_port": "Ray GCS",
                "ray_dashboard_port": "Ray dashboard",
                "ray_client_port": "Ray client server",
                "ray_agent_port": "Ray dashboard agent",
            },
        }[service]
        out: dict[int, str] = {}
        for key, label in names.items():
            out[getattr(self, key)] = f"{label} (setting {key})"
        if service == "s3":
            for key, label in names.items():
                out[getattr(self, key) + 10000] = f"{label} gRPC (setting {key} + 10000)"
        return out
