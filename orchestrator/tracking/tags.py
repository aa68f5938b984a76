"""Every MLflow tag name the project writes or reads, in one place.

Modules import the names from here (never through another module), so a tag one module writes
and another reads is spelled once.
"""

# A training job's run (tracking.tracker, train, launch, liveness).
JOB_TAG = "orchestrator.job"  # a run's job name: how a job finds its run again
ATTEMPT_TAG = "orchestrator.attempt"  # how many times the job has started this run
PARAMS_CHANGED_TAG = "orchestrator.params_changed"  # params a resumed attempt changed
ERROR_TAG = "orchestrator.error"  # why a run failed
HEARTBEAT_TAG = "orchestrator.heartbeat"  # stamped while the run's process lives (liveness)
LOST_TAG = "orchestrator.metrics_lost"  # metrics the tracker could not deliver
RAY_JOB_TAG = "ray_job_id"  # the Ray job the run belongs to: liveness asks Ray if it still runs
RAY_CLUSTER_TAG = "ray_cluster"  # its cluster's session name: Ray job ids repeat across clusters
STALE_SEEN_TAG = "orchestrator.stale_seen"  # liveness: "BEAT@SERVER_TIME" a sweep found it stale
GIT_COMMIT_TAG = "git_commit"  # the code's commit, in a column of its own
MLFLOW_GIT_COMMIT_TAG = "mlflow.source.git.commit"  # the same commit, where MLflow's UI shows it
MANIFEST_TAG = "manifest_sha256"  # digest of the dataset manifest the run trained on
NUM_CLASSES_TAG = "num_classes"  # classes the net was trained on (paper numbers need the full set)
MODEL_TAG = "model"  # the net's name, e.g. "resnet50"
STRATEGY_TAG = "strategy"  # the scaling strategy, e.g. "ddp"
WORLD_SIZE_TAG = "world_size"  # workers the run trained on
DEVICE_TAG = "device"  # "cuda" or "cpu"
DATASET_TAG = "dataset"  # the training data's URL, or "synthetic"

# MLflow's own tags.
PARENT_TAG = "mlflow.parentRunId"  # nests a run under its parent in the UI
RUN_NAME_TAG = "mlflow.runName"  # the run's display name
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # on an experiment: what kind of work it holds
DATA_CONTEXT_TAG = "mlflow.data.context"  # on a dataset input: "train"

# Checkpoints and models (tracking.tracker, tracking.run_report, publish.register).
CHECKPOINT_TAG = "checkpoint_url"  # on a run: its last checkpoint; on a version: its checkpoint
BEST_CHECKPOINT_TAG = "best_checkpoint_url"  # on a run: its best checkpoint
BEST_MODEL_VERSION_TAG = "best_model_version"  # on a run: "job/version" of its best checkpoint
LAST_MODEL_VERSION_TAG = "last_model_version"  # on a run: "job/version" of its last checkpoint
BEST_METRIC_TAG = "best_metric"  # on a version: the metric "best" was chosen by
STEP_TAG = "step"  # on a version: its checkpoint's step
FORMAT_TAG = "orchestrator.model_format"  # on a version: a loadable model of this format
WEIGHTS_TAG = "orchestrator.weights"  # on a version: "reference" (S3 checkpoint) or "copy"
REGISTRATION_TAG = "orchestrator.registration"  # on a run: why its models are not registered

# The paper's numbers beside a run (tracking.run_report, paper.layer_responses).
PAPER_SOURCE_TAG = "paper.source"  # where in the paper the compared number comes from
PAPER_PROTOCOL_TAG = "paper.protocol"  # the paper's evaluation protocol for that number
RESPONSES_CHECKPOINT_TAG = "layer_responses.checkpoint_url"  # checkpoint Fig. 7 was measured at
RESPONSES_IMAGES_TAG = "layer_responses.images"  # images Fig. 7's responses were measured over

# Studies (study.grid, study.parent, study.results).
STUDY_TAG = "orchestrator.study"  # on the parent run and on every trial's run
ROLE_TAG = "orchestrator.role"  # "study" on the parent run
CELL_TAG = "orchestrator.cell"  # a trial's cell label
STUDY_PAPER_TAG = "study.paper"  # on the parent run: the table or figure the study reproduces
STUDY_FINGERPRINT_TAG = "study.fingerprint"  # on the parent run: digest of its trials' specs

# Ensemble evaluations (ensemble_eval.members, ensemble_eval.runs).
ENSEMBLE_TAG = "orchestrator.ensemble"  # "parent" or "member": an evaluation's run, not training
MEMBERS_TAG = "orchestrator.members"  # on the parent: the members' labels
PROTOCOL_TAG = "protocol"  # the evaluation protocol, e.g. "multiscale"
CHECKPOINT_CHOICE_TAG = "checkpoint"  # which checkpoint of each run: "best" or "last"
SELECTED_BY_TAG = "selected_by"  # on a member: how its checkpoint was chosen
SOURCE_RUN_TAG = "source_run_id"  # on a member: the training run it came from

# Free tags a user puts on a job's run (tracking.tags.KEY=VALUE): never a name above, nor in
# MLflow's or the project's own namespaces, so a user tag cannot hide or fake one the project
# reads back. MLflow's limits: a key of at most 250 characters, a value of at most 5000.
RESUME_PREFIX = "resume/"  # tags (and artifacts) of the recipe changes a resubmission made
RESERVED_TAG_PREFIXES = ("mlflow.", "orchestrator.", RESUME_PREFIX)
TAG_KEY_MAX, TAG_VALUE_MAX = 250, 5000


def project_tags() -> list[str]:
    """Every tag name this module defines, sorted."""
    return sorted(v for k, v in globals().items() if k.endswith("_TAG") and isinstance(v, str))


def free_tag_problem(key: str, value: str) -> str | None:
    """Why `key=value` cannot be a user's free run tag, or None where it can."""
    if not key or len(key) > TAG_KEY_MAX:
        return f"a tag name has 1 to {TAG_KEY_MAX} characters"
    if not all(c.isascii() and (c.isalnum() or c in "_-./ ") for c in key):
        return "a tag name holds letters, digits and _ - . / or spaces only"
    if key in project_tags() or key.startswith(RESERVED_TAG_PREFIXES):
        named = [t for t in project_tags() if not t.startswith(RESERVED_TAG_PREFIXES)]
        return (
            f"the project or MLflow writes {key!r} itself; a free tag is none of "
            f"{', '.join(named)}, and starts with neither {' nor '.join(RESERVED_TAG_PREFIXES)}"
        )
    if len(value) > TAG_VALUE_MAX:
        return f"a tag value has at most {TAG_VALUE_MAX} characters (this one {len(value)})"
    return None
