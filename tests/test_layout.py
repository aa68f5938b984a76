"""The engine's layering, checked on its source: drivers never import the loop, and the modules
a driver needs to resolve a spec import neither torch nor the worker side."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "orchestrator"
# What resolving and checking a spec needs: no torch, no data pipeline, no loop.
LIGHT = {
    "orchestrator",
    "orchestrator.checkpoint",  # the pre-flight reads commit markers; torch only to (de)serialise
    "orchestrator.checkpoint_refs",  # where a job's checkpoints are: the pre-flight's too
    "orchestrator.data",
    "orchestrator.data.epochs",
    "orchestrator.data.manifest",
    "orchestrator.data.streams",
    "orchestrator.data.tar",
    "orchestrator.errors",
    "orchestrator.job_lease",  # the driver takes the job's lease before any worker starts
    "orchestrator.tracking",
    "orchestrator.tracking.metrics",
    "orchestrator.tracking.tags",
    "orchestrator.tracking.uri",  # the pre-flight asks where MLflow is
    "orchestrator.models",
    "orchestrator.models.registry",
    "orchestrator.models.zoo",
    "orchestrator.preflight",
    "orchestrator.resume_changes",  # the pre-flight compares a resubmission with its checkpoint
    "orchestrator.runtime",
    "orchestrator.s3",
    "orchestrator.spec",
    "orchestrator.spec_values",
    "orchestrator.storage",
}
HEAVY_THIRD_PARTY = ("torch", "numpy", "PIL", "webdataset", "deepspeed", "mlflow", "ray")
# Where the loop may be imported: the worker entry points of the launcher, nothing else.
LOOP_IMPORTERS = {
    ("orchestrator.launch", "run_local"),
    ("orchestrator.launch", "_ray_worker"),
    ("orchestrator.study.in_actor", "fit_in_actor"),  # a one-worker trial's worker: its actor
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(imported module, enclosing top-level function or None) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if function is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module, inner))
                found.extend((f"{child.module}.{alias.name}", inner) for alias in child.names)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # annotations only: never imported at run time
            visit(child, inner)

    visit(tree, None)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


SOURCES = sorted(PACKAGE.rglob("*.py"))

# The engine's layers, lowest first: a module may import its own layer and those below, never
# one above (a lazy import inside a function counts too: it runs all the same). A module takes
# the layer of the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    (  # foundation: what everything may use
        "orchestrator",
        "orchestrator.errors",
        "orchestrator.cli",
        "orchestrator.startup_clock",
        "orchestrator.spec",
        "orchestrator.spec_values",
        "orchestrator.runtime",
        "orchestrator.s3",
        "orchestrator.storage",
        "orchestrator.stack",
        "orchestrator.schedule",
        "orchestrator.models",
        "orchestrator.paper.numbers",
        "orchestrator.tracking",  # the package's face only (it imports nothing)
        "orchestrator.tracking.tags",
        "orchestrator.tracking.metrics",
        "orchestrator.tracking.redaction",
    ),
    (  # the parts a job is built from
        "orchestrator.data",
        "orchestrator.checkpoint",
        "orchestrator.checkpoint_refs",
        "orchestrator.job_lease",
        "orchestrator.strategy",
        "orchestrator.evaluation",
        "orchestrator.paper",
    ),
    ("orchestrator.tracking.",),  # MLflow: the tracker logs and closes, nothing more
    (  # what runs a model: the loop, and what reads a finished job's checkpoints
        "orchestrator.train",
        "orchestrator.train_data",
        "orchestrator.publish",
        "orchestrator.ensemble_eval",
        "orchestrator.paper.layer_responses",
    ),
    ("orchestrator.preflight", "orchestrator.launch", "orchestrator.plan"),  # a job's driver
    ("orchestrator.study",),  # many jobs
]


def layer_of(module: str) -> int:
    best, found = -1, None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            whole = prefix.rstrip(".")
            hit = module == whole or module.startswith(whole + ".")
            if prefix.endswith(".") and module == whole:
                hit = False  # "pkg." is the package's modules, not its face
            if hit and len(prefix) > best:
                best, found = len(prefix), level
    assert found is not None, f"{module} has no layer: add it to LAYERS in tests/test_layout.py"
    return found


def own_module(name: str) -> str:
    """The orchestrator module an imported name lives in (`a.b.func` -> `a.b`)."""
    while name and not (
        (ROOT / name.replace(".", "/")).with_suffix(".py").exists()
        or (ROOT / name.replace(".", "/") / "__init__.py").exists()
    ):
        name = name.rpartition(".")[0]
    return name


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_module_imports_from_a_higher_layer(path: Path) -> None:
    me = module_name(path)
    mine = layer_of(me)
    for name, function in imports(path):
        if not name.startswith("orchestrator"):
            continue
        target = own_module(name)
        if target and not me.startswith(target + ".") and layer_of(target) > mine:
            where = f"in {function}" if function else "at import time"
            raise AssertionError(
                f"{me} (layer {mine}) imports {target} (layer {layer_of(target)}) {where}: "
                "a lower layer must not reach up; move the call to the caller"
            )


def test_the_tracker_does_not_import_publish() -> None:
    tracker = PACKAGE / "tracking" / "tracker.py"
    names = [name for name, _ in imports(tracker)]
    assert not [n for n in names if n.startswith("orchestrator.publish")], names


# A path that ends in the `checkpoints` folder, or goes on below it: `f"{root}/{job}/checkpoints"`,
# `root + "/checkpoints/"`, `os.path.join(root, "checkpoints")`. Prose spells it `.../checkpoints`.
CHECKPOINTS_FOLDER = re.compile(r"(^|/)checkpoints(/|$)")


def checkpoints_folder_strings(path: Path) -> list[int]:
    """Lines of the string pieces (f-string parts included, docstrings not) that name a job's
    `checkpoints` folder."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and CHECKPOINTS_FOLDER.search(node.value.replace(".../checkpoints", ""))
    ]


