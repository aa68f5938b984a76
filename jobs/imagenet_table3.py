"""Table 3 of the paper: ResNet-34 with shortcut options A, B and C, and ResNet-50/101/152.

    ray job submit -- python jobs/imagenet_table3.py
    python jobs/imagenet_table3.py --dry-run                 # grid, GPU-hours, checks
    ray job submit -- python jobs/imagenet_table3.py study.cells=resnet34-A,resnet34-B

A: zero-padding shortcuts where dimensions grow, identity elsewhere (no extra parameters);
B: projections where dimensions grow; C: projections everywhere. The deeper nets use B and
the v1 bottleneck, as jobs/imagenet_r152.py does. 10-crop evaluation, as Table 3.
"""

import dataclasses

from imagenet_r152 import SPEC as RECIPE  # jobs/ is on sys.path when run as a script

from orchestrator.spec import ModelConfig
from orchestrator.study import Study, grid, main

STUDY = Study(
    name="imagenet_table3",
    base=dataclasses.replace(
        RECIPE,
        name="imagenet_table3",
        # stride_in_1x1 unset: the v1 bottleneck where a net has one (ResNet-34 has none)
        model=ModelConfig(name="resnet50", shortcut="B"),
        eval=dataclasses.replace(RECIPE.eval, protocol="ten_crop"),
    ),
    cells=grid({"model.name": ["resnet34"], "model.shortcut": ["A", "B", "C"]})
    + grid({"model.name": ["resnet50", "resnet101", "resnet152"], "model.shortcut": ["B"]}),
    seeds=1,
    paper="Table 3 (ImageNet)",
)

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
