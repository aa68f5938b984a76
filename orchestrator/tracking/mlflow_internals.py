"""Every use of MLflow's non-public API, in one place, each with why.

Tested with the MLflow range pinned in pyproject.toml; a new MLflow release that moves any of
this breaks here, and only here. Everything else in the project uses MLflow's public client.

- `last_steps`: the largest step of each metric of a run, to resume a run without logging a
  step twice. The public `run.data.metrics` holds the values only; MLflow's own system-metrics
  resume reads the steps from the private `run.data._metric_objs`, so do we (reading every
  metric's history is the slow fallback).
- `SystemMetrics`: MLflow's CPU/memory/disk/network/GPU sampler against a run of our choosing.
  The public way (`mlflow.enable_system_metrics_logging` + `mlflow.start_run`) makes the run the
  process's active fluent run; the tracker works through `MlflowClient` with a run it may have
  to reopen after an outage, so it drives `SystemMetricsMonitor` (an internal class) itself,
  and sets where its steps resume (MLflow's rule would count the loop's system/ figures too).
"""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.tracking.metrics import LOOP_SYSTEM_METRICS

log = logging.getLogger(__name__)


def last_steps(client: Any, run: Any) -> dict[str, int]:
    """Per metric key of `run` (an mlflow Run), the largest step it holds."""
    objs = getattr(run.data, "_metric_objs", None)  # private: Metric entities, with their steps
    if objs is not None:
        return {m.key: m.step for m in objs}
    run_id = run.info.run_id
    return {
        key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics
    }


class SystemMetrics:
    """MLflow's system-metrics sampler for one run, started at once; its steps continue from the
    last step of its own samples in the run. It stops itself when the server fails (`alive`)."""

    def __init__(self, client: Any, run_id: str, interval_s: float) -> None:
        from mlflow.system_metrics import system_metrics_monitor

        self.monitor = system_metrics_monitor.SystemMetricsMonitor(
            run_id, sampling_interval=interval_s
        )
        # private: the next step to publish. MLflow's own resume continues after the largest
        # step of any system/ metric, but the loop's system/ figures are stepped by training
        # step (a resumed run's samples would jump from step 30 to 60,001): continue after
        # MLflow's own samples only. Still the first step at `stop` means nothing was published.
        own = [
            m.step
            for m in client.get_run(run_id).data._metric_objs  # private: see last_steps
            if m.key.startswith("system/") and m.key not in LOOP_SYSTEM_METRICS
        ]
        self.monitor._logging_step = self.first_step = max(own) + 1 if own else 0
        self.monitor.start()

    def alive(self) -> bool:
        """Whether the sampling thread still runs (it ends when a call to the server fails)."""
        thread = self.monitor._process  # private: the sampling thread (None before start)
        return thread is not None and thread.is_alive()

    def stop(self) -> None:
        """Stop sampling and deliver what was sampled. A run shorter than one sampling interval
        still records one sample (MLflow's monitor would record none)."""
        monitor = self.monitor
        monitor.finish()
        if monitor._logging_step == self.first_step:  # private: see __init__
            # the monitor's own sample-and-publish steps, taken once by hand
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()  # internal BatchMetricsLogger: send the sample now
