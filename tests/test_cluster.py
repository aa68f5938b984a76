"""The cluster templates and the operator's guide, checked without a cloud.

- cluster/aws-p5.yaml against the JSON schema Ray ships (ray/autoscaler/ray-schema.json), plus
  the cross-field rules `ray up` applies and ours (token auth, dashboard on loopback);
- cluster/kuberay/*.yaml for the structure RayCluster and RayJob require, with every credential
  from a secretKeyRef and the secret template holding placeholders only;
- every repo path, `python -m` module, script, `ray` subcommand and flag that these files and
  docs/operators-guide.md name exists.

Each validator is also fed a deliberately broken copy, so a validator that misses the mistake
fails a test too.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import importlib.util
import io
import json
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws-p5.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
SECRET_TEMPLATE = CLUSTER / "kuberay" / "secret-template.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
GUIDE = ROOT / "docs" / "operators-guide.md"


def ray_dir() -> Path:
    """The installed ray package, found without importing it (importing ray takes seconds)."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations, "ray is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strings(node: Any) -> Iterator[str]:
    """Every string scalar in a parsed YAML document (commands live in them)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


# ============================================================ the Ray cluster launcher config


@cache
def ray_schema() -> dict[str, Any]:
    return json.loads((ray_dir() / "autoscaler" / "ray-schema.json").read_text())


def launcher_problems(config: Any) -> list[str]:
    """What `ray up` would reject in a launcher config, and what this project requires of one."""
    validator = jsonschema.Draft7Validator(ray_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        return [f"schema: {e.json_path}: {e.message}" for e in errors]
    problems = []
    # the rules ray.autoscaler._private.util.validate_config adds to the schema
    types = config.get("available_node_types", {})
    if config.get("head_node_type") not in types:
        problems.append(
            f"head_node_type {config.get('head_node_type')!r} is not one of {sorted(types)}"
        )
    if "cluster_synced_files" not in config:
        problems.append(
            "cluster_synced_files is missing (ray up treats that as a Ray version mismatch)"
        )
    max_workers = config.get("max_workers", 0)
    if sum(t.get("min_workers", 0) for t in types.values()) > max_workers:
        problems.append(
            f"the node types' min_workers add up to more than max_workers={max_workers}"
        )
    for name, node_type in types.items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", max_workers)
        if not 0 <= low <= high <= max_workers:
            problems.append(
                f"{name}: min_workers {low} <= max_workers {high} <= {max_workers} does not hold"
            )
    # ours: token auth on every node, the dashboard on the head's loopback only
    starts = [
        c
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for c in config.get(key, [])
        if "ray start" in c
    ]
    if len(starts) < 2:
        problems.append(
            "expected a `ray start` in both head_start_ray_commands and worker_start_ray_commands"
        )
    for command in starts:
        if "RAY_AUTH_MODE=token" not in command:
            problems.append(f"`ray start` without RAY_AUTH_MODE=token: {command!r}")
    for command in config.get("head_start_ray_commands", []):
        if "--head" in command and "--dashboard-host=127.0.0.1" not in command:
            problems.append(
                "the head's `ray start` must keep the dashboard on --dashboard-host=127.0.0.1"
            )
    region = config.get("provider", {}).get("region")
    for command in strings(config):
        for other in re.findall(r"--region[ =](\S+)", command):
            if other != region:
                problems.append(
                    f"a command uses --region {other}, the provider's region is {region}"
                )
    return problems


def test_launcher_config_passes_rays_schema() -> None:
    assert launcher_problems(load(LAUNCHER)) == []


def test_launcher_config_describes_p5_gpu_nodes() -> None:
    config = load(LAUNCHER)
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert len(gpu) == 1
    assert gpu[0]["node_config"]["InstanceType"] == "p5.48xlarge"
    assert gpu[0]["resources"]["GPU"] == 8
    assert gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] == config["max_workers"] == 64


def test_launcher_config_installs_the_project_and_reads_secrets_from_the_secrets_manager() -> None:
    config = load(LAUNCHER)
    setup = "\n".join(config["setup_commands"])
    assert "git clone" in setup and "pip install -q -e ~/resnet-orchestrator" in setup
    assert '"torch==' in setup and "--no-build-isolation" in setup
    assert "aws secretsmanager get-secret-value" in setup and "~/.ray/auth_token" in setup
    assert "umask 077" in setup
    text = LAUNCHER.read_text()
    # nothing secret inline: no keys, no token, no password
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)\s*[=:]", text)
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]|PASSWORD\s*[=:]|AKIA[0-9A-Z]{16}", text)
    assert "ray job submit -- python jobs/imagenet_r152.py" in text


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, leaf = path.split("/")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is _DELETE:
            del node[int(leaf) if isinstance(node, list) else leaf]
        else:
            node[int(leaf) if isinstance(node, list) else leaf] = value

    return mutate


_DELETE = object()


def _replace_in(commands: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    """Replace `old` in the first command of the list `commands` that holds it."""

    def mutate(doc: dict[str, Any]) -> None:
        index = next((i for i, c in enumerate(doc[commands]) if old in c), None)
        assert index is not None, f"{old!r} is in none of {commands}: the copy would not be broken"
        doc[commands][index] = doc[commands][index].replace(old, new)

    return mutate


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda c: c.update(setup_comands=c.pop("setup_commands")),
            "'setup_comands' was unexpected",
        ),
        (_set("max_workers", "many"), "is not of type 'integer'"),
        (_set("provider", _DELETE), "'provider' is a required property"),
        (_set("available_node_types/gpu_p5/resources/GPU", "8"), "is not of type 'integer'"),
        (
            _set("available_node_types/gpu_p5/node_config", _DELETE),
            "'node_config' is a required property",
        ),
        (_set("head_node_type", "ray.head.default"), "head_node_type"),
        (_set("available_node_types/gpu_p5/min_workers", 100), "min_workers"),
        (_set("cluster_synced_files", _DELETE), "cluster_synced_files"),
        (
            _replace_in("worker_start_ray_commands", "RAY_AUTH_MODE=token ", ""),
            "RAY_AUTH_MODE=token",
        ),
        (
            _replace_in("head_start_ray_commands", "127.0.0.1", "0.0.0.0"),
            "--dashboard-host=127.0.0.1",
        ),
        (
            _replace_in("setup_commands", "--region REPLACE_WITH_REGION", "--region us-west-2"),
            "--region",
        ),
    ],
)
def test_launcher_validator_catches_broken_copies(
    mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    broken = copy.deepcopy(load(LAUNCHER))
    mutate(broken)
    problems = launcher_problems(broken)
    assert any(expected in p for p in problems), problems


# ======================================================================= KubeRay manifests

SECRET_ENV = re.compile(
    r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|TOKEN|PASSWORD|SECRET|KEY$"
)
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def containers(pod_template: Any) -> list[Any]:
    spec = pod_template.get("spec", {}) if isinstance(pod_template, dict) else {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _pod_problems(where: str, template: Any) -> list[str]:
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        return [f"{where}.template.spec is missing"]
    if not template["spec"].get("containers"):
        return [f"{where}.template.spec.containers is empty or missing"]
    return [
        f"{where}: container {c.get('name', '?')!r} has no image"
        for c in template["spec"]["containers"]
        if not c.get("image")
    ]


def raycluster_spec_problems(spec: Any, where: str = "spec") -> list[str]:
    """The fields a RayClusterSpec must have for KubeRay to start the cluster we mean."""
    if not isinstance(spec, dict):
        return [f"{where}: expected a mapping"]
    problems = []
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return [f"{where}.headGroupSpec is missing"]
    if not isinstance(head.get("rayStartParams"), dict):
        problems.append(f"{where}.headGroupSpec.rayStartParams is required (it may be {{}})")
    problems += _pod_problems(f"{where}.headGroupSpec", head.get("template"))
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return [*problems, f"{where}.workerGroupSpecs: expected at least one worker group"]
    gpus = 0
    for i, group in enumerate(groups):
        at = f"{where}.workerGroupSpecs[{i}]"
        if not isinstance(group.get("groupName"), str) or not group.get("groupName"):
            problems.append(f"{at}.groupName is required")
        counts = {k: group.get(k) for k in ("replicas", "minReplicas", "maxReplicas")}
        for key, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{at}.{key} must be an integer >= 0, got {value!r}")
        if all(isinstance(v, int) for v in counts.values()) and not (
            counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]
        ):
            problems.append(f"{at}: minReplicas <= replicas <= maxReplicas does not hold: {counts}")
        if not isinstance(group.get("rayStartParams"), dict):
            problems.append(f"{at}.rayStartParams is required (it may be {{}})")
        problems += _pod_problems(at, group.get("template"))
        for c in containers(group.get("template")):
            gpus += int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    if gpus == 0:
        problems.append(f"{where}: no worker group has nvidia.com/gpu in its container limits")
    # token auth: the operator's authOptions, or RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from a
    # Secret: secret_problems checks that) in every Ray container, as KubeRay < 1.5.1 needs
    if spec.get("authOptions", {}).get("mode") != "token":
        pods = [head.get("template"), *(g.get("template") for g in groups)]
        for c in (c for pod in pods for c in pod["spec"]["containers"]):
            env = {e.get("name"): e for e in c.get("env", [])}
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token" or "RAY_AUTH_TOKEN" not in env:
                problems.append(f"{where}: token auth is off (set authOptions.mode: token)")
                break
    return problems


def secret_problems(doc: Any, where: str = "") -> list[str]:
    """Credentials only by reference: every secret-looking env var from a secretKeyRef."""
    problems = []
    if isinstance(doc, dict):
        for i, entry in enumerate(doc.get("env", []) if isinstance(doc.get("env"), list) else []):
            name = entry.get("name", "")
            if SECRET_ENV.search(name):
                ref = entry.get("valueFrom", {}).get("secretKeyRef", {})
                if "value" in entry or not (ref.get("name") and ref.get("key")):
                    problems.append(
                        f"{where}.env[{i}] {name}: must come from a secretKeyRef, not a value"
                    )
        for key, value in doc.items():
            problems += secret_problems(value, f"{where}.{key}")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            problems += secret_problems(value, f"{where}[{i}]")
    elif isinstance(doc, str) and re.search(r"AKIA[0-9A-Z]{16}", doc):
        problems.append(f"{where}: looks like an AWS access key id")
    return problems


def manifest_problems(doc: Any) -> list[str]:
    """The structure KubeRay's RayCluster and RayJob require, and no literal secrets."""
    if not isinstance(doc, dict):
        return ["expected a mapping"]
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    name = doc.get("metadata", {}).get("name")
    if not isinstance(name, str) or not DNS_NAME.match(name):
        problems.append(f"metadata.name must be a DNS-1123 label, got {name!r}")
    kind, spec = doc.get("kind"), doc.get("spec")
    if kind == "RayCluster":
        problems += raycluster_spec_problems(spec)
    elif kind == "RayJob":
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("entrypoint"), str)
            or not spec["entrypoint"]
        ):
            problems.append("spec.entrypoint is required")
        spec = spec if isinstance(spec, dict) else {}
        if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
            problems.append("spec needs exactly one of rayClusterSpec or clusterSelector")
        if "rayClusterSpec" in spec:
            problems += raycluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec")
    else:
        problems.append(f"kind must be RayCluster or RayJob, got {kind!r}")
    return problems + secret_problems(doc)


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifests_have_the_structure_kuberay_requires(path: Path) -> None:
    docs = load_all(path)
    assert len(docs) == 1
    assert manifest_problems(docs[0]) == []


