"""MLflow tracking from rank 0: one run per job for its whole life.

The run is the one whose id travels in the job's checkpoints (`run_id`), else the newest run
tagged `orchestrator.job = <job name>` in the spec's experiment, else a new one: a restarted
worker group, a resubmitted job, or one left RUNNING by a hard kill continues the same run.
Every metric key keeps strictly increasing steps: steps a resumed job replays are not logged
again.

What the run holds:
- params: the resolved spec as dotted keys; tags: job, model, strategy, world size, device,
  git commit, Ray job id, dataset URL and manifest hash; `spec.yaml`; the dataset manifest as
  the run's input dataset (digest = the manifest's sha256, source = the dataset URL);
- metrics from the loop, and system metrics (CPU, memory, disk, network, GPU where present)
  from MLflow's SystemMetricsMonitor;
- at a successful end: the paper's number for the same model and protocol beside this run's
  (metrics `paper/*`, `achieved/*`, `gap/*` in percent points, `paper/comparison.{md,csv}`) and
  training curves in the paper's style (`plots/*.png`); the best checkpoint registered as a
  model version (registered model = job name, alias `best`, source = its S3 URL).

Secrets (keys, tokens, passwords; credentials in URLs; the values of secret environment
variables) never reach params, tags, artifacts or log messages.

A tracking server that is down never stops training: the client's HTTP retries are kept short,
metrics are queued and flushed when the server answers again (retries back off), and what could
not be delivered is counted in the tag `orchestrator.metrics_lost`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from orchestrator.paper import gap_cell, pct_cell

log = logging.getLogger(__name__)

JOB_TAG = "orchestrator.job"
LOST_TAG = "orchestrator.metrics_lost"
BEST_ALIAS = "best"
EXPERIMENT_KIND = "mlflow.experimentKind"
PACKAGE_DIR = Path(__file__).resolve().parent

# MLflow's client retries an unreachable server for minutes by default; the tracker queues and
# retries on its own, so each call may fail fast. Users can still set these themselves.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

# ----------------------------------------------------------------------------- secrets

SECRET_NAME = re.compile(
    r"secret|password|passwd|token|credential|access_key|api_key|private|auth|(?:^|[._-])key(?:$|[._-])",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@", re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{12,}\b")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;\s](?:[\w.-]*(?:key|token|secret|password|signature|credential)[\w.-]*))=(?P<value>[^&\s]+)",
    re.IGNORECASE,
)
MASK = "***"


def _secret_values() -> list[str]:
    """Values of secret-named environment variables, longest first (short ones are too common)."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` with credentials masked: URL user-info, AWS key ids, secret query parameters,
    and any value of a secret environment variable (e.g. AWS_SECRET_ACCESS_KEY)."""
    text = str(text)
    for value in _secret_values():
        text = text.replace(value, MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _AWS_KEY_ID.sub(MASK, text)
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}={MASK}", text)


def redact(params: dict[str, Any]) -> dict[str, str]:
    """Stringified params with secrets masked: by name (the whole value) or by content."""
    out = {}
    for key, value in params.items():
        text = MASK if SECRET_NAME.search(key) else scrub(str(value))
        out[key] = text[:6000]  # MLflow's param value limit
    return out


# ----------------------------------------------------------------------------- helpers


def git_commit(path: Path = PACKAGE_DIR) -> str | None:
    """The commit checked out where the orchestrator's code lives; None outside a git work tree."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """The dataset's identity: the same hash the loop records in its checkpoints."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _error_code(err: BaseException) -> str | None:
    return getattr(err, "error_code", None)


class Tracker(Protocol):
    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_text(self, text: str, path: str) -> None: ...
    def finish(
        self, status: str, error: str | None = None, *,
        checkpoint_url: str | None = None, best_checkpoint_url: str | None = None,
    ) -> None: ...


