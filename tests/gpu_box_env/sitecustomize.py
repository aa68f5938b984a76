"""Imported at start-up by every Python process whose PYTHONPATH holds this folder: it makes
the interpreter look like the GPU machine's (torch, torchvision, numpy, Pillow and what torch
itself needs; there is no network there to install anything else) by hiding every other
installed package. tests/test_gpu_check.py runs bench/gpu_check.py --dry-run under it, so a new
import of boto3, mlflow, yaml ... on that path fails here instead of on the GPU box.

How: the site-packages folders leave sys.path; a folder of links to the allowed packages (and
their metadata and bundled libraries) takes their place. Optional imports then find nothing,
exactly as there.
"""

from __future__ import annotations

import atexit
import shutil
import site
import sys
import tempfile
from pathlib import Path

ALLOWED = {
    "torch",
    "torchvision",
    "torchgen",
    "functorch",
    "numpy",
    "pil",
    "pillow",
    # torch's own requirements, installed beside it on the GPU machine
    "filelock",
    "typing_extensions",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "fsspec",
}


def _top_name(entry: Path) -> str:
    """torch, torch-2.13.0.dist-info, numpy.libs, typing_extensions.py -> the package's name."""
    return entry.name.split("-")[0].split(".")[0].lower()


def _hide_other_packages() -> None:
    sites = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    farm = Path(tempfile.mkdtemp(prefix="gpu-box-site-"))
    atexit.register(shutil.rmtree, farm, True)
    for folder in sorted(sites):
        if not Path(folder).is_dir():
            continue
        for entry in Path(folder).iterdir():
            if _top_name(entry) in ALLOWED and not (farm / entry.name).exists():
                (farm / entry.name).symlink_to(entry)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) not in sites] + [str(farm)]
    # nor is this repository installed there (`pip install -e .` puts a finder here): scripts
    # must find the package from the checkout
    sys.meta_path[:] = [
        f
        for f in sys.meta_path
        if "__editable__" not in getattr(f, "__module__", "")
        and "__editable__" not in getattr(type(f), "__module__", "")
    ]


class _NoBuildOutputs:
    """Nor are this checkout's build outputs there (git-ignored, so not carried; and built for
    this Python, not the box's): the compiled JPEG decoder does not import."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "orchestrator._jpeg_region":
            raise ImportError(f"{name} is not built on the GPU machine")


_hide_other_packages()
sys.meta_path.insert(0, _NoBuildOutputs())