def test_raycluster_has_an_8_gpu_worker_group_and_token_auth() -> None:
    spec = load(RAYCLUSTER)["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    group = spec["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_runs_the_paper_job_on_the_same_cluster() -> None:
    job = load(RAYJOB)["spec"]
    assert job["entrypoint"].split()[:2] == ["python", "jobs/imagenet_r152.py"]
    # one cluster definition, written twice: they must not drift apart
    assert job["rayClusterSpec"] == load(RAYCLUSTER)["spec"]


def test_rayjob_entrypoint_is_a_valid_job_command() -> None:
    from orchestrator.launch import resolve
    from orchestrator.plan import load_job_spec

    program, script, *args = shlex.split(load(RAYJOB)["spec"]["entrypoint"])
    assert program == "python" and (ROOT / script).is_file()
    spec, _ = resolve(
        load_job_spec(ROOT / script), args
    )  # overrides and flags as the job parses them
    assert spec.name == "imagenet_r152"


HEAD = "spec/headGroupSpec/template/spec/containers/0"
WORKER = "spec/workerGroupSpecs/0"


@pytest.mark.parametrize(
    ("path", "mutate", "expected"),
    [
        (RAYCLUSTER, _set("apiVersion", "ray.io/v1alpha1"), "apiVersion"),
        (RAYCLUSTER, _set("kind", "RayClustr"), "kind"),
        (RAYCLUSTER, _set("metadata/name", "ResNet_Cluster"), "metadata.name"),
        (RAYCLUSTER, _set("spec/headGroupSpec/rayStartParams", _DELETE), "rayStartParams"),
        (RAYCLUSTER, _set(f"{HEAD}/image", _DELETE), "has no image"),
        (RAYCLUSTER, _set(f"{WORKER}/maxReplicas", _DELETE), "maxReplicas"),
        (RAYCLUSTER, _set(f"{WORKER}/minReplicas", 5), "minReplicas <= replicas"),
        (RAYCLUSTER, _set(f"{WORKER}/groupName", _DELETE), "groupName"),
        (RAYCLUSTER, _set("spec/authOptions", _DELETE), "token auth is off"),
        (
            RAYCLUSTER,
            _set(f"{HEAD}/env/1", {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}),
            "secretKeyRef",
        ),
        (
            RAYCLUSTER,
            _set(f"{HEAD}/env/0", {"name": "RAY_AUTH_TOKEN", "value": "abc"}),
            "secretKeyRef",
        ),
        (
            RAYCLUSTER,
            _set(
                f"{HEAD}/env/0",
                {
                    "name": "AWS_ACCESS_KEY_ID",
                    "valueFrom": {"secretKeyRef": {"name": "resnet-credentials"}},
                },
            ),
            "secretKeyRef",
        ),
        (RAYJOB, _set("spec/entrypoint", _DELETE), "spec.entrypoint"),
        (RAYJOB, _set("spec/rayClusterSpec", _DELETE), "rayClusterSpec or clusterSelector"),
        (
            RAYJOB,
            _set("spec/clusterSelector", {"ray.io/cluster": "resnet"}),
            "rayClusterSpec or clusterSelector",
        ),
        (RAYJOB, _set("spec/rayClusterSpec/workerGroupSpecs", []), "at least one worker group"),
    ],
)
def test_kuberay_validator_catches_broken_copies(
    path: Path, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    broken = copy.deepcopy(load(path))
    mutate(broken)
    problems = manifest_problems(broken)
    assert any(expected in p for p in problems), problems


def test_kuberay_validator_accepts_token_auth_set_by_hand() -> None:
    """The route for KubeRay < 1.5.1: RAY_AUTH_MODE=token and the token from your own Secret."""
    manual = copy.deepcopy(load(RAYCLUSTER))
    del manual["spec"]["authOptions"]
    spec = manual["spec"]
    for pod in [
        spec["headGroupSpec"]["template"],
        *(g["template"] for g in spec["workerGroupSpecs"]),
    ]:
        for c in pod["spec"]["containers"]:
            c["env"] += [
                {"name": "RAY_AUTH_MODE", "value": "token"},
                {
                    "name": "RAY_AUTH_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": "t", "key": "auth_token"}},
                },
            ]
    assert manifest_problems(manual) == []


