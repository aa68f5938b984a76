"""The linter's, the formatter's and the type checker's verdicts are part of the tests, so a
change that breaks one of them fails CI, not a reviewer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

RUFF = Path(sys.executable).parent / "ruff"
TREES = ["orchestrator", "jobs", "datasets", "tests", "bench"]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RUFF), *args, *TREES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_ruff_check_finds_nothing() -> None:
    out = ruff("check", "--output-format", "concise")
    assert out.returncode == 0, f"ruff check (or `ruff check --fix`):\n{out.stdout}{out.stderr}"


def test_mypy_finds_nothing_in_the_engine() -> None:
    """mypy over orchestrator/ (settings: pyproject.toml's [tool.mypy])."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "mypy")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, f"mypy:\n{out.stdout}{out.stderr}"


def test_the_tree_is_ruff_formatted() -> None:
    out = ruff("format", "--check")
    assert out.returncode == 0, f"run `ruff format` on:\n{out.stdout}{out.stderr}"
