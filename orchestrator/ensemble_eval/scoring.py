"""Scoring the members, in this process or as one Ray task each, and their ensemble: the
(weighted) mean of the members' probabilities over the samples they all scored."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.checkpoint_refs import read_trainer_state
from orchestrator.ensemble_eval.config import EnsembleConfig, EnsembleError
from orchestrator.ensemble_eval.members import Member
from orchestrator.evaluation import EvalResult, combine_probs, topk_errors

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """Errors as fractions; loss = mean -log p(true class)."""

    top1_err: float
    top5_err: float
    samples: int
    loss: float = math.nan


# ----------------------------------------------------------------------------- one member


def evaluate_member(
    payload: dict[str, Any], progress: bool | Callable[..., Any] = False
) -> dict[str, Any]:
    """Build the member's net, load its weights, (recalibrate BN,) evaluate: the EvalResult
    with probabilities, plus where it ran (device), its BN batches and seconds."""
    import torch

    from orchestrator.evaluation import evaluate_as, recalibrate_bn_on_data
    from orchestrator.models import create_model

    t0 = time.perf_counter()
    use_gpu = payload["use_gpu"]
    device = torch.device("cuda" if (use_gpu is not False and torch.cuda.is_available()) else "cpu")
    model = create_model(payload["model_name"], payload["num_classes"], **payload["model_options"])
    state = read_trainer_state(payload["checkpoint_url"], payload["label"])
    model.load_state_dict(state["strategy"]["model"])
    del state  # the optimizer state too: not needed to evaluate
    model.to(device)
    if device.type == "cuda":
        # torch's stubs leave out Module.to's memory_format keyword, which it takes
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    data, ev = payload["data"], payload["eval"]
    bn_batches = 0
    if ev.bn_recalibrate:
        bn_batches = recalibrate_bn_on_data(
            model,
            data,
            ev.bn_recalibrate,
            batch_size=ev.batch_size,
            rank=0,
            world_size=1,
            device=device,
            seed=payload["seed"],
        )
    result = evaluate_as(
        model,
        data,
        ev,
        rank=0,
        world_size=1,
        device=device,
        bf16=device.type == "cuda",
        return_probs=True,
        progress=progress,
        desc=payload["label"],
    )
    seconds = time.perf_counter() - t0
    return {"result": result, "device": str(device), "bn_batches": bn_batches, "seconds": seconds}


def _ray_member_task(payload: dict[str, Any]) -> dict[str, Any]:
    try:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        progress: Any = (
            (lambda total, desc: ray_tqdm(total=total, desc=desc)) if payload["progress"] else False
        )
    except ImportError:
        progress = False
    return evaluate_member(payload, progress)


def _payload(m: Member, cfg: EnsembleConfig) -> dict[str, Any]:
    """What a member's evaluation needs (small: the weights are read where it runs)."""
    return {
        "label": m.label,
        "model_name": m.model_name,
        "model_options": m.model_options,
        "num_classes": m.num_classes,
        "checkpoint_url": m.checkpoint_url,
        "data": m.data,
        "seed": m.seed,
        "eval": cfg.eval,
        "use_gpu": cfg.use_gpu,
        "progress": cfg.progress,
    }


# ----------------------------------------------------------------------------- every member


def connect_ray(cfg: EnsembleConfig) -> bool:
    """Join (or start) Ray before anything is logged; returns whether tasks get GPUs."""
    if os.environ.get("RAY_ADDRESS", "").startswith("http"):
        raise EnsembleError(
            "RAY_ADDRESS points at a Ray job server: submit this there with `ray job submit -- "
            "python -m orchestrator.ensemble_eval ...` (or jobs/ensemble_eval.py), or pass --local"
        )
    import ray

    try:
        if not ray.is_initialized():
            ray.init(log_to_driver=True)
    except Exception as err:
        raise EnsembleError(
            f"cannot connect to Ray ({os.environ.get('RAY_ADDRESS', 'local')}): {err}"
        ) from err
    if cfg.use_gpu is None:
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.use_gpu)


def evaluate_members(
    members: list[Member],
    cfg: EnsembleConfig,
    use_gpu: bool | None,
    on_done: Callable[[int, dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Evaluate every member here (--local) or as Ray tasks; `on_done(i, out)` as each ends."""
    from tqdm.auto import tqdm

    outs: list[dict[str, Any]] = [{} for _ in members]
    if cfg.local:
        for i, m in enumerate(members):
            outs[i] = evaluate_member(_payload(m, cfg), progress=cfg.progress)
            on_done(i, outs[i])
        return outs
    import ray

    task = ray.remote(num_cpus=cfg.cpus_per_member, num_gpus=1 if use_gpu else 0)(_ray_member_task)
    refs = {}
    for i, m in enumerate(members):
        payload = {**_payload(m, cfg), "use_gpu": use_gpu}
        refs[task.options(name=f"ensemble-eval:{m.label}").remote(payload)] = i
    pending = list(refs)
    with tqdm(total=len(members), desc="members", unit="member", disable=not cfg.progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = refs[done[0]]
            outs[i] = ray.get(done[0])
            on_done(i, outs[i])
            bar.update(1)
    return outs


# ----------------------------------------------------------------------------- the ensemble


def ensemble_of(
    results: list[EvalResult], weights: list[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, labels, probs) of the weighted mean over the samples every member scored."""
    scored = [per_sample(r) for r in results]
    common = scored[0][0]
    for indices, _, _ in scored[1:]:
        if not np.array_equal(indices, common):
            common = np.intersect1d(common, indices)
    if any(len(indices) != len(common) for indices, _, _ in scored):
        log.warning(
            "members scored different samples: the ensemble uses the %d they share", len(common)
        )
    aligned, labels = [], None
    for indices, member_labels, probs in scored:
        pick = np.searchsorted(indices, common)
        aligned.append(probs[pick])
        if labels is None:
            labels = member_labels[pick]
        elif not np.array_equal(labels, member_labels[pick]):
            raise RuntimeError(
                "members disagree on the labels of the same samples: different data?"
            )
    assert labels is not None  # results is never empty: the first member set it
    return common, labels, combine_probs(aligned, weights)


def per_sample(r: EvalResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A member's (indices, labels, probs): only results evaluated with return_probs=True
    have them."""
    if r.indices is None or r.labels is None or r.probs is None:
        raise ValueError(
            f"{r.protocol} result without per-sample probabilities: "
            "evaluate it with return_probs=True"
        )
    return r.indices, r.labels, r.probs


def ensemble_scores(probs: np.ndarray, labels: np.ndarray) -> Scores:
    """The ensemble's errors and loss from its probabilities."""
    top1, top5 = topk_errors(probs, labels)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)
    return Scores(top1, top5, len(labels), float(-np.log(picked).mean()))