def test_kuberay_validator_catches_a_cluster_without_gpus() -> None:
    broken = copy.deepcopy(load(RAYCLUSTER))
    worker = broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    del worker["resources"]["limits"]["nvidia.com/gpu"]  # a key with a slash: not for _set's paths
    assert any("nvidia.com/gpu" in p for p in manifest_problems(broken))


PLACEHOLDER = re.compile(r"^REPLACE_WITH_[A-Z0-9_]+$")


def test_secret_template_holds_placeholders_only() -> None:
    text = SECRET_TEMPLATE.read_text()
    assert text.startswith("# TEMPLATE: placeholder values only")
    docs = {doc["kind"]: doc for doc in load_all(SECRET_TEMPLATE)}
    secret, config_map = docs["Secret"], docs["ConfigMap"]
    assert "data" not in secret, (
        "base64 `data:` could hide a real value: use stringData placeholders"
    )
    assert secret["stringData"] and all(PLACEHOLDER.match(v) for v in secret["stringData"].values())
    assert all(PLACEHOLDER.match(v) for v in config_map["data"].values())


def _refs(node: Any, kind: str) -> Iterator[tuple[str, str]]:
    """(name, key) of every secretKeyRef / configMapRef in a document."""
    if isinstance(node, dict):
        if kind in node:
            yield node[kind]["name"], node[kind].get("key", "")
        for value in node.values():
            yield from _refs(value, kind)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value, kind)


