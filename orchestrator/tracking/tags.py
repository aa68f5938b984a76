"""Every MLflow tag name the project writes or reads, in one place."""

JOB_TAG = "orchestrator.job"  # a run's job name: how a job finds its run again
ERROR_TAG = "orchestrator.error"  # why a run failed
HEARTBEAT_TAG = "orchestrator.heartbeat"  # stamped while the run's process lives (liveness)
LOST_TAG = "orchestrator.metrics_lost"  # metrics the tracker could not deliver
