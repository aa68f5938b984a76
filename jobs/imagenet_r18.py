"""ResNet-18 on ImageNet: the same recipe as jobs/imagenet_r152.py (the paper, Sec. 3.4).

    ray job submit -- python jobs/imagenet_r18.py [section.key=value ...]

The paper's number to compare with: Table 2 (27.88% top-1, 10-crop). One of the six members of
the paper's ensemble as jobs/ensemble_eval.py reads it.
"""

import dataclasses

from imagenet_r152 import SPEC as R152_RECIPE  # jobs/ is on sys.path when run as a script

from orchestrator.launch import main
from orchestrator.spec import ModelConfig

SPEC = dataclasses.replace(
    R152_RECIPE,
    name="imagenet_r18",
    model=ModelConfig(name="resnet18"),
)

if __name__ == "__main__":
    raise SystemExit(main(SPEC))