def test_manifests_reference_exactly_what_the_template_defines() -> None:
    docs = {doc["kind"]: doc for doc in load_all(SECRET_TEMPLATE)}
    secret_keys = {
        (docs["Secret"]["metadata"]["name"], key) for key in docs["Secret"]["stringData"]
    }
    for path in (RAYCLUSTER, RAYJOB):
        refs = set(_refs(load(path), "secretKeyRef"))
        maps = {name for name, _ in _refs(load(path), "configMapRef")}
        assert refs == secret_keys, (
            f"{path.name}: references {refs}, the template defines {secret_keys}"
        )
        assert maps == {docs["ConfigMap"]["metadata"]["name"]}


def test_every_file_pins_the_installed_ray_and_the_same_torch() -> None:
    ray_version = importlib.metadata.version("ray")
    assert f'"ray[default,train]=={ray_version}"' in LAUNCHER.read_text()
    assert f"rayproject/ray:{ray_version}-" in DOCKERFILE.read_text()
    for path in (RAYCLUSTER, RAYJOB):
        spec = load(path)["spec"]
        assert (spec.get("rayClusterSpec") or spec)["rayVersion"] == ray_version
    torch_pins = {
        m
        for p in (LAUNCHER, DOCKERFILE, ROOT / "Makefile")
        for m in re.findall(r"torch==[\d.]+", p.read_text())
    }
    assert len(torch_pins) == 1, torch_pins


