"""bench/chaos.py's harness: the jobs it submits and what they leave, and its second Ray node.

- Jobs on the stack's Ray head (`submit`, `wait`, `logs`), their checkpoints (`store`,
  `wait_for_checkpoint`, `final_weights`), their processes (`worker_pid`, `driver_pid`), the
  stack's services (`stack`, `during_upload`) and the bench's data set (`make_dataset`); also
  what tests/test_fault_tolerance.py, test_multinode.py and test_spot.py use, through chaos.py.
- `SecondNode`: a raylet started by the bench beside the stack's Ray head (which must be
  joinable: `STACK_RAY_LOOPBACK_ONLY=false`), with its own CPUs and ports; drained as a spot
  reclaim is (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`), or SIGKILLed with every
  process under it at once (a VM that is gone), and started again.
- `ledger_steps`: a job's per-step sample ids (orchestrator.data.ledger's files, newest attempt
  per step, ranks joined) and the world size each attempt trained at.
- `History` / `lost_seconds`: a job's MLflow `train/loss` with timestamps, and the training a
  failure cost in wall seconds.
- `curve_gap`: the largest gap between two loss curves' means over windows of steps, the
  measure the tolerance for a changed world size is stated in.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from orchestrator import storage
from orchestrator.checkpoint import CheckpointStore
from orchestrator.checkpoint_refs import job_checkpoints_url
from orchestrator.data import ledger as ledger_mod

# ---------------------------------------------------------------------------- jobs


def client() -> Any:
    """Ray's job client for RAY_ADDRESS (one per head: its creation asks the head's version,
    and the harnesses poll job states several times a second)."""
    return _client(os.environ["RAY_ADDRESS"], os.environ.get("RAY_AUTH_TOKEN_PATH", ""))


@functools.cache
def _client(address: str, token_path: str) -> Any:  # the token's file: part of the key only
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(args: list[str]) -> str:
    """Submit `python jobs/smoke.py ARGS` to the Ray head; returns the submission id."""
    return client().submit_job(
        entrypoint="python jobs/smoke.py " + " ".join(map(shlex.quote, args))
    )


def wait(job_id: str, timeout_s: float = 900, poll_s: float = 1.0) -> str:
    """The job's terminal status, read every `poll_s` seconds."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client().get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status)
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} still running after {timeout_s} s")


def logs(job_id: str) -> str:
    return client().get_job_logs(job_id)


def store(storage_url: str, name: str) -> CheckpointStore:
    return CheckpointStore(job_checkpoints_url(storage_url, name))


def wait_for_checkpoint(
    st: CheckpointStore, min_step: int, job_id: str, timeout_s: float = 600, poll_s: float = 0.5
) -> int:
    """The newest committed step once one at `min_step` or later is there, read every
    `poll_s` seconds; raises if the job ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = st.latest()
        if latest and latest.step >= min_step:
            return latest.step
        if wait_status_terminal(job_id):
            raise RuntimeError(f"job ended before step {min_step}:\n{logs(job_id)[-3000:]}")
        time.sleep(poll_s)
    raise TimeoutError(f"no checkpoint at step >= {min_step} in {st.root}")


def wait_status_terminal(job_id: str) -> bool:
    from ray.job_submission import JobStatus

    return client().get_job_status(job_id) in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    )


def worker_pid(st: CheckpointStore, step: int, rank: int) -> int:
    """The pid of a rank's process, as recorded in its own checkpoint file."""
    return int(st.read(step, f"rank-{rank:05d}.pt")["pid"])


def driver_pid(name: str) -> int:
    """The job's driver process (`python jobs/smoke.py ... name=NAME ...`)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if f"name={name}" in cmd and any(c.endswith("jobs/smoke.py") for c in cmd):
            return proc.pid
    raise LookupError(f"no driver process for job {name}")


def final_weights(st: CheckpointStore) -> dict[str, torch.Tensor]:
    latest = st.latest()
    assert latest is not None, f"no committed checkpoint in {st.root}"
    return st.read(latest.step, "trainer.pt")["strategy"]["model"]


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metric_steps(experiment: str, name: str, key: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of a job's metric history, in step order (duplicates kept, to be seen)."""
    from mlflow import MlflowClient

    c = MlflowClient()
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    (run,) = c.search_runs([exp.experiment_id], filter_string=f"tags.`orchestrator.job` = '{name}'")
    return sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, key))


def stack() -> Any:
    from orchestrator.stack import Stack, StackConfig

    return Stack(StackConfig.load())


