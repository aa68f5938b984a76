"""Table 6 and Fig. 6 of the paper: CIFAR-10 plain and residual nets of 20 to 1202 layers.

    ray job submit -- python jobs/cifar10_table6.py                  # every cell, 5 seeds
    python jobs/cifar10_table6.py --dry-run                          # grid, GPU-hours, checks
    ray job submit -- python jobs/cifar10_table6.py study.seeds=1 study.cells=cifar_resnet20

Each trial is one jobs/cifar10_resnet.py job (the paper's recipe, Sec. 4.2: 64k iterations at
batch 128 on 2 GPUs, ResNet-110's warm-up by its rule). The study's parent run in MLflow
(experiment cifar10) holds the table (mean +- std over seeds of the final and best test
error beside Table 6) and Fig. 6's curves; every trial's run is nested under it. The paper
reports ResNet-110 as the best of 5 runs (6.43%) with their mean 6.61 +- 0.16: 5 seeds here.
The plain nets stop at 56 layers, as in Fig. 6 (plain-110 fails to train in the paper, >60%).
"""

import dataclasses

from cifar10_resnet import SPEC as RECIPE  # jobs/ is on sys.path when run as a script
from cifar10_resnet import paper_warmup

from orchestrator.study import Study, grid, main

STUDY = Study(
    name="cifar10_table6",
    base=dataclasses.replace(RECIPE, name="cifar10_table6"),
    cells=grid({"model.name": [f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110, 1202)]})
    + grid({"model.name": [f"cifar_plain{d}" for d in (20, 32, 44, 56)]}),
    seeds=5,
    finalize=paper_warmup,
    paper="Table 6 / Fig. 6 (CIFAR-10)",
)

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
