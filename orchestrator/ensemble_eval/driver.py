"""`python -m orchestrator.ensemble_eval`: resolve and check the members, evaluate them, log
the ensemble; see the package's docstring."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.checkpoint_refs import holding
from orchestrator.cli import run_cli
from orchestrator.ensemble_eval.config import EnsembleConfig, parse_args
from orchestrator.ensemble_eval.members import Member, check_members, resolve_members
from orchestrator.ensemble_eval.runs import EnsembleRuns, NoRuns
from orchestrator.ensemble_eval.scoring import (
    Scores,
    connect_ray,
    ensemble_of,
    ensemble_scores,
    evaluate_members,
    per_sample,
)
from orchestrator.evaluation import EvalResult
from orchestrator.paper.comparison import ensemble_markdown, ensemble_rows
from orchestrator.runtime import Terminated, raise_on_sigterm
from orchestrator.spec import to_yaml
from orchestrator.tracking.redaction import scrub
from orchestrator.tracking.uri import VARIABLE, tracking_client


def run(cfg: EnsembleConfig) -> dict[str, Any]:
    """Resolve, check, evaluate, log. Raises EnsembleError (bad input) before logging anything."""
    if cfg.dry_run:
        print(to_yaml(cfg), end="")
        return {"members": []}
    client = None
    if _tracking(cfg):
        client = tracking_client(
            "an ensemble of --runs, --experiment or --model members (found in MLflow; "
            "--checkpoint-url members need none)"
        )
    members = resolve_members(client, cfg)
    with contextlib.ExitStack() as held:  # retention keeps every member's step until the end
        for m in members:
            held.enter_context(holding(m.checkpoint_url, f"ensemble member {m.label}"))
        return _run_members(cfg, client, members)


def _tracking(cfg: EnsembleConfig) -> bool:
    """Whether the results go to MLflow: MLFLOW_TRACKING_URI set. Without it only
    --checkpoint-url members can be found, and the results are printed (and written to
    --output-dir), said once; no local MLflow store is ever created."""
    chosen = (("--runs", cfg.runs), ("--experiment", cfg.experiment), ("--model", cfg.models))
    needs = [flag for flag, value in chosen if value] + (["--log-probs"] if cfg.log_probs else [])
    if os.environ.get(VARIABLE, "").strip() or needs:
        return True  # tracking_client refuses an unset URI, naming it
    kept = f"and written to {cfg.output_dir}" if cfg.output_dir else "only (--output-dir DIR)"
    print(f"MLflow: not used ({VARIABLE} is not set): results printed here {kept}")
    return False


def _run_members(cfg: EnsembleConfig, client: Any | None, members: list[Member]) -> dict[str, Any]:
    """`run` once the members are resolved (and held)."""
    manifest = check_members(members, cfg)
    data_url, split, protocol = members[0].data.url, members[0].data.val_split, cfg.eval.protocol
    print(scrub(f"{len(members)} member(s), protocol {protocol}, data {data_url} [{split}]"))
    for m in members:
        how = f"weight {m.weight:g}, {m.selected_by}"
        print(scrub(f"  {m.label}: {m.model_name}, {m.checkpoint_url} ({how})"))
    if cfg.check:
        return {"members": members, "manifest": manifest}
    use_gpu = cfg.use_gpu if cfg.local else connect_ray(cfg)

    raise_on_sigterm()  # `ray job stop`, a preempted node: the runs end KILLED, not RUNNING
    runs: EnsembleRuns | NoRuns = NoRuns(members)
    if client is not None:
        runs = EnsembleRuns(client, cfg, members, data_url)
        print(f"MLflow: ensemble run {runs.parent} in experiment {cfg.output_experiment!r}")
    save_dir = Path(cfg.save_probs) if cfg.save_probs else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    try:
        rows, table, ens = _evaluate_and_log(cfg, members, runs, use_gpu, save_dir)
    except (KeyboardInterrupt, Terminated) as err:
        runs.fail(f"interrupted ({type(err).__name__}: {err})", status="KILLED")
        raise
    except BaseException as err:
        runs.fail(f"{type(err).__name__}: {err}")
        raise
    print()
    print(table, end="")
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(table)
        (out / "comparison.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {out / 'comparison.md'} and {out / 'comparison.json'}")
    return {
        "parent_run_id": runs.parent,
        "child_run_ids": runs.children,
        "rows": rows,
        "top1_err": ens.top1_err,
        "top5_err": ens.top5_err,
        "members": members,
    }


def _evaluate_and_log(
    cfg: EnsembleConfig,
    members: list[Member],
    runs: EnsembleRuns | NoRuns,
    use_gpu: bool | None,
    save_dir: Path | None,
) -> tuple[list[dict[str, Any]], str, Scores]:
    """Evaluate every member (each logged and closed as it finishes), then the ensemble;
    returns the table's rows, the table, and the ensemble's scores."""
    scores: dict[int, Scores] = {}  # by member index, as each finishes

    def on_done(i: int, out: dict[str, Any]) -> None:
        r: EvalResult = out["result"]
        m = members[i]
        if not r.samples:
            raise RuntimeError(
                f"{m.label}: no validation sample could be evaluated in {m.data.url} "
                f"[{m.data.val_split}] (every sample bad or unreadable?)"
            )
        scores[i] = Scores(r.top1_err, r.top5_err, r.samples, r.loss)
        runs.log_member(i, out, cfg.log_probs)
        if save_dir:
            indices, labels, probs = per_sample(r)
            np.savez_compressed(
                save_dir / f"member-{i}.npz", probs=probs, labels=labels, indices=indices
            )
        runs.close(runs.children[i])
        print(
            f"  {m.label}: top-1 err {100 * r.top1_err:.2f}%  top-5 err {100 * r.top5_err:.2f}%  "
            f"({r.samples} samples, {out['device']}, {out['seconds']:.1f} s)"
        )

    outs = evaluate_members(members, cfg, use_gpu, on_done)
    results = [o["result"] for o in outs]
    indices, labels, probs = ensemble_of(results, [m.weight for m in members])
    ens = ensemble_scores(probs, labels)
    member_scores = [scores[i] for i in range(len(members))]
    protocol, data = cfg.eval.protocol, members[0].data
    evaluated_on = f"the {data.val_split!r} split of {data.url} (validation)"
    rows = ensemble_rows(members, member_scores, ens, protocol, evaluated_on=evaluated_on)
    title = (
        f"Ensemble of {len(members)} (protocol {protocol}, checkpoint {cfg.checkpoint}); "
        f"errors in % on {len(labels)} samples of {evaluated_on}"
    )
    table = scrub(ensemble_markdown(rows, title))
    classes = members[0].num_classes
    hit = probs.argmax(1) == labels
    per_class = {
        "class_total": np.bincount(labels, minlength=classes).tolist(),
        "class_correct": np.bincount(labels[hit], minlength=classes).tolist(),
    }
    runs.log_ensemble(ens, member_scores, rows, table, per_class)
    if cfg.log_probs:
        runs.log_npz(runs.parent, "probs.npz", probs=probs, labels=labels, indices=indices)
    if save_dir:
        np.savez_compressed(save_dir / "ensemble.npz", probs=probs, labels=labels, indices=indices)
    runs.close(runs.parent)
    return rows, table, ens


def main(argv: Sequence[str] | None = None, base: EnsembleConfig | None = None) -> int:
    """The command line (over a job file's `base` config); exit code 2 on bad input."""

    def evaluate(args: list[str]) -> None:
        run(parse_args(args, base))

    return run_cli(evaluate, argv, log_level="WARNING")
