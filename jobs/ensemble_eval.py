"""Ensemble evaluation as a job: which members, which checkpoint, which protocol.

    ray job submit -- python jobs/ensemble_eval.py
    ray job submit -- python jobs/ensemble_eval.py --protocol ten_crop --checkpoint last
    ray job submit -- python jobs/ensemble_eval.py --runs RUN_ID RUN_ID   # replaces the selection
    python jobs/ensemble_eval.py --dry-run         # print the resolved config
    python jobs/ensemble_eval.py --check           # resolve and check the members, log nothing
    python jobs/ensemble_eval.py --local           # in this process, without Ray

The paper's best single models were tested fully convolutionally over the scales
{224, 256, 384, 480, 640} with flips (Table 4), and its ILSVRC 2015 entry was an ensemble of
such nets (Table 5). This declaration evaluates every finished ResNet-152 run of the `imagenet`
experiment at its best checkpoint that way, each member and their mean of softmax
probabilities, and logs the comparison with the paper to the MLflow experiment `ensembles`.
Flags (`python -m orchestrator.ensemble_eval --help`) override any field below.
"""

import sys

from orchestrator.ensemble_eval import EnsembleConfig, main
from orchestrator.spec import EvalConfig

CONFIG = EnsembleConfig(
    name="ensemble_eval",  # the parent MLflow run's name
    experiment="imagenet",
    filter="tags.model = 'resnet152' and attributes.status = 'FINISHED'",
    checkpoint="best",  # the committed step with the lowest val/top1_err
    eval=EvalConfig(
        protocol="multiscale",
        scales=[224, 256, 384, 480, 640],
        flips=True,
        batch_size=25,  # whole images at 640 px: keep batches small
    ),
    output_experiment="ensembles",
)

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], CONFIG))