def during_upload(st: CheckpointStore, job: str, timeout_s: float = 300) -> int:
    """Wait until a checkpoint folder exists without its commit marker (an upload running);
    returns its step."""
    root = storage.open_storage(st.root)
    deadline = time.monotonic() + timeout_s
    committed = {c.step for c in st.committed()}
    while time.monotonic() < deadline:
        for d in root.list_dirs():
            step = int(d.removeprefix("step-")) if d.startswith("step-") else -1
            if step > 0 and step not in committed and not root.exists(f"{d}/COMMITTED"):
                return step
        committed = {c.step for c in st.committed()}
        if wait_status_terminal(job):
            raise RuntimeError("job ended before an upload was caught")
        time.sleep(0.05)
    raise TimeoutError("no checkpoint upload seen")


BENCH_DATASET = "s3://resnet/datasets/chaos-smoke"


def make_dataset(url: str) -> str:
    """A small learnable ImageNet-layout set (4 classes, 160x120 JPEGs), generated and
    converted by the project's own scripts; kept between runs (its manifest says it is whole)."""
    if storage.open_storage(url).exists("manifest.json"):
        return url
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="chaos-src-") as src:
        for cmd in (
            ["datasets/synthetic.py", "imagenet", "--out", src, "--classes", "4"]
            + ["--train-per-class", "40", "--val-per-class", "10", "--size", "160x120"],
            ["datasets/imagenet.py", "--src", src, "--dest", url, "--shard-size-mb", "0.5"],
        ):
            subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)
    return url


# ---------------------------------------------------------------------------- the second node


RAY_BIN = Path(sys.executable).parent / "ray"
NODE_CPUS = 2  # the head's 2 (a 2-core box): one worker of scaling.cpus_per_worker=2 on each
# the second raylet's own ports: its dashboard agent's, and a worker-port range apart from
# the head's (two raylets handing out the same ports would race for them)
NODE_AGENT_PORTS = range(24050, 24200, 7)
NODE_WORKER_PORTS = (4000, 4999)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SecondNode:
    """A second raylet joined to the head at `gcs` (host:port), logging to `log_path`."""

    def __init__(self, gcs: str, log_path: Path) -> None:
        self.gcs, self.log_path = gcs, log_path
        self.proc: subprocess.Popen | None = None
        self.node_id = ""

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes (Ray's state API through the dashboard: no ray.init here,
        so the bench never becomes a driver of the cluster it breaks)."""
        from ray.util.state import list_nodes

        # (a state filter here fails on Ray 2.60 with a "data truncation" error: filter below)
        nodes = list_nodes(address=os.environ["RAY_ADDRESS"], limit=1000)
        return [{"id": n.node_id, "head": n.is_head_node} for n in nodes if n.state == "ALIVE"]

    def start(self, timeout_s: float = 180) -> str:
        """Start the raylet and wait until it is alive in the cluster; returns its node id."""
        if self.proc is not None and self.proc.poll() is None:
            return self.node_id
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        agent = next(p for p in NODE_AGENT_PORTS if _port_free(p))
        cmd = [
            str(RAY_BIN), "start", f"--address={self.gcs}", f"--num-cpus={NODE_CPUS}", "--block",
            f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats",
            f"--min-worker-port={NODE_WORKER_PORTS[0]}",
            f"--max-worker-port={NODE_WORKER_PORTS[1]}",
        ]  # fmt: skip
        before = {n["id"] for n in self.alive_nodes()}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            new = [n["id"] for n in self.alive_nodes() if not n["head"] and n["id"] not in before]
            if new:
                self.node_id = new[0]
                # Ray Train sizes a new group from the cluster's resource view, which lags
                # the node's registration: a job submitted at once could start on one worker
                time.sleep(20)
                return self.node_id
            if self.proc.poll() is not None:
                raise RuntimeError(f"the second node exited: see {self.log_path}")
            time.sleep(1)
        raise TimeoutError(f"the second node did not join in {timeout_s} s: see {self.log_path}")

    def drain(self, deadline_s: int) -> None:
        """Drain the node as a spot reclaim reaches Ray: a preemption with a deadline."""
        out = subprocess.run(
            [
                str(RAY_BIN), "drain-node", f"--address={self.gcs}", f"--node-id={self.node_id}",
                "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim (chaos)",
                f"--deadline-remaining-seconds={deadline_s}",
            ],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"ray drain-node failed: {out.stdout}{out.stderr}")

    def kill(self) -> float:
        """SIGKILL the raylet and every process under it at once (a reclaimed or lost VM
        gives no warning); returns the time.time() of the kill."""
        assert self.proc is not None, "the second node was never started"
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        t = time.time()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        self.proc, self.node_id = None, ""
        return t

    def stop(self) -> None:
        """At the bench's end: gone, whatever state it is in."""
        if self.proc is not None:
            self.kill()


# ---------------------------------------------------------------------------- the ledger


