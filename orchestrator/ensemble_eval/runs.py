"""An ensemble evaluation in MLflow: a parent run in `--output-experiment` with the ensemble's
metrics (`ensemble/...`) and the comparison with the paper, and one nested child run per
member (tag mlflow.parentRunId) with its own (`val/...`). Every param, tag and text goes
through orchestrator.tracking.redaction, as a training run's do."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.ensemble_eval.config import EnsembleConfig
from orchestrator.ensemble_eval.members import Member
from orchestrator.ensemble_eval.scoring import Scores
from orchestrator.evaluation import EvalResult
from orchestrator.tracking.redaction import log_tags, redact, redact_tags, scrub
from orchestrator.tracking.runs import experiment_id
from orchestrator.tracking.tags import (
    CHECKPOINT_CHOICE_TAG,
    CHECKPOINT_TAG,
    DEVICE_TAG,
    ENSEMBLE_TAG,
    ERROR_TAG,
    MEMBERS_TAG,
    MODEL_TAG,
    PARENT_TAG,
    PROTOCOL_TAG,
    SELECTED_BY_TAG,
    SOURCE_RUN_TAG,
)

log = logging.getLogger(__name__)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _class_json(result: EvalResult) -> dict[str, Any]:
    acc = result.per_class_accuracy
    return {
        "class_total": result.class_total.tolist(),
        "class_correct": result.class_correct.tolist(),
        "accuracy": [None if np.isnan(a) else float(a) for a in acc],
    }


class EnsembleRuns:
    """The parent run and its children, created at once; `fail` closes whatever is still open."""

    def __init__(
        self, client: Any, cfg: EnsembleConfig, members: list[Member], data_url: str
    ) -> None:
        self.client = client
        exp_id = experiment_id(client, cfg.output_experiment)
        name = cfg.name or f"ensemble-{cfg.eval.protocol}-{len(members)}"
        tags = {
            ENSEMBLE_TAG: "parent",
            PROTOCOL_TAG: cfg.eval.protocol,
            CHECKPOINT_CHOICE_TAG: cfg.checkpoint,
            MEMBERS_TAG: ", ".join(m.label for m in members),
        }
        run = client.create_run(exp_id, run_name=scrub(name), tags=redact_tags(tags))
        self.parent: str = run.info.run_id
        self.children: list[str] = []
        self.open = {self.parent}
        try:
            self._log_params(cfg, members, data_url)
            self._create_children(exp_id, cfg, members)
        except BaseException as err:
            self.fail(f"creating the runs: {type(err).__name__}: {err}")
            raise

    def _log_params(self, cfg: EnsembleConfig, members: list[Member], data_url: str) -> None:
        ev = cfg.eval
        params = {
            "protocol": ev.protocol,
            "checkpoint": cfg.checkpoint,
            "num_members": len(members),
            "data.url": data_url,
            "data.val_split": members[0].data.val_split,
            "weights": [m.weight for m in members],
            "batch_size": ev.batch_size,
            "max_batches": ev.max_batches,
            "bn_recalibrate": ev.bn_recalibrate,
            "members": [m.run_id or m.label for m in members],
            "executor": "local" if cfg.local else "ray",
        }
        if ev.protocol == "multiscale":
            params.update(scales=list(ev.scales), flips=ev.flips)
        self._log_params_of(self.parent, params)

    def _log_params_of(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in redact(params).items()]
        self.client.log_batch(run_id, params=items)

    def _create_children(self, exp_id: str, cfg: EnsembleConfig, members: list[Member]) -> None:
        for i, m in enumerate(members):
            tags = {
                PARENT_TAG: self.parent,
                ENSEMBLE_TAG: "member",
                MODEL_TAG: m.model_name,
                CHECKPOINT_TAG: m.checkpoint_url,
                SELECTED_BY_TAG: m.selected_by,
                SOURCE_RUN_TAG: m.run_id or "",
                PROTOCOL_TAG: cfg.eval.protocol,
            }
            run = self.client.create_run(exp_id, run_name=scrub(m.label), tags=redact_tags(tags))
            child = run.info.run_id
            self.children.append(child)
            self.open.add(child)
            # what training's validation measured at this step, beside what this evaluation finds
            measured = {
                f"checkpoint.{k}": v for k, v in m.marker_metrics.items() if k.startswith("val")
            }
            params = {
                "member_index": i,
                "model.name": m.model_name,
                "checkpoint.step": m.step,
                "checkpoint.url": m.checkpoint_url,
                "weight": m.weight,
                "source_run_id": m.run_id or "",
                "source_run_name": m.run_name or "",
                **measured,
            }
            self._log_params_of(child, params)

    # ------------------------------------------------------------------ results

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, 0)
            for k, v in metrics.items()
            if v is not None and not math.isnan(v)
        ]
        self.client.log_batch(run_id, metrics=items)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, scrub(text), path)

    def log_json(self, run_id: str, obj: Any, path: str) -> None:
        self.log_text(run_id, json.dumps(obj, indent=1, default=_jsonable), path)

    def log_npz(self, run_id: str, name: str, **arrays: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            np.savez_compressed(path, **arrays)
            self.client.log_artifact(run_id, str(path))

    def log_member(self, i: int, out: dict[str, Any], log_probs: bool) -> None:
        """Member i's evaluation (evaluate_member's `out`): metrics val/..., its device,
        per_class_accuracy.json, and with `log_probs` probs.npz."""
        r: EvalResult = out["result"]
        child = self.children[i]
        metrics = {
            **r.metrics(),
            "val/eval_seconds": out["seconds"],
            "val/bn_batches": out["bn_batches"],
        }
        self.log_metrics(child, metrics)
        log_tags(self.client, child, {DEVICE_TAG: out["device"]})
        self.log_json(child, _class_json(r), "per_class_accuracy.json")
        if log_probs:
            self.log_npz(child, "probs.npz", probs=r.probs, labels=r.labels, indices=r.indices)

    def log_ensemble(
        self,
        scores: Scores,
        members: list[Scores],
        rows: list[dict[str, Any]],
        table: str,
        per_class: dict[str, Any],
    ) -> None:
        """The ensemble's metrics (ensemble/...), comparison.{md,json}, per_class_accuracy.json."""
        member_top1 = [s.top1_err for s in members]
        metrics = {
            "ensemble/top1_err": scores.top1_err,
            "ensemble/top5_err": scores.top5_err,
            "ensemble/loss": scores.loss,
            "ensemble/samples": scores.samples,
            "ensemble/best_member_top1_err": min(member_top1),
            "ensemble/mean_member_top1_err": float(np.mean(member_top1)),
        }
        self.log_metrics(self.parent, metrics)
        self.log_text(self.parent, table, "comparison.md")
        self.log_json(self.parent, rows, "comparison.json")
        self.log_json(self.parent, per_class, "per_class_accuracy.json")

    # ------------------------------------------------------------------ the end

    def close(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
        self.open.discard(run_id)

    def fail(self, error: str, status: str = "FAILED") -> None:
        """Every run still open ends with `status`, the error (redacted) in orchestrator.error."""
        tag = redact_tags({ERROR_TAG: error})[ERROR_TAG]
        for run_id in [r for r in [*self.children, self.parent] if r in self.open]:
            try:
                self.client.set_tag(run_id, ERROR_TAG, tag)
                self.client.set_terminated(run_id, status=status)
            except Exception as err:  # noqa: BLE001 - keep the original error in front
                log.warning("could not mark MLflow run %s %s: %s", run_id, status, scrub(err))
        self.open.clear()


class NoRuns:
    """EnsembleRuns' stand-in where there is no MLflow (every member a --checkpoint-url and
    MLFLOW_TRACKING_URI unset): nothing is logged; the driver says so once, prints the table
    and writes --output-dir."""

    parent = ""  # no run ids: nothing is logged

    def __init__(self, members: list[Member]) -> None:
        self.children: list[str] = [""] * len(members)

    def log_member(self, i: int, out: dict[str, Any], log_probs: bool) -> None:
        pass

    def log_ensemble(self, *args: Any) -> None:
        pass

    def log_npz(self, run_id: str, name: str, **arrays: Any) -> None:
        pass

    def close(self, run_id: str, status: str = "FINISHED") -> None:
        pass

    def fail(self, error: str, status: str = "FAILED") -> None:
        pass
