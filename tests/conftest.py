"""Shared fixtures: the real local stack (SeaweedFS S3, MLflow server, Ray head) on loopback.

The test stack runs on its own ports and state folder (.stack-test), so it never collides with
a developer's `make up` stack. It stays up for the whole session; set ORCH_TEST_KEEP_STACK=1 to
leave it running afterwards (faster reruns).
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.study import tiny_study_args  # the bench's small study's overrides
from orchestrator.stack import Stack, StackConfig
from tests import lanes

ROOT = Path(__file__).resolve().parent.parent

# Every port, and SeaweedFS's gRPC port (its port + 10000), lies below the kernel's ephemeral
# range (32768+ here) and above Ray's worker ports (10002-17999): an outgoing connection or a
# Ray worker can take a port in those ranges at any moment, and SeaweedFS then refuses to start.
TEST_PORTS = {
    "s3_port": 20333,
    "weed_master_port": 21333,
    "weed_volume_port": 21340,
    "weed_filer_port": 20888,
    "weed_admin_port": 22646,
    "mlflow_port": 25000,
    "ray_port": 26379,
    "ray_dashboard_port": 28265,
    "ray_client_port": 20001,
    "ray_agent_port": 25465,
}
WEED_PORT_NAMES = (
    "s3_port",
    "weed_master_port",
    "weed_volume_port",
    "weed_filer_port",
    "weed_admin_port",
)


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port` right now."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_weed_ports(low: int = 20000, high: int = 22760) -> dict[str, int]:
    """Five consecutive SeaweedFS ports in [low, high) that are free now, gRPC ports included,
    for a test's own store; none is a test stack port, none falls in the ephemeral range."""
    import random

    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert high + 10000 <= ephemeral_low, (
        f"ports up to {high + 10000} reach the ephemeral range ({ephemeral_low}+)"
    )
    taken = set(TEST_PORTS.values())
    bases = list(range(low, high - len(WEED_PORT_NAMES), 10))
    random.shuffle(bases)  # two tests asking at once rarely pick the same block
    for base in bases:
        ports = [base + i for i in range(len(WEED_PORT_NAMES))]
        if taken.isdisjoint(ports) and all(
            port_is_free(p) and port_is_free(p + 10000) for p in ports
        ):
            return dict(zip(WEED_PORT_NAMES, ports, strict=True))
    raise RuntimeError(f"no five free consecutive ports (and their gRPC ports) in [{low}, {high})")


def test_stack_config(state_dir: Path | None = None, **settings: object) -> StackConfig:
    """A StackConfig for tests: the test ports unless given, and a state folder. Ray listens on
    loopback only, the default; the multi-node test starts a joinable head of its own."""
    return StackConfig.load(
        state_dir=state_dir or ROOT / ".stack-test", **{**TEST_PORTS, **settings}
    )


test_stack_config.__test__ = False  # a helper, not a test


def pytest_configure(config: pytest.Config) -> None:
    """Ray reads its auth mode once per process, when it is first imported: a test module that
    imports Ray at collection, before the stack fixture sets the client variables, would leave
    this process unable to talk to the test stack's Ray (token auth). Set them first."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(Stack(test_stack_config()).ray_token_path))
    # DeepSpeed's CPU collectives JIT-compile a C++ op on first use, under a lock file in the
    # user's shared ~/.cache/torch_extensions: a build killed midway (another checkout's test
    # run stopped) leaves the lock, and every later build waits on it forever. This checkout
    # builds in its own folder (its environment's, so the stack's workers inherit it).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    lanes.nice_the_other_lane(config.option)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist runs the tests in order
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    return lanes.make_scheduler(config, log) if config.getvalue("dist") == "loadgroup" else None


@pytest.hookimpl(tryfirst=True)  # before xdist's worker names each test's group
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests for `make test`'s lanes (tests/lanes.py): every test that uses the
    shared stack (the `stack` fixture, or `@pytest.mark.services` where a test asks for it with
    request.getfixturevalue or starts services of its own) in one group, run in file order on
    one worker, so that a run has one stack and one Ray cluster and no two tests start, stop or
    scan services at once; the others by module."""
    for item in items:
        uses_services = "stack" in item.fixturenames or item.get_closest_marker("services")
        group = lanes.SERVICES if uses_services else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


