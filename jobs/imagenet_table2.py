"""Table 2 and Fig. 4 of the paper: plain and residual nets of 18 and 34 layers on ImageNet.

    ray job submit -- python jobs/imagenet_table2.py
    python jobs/imagenet_table2.py --dry-run                 # grid, GPU-hours, checks

Each trial is one jobs/imagenet_r152.py-recipe job (Sec. 3.4) with the cell's net. Table 2's
ResNets use option-A shortcuts (identity, zero-padding where dimensions grow), so this study
sets model.shortcut=A on them; the nets are evaluated 10-crop, as Table 2 is. The parent run in
MLflow (experiment imagenet) holds the table beside Table 2 and Fig. 4's curves (thin dashed:
training error, bold: validation error), every trial nested under it.
"""

import dataclasses

from imagenet_r152 import SPEC as RECIPE  # jobs/ is on sys.path when run as a script

from orchestrator.spec import ModelConfig
from orchestrator.study import Study, grid, main

STUDY = Study(
    name="imagenet_table2",
    base=dataclasses.replace(
        RECIPE,
        name="imagenet_table2",
        model=ModelConfig(name="resnet18"),
        eval=dataclasses.replace(RECIPE.eval, protocol="ten_crop"),
    ),
    cells=grid({"model.name": ["plain18", "plain34"]})
    + grid({"model.name": ["resnet18", "resnet34"], "model.shortcut": ["A"]}),
    seeds=1,
    paper="Table 2 / Fig. 4 (ImageNet)",
)

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