def test_dockerfile_copies_files_that_exist() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY"):
            sources = [t for t in line.split()[1:-1] if not t.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), (
                    f"cluster/Dockerfile copies {source}, which does not exist"
                )


def test_every_install_can_build_the_partial_jpeg_decoder() -> None:
    """The image and the launcher's nodes get what setup.py needs for orchestrator/_jpeg_region.c
    (the compiler and libjpeg's headers), and the image has setup.py and the C source in place
    before it runs `pip install -e .`: without them the build skips the module silently."""
    lines = DOCKERFILE.read_text().splitlines()
    install = next(i for i, line in enumerate(lines) if "pip install --no-cache-dir -e ." in line)
    copied = " ".join(line for line in lines[:install] if line.startswith("COPY"))
    assert "setup.py" in copied and "orchestrator/" in copied
    apt = " ".join(line for line in lines[:install] if "apt-get install" in line)
    assert "gcc" in apt and "libjpeg-dev" in apt
    setup = "\n".join(load(LAUNCHER)["setup_commands"])
    apt_line = next(line for line in setup.splitlines() if "apt-get" in line and "install" in line)
    assert all(pkg in apt_line for pkg in ("gcc", "libjpeg-dev", "python3-dev"))
    assert "orchestrator/_jpeg_region.c" in (ROOT / "setup.py").read_text()


# ============================================================ paths, modules, commands, flags

REPO_PATH = re.compile(
    r"(?<![\w/.:~$-])((?:jobs|datasets|cluster|docs|orchestrator|tests|bench)/[\w.*/-]*[\w*])"
)
PY_MODULE = re.compile(r"\bpython3?\s+-m\s+((?:orchestrator)(?:\.\w+)+)([^\n`|;&)#\"']*)")
PY_SCRIPT = re.compile(r"\bpython3?\s+((?:jobs|datasets|bench)/[\w.-]+\.py)([^\n`|;&)#\"']*)")
RAY_COMMAND = re.compile(r"(?<![\w./-])ray\s+([a-z][\w-]*)([^\n`|;&)#\"']*)")


