"""bench/gpu_check.py's dry run: the GPU script's whole plumbing on a CPU, at tiny sizes."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT, run_script


def test_gpu_check_dry_run_prints_the_table(tmp_path: Path) -> None:
    """Run as on the GPU machine: only torch, torchvision, numpy, Pillow (and torch's own
    requirements) importable, this repository not installed (tests/gpu_box_env)."""
    out = run_script(
        *("bench/gpu_check.py", "--dry-run", "--work", str(tmp_path), "--models", "r50"),
        timeout=600,
        env={"PYTHONPATH": str(ROOT / "tests" / "gpu_box_env")},
    )
    rows = [line.split() for line in out.splitlines() if line.startswith("r50 ")]
    # the default runs, compiled ones eager on a CPU; gpu/split decode on the host there
    assert [r[2] for r in rows] == ["synthetic", "synthetic", "gpu", "split", "cpu"]
    for row in rows:
        assert row[3] != "FAILED" and float(row[3]) > 0, row
        # against bench/plain_baseline.py's figure from the same call, at the rows' batch
        assert float(row[4]) > 0, row
    assert "baseline: plain_baseline.py, same run, batch 4 at 64px" in out
    assert rows[3][7] != "-"  # the split row reports the share the loop settled on
    assert (tmp_path / "shards" / "manifest.json").exists()
    decoder = re.search(r"CPU JPEG decoder \(the cpu rows\): (.+)", out)
    assert decoder and decoder.group(1) == "whole images (Pillow)", out[-2000:]  # all the box has