def _live_leases(leases: Path) -> dict[str, str]:
    """Other live processes' leases on the test stack: pid -> the xdist run id each wrote
    ("" outside xdist)."""
    live = {}
    for lease in leases.iterdir():
        mine = lease.name == str(os.getpid())
        if lease.name.isdigit() and not mine and Path(f"/proc/{lease.name}").exists():
            with contextlib.suppress(OSError):
                live[lease.name] = lease.read_text()
    return live


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The running test stack; its client variables are set in os.environ for the session."""
    st = Stack(test_stack_config())
    # several pytest sessions may share the test stack: each holds a lease, the last one out
    # stops it (unless ORCH_TEST_KEEP_STACK is set)
    leases = st.dir / "leases"
    leases.mkdir(parents=True, exist_ok=True)
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")  # the same in every worker of one run
    (leases / str(os.getpid())).write_text(run)
    twin = [pid for pid, its_run in _live_leases(leases).items() if run and its_run == run]
    if twin:
        (leases / str(os.getpid())).unlink()
        pytest.fail(
            f"xdist worker {os.environ.get('PYTEST_XDIST_WORKER')} and process(es) {twin} of this "
            "run both use the test stack: the services' tests must share one worker. Run pytest "
            "with `--dist loadgroup` (as make test does) on a pytest that pytest-xdist can group "
            "with (pyproject.toml's pin says which)"
        )
    st.up()
    saved = dict(os.environ)
    os.environ.update(st.env())
    yield st
    os.environ.clear()
    os.environ.update(saved)
    (leases / str(os.getpid())).unlink(missing_ok=True)
    if not _live_leases(leases) and not os.environ.get("ORCH_TEST_KEEP_STACK"):
        st.down()


@pytest.fixture
def s3_prefix(stack: Stack) -> str:
    """A fresh s3:// prefix in the `resnet` bucket, unique to this test."""
    return f"s3://resnet/tests/{uuid.uuid4().hex[:12]}"


def run_script(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """Run a repo script with this interpreter the way a user would; fail loudly with its output."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, (
        f"{' '.join(args)} failed ({proc.returncode}):\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout + proc.stderr


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`python ARGS` (`-m MODULE ...` or `FILE ...`) as its `__main__`, in this process: runpy
    runs the very code `python -m` and `python FILE` run, without a child interpreter's start-up
    (seconds each on the 2-core box). Returns (exit code, stdout, stderr); an uncaught exception
    fails the test with its traceback. For a command's answer, not for a job that trains."""
    import runpy
    import warnings

    module = args[1] if args[0] == "-m" else None
    path = None if module else str(ROOT / args[0])
    saved = sys.argv, list(sys.path), os.getcwd()
    code: int | None = None
    capsys.readouterr()
    try:
        sys.argv = [module or str(path), *args[(2 if module else 1) :]]
        sys.path.insert(0, str(Path(path).parent) if path else str(ROOT))  # as python does
        os.chdir(ROOT)
        with warnings.catch_warnings():
            # a module run as __main__ that this process has imported already (its tests did)
            warnings.filterwarnings("ignore", ".* found in sys.modules", RuntimeWarning)
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(path), run_name="__main__")
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        os.chdir(saved[2])
    assert code is not None, f"{' '.join(args)} ended without an exit code"
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def generated_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small learnable ImageNet-layout folder (4 classes, 160x120 JPEGs), one for both lanes."""

    def build(out: Path) -> None:
        run_script(
            "datasets/synthetic.py", "imagenet", "--out", str(out), "--classes", "4",
            "--train-per-class", "40", "--val-per-class", "10", "--size", "160x120",
        )  # fmt: skip

    return lanes.built_once(tmp_path_factory, "imagenet-src", build)


@pytest.fixture(scope="session")
def smoke_dataset(stack: Stack, generated_imagenet: Path) -> str:
    """That folder as WebDataset shards in the test stack's S3; returns the dataset URL."""
    url = f"s3://resnet/datasets/smoke-{uuid.uuid4().hex[:8]}"
    run_script(
        "datasets/imagenet.py",
        "--src",
        str(generated_imagenet),
        "--dest",
        url,
        "--shard-size-mb",
        "0.5",
    )
    return url


@pytest.fixture(scope="session")
def tracked_smoke_job(stack: Stack, smoke_dataset: str) -> dict[str, str]:
    """jobs/smoke.py --local, tracked, once a session (CIFAR ResNet-20 on the smoke dataset, 6
    steps, checkpoints at 3 and 6), with a secret in its environment beside the stack's own:
    test_tracking reads its run, test_publish its registered models. Returns job, experiment,
    dataset, output, token."""
    job, exp = f"loop-{uuid.uuid4().hex[:8]}", f"track-loop-{uuid.uuid4().hex[:8]}"
    token = f"hf_{uuid.uuid4().hex}"
    output = run_script(
        "jobs/smoke.py",
        "--local",
        f"name={job}",
        f"data.url={smoke_dataset}",
        f"tracking.experiment={exp}",
        "scaling.num_workers=1",
        "scaling.global_batch=16",
        "schedule.max_iters=6",
        "schedule.milestones=[]",
        "eval.every_iters=3",
        "checkpoint.every_iters=3",
        "tracking.log_every=2",
        "data.num_workers=0",
        env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "HF_TOKEN": token},
    )
    return {
        "job": job,
        "experiment": exp,
        "dataset": smoke_dataset,
        "output": output,
        "token": token,
    }


