"""The linter's verdict is part of the tests, so a change that breaks it fails CI, not a reviewer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_ruff_finds_nothing() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    out = subprocess.run([str(ruff), "check", "--output-format", "concise", "orchestrator", "jobs", "datasets",
                          "tests", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, f"ruff found problems (fix them, or `ruff check --fix`):\n{out.stdout}{out.stderr}"
