"""plain-34 on ImageNet: the same recipe as jobs/imagenet_r152.py (the paper, Sec. 3.4).

    ray job submit -- python jobs/imagenet_plain34.py [section.key=value ...]

The paper's number to compare with: Table 2 (28.54% top-1, 10-crop): the plain half of the
degradation pair, no shortcuts.
"""

import dataclasses

from imagenet_r152 import SPEC as R152_RECIPE  # jobs/ is on sys.path when run as a script

from orchestrator.launch import main
from orchestrator.spec import ModelConfig

SPEC = dataclasses.replace(
    R152_RECIPE,
    name="imagenet_plain34",
    model=ModelConfig(name="plain34"),
)

if __name__ == "__main__":
    raise SystemExit(main(SPEC))