def odd_shards_data(url: Path | str, num_workers: int = 1) -> list[str]:
    """The data overrides that train on `odd_local_shards` at 32 px (whole-image crops)."""
    return [
        f"data.url={url}",
        "data.source=shards",
        "data.image_size=32",
        "data.train_transform=rrc",
        "data.scale_range=[36,48]",
        "data.eval_resize=36",
        f"data.num_workers={num_workers}",
        "data.shuffle_buffer=16",
    ]


def odd_shards_config(url: Path | str, **overrides: Any) -> Any:
    """`odd_shards_data` as a DataConfig, for tests that drive the loaders directly."""
    from orchestrator.spec import DataConfig

    settings: dict[str, Any] = {
        "url": str(url),
        "train_transform": "rrc",
        "image_size": 32,
        "scale_range": (36, 48),
        "eval_resize": 36,
        "num_workers": 1,
        "shuffle_buffer": 16,
    }
    return DataConfig(**{**settings, **overrides})


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar shard of (member name, bytes), as another tool might write it."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def odd_local_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local shards with an odd validation count (3 classes x 7 = 21) for exact-count tests."""
    src = tmp_path_factory.mktemp("odd-src")
    run_script(
        "datasets/synthetic.py",
        "imagenet",
        "--out",
        str(src),
        "--classes",
        "3",
        "--train-per-class",
        "16",
        "--val-per-class",
        "7",
        "--size",
        "64x48",
        "--size-jitter",
        "0",
    )
    dest = tmp_path_factory.mktemp("odd-shards")
    run_script(
        "datasets/imagenet.py", "--src", str(src), "--dest", str(dest), "--shard-size-mb", "0.05"
    )
    return dest


def assert_no_secret_in_runs(run_ids: list[str], secrets: list[str], *texts: str) -> None:
    """None of `secrets` in the runs' names, params, tags, metric names and every artifact (all
    downloaded), nor in `texts` (a job's output): one check for every kind of run."""
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient()
    places: dict[str, str] = {f"text {i}": t for i, t in enumerate(texts)}
    for run_id in run_ids:
        run = client.get_run(run_id)
        places[f"{run_id} name"] = run.info.run_name or ""
        places[f"{run_id} params"] = repr(run.data.params)
        places[f"{run_id} tags"] = repr(run.data.tags)
        places[f"{run_id} metric names"] = repr(sorted(run.data.metrics))
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(client.download_artifacts(run_id, "", tmp))
            for f in sorted(p for p in root.rglob("*") if p.is_file()):
                places[f"{run_id} artifact {f.relative_to(root)}"] = f.read_bytes().decode(
                    "utf-8", "replace"
                )
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"a secret reached {where}"


def load_job_spec(stem: str) -> Any:
    """A job file's SPEC (jobs/STEM.py), imported as the job would be."""
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        found = importlib.util.spec_from_file_location(stem, ROOT / "jobs" / f"{stem}.py")
        module = importlib.util.module_from_spec(found)
        found.loader.exec_module(module)
        return module.SPEC
    finally:
        sys.path.remove(str(ROOT / "jobs"))


# --------------------------------------------------------------------------- two Ray nodes

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# How fast the joinable head notices a drain and a reclaimed node. An elastic group that
# restarts after a reclaim sizes itself from Ray Train's reservations, which still count the dead
# node until the reservations' next refresh (every 20 s): it asks for both workers, waits out Ray
# Train's worker-group start timeout (60 s by default), then starts on the node left (see
# docs/operators-guide.md). Here a killed node is dead after 2 failed health checks 1 s apart
# (Ray's default: 5, 3 s apart); the wait for a group's placement group that cannot be placed is
# 5 s (that timeout covers the placement alone, never the workers' start, and Ray Train retries
# it without counting a failure); Ray Train's watcher looks for drains every second (default 5).
QUICK_RECOVERY = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "2",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
}