@dataclass
class LedgerSteps:
    """A job's ledger, step by step: sorted sample ids of each kept step, and the world size
    of each attempt (oldest first) with the first step it counts for."""

    ids: dict[int, tuple[int, ...]]
    attempts: list[tuple[int, int]]  # (first step, world size) of the attempts that count
    # every attempt, those a newer one cut off entirely too: their steps' losses may be the
    # ones MLflow kept (a replayed step is not logged again)
    raw_attempts: list[tuple[int, int]] = field(default_factory=list)

    @property
    def world_sizes(self) -> list[int]:
        return [w for _, w in self.attempts]


def ledger_steps(root_url: str) -> LedgerSteps:
    """Read `root_url`'s ledger files with the ledger's attempt rule (a newer attempt's resume
    point cuts the older ones), ranks joined per step."""
    root = storage.open_storage(root_url)
    files = ledger_mod.list_files(root)
    cuts = ledger_mod.attempt_cuts(files)
    chunks: dict[int, list[np.ndarray]] = {}
    firsts: dict[int, int] = {}
    worlds: dict[int, int] = {}
    raw_worlds: dict[int, tuple[int, int]] = {}
    for f in sorted(files, key=lambda f: (f.attempt, f.first, f.rank)):
        cut = cuts[f.attempt]
        raw = root.get(f"{ledger_mod.FOLDER}/{f.name}")
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            steps, offsets, ids = z["steps"], z["offsets"], z["ids"]
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        first, world = raw_worlds.get(f.attempt, (f.first, 0))
        raw_worlds[f.attempt] = (min(first, f.first), max(world, int(meta.get("world_size") or 0)))
        if cut is not None and f.first >= cut:
            continue
        worlds[f.attempt] = max(worlds.get(f.attempt, 0), int(meta.get("world_size") or 0))
        firsts[f.attempt] = min(firsts.get(f.attempt, f.first), f.first)
        for i, step in enumerate(steps.tolist()):
            if cut is None or step < cut:
                chunks.setdefault(step, []).append(ids[offsets[i] : offsets[i + 1]])
    joined = {s: tuple(sorted(np.concatenate(c).tolist())) for s, c in sorted(chunks.items())}
    return LedgerSteps(
        joined,
        [(firsts[a], worlds[a]) for a in sorted(worlds)],
        [raw_worlds[a] for a in sorted(raw_worlds)],
    )


# ---------------------------------------------------------------------------- MLflow, time


@dataclass
class History:
    """A job's `train/loss` history: (step, value, timestamp in s) in step order."""

    points: list[tuple[int, float, float]]

    @property
    def steps(self) -> list[tuple[int, float]]:
        return [(s, v) for s, v, _ in self.points]

    def step_time(self) -> float:
        """Median wall seconds per step between consecutive logs (an uninterrupted run)."""
        p = self.points
        return statistics.median((b[2] - a[2]) / (b[0] - a[0]) for a, b in itertools.pairwise(p))

    def last_before(self, t: float) -> int:
        """The newest step logged before time `t` (0: none)."""
        return max((s for s, _, ts in self.points if ts <= t), default=0)


def history(experiment: str, name: str, key: str = "train/loss") -> History:
    from mlflow import MlflowClient

    c = MlflowClient()
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    (run,) = c.search_runs([exp.experiment_id], filter_string=f"tags.`orchestrator.job` = '{name}'")
    metrics = c.get_metric_history(run.info.run_id, key)
    return History(sorted((m.step, m.value, m.timestamp / 1000) for m in metrics))


def lost_seconds(h: History, t_fail: float, step_time: float) -> tuple[float, int]:
    """(wall seconds of training a failure at `t_fail` cost, the steps done when it struck).

    The cost: the longest interval between two logged steps after the failure, less what its
    steps take at `step_time` (an unbroken run's): a restart shows as one such interval, and it
    holds the processes' start, the checkpoint read, the first batch and every step trained
    twice. The steps done: the newest logged before the failure plus the whole steps its time
    since then allows (logs come every LOG_EVERY steps)."""
    pairs = [(a, b) for a, b in itertools.pairwise(h.points) if b[2] > t_fail]
    before = [p for p in h.points if p[2] <= t_fail]
    done = before[-1][0] + int((t_fail - before[-1][2]) / step_time) if before else 0
    if not pairs:
        return float("nan"), done
    excess = [b[2] - a[2] - (b[0] - a[0]) * step_time for a, b in pairs]
    return max(0.0, *excess), done


def curve_gap(a: list[tuple[int, float]], b: list[tuple[int, float]], window: int) -> float:
    """The largest |mean(a) - mean(b)| over consecutive windows of `window` steps (steps both
    curves hold): per-step losses of one batch swing too much to compare one by one."""
    da, db = dict(a), dict(b)
    common = sorted(set(da) & set(db))
    gaps = []
    for i in range(0, len(common) - window + 1, window):
        block = common[i : i + window]
        mean_a, mean_b = (statistics.fmean(d[s] for s in block) for d in (da, db))
        gaps.append(abs(mean_a - mean_b))
    return max(gaps, default=0.0)
