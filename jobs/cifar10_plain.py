"""CIFAR-10 plain nets (no shortcuts), the paper's Fig. 6 counterpart of cifar10_resnet.py.

    ray job submit -- python jobs/cifar10_plain.py model.name=cifar_plain56

Depth is the model name: cifar_plain20, 32, 44, 56 or 110. Same recipe as the ResNets (per-pixel
mean, the authors' Caffe momentum: see jobs/cifar10_resnet.py): the paper shows the deeper
plain nets train *worse* (the degradation problem).
"""

import dataclasses

from cifar10_resnet import SPEC as RESNET_RECIPE  # jobs/ is on sys.path when run as a script

from orchestrator.launch import main
from orchestrator.spec import ModelConfig

SPEC = dataclasses.replace(
    RESNET_RECIPE,
    name="cifar10_plain",
    model=ModelConfig(name="cifar_plain20", channels_last=False),
)

if __name__ == "__main__":
    raise SystemExit(main(SPEC))