def test_a_jobs_checkpoint_folder_has_one_definition() -> None:
    """`checkpoint_refs.job_checkpoints_url` alone spells `{storage}/{job}/checkpoints`: copies
    drifted apart (one kept a trailing slash of checkpoint.storage, so a study looked under
    another prefix and reran finished trials)."""
    sources = [*SOURCES, *sorted((ROOT / "bench").rglob("*.py"))]
    found = {
        str(path.relative_to(ROOT)): lines
        for path in sources
        if (lines := checkpoints_folder_strings(path))
    }
    assert list(found) == ["orchestrator/checkpoint_refs.py"], (
        f"a job's checkpoint folder is spelled outside orchestrator/checkpoint_refs.py: {found}; "
        "call checkpoint_refs.job_checkpoints_url (or spec_checkpoints_url) instead"
    )
    assert len(found["orchestrator/checkpoint_refs.py"]) == 1, found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_launchers_worker_entry_points_import_the_loop(path: Path) -> None:
    me = module_name(path)
    for name, function in imports(path):
        if name == "orchestrator.train" or name.startswith("orchestrator.train."):
            assert (me, function) in LOOP_IMPORTERS, (
                f"{me} imports the training loop (in {function or 'the module body'}): drivers "
                "use orchestrator.runtime; only the worker entry points run the loop"
            )


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_spec_side_modules_import_nothing_heavy_at_import_time(name: str) -> None:
    folder = ROOT / name.replace(".", "/")
    path = folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")
    for imported, function in imports(path):
        if function is not None:
            continue  # a lazy import inside a function runs only when that function is called
        top = imported.split(".")[0]
        assert top not in HEAVY_THIRD_PARTY, f"{name} imports {imported} at import time"
        if top == "orchestrator":
            owner = imported if imported in LIGHT else imported.rsplit(".", 1)[0]
            assert owner in LIGHT, f"{name} imports {imported}, outside the light modules {LIGHT}"


def test_a_dry_run_loads_no_torch(tmp_path: Path) -> None:
    """`python jobs/imagenet_r152.py --dry-run` resolves and prints the spec, and runs the
    pre-flight (model, storage, resume) without torch. With a dataset: tests/test_preflight.py."""
    argv = ["jobs/imagenet_r152.py", "--dry-run", "data.source=synthetic"]
    argv += [f"checkpoint.storage={tmp_path}", "tracking.enabled=false"]
    probe = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    runpy.run_path('jobs/imagenet_r152.py', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_THIRD_PARTY!r})\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "name: " in out.stdout and "scaling:" in out.stdout  # the resolved spec was printed
    assert "# pre-flight ok: model: resnet152" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []", out.stdout[-500:]


# Issue 27's limits: a module a newcomer reads in one sitting, a function that fits a screen.
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def module_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`name (N lines from line L)` for each function or method in `path` over `limit` lines,
    its signature and body counted (decorators not)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{node.name} ({length} lines from line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (length := (node.end_lineno or node.lineno) - node.lineno + 1) > limit
    ]


def test_the_length_checker_counts_a_function_from_def_to_its_last_line(tmp_path: Path) -> None:
    def body(lines: int, indent: str) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(lines))

    sample = tmp_path / "sample.py"
    sample.write_text(
        "@staticmethod\ndef fits():\n"
        + body(79, "    ")
        + "\n\nclass C:\n    async def over(self):\n"
        + body(80, "        ")
    )
    assert long_functions(sample) == ["over (81 lines from line 85)"]
    assert module_lines(sample) == 165


def test_no_module_over_600_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in SOURCES
        if (lines := module_lines(path)) > MAX_MODULE_LINES
    }
    assert not long, (
        f"modules over {MAX_MODULE_LINES} lines: {long}; move a coherent group of functions "
        "into a module of its own"
    )


def test_no_function_over_80_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): found for path in SOURCES if (found := long_functions(path))
    }
    assert not long, (
        f"functions over {MAX_FUNCTION_LINES} lines: {long}; split each into steps that name "
        "what they do"
    )