def _argparse_flags(path: Path) -> set[str]:
    """The option strings of every add_argument call in a file (without running it)."""
    flags = {"-h", "--help"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {
                a.value
                for a in node.args
                if isinstance(a, ast.Constant) and str(a.value).startswith("-")
            }
    return flags


@cache
def script_flags(target: str) -> frozenset[str]:
    """Flags a repo command takes: a job file (orchestrator.launch), a script, or a module."""
    if target.startswith("jobs/"):
        return frozenset(_argparse_flags(ROOT / "orchestrator" / "launch.py"))
    if target.startswith("orchestrator."):
        module = ROOT / target.replace(".", "/")  # a module file, or a package's folder
        files = sorted(module.glob("*.py")) if module.is_dir() else [module.with_suffix(".py")]
        flags = set().union(*map(_argparse_flags, files))
        if target == "orchestrator.stack":  # its port flags are generated from StackConfig
            from orchestrator import stack

            out = io.StringIO()
            with redirect_stdout(out), pytest.raises(SystemExit):
                stack.main(["--help"])
            flags |= set(re.findall(r"(?<![\w-])--[a-z][\w-]*", out.getvalue()))
        return frozenset(flags)
    flags = _argparse_flags(ROOT / target)
    if target.startswith("datasets/"):  # the converters share their output options
        flags |= _argparse_flags(ROOT / "datasets" / "shardwriter.py")
    return frozenset(flags)


@cache
def ray_cli() -> tuple[frozenset[str], frozenset[str]]:
    """Ray's subcommand names and every option string its CLI declares (read, not imported)."""
    files = [
        ray_dir() / "scripts" / "scripts.py",
        *(ray_dir() / "dashboard" / "modules" / "job").glob("cli*.py"),
    ]
    names, flags = set(), set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and re.fullmatch(
                r"--?[A-Za-z][\w-]*", str(node.value)
            ):
                flags.add(node.value)
            if isinstance(node, ast.FunctionDef):
                for deco in node.decorator_list:
                    call = deco if isinstance(deco, ast.Call) else None
                    if call and getattr(call.func, "attr", "") in ("command", "group"):
                        explicit = [a.value for a in call.args if isinstance(a, ast.Constant)]
                        explicit += [
                            k.value.value
                            for k in call.keywords
                            if k.arg == "name" and isinstance(k.value, ast.Constant)
                        ]
                        names.add(explicit[0] if explicit else node.name.replace("_", "-"))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_command":
                names |= {
                    k.value.value
                    for k in node.keywords
                    if k.arg == "name" and isinstance(k.value, ast.Constant)
                }
    return frozenset(names), frozenset(flags)


def _options(args: str) -> list[str]:
    """Option tokens of a command line, up to a bare `--` (what follows is another command)."""
    out = []
    for token in args.split():
        if token == "--":
            break
        if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", token):
            out.append(token.split("=", 1)[0])
    return out


def command_problems(text: str) -> list[str]:
    """Repo paths, `python -m` modules, scripts, `ray` subcommands and flags that do not exist."""
    text = re.sub(r"\\\n\s*", " ", text)  # join shell line continuations
    problems = []
    for path in sorted(set(REPO_PATH.findall(text))):
        found = (
            list(ROOT.glob(path))
            if "*" in path
            else [ROOT / path]
            if (ROOT / path).exists()
            else []
        )
        if not found:
            problems.append(f"no such path in the repo: {path}")
    for module, args in PY_MODULE.findall(text):
        if importlib.util.find_spec(module) is None:
            problems.append(f"no such module: python -m {module}")
            continue
        problems += [
            f"python -m {module} has no option {o}"
            for o in _options(args)
            if o not in script_flags(module)
        ]
    for script, args in PY_SCRIPT.findall(text):
        if not (ROOT / script).is_file():
            continue  # reported as a missing path above
        problems += [
            f"python {script} has no option {o}"
            for o in _options(args)
            if o not in script_flags(script)
        ]
    names, flags = ray_cli()
    for sub, args in RAY_COMMAND.findall(text):
        words = [sub, *args.split()[:1]] if sub == "job" else [sub]
        for word in words:
            if word not in names:
                problems.append(f"`ray {' '.join(words)}`: Ray has no command {word!r}")
        problems += [
            f"`ray {' '.join(words)}` has no option {o}" for o in _options(args) if o not in flags
        ]
    return problems


def _text_of(path: Path) -> str:
    """A file's text; for YAML also its parsed strings (folded `>-` commands on one line)."""
    text = path.read_text()
    if path.suffix == ".yaml":
        text += "\n" + "\n".join(s for doc in load_all(path) for s in strings(doc))
    return text


@pytest.mark.parametrize(
    "path", [LAUNCHER, RAYCLUSTER, RAYJOB, SECRET_TEMPLATE, DOCKERFILE, GUIDE], ids=lambda p: p.name
)
def test_every_path_command_and_flag_named_exists(path: Path) -> None:
    assert command_problems(_text_of(path)) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "ray job submit -- python jobs/imagenet_r512.py",
            "no such path in the repo: jobs/imagenet_r512.py",
        ),
        (
            "see cluster/kuberay/raycluster.yml",
            "no such path in the repo: cluster/kuberay/raycluster.yml",
        ),
        (
            'eval "$(python -m orchestrator.stak env)"',
            "no such module: python -m orchestrator.stak",
        ),
        ("python -m orchestrator.stack up --s3port 9000", "has no option --s3port"),
        ("python -m orchestrator.plan jobs/imagenet_r152.py --node 64", "has no option --node"),
        (
            "python datasets/imagenet.py --source DIR --dest s3://b/datasets/x",
            "has no option --source",
        ),
        ("python jobs/imagenet_r152.py --resume s3://b/runs/x", "has no option --resume"),
        ("ray job submit --workdir . -- python jobs/imagenet_r152.py", "has no option --workdir"),
        ("ray upp cluster/aws-p5.yaml", "Ray has no command 'upp'"),
        ("ray job tail raysubmit_1", "Ray has no command 'tail'"),
    ],
)
def test_command_checker_catches_broken_commands(text: str, expected: str) -> None:
    problems = command_problems(text)
    assert any(expected in p for p in problems), problems