@pytest.fixture(scope="session")
def joinable_ray_head(stack: Stack) -> Iterator[Stack]:
    """One joinable Ray head (`ray_loopback_only=false`) for the run's multi-node tests
    (test_multinode, test_spot), started once: free ports below the ephemeral range, a short
    state folder for Ray's socket paths, the test stack's secrets (the same S3 keys and Ray
    token). The shared test stack's Ray listens on loopback only and cannot be joined."""
    import shutil
    import tempfile

    state = Path(tempfile.mkdtemp(prefix="orch-mn-"))
    ports = iter(p for p in range(22800, 23390, 7) if port_is_free(p))
    names = ("ray_port", "ray_dashboard_port", "ray_client_port", "ray_agent_port")
    cfg = test_stack_config(state, ray_loopback_only=False, **{name: next(ports) for name in names})
    (state / "secrets").symlink_to(stack.dir / "secrets")
    head = Stack(cfg)
    try:
        with pytest.MonkeyPatch.context() as env:  # in the head's environment only
            for key, value in QUICK_RECOVERY.items():
                env.setenv(key, value)
            head.up(("ray",))
        yield head
    finally:
        head.down()
        (state / "secrets").unlink()  # the test stack's: never purged through the link
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def cluster_head(joinable_ray_head: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """That head, its client variables replacing the test stack's for the test."""
    monkeypatch.delenv(LOOPBACK_SWITCH, raising=False)  # set by the loopback test stack
    for key, value in joinable_ray_head.env().items():
        monkeypatch.setenv(key, value)
    return joinable_ray_head


@contextlib.contextmanager
def joined_node(head: Stack, cpus: int, log: Path) -> Iterator[tuple[int, str]]:
    """A second raylet of `cpus` CPUs joined to `head`, this process connected to the cluster
    as a driver; yields (the raylet's pid, its node id) once Ray lists it alive; stopped
    afterwards. A node an earlier test stopped may still be listed alive for a while: the one
    wanted is the only live non-head node of `cpus` CPUs (test_multinode's has 1, test_spot's
    2)."""
    import subprocess
    import time

    import ray

    from orchestrator.process_tree import stop_tree

    agent_port = next(p for p in range(23391, 23600, 7) if port_is_free(p))
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"), "start", f"--address={head.gcs_address}",
            f"--num-cpus={cpus}", "--block", f"--dashboard-agent-listen-port={agent_port}",
            "--disable-usage-stats",
        ],
        # stopped at once at the end, not drained for 30 s first (see the stack's ray command)
        env={
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        },
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    ray.init(address=head.gcs_address, logging_level="ERROR")
    try:
        deadline = time.monotonic() + 120
        while True:
            found = [
                n["NodeID"]
                for n in ray.nodes()
                if n["Alive"]
                and "node:__internal_head__" not in n["Resources"]
                and n["Resources"].get("CPU") == cpus
            ]
            if len(found) == 1:
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the second node did not join: {found}"
            time.sleep(0.5)
        yield proc.pid, found[0]
    finally:
        ray.shutdown()
        stop_tree(proc.pid)


# --------------------------------------------------------------------------- a small study


def submit_study(script: str, *args: str, timeout: float = 1200) -> Any:
    """`ray job submit -- python SCRIPT ARGS` to the test stack's Ray head; the script by its
    full path, since the head runs drivers in the folder it was started in."""
    import subprocess
    import sys

    ray = Path(sys.executable).with_name("ray")
    return subprocess.run(
        [str(ray), "job", "submit", "--", "python", str(ROOT / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def cifar_dataset(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A generated CIFAR-10-layout dataset (10 classes, 20 train and 5 test images each) in the
    test stack's S3."""
    src = tmp_path_factory.mktemp("cifar-src")
    run_script(
        "datasets/synthetic.py", "cifar10", "--out", str(src),
        "--train-per-class", "20", "--test-per-class", "5",
    )  # fmt: skip
    url = f"s3://resnet/datasets/cifar-{uuid.uuid4().hex[:8]}"
    run_script("datasets/cifar10.py", "--src", str(src), "--dest", url, "--shard-size-mb", "0.1")
    return url


# The session's small study: a residual and a plain cell of two depths (19 and 31 3x3 layers
# for Fig. 7), each over 2 seeds (a mean +- std per cell). A trial's job costs 15-30 s on the
# 2-core box whatever its 4 steps (Ray Train's worker group, its MLflow run, the driver's
# follow-ups): 4 trials, not the bench's 8 (2 depths x plain/residual x 2 seeds), prove the
# same table, nesting, Fig. 7 and 2-at-a-time in about half the time.
STUDY_CELLS = "cifar_resnet20,cifar_plain32"


@pytest.fixture(scope="session")
def small_study(stack: Stack, cifar_dataset: str) -> dict[str, Any]:
    """jobs/cifar10_table6.py through `ray job submit`, once a session: STUDY_CELLS x 2 seeds
    = 4 trials of 4 CPU steps, 2 at a time on Ray Tune. test_study checks it, test_dashboard
    opens its parent run in a browser (whichever comes first runs it). Returns experiment,
    name, args, output."""
    experiment, name = f"study-{uuid.uuid4().hex[:6]}", f"st{uuid.uuid4().hex[:6]}"
    args = tiny_study_args(
        cifar_dataset, experiment, name,
        f"study.cells={STUDY_CELLS}", "study.seeds=2", "study.max_concurrent=2",
    )  # fmt: skip
    proc = submit_study("jobs/cifar10_table6.py", *args)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return {"experiment": experiment, "name": name, "args": args, "output": output}