class NullTracker:
    """Used off rank 0, with tracking disabled, or where MLflow is not installed."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, path: str) -> None:
        pass

    def finish(self, status: str, error: str | None = None, **checkpoints: str | None) -> None:
        pass


# ----------------------------------------------------------------------------- the tracker


class MlflowTracker:
    """One MLflow run per job; see the module docstring. Never raises for server trouble."""

    def __init__(
        self,
        experiment: str,
        job: str,
        params: dict[str, Any],
        tags: dict[str, str],
        spec_yaml: str = "",
        run_id: str | None = None,
        *,
        manifest: dict[str, Any] | None = None,
        system_metrics_interval_s: float | None = 10.0,
        max_pending: int = 100_000,
        finish_timeout_s: float = 15.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        load_mlflow()
        from mlflow import MlflowClient

        self.client = MlflowClient()
        self.experiment, self.job = experiment, job
        self.params = dict(params)
        self.tags = {k: str(v) for k, v in tags.items() if v is not None}
        self.spec_yaml = spec_yaml
        self.run_id = run_id  # a hint (from a checkpoint) until the run is open
        self.manifest = manifest  # the dataset's, as the loop read it (None: read it here)
        self.system_metrics_interval_s = system_metrics_interval_s
        self.max_pending = max_pending
        self.finish_timeout_s = finish_timeout_s
        self.max_backoff_s = max_backoff_s
        self.opened = False
        self.pending: list[Any] = []  # mlflow.entities.Metric not yet delivered
        self.last_steps: dict[str, int] = {}  # per metric key: the largest step logged
        self.dropped = 0  # metrics given up on (queue over max_pending)
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = 1.0
        self._monitor: Any = None
        self._monitor_broken = False  # it failed to start: retrying each flush would not help
        self._finished = self._closing = False
        self._lost_reported = 0
        self._flush(force=True)  # opens the run; if the server is down, later calls retry

    # ------------------------------------------------------------------ opening the run

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                log.warning("experiment %s was deleted: restoring it", self.experiment)
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            # the kind tells MLflow 3's UI to open on the runs table (not the GenAI overview)
            return self.client.create_experiment(self.experiment, tags={EXPERIMENT_KIND: "custom_model_development"})
        except MlflowException as err:  # created meanwhile by another job
            if _error_code(err) != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def _find_run(self, exp_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        if self.run_id:
            try:
                run = self.client.get_run(self.run_id)
                if run.info.lifecycle_stage == "active":
                    return run
                log.warning("MLflow run %s from the checkpoint was deleted; looking up the job", self.run_id)
            except MlflowException as err:
                if _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
                    raise  # the server is down: open again later
                log.warning("MLflow run %s from the checkpoint is not on this server; looking up the job", self.run_id)
        job = self.job.replace("\\", "\\\\").replace("'", "\\'")
        found = self.client.search_runs(
            [exp_id], filter_string=f"tags.`{JOB_TAG}` = '{job}'", order_by=["attributes.start_time DESC"],
            max_results=1,
        )  # fmt: skip
        return found[0] if found else None

    def _run_tags(self) -> dict[str, str]:
        tags = {JOB_TAG: self.job, "job": self.job, **{k: scrub(v)[:5000] for k, v in self.tags.items()}}
        commit = git_commit()
        if commit:
            tags["git_commit"] = tags["mlflow.source.git.commit"] = commit
        return tags

    def _open(self) -> None:
        exp_id = self._experiment_id()
        run = self._find_run(exp_id)
        tags = self._run_tags()
        known: dict[str, int] = {}
        if run is None:
            run = self.client.create_run(exp_id, run_name=self.job, tags={**tags, "orchestrator.attempt": "1"})
            self.run_id = run.info.run_id
            log.info("MLflow run %s created for job %s", self.run_id, self.job)
        else:
            self.run_id = run.info.run_id
            attempt = int(run.data.tags.get("orchestrator.attempt", "1")) + 1
            self.client.update_run(self.run_id, status="RUNNING")
            self._set_tags({**tags, "orchestrator.attempt": str(attempt)})
            known = self._last_steps(run)
            log.info(
                "continuing MLflow run %s of job %s (attempt %d, last step %d)",
                self.run_id, self.job, attempt, max(known.values(), default=-1),
            )  # fmt: skip
        self._sync_params(run.data.params)
        self._log_spec(run)
        self._log_dataset(run)
        # metrics queued before the run was known: drop the steps it already has
        self.pending = [m for m in self.pending if m.step > known.get(m.key, -1)]
        self.last_steps = dict(known)
        for m in self.pending:
            self.last_steps[m.key] = max(self.last_steps.get(m.key, -1), m.step)
        self.opened = True

    def _last_steps(self, run: Any) -> dict[str, int]:
        """Per metric key, the largest step the run holds (MLflow keeps it in run.data)."""
        objs = getattr(run.data, "_metric_objs", None)
        if objs is not None:
            steps = {m.key: m.step for m in objs}
        else:  # an MLflow without it: read the histories
            steps = {k: max(m.step for m in self.client.get_metric_history(self.run_id, k))
                     for k in run.data.metrics}  # fmt: skip
        return steps

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _sync_params(self, existing: dict[str, str]) -> None:
        """Log the params the run lacks; params are immutable, so changed ones become a tag."""
        from mlflow.entities import Param

        params = redact(self.params)
        missing = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(missing), 100):
            self.client.log_batch(self.run_id, params=missing[i : i + 100])
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("job %s resumed with changed settings %s (params keep the first values)", self.job, changed)
            self._set_tags({"orchestrator.params_changed": ",".join(changed)[:5000]})

    def _log_spec(self, run: Any) -> None:
        if not self.spec_yaml:
            return
        text = scrub(self.spec_yaml)
        names = {f.path for f in self.client.list_artifacts(self.run_id)} if run.data.params else set()
        if "spec.yaml" not in names:
            self.client.log_text(self.run_id, text, "spec.yaml")
            return
        attempt = run.data.tags.get("orchestrator.attempt", "1")
        with tempfile.TemporaryDirectory() as tmp:
            current = Path(self.client.download_artifacts(self.run_id, "spec.yaml", tmp)).read_text()
        if current != text:  # a resubmission with other overrides: keep both
            self.client.log_text(self.run_id, text, f"spec-attempt-{int(attempt) + 1}.yaml")

    def _dataset_input(self) -> Any:
        """The dataset manifest as an MLflow input dataset, or None (synthetic data, no manifest)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        url = str(self.params.get("data.url") or "")
        if self.params.get("data.source", "shards") != "shards" or not url:
            return None
        digest, manifest = self.tags.get("manifest_sha256"), self.manifest
        if manifest is None and _URL_USERINFO.search(url):
            log.warning("data.url carries credentials (pass them as AWS_* variables): manifest not read")
        elif manifest is None:
            try:
                from orchestrator.data import load_manifest

                manifest = load_manifest(url)
            except Exception as err:  # noqa: BLE001
                log.warning("could not read the manifest of dataset %s: %s", scrub(url), scrub(str(err))[:500])
        profile: dict[str, Any] = {}
        if manifest is not None:
            full = manifest_sha256(manifest)
            if digest and digest != full:
                log.warning("dataset %s: manifest changed since the job started", scrub(url))
            digest = full
            profile = {
                "manifest_sha256": full, "num_classes": manifest.get("num_classes"),
                "created": manifest.get("created"),
                "splits": {s: {"samples": info.get("samples"), "shards": len(info.get("shards", []))}
                           for s, info in manifest.get("splits", {}).items()},
            }  # fmt: skip
        if not digest:
            return None
        name = (manifest or {}).get("name") or url.rstrip("/").rsplit("/", 1)[-1]
        source_type = "s3" if url.startswith("s3://") else "http" if url.startswith("http") else "local"
        dataset = Dataset(
            name=scrub(str(name))[:500], digest=digest[:36],  # MLflow's digest column holds 36
            source_type=source_type, source=json.dumps({"uri": scrub(url)}),
            profile=json.dumps(profile) if profile else None,
        )  # fmt: skip
        return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])

    def _log_dataset(self, run: Any) -> None:
        item = self._dataset_input()
        if item is None:
            return
        inputs = getattr(run, "inputs", None)
        have = {(d.dataset.name, d.dataset.digest) for d in (inputs.dataset_inputs if inputs else [])}
        if (item.dataset.name, item.dataset.digest) not in have:
            self.client.log_inputs(self.run_id, datasets=[item])

    # ------------------------------------------------------------------ system metrics

    def _start_system_metrics(self) -> None:
        """(Re)start MLflow's monitor; it stops itself when the server fails, so restart it
        whenever the server answers again. Steps continue from the run's last system step."""
        if self.system_metrics_interval_s is None or not self.opened or self._closing or self._monitor_broken:
            return
        thread = getattr(self._monitor, "_process", None)
        if thread is not None and thread.is_alive():
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=self.system_metrics_interval_s, resume_logging=True
            )
            self._monitor._first_step = self._monitor._logging_step  # see _stop_system_metrics
            self._monitor.start()
        except Exception as err:  # noqa: BLE001
            log.warning("system metrics off: %s", scrub(str(err))[:300])
            self._monitor, self._monitor_broken = None, True

    def _stop_system_metrics(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                first = getattr(monitor, "_first_step", None)
                monitor.finish()
                if first is not None and monitor._logging_step == first:
                    # a run shorter than one sampling interval: still record one sample
                    monitor.collect_metrics()
                    monitor.publish_metrics(monitor.aggregate_metrics())
                    monitor.mlflow_logger.flush()
            except Exception as err:  # noqa: BLE001
                log.warning("stopping system metrics: %s", scrub(str(err))[:300])

    # ------------------------------------------------------------------ metrics

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self.last_steps.get(key, -1):
                continue  # logged before a restart: steps stay strictly increasing
            try:
                self.pending.append(Metric(key, float(value), now, int(step)))
            except (TypeError, ValueError):
                continue
            self.last_steps[key] = step
        if not self._flush() and len(self.pending) > self.max_pending:
            excess = len(self.pending) - self.max_pending  # bounded memory: drop the oldest
            if not self.dropped:
                log.warning("MLflow backlog over %d metrics: dropping the oldest (counted in %s)", self.max_pending, LOST_TAG)
            self.dropped += excess
            del self.pending[:excess]

    def _flush(self, force: bool = False) -> bool:
        """Open the run if needed and deliver the queue; False (never an exception) on failure."""
        if self.opened and not self.pending and not (self.dropped > self._lost_reported):
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        try:
            if not self.opened:
                self._open()
            while self.pending:
                batch = self.pending[:1000]
                self.client.log_batch(self.run_id, metrics=batch)
                del self.pending[: len(batch)]
            if self.dropped > self._lost_reported:
                self._set_tags({LOST_TAG: str(self.dropped)})
                self._lost_reported = self.dropped
        except Exception as err:  # noqa: BLE001
            self._failed(err)
            return False
        self._recovered()
        return True

    def _failed(self, err: Exception) -> None:
        now = time.monotonic()
        self._retry_at = now + min(self._backoff, self.max_backoff_s)
        self._backoff = min(self._backoff * 2, self.max_backoff_s)
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "MLflow unreachable (%s: %s); training goes on, %d metrics queued and retried",
                type(err).__name__, (scrub(str(err)).splitlines() or [""])[0][:300], len(self.pending),
            )  # fmt: skip

    def _recovered(self) -> None:
        if self._down_since is not None:
            log.info("MLflow reachable again after %.0f s; backlog delivered", time.monotonic() - self._down_since)
        self._down_since, self._backoff, self._retry_at = None, 1.0, 0.0
        self._start_system_metrics()

    def log_text(self, text: str, path: str) -> None:
        if not self._flush(force=True):
            log.warning("MLflow unreachable: %s not logged", path)
            return
        try:
            self.client.log_text(self.run_id, scrub(text), path)
        except Exception as err:  # noqa: BLE001
            log.warning("could not log %s to MLflow: %s", path, scrub(str(err))[:300])

    # ------------------------------------------------------------------ the end

    def finish(
        self, status: str, error: str | None = None, *,
        checkpoint_url: str | None = None, best_checkpoint_url: str | None = None,
    ) -> None:  # fmt: skip
        """Close the run with `status`; on FINISHED also the paper comparison, plots and the
        best checkpoint's registration. Waits up to finish_timeout_s for a down server."""
        if self._finished:
            return
        self._closing = True  # no monitor restarts from here on
        self._stop_system_metrics()
        deadline = time.monotonic() + self.finish_timeout_s
        while not self._flush(force=True) and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        lost = self.dropped + len(self.pending)
        if not self.opened or self.pending:
            log.warning(
                "MLflow unreachable at the end of job %s: run %s not closed (%s), %d metrics lost; "
                "a resubmitted job continues it", self.job, self.run_id, status, lost,
            )  # fmt: skip
            if not self.opened:
                return
        steps = [
            ("record the error", lambda: error and self._set_tags({"orchestrator.error": scrub(error)[:5000]})),
            ("record the checkpoint", lambda: checkpoint_url and self._set_tags({"checkpoint_url": scrub(checkpoint_url)})),
            ("register the best checkpoint", lambda: best_checkpoint_url and self.register_best(best_checkpoint_url)),
            ("compare with the paper", lambda: status == "FINISHED" and self.paper_report()),
            ("record lost metrics", lambda: lost > self._lost_reported and self._set_tags({LOST_TAG: str(lost)})),
            ("close the run", lambda: self.client.set_terminated(self.run_id, status=status)),
        ]  # fmt: skip
        for what, step in steps:
            try:
                step()
            except Exception as err:  # noqa: BLE001
                log.warning("MLflow: could not %s for run %s: %s", what, self.run_id, scrub(str(err))[:500])
        self._finished = True

    # ------------------------------------------------------------------ model registry

    def register_best(self, url: str) -> Any:
        """The best checkpoint as a version of the registered model named after the job, with
        alias `best`; a version already registered for the same URL is reused."""
        from mlflow.exceptions import MlflowException

        url = scrub(url)
        name, metric = self.job, str(self.params.get("checkpoint.best_metric", ""))
        self._set_tags({"best_checkpoint_url": url})
        if not re.match(r"^[a-z][a-z0-9+.-]*://", url, re.IGNORECASE):
            # the registry takes a local path only inside the run's own artifacts
            log.info("best checkpoint %s is a local path: recorded as a tag, not registered", url)
            return None
        try:
            self.client.create_registered_model(
                name, tags={JOB_TAG: self.job}, description=f"Checkpoints of job {self.job} (best by {metric})."
            )
        except MlflowException as err:
            if _error_code(err) != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            current = self.client.get_model_version_by_alias(name, BEST_ALIAS)
        except MlflowException:
            current = None
        if current is not None and current.source == url:
            version = current
        else:
            version = self.client.create_model_version(
                name, source=url, run_id=self.run_id,
                tags={"checkpoint_url": url, "best_metric": metric, JOB_TAG: self.job},
                description=f"Best checkpoint of job {self.job} by {metric}: {url}",
            )  # fmt: skip
            self.client.set_registered_model_alias(name, BEST_ALIAS, version.version)
        self._set_tags({"best_model_version": f"{name}/{version.version}"})
        log.info("best checkpoint %s registered as model %s version %s (@%s)", url, name, version.version, BEST_ALIAS)
        return version

    # ------------------------------------------------------------------ the paper

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of one metric from MLflow, one point per step (the last logged)."""
        points: dict[int, float] = {}
        for m in sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: (m.step, m.timestamp)):
            points[m.step] = m.value
        return sorted(points.items())

    def paper_report(self) -> dict[str, float]:
        """Log this run's final validation error beside the paper's (same model, protocol,
        shortcut) as metrics and paper/comparison.{md,csv}, and the curves as plots/*.png.
        Reads the full history from MLflow, so a resumed run is reported whole."""
        from orchestrator import paper

        model = str(self.params.get("model.name", ""))
        protocol = str(self.params.get("eval.protocol", "center"))
        shortcut = self.params.get("model.shortcut")
        classes = self.tags.get("num_classes")  # the loop's tag; None: not known, compare
        ref = paper.lookup(model, protocol, shortcut if isinstance(shortcut, str) else None,
                           int(classes) if classes else None)  # fmt: skip
        hist = {k: self.history(k) for k in
                ("train/top1_err", "train/top5_err", "val_top1_err", "val_top5_err", "train/loss", "val/loss")}  # fmt: skip
        last_step = max((pts[-1][0] for pts in hist.values() if pts), default=0)
        rows, metrics = [], {}
        for name, key, paper_value in (("top-1", "top1", ref and ref.top1), ("top-5", "top5", ref and ref.top5)):
            val = hist[f"val_{key}_err"]
            final = val[-1][1] * 100 if val else None
            best = min(v for _, v in val) * 100 if val else None
            gap = final - paper_value if final is not None and paper_value is not None else None
            for metric, value in ((f"achieved/{key}_err", final), (f"paper/{key}_err", paper_value), (f"gap/{key}_err", gap)):
                if value is not None:
                    metrics[metric] = float(value)
            rows.append([f"{name} error (%)", final, best, paper_value, gap])
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # once per step, like every metric: a finished job submitted again reports nothing twice
        fresh = [Metric(k, v, now, last_step) for k, v in metrics.items() if last_step > self.last_steps.get(k, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
            self.last_steps.update({m.key: last_step for m in fresh})
        if ref is not None:
            self._set_tags({"paper.source": ref.source, "paper.protocol": ref.protocol})
        self.client.log_text(self.run_id, self._comparison_md(model, protocol, shortcut, ref, rows, last_step),
                             "paper/comparison.md")  # fmt: skip
        self.client.log_text(self.run_id, self._comparison_csv(model, protocol, ref, rows), "paper/comparison.csv")
        self._plots(model, ref, hist)
        return metrics

    def _comparison_md(self, model: str, protocol: str, shortcut: Any, ref: Any, rows: list[list[Any]], step: int) -> str:
        dataset = scrub(str(self.params.get("data.url") or "synthetic"))
        lines = [
            f"# {self.job}: {model} against He et al. (2016)", "",
            f"- model: `{model}` (shortcut {shortcut or 'paper default'}), evaluation protocol: `{protocol}`",
            f"- dataset: `{dataset}`, final step: {step}",
            f"- paper: {ref.source + (' — ' + ref.note if ref.note else '') if ref else 'no number for this model and protocol'}",
            "", "| | this run (final) | this run (best) | paper | gap (final − paper, points) |",
            "|---|---:|---:|---:|---:|",
        ]  # fmt: skip
        for name, final, best, paper_value, _ in rows:
            cells = (pct_cell(final), pct_cell(best), pct_cell(paper_value), gap_cell(final, paper_value))
            lines.append(f"| {name} | {' | '.join(cells)} |")
        lines += ["", (
            "Errors in percent. The paper's numbers are on ImageNet val (CIFAR-10 test for the CIFAR "
            "nets): the gap means something only where this run trained and evaluated on that data."
        )]  # fmt: skip
        return "\n".join(lines) + "\n"

    def _comparison_csv(self, model: str, protocol: str, ref: Any, rows: list[list[Any]]) -> str:
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(["metric", "model", "protocol", "this_run_final", "this_run_best", "paper", "gap_points", "paper_source"])
        for name, final, best, paper_value, gap in rows:
            cells = [None if v is None else round(v, 4) for v in (final, best, paper_value, gap)]
            out.writerow([name, model, protocol, *["" if c is None else c for c in cells], ref.source if ref else ""])
        return buf.getvalue()

    def _plots(self, model: str, ref: Any, hist: dict[str, list[tuple[int, float]]]) -> None:
        from orchestrator import plots

        if not plots.available():
            log.warning("matplotlib is not installed: no training-curve plots (pip install matplotlib)")
            return
        figures = []
        for key, name in (("top1", "top-1"), ("top5", "top-5")):
            train = [(s, v * 100) for s, v in hist[f"train/{key}_err"]]
            val = [(s, v * 100) for s, v in hist[f"val_{key}_err"]]
            if not (train or val):
                continue
            value = getattr(ref, key, None) if ref else None
            refs = [plots.Reference(f"paper: {value:.2f}% ({ref.source}, {ref.protocol})", value)] if value is not None else []
            figures.append((f"plots/{key}_error.png", plots.Plot(
                title=f"{self.job} ({model}): {name} error", ylabel=f"{name} error (%)",
                curves=[plots.Curve("", train, val)], references=refs,
                train_name="train (thin)", val_name="validation (bold)",
            )))  # fmt: skip
        if hist["train/loss"] or hist["val/loss"]:
            figures.append(("plots/loss.png", plots.Plot(
                title=f"{self.job} ({model}): cross-entropy loss", ylabel="loss (nats per image)",
                curves=[plots.Curve("", hist["train/loss"], hist["val/loss"])],
                train_name="train (thin)", val_name="validation (bold)",
            )))  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            for path, plot in figures:
                local = plots.render(plot, Path(tmp) / path)
                self.client.log_artifact(self.run_id, str(local), str(Path(path).parent))


def start_tracker(
    enabled: bool, experiment: str, job: str, params: dict[str, Any], tags: dict[str, str],
    spec_yaml: str = "", run_id: str | None = None, manifest: dict[str, Any] | None = None,
) -> Tracker:  # fmt: skip
    """An MLflow tracker where MLFLOW_TRACKING_URI is set and MLflow imports; else a no-op.
    `run_id` (from the job's checkpoint) names the run to continue; `manifest` is the dataset's,
    already read (else the tracker reads it from data.url)."""
    if not enabled or not os.environ.get("MLFLOW_TRACKING_URI"):
        return NullTracker()
    try:
        return MlflowTracker(experiment, job, params, tags, spec_yaml, run_id, manifest=manifest)
    except ImportError:
        log.warning("MLflow is not installed: tracking off")
    except Exception as err:  # noqa: BLE001 (never stop training for tracking)
        log.warning("MLflow tracking off: %s: %s", type(err).__name__, scrub(str(err))[:500])
    return NullTracker()


def load_mlflow() -> None:
    """Import MLflow's client and set our HTTP defaults (short timeouts, one retry) now, where
    tracking is on: the first import takes seconds, too long to pay inside a signal handler."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        pass


def mark_job_run(experiment: str, job: str, status: str, error: str | None = None) -> str | None:
    """Set the status of a job's run from outside its workers (the driver on Ray, where the loop
    runs off the main thread and cannot catch SIGTERM). Only a RUNNING run is changed; returns
    its id, or None where there is no tracking server or no such run."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        name = job.replace("\\", "\\\\").replace("'", "\\'")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
        if not runs or runs[0].info.status != "RUNNING":
            return None
        run_id = runs[0].info.run_id
        if error:
            client.set_tag(run_id, "orchestrator.error", scrub(error)[:5000])
        client.set_terminated(run_id, status=status)
        return run_id
    except Exception as err:  # noqa: BLE001 - status bookkeeping must never mask the job's own error
        log.warning("could not mark MLflow run of %s %s: %s", job, status, scrub(str(err)))
        return None
