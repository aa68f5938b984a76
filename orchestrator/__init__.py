"""Train the ResNet family of He et al. (2016) at cluster scale.

The engine behind `jobs/*.py`, in layers (docs/layout.md has the whole map):

- the spec side, torch-free: spec (typed job specs), runtime (rank, device, distributed
  helpers, signals), storage and s3 (local or s3:// objects), tracking.metrics and
  tracking.tags (metric and tag names), and preflight, with what it reads torch-free: the
  model registry, dataset manifests and epoch rules, checkpoint markers (tests/test_layout.py
  lists them);
- the worker side: train (the loop), checkpoint, strategy, models, data, evaluation, schedule;
- MLflow: tracking/ (tracker, runs, tags, metrics, lineage, liveness, run_report, redaction,
  mlflow_internals); the paper: paper/ (numbers, comparison, plots, layer_responses);
- the drivers: launch, ensemble_eval, plan, stack. They import the spec side and the runtime,
  never the loop (only launch's worker entry points run it).
"""

__version__ = "0.1.0"
