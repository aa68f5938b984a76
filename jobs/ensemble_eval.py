"""Ensemble evaluation as a job: the paper's ILSVRC 2015 ensemble (Table 5), declared.

    ray job submit -- python jobs/ensemble_eval.py
    ray job submit -- python jobs/ensemble_eval.py --allow-missing   # evaluate what exists, said
    ray job submit -- python jobs/ensemble_eval.py --protocol ten_crop --checkpoint last
    ray job submit -- python jobs/ensemble_eval.py --runs RUN_ID RUN_ID   # replaces the selection
    python jobs/ensemble_eval.py --checkpoint-url s3://.../checkpoints ...  # no MLflow needed
    python jobs/ensemble_eval.py --dry-run         # print the resolved config
    python jobs/ensemble_eval.py --check           # resolve and check the members, log nothing
    python jobs/ensemble_eval.py --local           # in this process, without Ray

The paper (Sec. 3.4): "We combine six models of different depth to form an ensemble (only with
two 152-layer ones at the time of submitting). This leads to 3.57% top-5 error on the test
set" (Table 5). It names no other depth; its ImageNet ResNets have five (18, 34, 50, 101,
152, Table 1), so six models of different depth with two 152-layer ones are one each of 18,
34, 50 and 101 and two of 152: our reading, declared below as `ranked`: the best run of each
(by its best checkpoint's val/top1_err) among the finished runs of the experiment `imagenet`
(the imagenet_r* jobs; ResNet-18: jobs/imagenet_r18.py, or the Table 2 study's trials), and
the two best ResNet-152 runs. A member missing is refused, naming it, unless --allow-missing.
Weights: the paper gives none, so the mean of the six members' softmax probabilities.
Protocol: its best results' (Table 4): fully convolutional over the scales {224, 256, 384,
480, 640} with flips, at each run's best committed checkpoint.

The numbers are measured on the members' validation split (ImageNet val, 50k images); the
paper's 3.57% is on the ImageNet test set, which no split here holds: the report (printed,
and comparison.md in the MLflow experiment `ensembles`) names the set of every number and
computes no gap to it. Flags (`python -m orchestrator.ensemble_eval --help`) override any field.
"""

import sys

from orchestrator.ensemble_eval import EnsembleConfig, main
from orchestrator.spec import EvalConfig

CONFIG = EnsembleConfig(
    name="ensemble_eval",  # the parent MLflow run's name
    experiment="imagenet",  # where the members are ranked
    filter="attributes.status = 'FINISHED'",
    ranked=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152#1", "resnet152#2"],
    allow_missing=False,  # refuse, naming the members that do not exist yet
    checkpoint="best",  # each member's committed step with the lowest val/top1_err
    weights=None,  # equal: the paper states none
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
