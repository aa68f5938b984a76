"""The worker loop on CPU: DDP and DeepSpeed under Ray, accumulation equivalence, plateau
decisions across ranks, non-finite loss, exact validation counts."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import odd_shards_data, run_script

TINY = [  # cifar_resnet20 on 32x32 synthetic batches: the loop's mechanics, fast
    "model.name=cifar_resnet20",
    "model.channels_last=false",
    "data.source=synthetic",
    "data.image_size=32",
    "data.synthetic_classes=10",
    "data.pca_lighting=0",
    "tracking.enabled=false",
    "eval.every_iters=0",
    "eval.at_end=false",
    "checkpoint.at_epoch_end=false",
]


def local_job(storage: Path, name: str, *overrides: str) -> list[str]:
    """The command line of a TINY smoke job under `--local` (torchrun where it asks for more
    than one worker), its checkpoints under `storage`."""
    return [
        sys.executable,
        "jobs/smoke.py",
        "--local",
        f"name={name}",
        f"checkpoint.storage={storage}",
        *TINY,
        *overrides,
    ]


def _final_state(storage: Path, name: str) -> dict:
    steps = sorted((storage / name / "checkpoints").glob("step-*"))
    assert steps and (steps[-1] / "COMMITTED").exists(), f"no committed checkpoint under {storage}"
    return torch.load(io.BytesIO((steps[-1] / "trainer.pt").read_bytes()), weights_only=True)


def _local(tmp_path: Path, name: str, *overrides: str, log_level: str = "INFO") -> str:
    return run_script(
        "jobs/smoke.py",
        "--local",
        f"name={name}",
        f"checkpoint.storage={tmp_path}",
        *TINY,
        *overrides,
        env={"OMP_NUM_THREADS": "1", "ORCH_LOG_LEVEL": log_level},
    )


ACCUMULATION = ["scaling.global_batch=16", "scaling.micro_batch=8", "schedule.max_iters=3"]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """2 DDP workers x 1 micro-batch of 8: the final weights both accumulation tests compare
    with (DeepSpeed's 2 workers train bit-identically to DDP's; tests/test_fault_tolerance's
    ZeRO tests hold DeepSpeed's 2-worker runs to the same DDP weights)."""
    storage = tmp_path_factory.mktemp("two-workers")
    _local(storage, "two", *ACCUMULATION, "checkpoint.every_iters=3", "scaling.num_workers=2")
    return _final_state(storage, "two")["strategy"]["model"]


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_accumulation_matches_more_workers(
    tmp_path: Path, strategy: str, two_workers: dict[str, torch.Tensor]
) -> None:
    """1 worker x 2 micro-batches of 8 == 2 workers x 1 micro-batch of 8 (same global batch 16).
    The synthetic source gives every rank the same batch, so both see the same 16 samples."""
    one_worker = ["scaling.num_workers=1", "checkpoint.every_iters=1"]
    _local(tmp_path, "one", *ACCUMULATION, *one_worker, f"scaling.strategy={strategy}")
    one = _final_state(tmp_path, "one")["strategy"]["model"]
    assert one.keys() == two_workers.keys()
    for key in one:
        # BN running statistics are updated once per micro-batch, so accumulation moves them
        # twice per step where two workers move them once: only the weights must agree
        if one[key].is_floating_point() and "running_" not in key:
            torch.testing.assert_close(one[key], two_workers[key], rtol=1e-4, atol=1e-5, msg=key)
    # equal weights prove nothing if nothing trained: the last step must have moved them
    before = torch.load(
        tmp_path / "one" / "checkpoints" / "step-00000002" / "trainer.pt", weights_only=True
    )
    assert not torch.equal(before["strategy"]["model"]["fc.weight"], one["fc.weight"])


def test_nonfinite_loss_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failed:
        _local(
            tmp_path,
            "nan",
            "optim.lr=1e12",
            "schedule.max_iters=20",
            "scaling.global_batch=8",
            "scaling.num_workers=1",
            "checkpoint.every_iters=0",
        )
    assert "NonFiniteLoss: non-finite loss at step" in str(failed.value)
    assert "on rank(s) [0]" in str(failed.value)
    assert not (tmp_path / "nan" / "checkpoints").exists() or not list(
        (tmp_path / "nan" / "checkpoints").glob("*/COMMITTED")
    )


def test_exact_validation_counts_and_identical_plateau_decisions(
    tmp_path: Path, odd_local_shards: Path
) -> None:
    """2 ranks, 21 validation samples: counted once each; the plateau rule decides alike."""
    _local(
        tmp_path,
        "plateau",
        *odd_shards_data(odd_local_shards),
        "scaling.num_workers=2",
        "scaling.global_batch=8",
        "schedule.kind=plateau",
        "schedule.plateau_patience=1",
        "schedule.plateau_threshold=0.5",
        "schedule.max_iters=6",
        "eval.every_iters=2",
        "eval.batch_size=4",
        "checkpoint.every_iters=6",
    )
    step_dir = max((tmp_path / "plateau" / "checkpoints").glob("step-*"))
    marker = json.loads((step_dir / "COMMITTED").read_text())
    assert marker["metrics"]["val/samples"] == 21
    ranks = [torch.load(step_dir / f"rank-{r:05d}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["schedule"] == ranks[1]["schedule"]
    assert ranks[0]["schedule"]["drops"] >= 2  # threshold 0.5 makes every evaluation a plateau


@pytest.mark.parametrize("decode", ["gpu", "split"])
def test_device_decode_paths_train(tmp_path: Path, odd_local_shards: Path, decode: str) -> None:
    """decode=gpu/split end to end; on a CPU the "device" decoder is the host's libjpeg-turbo,
    so the plumbing (MixedBatch, device augmentation, the share in the checkpoint) is real."""
    out = _local(
        tmp_path,
        decode,
        *odd_shards_data(odd_local_shards),
        f"data.decode={decode}",
        "data.split_cpu_share=0.25",
        "scaling.global_batch=8",
        "schedule.max_iters=4",
        "tracking.log_every=1",
        "checkpoint.every_iters=4",
        log_level="DEBUG",  # every published figure (the progress line shows a few)
    )
    state = _final_state(tmp_path, decode)
    assert state["step"] == 4
    if decode == "split":
        assert "cpu_decode_share=0.25" in out and state["cpu_decode_share"] == 0.25


def test_a_mid_epoch_resume_on_fewer_workers_keeps_the_sample_sequence(
    tmp_path: Path, odd_local_shards: Path
) -> None:
    """2 workers train to step 6 (mid-epoch 1 of 4-step epochs: 48 images, global batch 12),
    the job is resubmitted on 1 worker to step 12. The ledger holds every sample once per epoch,
    and every step's samples equal those of a run on 1 worker from the start."""
    from orchestrator.data.ledger import read_ledger, read_steps

    data = [*odd_shards_data(odd_local_shards), "data.ledger=true", "scaling.global_batch=12"]
    common = [*data, "checkpoint.every_iters=3", "data.streams=2"]
    _local(tmp_path, "elastic", *common, "scaling.num_workers=2", "schedule.max_iters=6")
    longer = ["schedule.max_iters=12", "--allow-change", "schedule.max_iters"]
    out = _local(tmp_path, "elastic", *common, "scaling.num_workers=1", *longer)
    assert "resumed from" in out or "from step 6" in out, out[-2000:]
    _local(tmp_path, "straight", *common, "scaling.num_workers=1", "schedule.max_iters=12")
    report = read_ledger(str(tmp_path / "elastic" / "checkpoints"))
    assert report.ok and [e.epoch for e in report.complete_epochs] == [0, 1, 2], report.lines
    assert report.duplicates == 0 and report.drops == 0
    elastic = read_steps(str(tmp_path / "elastic" / "checkpoints"))
    straight = read_steps(str(tmp_path / "straight" / "checkpoints"))
    assert list(elastic) == list(range(1, 13)) == list(straight)
    for step in elastic:
        assert elastic[step].tolist() == straight[step].tolist(), step
    state = _final_state(tmp_path, "elastic")
    assert state["step"] == 12 and state["position"]["world_size"] == 1
