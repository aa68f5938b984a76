"""A study for tests/test_study.py: CIFAR ResNet-20 and a plain-20 cell whose lr no net
survives (its loss turns non-finite: NonFiniteLoss, which no restart fixes)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

from cifar10_resnet import SPEC

from orchestrator.study import Study, main

STUDY = Study(
    name="study_with_bad_cell",
    base=SPEC,
    cells=[
        {"model.name": "cifar_resnet20"},
        {"label": "cifar_plain20", "model.name": "cifar_plain20", "optim.lr": 1e12},
    ],
)

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