def test_command_checker_passes_real_commands_and_ignores_urls() -> None:
    text = """
        python -m orchestrator.stack up --s3-port 9000 --state-dir /tmp/x
        python -m orchestrator.plan jobs/imagenet_r152.py --nodes 64 --gpus-per-node 8 optim.lr=0.2
        python datasets/imagenet.py --src DIR --dest s3://B/datasets/imagenet --shard-size-mb 34
        python jobs/imagenet_r152.py --resume-from s3://resnet/runs/x/checkpoints/step-00005000
        ray job submit --working-dir . --no-wait -- python jobs/imagenet_r152.py --dry-run
        ray job logs -f raysubmit_1 && ray up -y cluster/aws-p5.yaml
        ray get-auth-token --generate
    """
    assert command_problems(text) == []


def test_a_broken_copy_of_a_template_is_caught() -> None:
    broken = LAUNCHER.read_text().replace("jobs/imagenet_r152.py", "jobs/imagenet_r15.py")
    assert "no such path in the repo: jobs/imagenet_r15.py" in command_problems(broken)
    broken = RAYJOB.read_text().replace(
        "python jobs/imagenet_r152.py", "python jobs/imagenet-r152.py"
    )
    assert "no such path in the repo: jobs/imagenet-r152.py" in command_problems(broken)


# ===================================================================== the operator's guide

REAL_CLUSTER = re.compile(
    r"^\s*(kubectl|helm|aws|docker|mlflow server|ray (up|down|dashboard|attach|exec|monitor))\b",
    re.MULTILINE,
)
MARKS = ("(needs a real cluster)", "(checked, not run)")
# What `make demo` and `make test` run (Makefile, tests/conftest.py, tests/test_*.py): an
# unmarked block in the guide may hold only these.
RUN_BY_DEMO_OR_TESTS = re.compile(
    r"^(make (demo|test)"
    r"|python -m orchestrator\.stack (up|down|status|env)"
    r'|eval "\$\(python -m orchestrator\.stack env\)"'
    r"|python datasets/(synthetic|imagenet)\.py "
    r"|ray job submit -- python jobs/"
    r"|python jobs/\S+\.py --dry-run"
    r"|python -m orchestrator\.plan "
    r"|python -m orchestrator\.publish --run "  # tests/test_publish.py
    r"|python -m orchestrator\.paper\.layer_responses --run "  # tests/test_layer_responses.py
    r"|mlflow models serve )"
)


def guide_blocks(language: str = "bash") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


