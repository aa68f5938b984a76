"""`--checkpoint-url` for ensembles and Fig. 7: a run trained with tracking.enabled=false is
evaluated without MLflow at all. Two tiny checkpoints (CIFAR ResNet-20s with random weights,
3 classes) are committed to a local folder; the data are local shards; MLFLOW_TRACKING_URI is
unset, and nothing may create a local MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.checkpoint import CheckpointStore
from orchestrator.checkpoint_refs import CheckpointRefError
from orchestrator.ensemble_eval import main as ensemble_main
from orchestrator.ensemble_eval.members import url_checkpoint
from orchestrator.models import create_model
from orchestrator.paper.layer_responses import main as responses_main
from orchestrator.spec import apply_overrides
from tests.conftest import load_job_spec


@pytest.fixture(scope="module")
def checkpoints(odd_local_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two jobs' checkpoint folders: `a` with steps 1 (val 0.5) and 2 (val 0.7), `b` with 1."""
    root = tmp_path_factory.mktemp("runs")
    base = load_job_spec("smoke")
    folders = {}
    for job, steps in (("a", {1: 0.5, 2: 0.7}), ("b", {1: 0.6})):
        spec = apply_overrides(
            base, [f"name={job}", f"data.url={odd_local_shards}", "tracking.enabled=false"]
        )
        store = CheckpointStore(f"{root}/{job}/checkpoints")
        for step, err in steps.items():
            torch.manual_seed(step * 10 + len(job))
            net = create_model("cifar_resnet20", 3)
            store.write(
                step,
                "trainer.pt",
                {"spec": spec.to_dict(), "strategy": {"model": net.state_dict()}},
            )
            store.commit(step, {"val/top1_err": err})
        folders[job] = f"{root}/{job}/checkpoints"
    return folders


@pytest.fixture
def no_mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MLFLOW_TRACKING_URI, and a working folder to look for an accidental store in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_url_names_a_step_or_a_folders_best_or_last(checkpoints: dict[str, str]) -> None:
    a = checkpoints["a"]
    assert url_checkpoint(a, "best").step == 1 and url_checkpoint(a, "last").step == 2
    assert url_checkpoint(f"{a}/step-00000002/").step == 2
    with pytest.raises(CheckpointRefError, match=r"step 7 is not a committed .*steps: 1, 2"):
        url_checkpoint(f"{a}/step-00000007")
    with pytest.raises(CheckpointRefError, match="no committed checkpoint there"):
        url_checkpoint(f"{a}/../nothing/checkpoints")


def test_an_ensemble_of_checkpoint_urls_needs_no_mlflow(
    checkpoints: dict[str, str], no_mlflow: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = no_mlflow / "out"
    argv = [
        "--checkpoint-url",
        checkpoints["a"],
        "--checkpoint-url",
        f"{checkpoints['b']}/step-00000001",
    ]
    argv += ["--local", "--no-progress", "--output-dir", str(out), "--save-probs", str(out)]
    assert ensemble_main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "MLflow: not used (MLFLOW_TRACKING_URI is not set): results printed here and written"
        in printed
    )
    assert "| a-step1 |" in printed and "| b-step1 |" in printed and "| ensemble (2) |" in printed
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["member"] for r in rows] == ["a-step1", "b-step1", "ensemble (2)"]
    assert (out / "comparison.md").read_text() in printed
    # the ensemble is the mean of the members' probabilities
    members = [np.load(out / f"member-{i}.npz") for i in (0, 1)]
    ensemble = np.load(out / "ensemble.npz")
    assert np.allclose(
        ensemble["probs"], (members[0]["probs"] + members[1]["probs"]) / 2, atol=1e-6
    )
    hit = ensemble["probs"].argmax(1) == ensemble["labels"]
    assert rows[-1]["top1_err"] == pytest.approx(round(100 * (1 - hit.mean()), 2))
    assert sorted(p.name for p in no_mlflow.iterdir()) == ["out"]  # no mlflow.db, no mlruns


def test_members_from_mlflow_still_need_its_uri(
    checkpoints: dict[str, str], no_mlflow: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ensemble_main(["--runs", "0" * 32, "--checkpoint-url", checkpoints["a"], "--local"]) == 2
    assert "MLFLOW_TRACKING_URI" in capsys.readouterr().err
    assert not list(no_mlflow.iterdir())


def test_fig_7_of_checkpoint_urls_needs_no_mlflow(
    checkpoints: dict[str, str], no_mlflow: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--checkpoint-url", checkpoints["a"], "--checkpoint", "best", "--images", "8"]
    assert responses_main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "ResNet-20 (cifar_resnet20): 19 3x3 layers, 8 validation images" in printed
    assert f"step 1 ({checkpoints['a']}/step-00000001)" in printed
    assert "printed only (--output-dir DIR)" in printed
    out = no_mlflow / "fig7"
    both = [*argv, "--checkpoint-url", checkpoints["b"], "--output-dir", str(out)]
    assert responses_main(both) == 0
    assert "not logged to MLflow" in capsys.readouterr().out
    lines = (out / "layer_responses.csv").read_text().splitlines()
    assert lines[0] == "label,checkpoint_url,index,layer,std,rank" and len(lines) == 1 + 2 * 19
    assert lines[1].startswith(f"ResNet-20,{checkpoints['a']}/step-00000001,1,conv1,")
    assert lines[20].startswith(f"ResNet-20,{checkpoints['b']}/step-00000001,1,conv1,")
    assert (out / "plots" / "layer_responses.png").stat().st_size > 0
    assert sorted(p.name for p in no_mlflow.iterdir()) == ["fig7"]
    assert responses_main(["--images", "8"]) == 2
    assert "--run RUN_ID) or --checkpoint-url URL" in capsys.readouterr().err


def test_a_folders_best_is_by_the_jobs_own_best_metric(tmp_path: Path) -> None:
    """The marker records the job's spec: a job that chose val/top5_err keeps its choice."""
    spec = apply_overrides(
        load_job_spec("smoke"), ["checkpoint.best_metric=val/top5_err", "tracking.enabled=false"]
    )
    store = CheckpointStore(f"{tmp_path}/c/checkpoints")
    for step, (top1, top5) in {1: (0.4, 0.3), 2: (0.5, 0.1)}.items():
        store.write(step, "trainer.pt", {"spec": spec.to_dict()})
        store.commit(step, {"val/top1_err": top1, "val/top5_err": top5}, spec=spec.to_dict())
    assert url_checkpoint(f"{tmp_path}/c/checkpoints", "best").step == 2  # top-1 would say 1
