"""`--from-run RUN_ID`: a real run's throughput and step time, read from MLflow, in place of the
anchor's per-GPU compute figure.

The loop logs, every tracking.log_every steps (orchestrator/metrics_window.py):
`system/images_per_s` (the whole job: rank 0's images x world size / window seconds) and
`system/step_time_s` (window seconds / optimizer steps). Both include the run's own input waits
and communication; the plan takes the model's share of that communication out again
(formulas.compute_rate_from_step), so the figure it carries to another cluster is compute only.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from orchestrator.plan.job import PlanError

IMAGES_PER_S = "system/images_per_s"
STEP_TIME_S = "system/step_time_s"


@dataclass(frozen=True)
class RunFigures:
    """What the plan takes from one run: its figures and the shape of its steps."""

    run_id: str
    model: str
    world_size: int
    global_batch: int
    micro_batch: int
    accumulation: int
    strategy: str
    zero_stage: int
    precision: str
    img_per_s: float  # whole job, median of the windows kept
    step_s: float  # median of the windows kept
    windows: int  # windows the medians are taken over

    @property
    def img_per_s_per_gpu(self) -> float:
        return self.img_per_s / self.world_size


def steady_median(values: list[float]) -> float:
    """The median of a run's windows without the first one (warm-up: cuDNN autotuning,
    torch.compile, the loader filling up), unless it is the only one."""
    kept = values[1:] if len(values) > 1 else values
    return statistics.median(kept)


def _param(params: dict[str, str], key: str, run_id: str) -> str:
    if key not in params:
        raise PlanError(f"run {run_id} has no param {key!r}: was it logged by this project's loop?")
    return params[key]


def _int(text: str, key: str, run_id: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PlanError(f"run {run_id}: param {key}={text!r} is not an integer") from None


def read_run(run_id: str, client: Any = None) -> RunFigures:
    """Read a training run's figures from MLflow (MLFLOW_TRACKING_URI)."""
    from orchestrator.tracking.run_report import metric_history  # imports no mlflow itself

    if client is None:
        from mlflow.exceptions import MlflowException

        from orchestrator.tracking.uri import tracking_client

        client = tracking_client("--from-run")
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            raise PlanError(f"--from-run {run_id}: {err.message}") from None
    else:
        run = client.get_run(run_id)
    params = run.data.params
    world = _int(_param(params, "scaling.num_workers", run_id), "scaling.num_workers", run_id)
    global_batch = _int(
        _param(params, "scaling.global_batch", run_id), "scaling.global_batch", run_id
    )
    micro_text = params.get("scaling.micro_batch", "None")
    micro = global_batch // world if micro_text == "None" else _int(micro_text, "micro", run_id)
    figures = {}
    for name in (IMAGES_PER_S, STEP_TIME_S):
        values = [v for _, v in metric_history(client, run_id, name)]
        if not values:
            raise PlanError(
                f"run {run_id} logged no {name}: it has not reached its first log step "
                "(tracking.log_every)"
            )
        figures[name] = (steady_median(values), len(values[1:] or values))
    return RunFigures(
        run_id=run_id,
        model=_param(params, "model.name", run_id),
        world_size=world,
        global_batch=global_batch,
        micro_batch=micro,
        accumulation=global_batch // (micro * world),
        strategy=params.get("scaling.strategy", "ddp"),
        zero_stage=_int(params.get("scaling.zero_stage", "0"), "scaling.zero_stage", run_id),
        precision=params.get("scaling.precision", "auto"),
        img_per_s=figures[IMAGES_PER_S][0],
        step_s=figures[STEP_TIME_S][0],
        windows=figures[STEP_TIME_S][1],
    )