def test_guide_marks_every_command_that_is_not_run() -> None:
    blocks = guide_blocks()
    assert len(blocks) >= 10
    for block in blocks:
        if REAL_CLUSTER.search(block):
            assert MARKS[0] in block, f"unmarked block needs a real cluster:\n{block}"
        if not any(mark in block for mark in MARKS):
            for line in block.splitlines():
                command = line.split("  #")[0].strip()
                if command and not command.startswith("#"):
                    assert RUN_BY_DEMO_OR_TESTS.match(command), (
                        f"neither run by the demo or tests nor marked: {command}"
                    )


def test_guide_shows_what_the_plan_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import plan

    monkeypatch.chdir(ROOT)  # the guide's command names the job file relative to the repository
    (sample,) = [
        b
        for b in guide_blocks("text")
        if "python -m orchestrator.plan" not in b and "512 GPUs" in b
    ]
    assert plan.main(["jobs/imagenet_r152.py", "--nodes", "64", "--gpus-per-node", "8"]) == 0
    printed = capsys.readouterr().out.splitlines()
    for line in sample.splitlines():
        assert line in printed, f"the guide shows a line the plan does not print: {line!r}"


def test_launcher_placeholders_are_the_documented_ones() -> None:
    found = set(re.findall(r"REPLACE_WITH_[A-Z0-9_]+", LAUNCHER.read_text()))
    assert found == {
        f"REPLACE_WITH_{name}"
        for name in (
            "REGION",
            "DLAMI_ID",
            "HEAD_INSTANCE_PROFILE_ARN",
            "WORKER_INSTANCE_PROFILE_ARN",
            "GIT_URL",
            "GIT_REF",
            "SECURITY_GROUP_ID",
        )
    }


def makefile_targets() -> set[str]:
    """The targets the Makefile defines (rule lines `a b: ...`, not `X := ...` assignments)."""
    rules = re.findall(r"^([\w. -]+?)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    return {name for rule in rules for name in rule.split()} - {".PHONY"}


def test_every_make_target_the_guide_names_exists() -> None:
    text = GUIDE.read_text()
    named = set(re.findall(r"`make ([\w-]+)`", text))
    named |= {
        t for block in guide_blocks() for t in re.findall(r"^make ([\w-]+)", block, re.MULTILINE)
    }
    assert named, "the guide names no make target: the pattern above no longer matches it"
    assert named <= makefile_targets(), named - makefile_targets()


def test_the_guides_placeholder_grep_lists_what_is_left_to_fill_in() -> None:
    """The guide's `grep ... REPLACE_WITH_ ...` line, run as written, finds every placeholder."""
    (line,) = [
        line.split("  #")[0].strip()
        for block in guide_blocks()
        for line in block.splitlines()
        if line.startswith("grep ") and "REPLACE_WITH_" in line
    ]
    out = subprocess.run(
        shlex.split(line), cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert set(re.findall(r"REPLACE_WITH_\w+", out)) == set(
        re.findall(r"REPLACE_WITH_\w+", LAUNCHER.read_text())
    )


def test_the_guides_variables_are_the_ones_stack_env_exports(tmp_path: Path) -> None:
    """The guide's table of variables holds every variable `python -m orchestrator.stack env`
    exports, with the same value where it gives one (RAY_AUTH_MODE=token)."""
    from orchestrator.stack import Stack, StackConfig

    table = "\n".join(
        line for line in GUIDE.read_text().split("\n## ")[0].splitlines() if line.startswith("| `")
    )
    documented = dict(re.findall(r"`([A-Z][A-Z0-9_]+)(?:=([^`]*))?`", table))
    exported = Stack(StackConfig(state_dir=tmp_path)).env()
    # Ray's one-machine switch is not for users to set: the guide explains it in prose
    missing = set(exported) - set(documented) - {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    assert not missing, f"stack env exports variables the guide's table lacks: {missing}"
    for name, value in documented.items():
        if value:
            assert exported.get(name) == value, name


def test_the_guides_mlflow_server_flags_exist() -> None:
    from mlflow.cli import server

    takes = {opt for param in server.params for opt in param.opts}
    commands = [
        line.split("mlflow server", 1)[1]
        for block in guide_blocks()
        for line in block.splitlines()
        if line.startswith("mlflow server")
    ]
    used = {flag for command in commands for flag in _options(command)}
    assert used, "the guide starts no mlflow server: the pattern above no longer matches it"
    assert used <= takes, used - takes
