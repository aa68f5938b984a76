"""Evaluate trained runs and their ensemble with the paper's protocols; log it all to MLflow.

    python -m orchestrator.ensemble_eval --runs RUN_ID [RUN_ID ...] [--protocol ten_crop]
    python -m orchestrator.ensemble_eval --experiment imagenet \\
        --filter "tags.model = 'resnet152'" --checkpoint best --protocol multiscale
    python -m orchestrator.ensemble_eval --model r152@champion --model r101/3 --weights 2 1
    python -m orchestrator.ensemble_eval --experiment imagenet --ranked resnet101 resnet152#1 \
        resnet152#2 [--allow-missing]       # members by model and rank (jobs/ensemble_eval.py)
    python -m orchestrator.ensemble_eval --checkpoint-url URL [--checkpoint-url URL ...] \
        --local --output-dir DIR            # no MLflow (docs/ensembles.md)
    ray job submit -- python jobs/ensemble_eval.py [the same flags]
    python -m orchestrator.ensemble_eval ... --check      # resolve and check members only

Members
    --runs ID ...                 MLflow run ids of training jobs
    --experiment NAME [--filter]  every active run of an experiment matching an MLflow filter
                                  string (ensemble runs themselves are left out)
    --model NAME@ALIAS, NAME/VERSION  registered model versions (repeatable); a version's
                                  source is its checkpoint URL (.../checkpoints/step-NNNNNNNN)
    --experiment NAME --ranked MODEL[#RANK] ...
                                  the RANK-th best run (default 1) tagged model=MODEL among the
                                  experiment's runs matching --filter, by its best checkpoint's
                                  val/top1_err; a declared member missing is refused by name,
                                  or with --allow-missing left out and said
    --checkpoint-url URL          a committed step (.../checkpoints/step-NNNNNNNN) or a job's
                                  .../checkpoints folder (--checkpoint chooses); repeatable;
                                  found without MLflow
The selections add up, in this order: --runs, the experiment's runs (oldest first) or its
ranked ones, --model, --checkpoint-url (a checkpoint selected twice counts once); --weights
follow that order. Without MLFLOW_TRACKING_URI only --checkpoint-url members can be found;
nothing is logged then (said once): the table is printed, and --output-dir DIR writes
comparison.md and comparison.json. A training run's
checkpoints are found from its tag `orchestrator.job` and its param `checkpoint.storage`:
`{checkpoint.storage}/{job}/checkpoints` (`orchestrator.checkpoint_refs`, which publish and
Fig. 7 resolve through too); `--checkpoint best` takes the committed step with the lowest
`checkpoint.best_metric` (val/top1_err) in its commit marker
(`orchestrator.checkpoint.best_checkpoint`, as training chooses), `last` the newest
committed step. A model version pins its own step; while it runs, the ensemble holds a
reader's lease on every member's step (`checkpoint_refs.holding`), so retention keeps them.

Each member is rebuilt from the checkpoint's spec and weights and evaluated on the validation
split of its own data section (`--data-url`/`--split` override it; all members must read the
same split) with `orchestrator.evaluation.evaluate`: per-sample probabilities, lined up by
the samples' positions in the split. The ensemble is the (weighted, `--weights`) mean of the
members' probabilities. Top-1/top-5 errors are compared with the paper's Tables 3-5
(`orchestrator.paper.comparison`) in a table that is printed and logged; every row names the
set of the paper's number (ImageNet val; Table 5's ensemble: the ImageNet test set, to which
no gap is computed) beside ours (the split evaluated).

Where it runs: one Ray task per member (a GPU each where the cluster has GPUs), or in this
process with `--local`. A tqdm bar shows progress.

MLflow: one parent run in `--output-experiment` (default "ensembles") with the ensemble's
metrics, the comparison table (comparison.md / comparison.json), and one nested child run per
member (tag mlflow.parentRunId) with its own. Metrics are fractions, as in training runs: the
parent's `ensemble/top1_err`, `ensemble/top5_err`, `ensemble/loss` (mean -log p(true class)),
`ensemble/samples`, `ensemble/best_member_top1_err`, `ensemble/mean_member_top1_err`; each
member's `val/top1_err`, `val/top5_err`, `val/loss`, `val/samples`, `val/eval_seconds`,
`val/bn_batches`; per_class_accuracy.json on every run; with --log-probs, probs.npz (probs
[N, C], labels, indices = positions in the split). Params, tags and texts are redacted
(orchestrator.tracking.redaction) like a training run's. `--bn-recalibrate N` first recomputes each
member's BN statistics as the exact average over N training batches (the authors' practice).
Everything is checked before the parent run is created: an unknown protocol, a member without
a committed checkpoint, an unreachable run, checkpoint or dataset, members with different
class counts, a weights list of the wrong length all stop with exit code 2 and a message
naming the run (or listing the valid choices), and nothing is logged. If evaluation fails
after that, the parent run (and its unfinished children) are marked FAILED with the error in
the tag `orchestrator.error`.

The package, one concern a module: `config` (EnsembleConfig, the flags), `members` (which
checkpoints), `scoring` (evaluating members here or on Ray, and their ensemble), `runs` (the
MLflow runs), `driver` (run, main).
"""

from orchestrator.ensemble_eval.config import (
    EnsembleConfig,
    EnsembleError,
    argv_of,
    build_parser,
    parse_args,
)
from orchestrator.ensemble_eval.driver import main, run
from orchestrator.ensemble_eval.members import (
    Member,
    check_members,
    member_from_run,
    member_from_version,
    resolve_members,
)
from orchestrator.ensemble_eval.runs import EnsembleRuns
from orchestrator.ensemble_eval.scoring import (
    Scores,
    connect_ray,
    ensemble_of,
    ensemble_scores,
    evaluate_member,
    evaluate_members,
)

__all__ = [
    "EnsembleConfig",
    "EnsembleError",
    "EnsembleRuns",
    "Member",
    "Scores",
    "argv_of",
    "build_parser",
    "check_members",
    "connect_ray",
    "ensemble_of",
    "ensemble_scores",
    "evaluate_member",
    "evaluate_members",
    "main",
    "member_from_run",
    "member_from_version",
    "parse_args",
    "resolve_members",
    "run",
]
