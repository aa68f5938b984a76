"""`python -m orchestrator.ensemble_eval` against the real local stack (S3, MLflow, Ray).

Two short smoke runs (cifar_resnet20, 32 px, 12 steps, validation every 6) are trained with
tracking on, so they exist in MLflow with their checkpoints on S3; the ensembles of them are
then evaluated locally and on the Ray head, and checked against numpy over the members'
logged probabilities. The error paths run in-process against the same services and must
leave nothing logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from orchestrator.checkpoint import CheckpointStore
from orchestrator.ensemble_eval import EnsembleConfig, Member, Scores, argv_of, main, parse_args
from orchestrator.paper.comparison import ensemble_markdown, ensemble_rows
from orchestrator.spec import EvalConfig
from orchestrator.stack import Stack
from orchestrator.storage import open_storage
from orchestrator.tracking.tags import JOB_TAG
from tests.conftest import ROOT, assert_no_secret_in_runs, run_script


@pytest.fixture(scope="module")
def trained(stack: Stack, smoke_dataset: str) -> dict[str, Any]:
    """Two tracked smoke runs (seeds 0 and 1) with committed checkpoints at steps 6 and 12
    (validated), plus a step 13 whose marker says it validated worst."""
    tag = uuid.uuid4().hex[:8]
    experiment, storage = f"ens-src-{tag}", f"s3://resnet/tests/ens-{tag}/runs"
    names = [f"ens-{tag}-seed{seed}" for seed in (0, 1)]

    def train(seed: int) -> str:
        return run_script(
            "jobs/smoke.py",
            "--local",
            f"name={names[seed]}",
            f"seed={seed}",
            f"data.url={smoke_dataset}",
            f"checkpoint.storage={storage}",
            f"tracking.experiment={experiment}",
            "scaling.num_workers=1",
            "schedule.max_iters=12",
            "schedule.milestones=[8]",
            "checkpoint.every_iters=6",
            "checkpoint.at_epoch_end=false",
            "eval.every_iters=6",
            "tracking.log_every=6",
            env={"OMP_NUM_THREADS": "1"},
        )

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(train, (0, 1)))
    for name in names:  # a newer checkpoint that validated worse: `best` and `latest` differ
        store = CheckpointStore(f"{storage}/{name}/checkpoints")
        store.write(13, "trainer.pt", store.read(store.latest().step, "trainer.pt"))
        store.commit(13, {"val/top1_err": 0.99})
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == sorted(names)
    return {
        "experiment": experiment,
        "storage": storage,
        "names": names,
        "ids": [runs[n].info.run_id for n in names],
        "data": smoke_dataset,
    }


def _children(client: MlflowClient, parent: Any) -> list[Any]:
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    return sorted(found, key=lambda r: int(r.data.params["member_index"]))


def _only_parent(client: MlflowClient, experiment: str) -> Any:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    parents = [
        r
        for r in client.search_runs([exp.experiment_id])
        if "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(parents) == 1
    return parents[0]


def _probs(run_id: str, tmp: Path) -> dict[str, np.ndarray]:
    path = download_artifacts(run_id=run_id, artifact_path="probs.npz", dst_path=str(tmp / run_id))
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def _best(storage: str, name: str) -> tuple[int, float]:
    """(step, val/top1_err) of the committed checkpoint with the lowest val/top1_err in its
    marker; on a tie, the newer."""
    found = CheckpointStore(f"{storage}/{name}/checkpoints").committed()
    scored = [(c.step, c.metrics.get("val/top1_err")) for c in found]
    return min(((s, e) for s, e in scored if e is not None), key=lambda se: (se[1], -se[0]))


def _nothing_logged(client: MlflowClient, experiment: str) -> bool:
    exp = client.get_experiment_by_name(experiment)
    return exp is None or not client.search_runs([exp.experiment_id])


# ------------------------------------------------------------------------------- success


def test_local_ensemble_matches_numpy_over_the_members_probabilities(
    trained: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out_exp = f"ens-out-{uuid.uuid4().hex[:8]}"
    token = f"hf_{uuid.uuid4().hex}"  # a secret in the environment, beside the stack's own
    monkeypatch.setenv("HF_TOKEN", token)
    code = main(
        [
            "--runs",
            *trained["ids"],
            "--checkpoint",
            "best",
            "--protocol",
            "center",
            "--local",
            "--log-probs",
            "--output-experiment",
            out_exp,
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    client = MlflowClient()
    parent = _only_parent(client, out_exp)
    assert parent.info.status == "FINISHED"
    children = _children(client, parent)
    assert [c.data.params["source_run_id"] for c in children] == trained["ids"]
    assert all(c.info.status == "FINISHED" for c in children)
    secrets = [token, os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["MLFLOW_TRACKING_PASSWORD"]]
    ids = [parent.info.run_id, *(c.info.run_id for c in children)]
    assert_no_secret_in_runs(ids, secrets, printed)
    # best = the committed step with the lowest val/top1_err in its marker
    for child, name in zip(children, trained["names"]):
        step, err = _best(trained["storage"], name)
        assert step in (6, 12)
        assert child.data.params["checkpoint.step"] == str(step)
        # what training's validation measured there, beside this evaluation's own numbers
        assert float(child.data.params["checkpoint.val/top1_err"]) == pytest.approx(err)
        assert not any(k.startswith("checkpoint.train") for k in child.data.params)
        assert child.data.tags["checkpoint_url"].endswith(f"/{name}/checkpoints/step-{step:08d}")

    members = [_probs(c.info.run_id, tmp_path) for c in children]
    for m, child in zip(members, children):
        assert len(m["labels"]) == 40 and np.array_equal(m["indices"], np.arange(40))
        np.testing.assert_allclose(m["probs"].sum(1), 1.0, atol=1e-5)
        member_top1 = float(np.mean(m["probs"].argmax(1) != m["labels"]))
        assert child.data.metrics["val/top1_err"] == pytest.approx(member_top1)
        assert child.data.metrics["val/samples"] == 40
        assert {"val/top5_err", "val/loss", "val/eval_seconds"} <= set(child.data.metrics)
    ensemble = (members[0]["probs"].astype(np.float64) + members[1]["probs"]) / 2
    top1 = float(np.mean(ensemble.argmax(1) != members[0]["labels"]))
    top3 = np.argsort(-ensemble, 1)[:, :5]  # 4 classes: top-5 holds them all
    top5 = float(np.mean(~(top3 == members[0]["labels"][:, None]).any(1)))
    assert parent.data.metrics["ensemble/top1_err"] == pytest.approx(top1)
    assert parent.data.metrics["ensemble/top5_err"] == pytest.approx(top5) == 0.0
    assert parent.data.metrics["ensemble/samples"] == 40
    member_top1 = [c.data.metrics["val/top1_err"] for c in children]
    assert parent.data.metrics["ensemble/best_member_top1_err"] == pytest.approx(min(member_top1))
    assert {"ensemble/loss", "ensemble/mean_member_top1_err"} <= set(parent.data.metrics)
    assert not any("/" not in k for k in parent.data.metrics), "every metric in its group"
    assert parent.data.params["protocol"] == "center"
    logged = _probs(parent.info.run_id, tmp_path)
    np.testing.assert_allclose(logged["probs"], ensemble, rtol=1e-5, atol=1e-6)

    # an independent evaluation of member 0: its checkpoint, a plain forward pass
    from orchestrator.data import DeviceNormalize, eval_loader, load_manifest
    from orchestrator.models import create_model
    from orchestrator.spec import JobSpec, from_dict

    root, step = children[0].data.tags["checkpoint_url"].rsplit("/step-", 1)
    state = CheckpointStore(root).read(int(step), "trainer.pt")
    spec = from_dict(JobSpec, state["spec"])
    net = create_model("cifar_resnet20", 4)
    net.load_state_dict(state["strategy"]["model"])
    net.eval()
    manifest = load_manifest(trained["data"])
    norm = DeviceNormalize(manifest["mean"], manifest["std"], 0.0)
    with torch.no_grad():
        logits = torch.cat(
            [
                net(norm(x, train=False))
                for x, _ in eval_loader(spec.data, rank=0, world_size=1, batch_size=16)
            ]
        )
    np.testing.assert_allclose(
        members[0]["probs"], torch.softmax(logits, 1).numpy(), rtol=1e-4, atol=1e-6
    )

    # the comparison table: printed and logged, one row per member plus the ensemble
    table = download_artifacts(
        run_id=parent.info.run_id, artifact_path="comparison.md", dst_path=str(tmp_path)
    )
    text = Path(table).read_text()
    assert text in printed
    assert "Table" not in text  # trained on a toy dataset: no paper numbers beside it
    rows = json.loads(
        Path(
            download_artifacts(
                run_id=parent.info.run_id, artifact_path="comparison.json", dst_path=str(tmp_path)
            )
        ).read_text()
    )
    assert [r["member"] for r in rows] == [*trained["names"], "ensemble (2)"]
    assert rows[0]["paper_top1_err"] is None
    assert rows[-1]["top1_err"] == pytest.approx(round(100 * top1, 2))
    assert rows[-1]["paper_top5_err"] is None


def test_comparison_rows_take_the_papers_tables() -> None:
    """ImageNet members beside Tables 3 (10-crop) and 4 (multi-scale), the ensemble beside
    Table 5; errors in percent."""

    def member(name: str, model: str, shortcut: str | None = None) -> Member:
        return Member(
            label=name,
            selected_by="run",
            run_id=name,
            run_name=name,
            checkpoint_url="-",
            step=1,
            marker_metrics={},
            model_name=model,
            model_options={},
            shortcut=shortcut,
            num_classes=1000,
            data=None,
            seed=0,
        )

    members = [member("a", "resnet152"), member("b", "resnet34", "C")]
    scores = [Scores(0.2000, 0.0500, 50_000), Scores(0.2500, 0.0800, 50_000)]
    rows = ensemble_rows(members, scores, Scores(0.19, 0.04, 50_000), "ten_crop")
    assert (rows[0]["paper_top1_err"], rows[0]["paper_top5_err"]) == (21.43, 5.71)
    assert (rows[1]["paper_top1_err"], rows[1]["paper_top5_err"]) == (24.19, 7.40)
    assert rows[2]["paper_top5_err"] == 3.57 and "Table 5" in rows[2]["paper_source"]
    assert (rows[0]["top1_err"], rows[2]["top5_err"]) == (20.0, 4.0)
    rows = ensemble_rows(members, scores, Scores(0.19, 0.04, 50_000), "multiscale")
    assert rows[0]["paper_top1_err"] == 19.38 and rows[1]["paper_top1_err"] == 21.53
    table = ensemble_markdown(rows, "title")
    assert (
        "| a | resnet152 | 1 | 20.00 | 5.00 | 19.38 | 4.49 | +0.62 | +0.51 | Table 4, multiscale |"
        in table
    )
    # CIFAR nets on CIFAR-10's 10 classes: Table 6 (and no Table 5: that ensemble is ImageNet's)
    cifar = [
        dataclasses.replace(m, model_name="cifar_resnet20", shortcut=None, num_classes=10)
        for m in members
    ]
    rows = ensemble_rows(cifar, scores, Scores(0.19, 0.04, 10_000), "center")
    assert rows[0]["paper_top1_err"] == 8.75 and "Table 6" in rows[0]["paper_source"]
    assert rows[-1]["paper_top5_err"] is None
    # the same nets trained on 10 generated classes (the demo): nothing in the paper to compare
    toy = [dataclasses.replace(m, num_classes=10) for m in members]
    rows = ensemble_rows(toy, scores, Scores(0.19, 0.04, 100), "center")
    assert all(r["paper_top1_err"] is None and r["paper_top5_err"] is None for r in rows)
    table = ensemble_markdown(rows, "title")
    assert "| a | resnet152 | 1 | 20.00 | 5.00 | - | - | - | - | - |" in table


def test_ray_job_submit_with_registry_alias_weights_and_ten_crop(
    stack: Stack, trained: dict[str, Any], tmp_path: Path
) -> None:
    """jobs/ensemble_eval.py through `ray job submit`: one member by run id, one by
    registered-model alias (its source a checkpoint URL); weighted 3:1; 10-crop."""
    client = MlflowClient()
    model = f"ens-{uuid.uuid4().hex[:8]}"
    latest = CheckpointStore(f"{trained['storage']}/{trained['names'][0]}/checkpoints").latest()
    client.create_registered_model(model)
    version = client.create_model_version(model, latest.url, run_id=trained["ids"][0])
    client.set_registered_model_alias(model, "champion", version.version)
    out_exp = f"ens-ray-{uuid.uuid4().hex[:8]}"
    ray = Path(sys.executable).parent / "ray"
    proc = subprocess.run(
        [
            str(ray),
            "job",
            "submit",
            "--",
            "python",
            "jobs/ensemble_eval.py",
            "--model",
            f"{model}@champion",
            "--runs",
            trained["ids"][1],
            "--weights",
            "3",
            "1",
            "--protocol",
            "ten_crop",
            "--checkpoint",
            "last",
            "--log-probs",
            "--output-experiment",
            out_exp,
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **stack.env()},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    parent = _only_parent(client, out_exp)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["executor"] == "ray" and parent.data.params["protocol"] == "ten_crop"
    children = _children(client, parent)
    # member order: --runs, then --experiment's runs, then --model (the order --weights uses)
    assert [c.info.run_name for c in children] == [trained["names"][1], f"{model}@champion"]
    assert children[0].data.params["checkpoint.step"] == "13"  # --checkpoint last
    assert children[1].data.tags["checkpoint_url"] == latest.url
    assert children[1].data.tags["selected_by"] == f"model {model}@champion"
    members = [_probs(c.info.run_id, tmp_path) for c in children]
    ensemble = 0.75 * members[0]["probs"].astype(np.float64) + 0.25 * members[1]["probs"]
    top1 = float(np.mean(ensemble.argmax(1) != members[0]["labels"]))
    assert parent.data.metrics["ensemble/top1_err"] == pytest.approx(top1)
    assert parent.data.metrics["ensemble/samples"] == 40
    np.testing.assert_allclose(
        _probs(parent.info.run_id, tmp_path)["probs"], ensemble, rtol=1e-5, atol=1e-6
    )
    assert "| ensemble (2) |" in proc.stdout


def test_experiment_filter_selection_and_job_file_config(
    trained: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """--experiment + --filter selects by tags; a job file's config is overridden by flags."""
    filt = f"tags.model = 'cifar_resnet20' and attributes.run_name = '{trained['names'][1]}'"
    code = main(["--experiment", trained["experiment"], "--filter", filt, "--check"])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 member(s)" in out and trained["names"][1] in out and trained["names"][0] not in out
    base = EnsembleConfig(
        experiment="imagenet",
        filter="tags.model = 'resnet152'",
        eval=EvalConfig(protocol="multiscale", batch_size=25),
    )
    cfg = parse_args(["--runs", "A", "B", "--protocol", "ten_crop"], base)
    assert (cfg.runs, cfg.experiment, cfg.filter) == (["A", "B"], None, "")
    assert (cfg.eval.protocol, cfg.eval.batch_size) == ("ten_crop", 25)
    assert base.eval.protocol == "multiscale", "the job file's config is left as declared"
    kept = parse_args(["--checkpoint", "last"], base)
    assert (kept.experiment, kept.eval.protocol, kept.checkpoint) == (
        "imagenet",
        "multiscale",
        "last",
    )
    assert parse_args(argv_of(kept)) == kept


# ------------------------------------------------------------------------------- error paths


def _bad(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    out_exp = f"ens-bad-{uuid.uuid4().hex[:8]}"
    code = main([*argv, "--local", "--output-experiment", out_exp, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert _nothing_logged(MlflowClient(), out_exp), "a failed check must log nothing"
    return err


def _fake_member_run(
    client: MlflowClient, experiment: str, job: str | None, storage: str | None
) -> str:
    """An MLflow run shaped like a training run's (tag + param), pointing where we say."""
    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(
        exp.experiment_id, run_name=job or "not-a-job", tags={JOB_TAG: job} if job else {}
    )
    if storage:
        client.log_param(run.info.run_id, "checkpoint.storage", storage)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_bad_input_is_a_clear_error_and_logs_nothing(
    trained: dict[str, Any], s3_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient()
    good = trained["ids"][0]

    err = _bad(["--runs", good, "--protocol", "five_crop"], capsys)
    assert (
        "unknown evaluation protocol 'five_crop'; valid choices: center, ten_crop, multiscale"
        in err
    )
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.ensemble_eval",
            "--runs",
            good,
            "--protocol",
            "five_crop",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert cli.returncode == 2 and "valid choices: center, ten_crop, multiscale" in cli.stderr

    err = _bad(["--runs", good, "--checkpoint", "newest"], capsys)
    assert "expected one of best, last" in err

    empty = _fake_member_run(
        client, trained["experiment"], f"empty-{uuid.uuid4().hex[:6]}", f"{s3_prefix}/runs"
    )
    err = _bad(["--runs", good, empty], capsys)
    assert f"run {empty}" in err and "has no committed checkpoint" in err

    plain = _fake_member_run(client, trained["experiment"], None, None)
    err = _bad(["--runs", plain], capsys)
    assert f"run {plain}" in err and "has no checkpoint" in err

    nobucket = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/runs"
    lost = _fake_member_run(client, trained["experiment"], "lost", nobucket)
    err = _bad(["--runs", good, lost], capsys)
    assert f"run {lost}" in err and "cannot list checkpoints" in err and "NoSuchBucket" in err

    err = _bad(["--runs", "0123456789abcdef0123456789abcdef"], capsys)
    assert "run 0123456789abcdef0123456789abcdef: not found" in err

    model = f"ens-bad-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(model)
    missing = f"{s3_prefix}/gone/checkpoints/step-00000012"
    client.create_model_version(model, missing)
    err = _bad(["--runs", good, "--model", f"{model}/1"], capsys)
    assert f"model {model}/1" in err and missing in err and "not committed" in err
    err = _bad(["--model", f"{model}@nosuchalias"], capsys)
    assert f"model {model}@nosuchalias: not found" in err

    err = _bad(["--runs", good, "--data-url", f"{s3_prefix}/no-dataset"], capsys)
    assert "cannot read dataset" in err and "no manifest.json" in err

    err = _bad(["--runs", *trained["ids"], "--weights", "1"], capsys)
    assert "--weights has 1 values for 2 members" in err

    # a member with 5 classes: the same weights with a wider fc, committed under its own job
    src = CheckpointStore(f"{trained['storage']}/{trained['names'][0]}/checkpoints")
    state = src.read(src.latest().step, "trainer.pt")
    model_state = state["strategy"]["model"]
    model_state["fc.weight"] = torch.zeros(5, model_state["fc.weight"].shape[1])
    model_state["fc.bias"] = torch.zeros(5)
    state["spec"]["model"]["num_classes"] = 5
    job = f"five-{uuid.uuid4().hex[:6]}"
    wide = CheckpointStore(f"{s3_prefix}/runs/{job}/checkpoints")
    wide.write(12, "trainer.pt", state)
    wide.commit(12, {"val/top1_err": 0.5})
    five = _fake_member_run(client, trained["experiment"], job, f"{s3_prefix}/runs")
    err = _bad(["--runs", good, five], capsys)
    assert "members have different class counts" in err
    assert f"(run {five}): 5" in err and f"(run {good}): 4" in err


def test_a_checkpoint_missing_on_local_disk_names_the_machine_and_the_fix(
    tmp_path: Path, s3_prefix: str
) -> None:
    """A Ray task on another node than the one that wrote a local-disk checkpoint finds
    nothing there: the error says where it looked and what to do (S3 errors need no hint)."""
    import socket

    from orchestrator.checkpoint_refs import CheckpointRefError, read_trainer_state

    url = f"{tmp_path}/job/checkpoints/step-00000003"
    with pytest.raises(CheckpointRefError) as err:
        read_trainer_state(url, "member a")
    text = str(err.value)
    assert text.startswith(f"member a: cannot read {url}/trainer.pt: it does not exist")
    assert socket.gethostname() in text and "every node mounts" in text and "--local" in text
    with pytest.raises(CheckpointRefError) as err:
        read_trainer_state(f"{s3_prefix}/nothing/checkpoints/step-00000003", "member b")
    assert "trainer.pt: it does not exist" in str(err.value)
    assert "every node mounts" not in str(err.value)


def test_failure_midway_marks_the_parent_failed(
    trained: dict[str, Any], s3_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dataset's manifest is there but its shards are not: checks pass, evaluation
    cannot score a sample, and the runs end FAILED with the error, not FINISHED."""
    hollow = f"{s3_prefix}/hollow"
    open_storage(hollow).put("manifest.json", open_storage(trained["data"]).get("manifest.json"))
    out_exp = f"ens-fail-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError, match="no validation sample could be evaluated"):
        main(
            [
                "--runs",
                *trained["ids"],
                "--data-url",
                hollow,
                "--local",
                "--output-experiment",
                out_exp,
                "--no-progress",
                "--num-workers",
                "0",
            ]
        )
    client = MlflowClient()
    parent = _only_parent(client, out_exp)
    assert parent.info.status == "FAILED"
    assert "no validation sample could be evaluated" in parent.data.tags["orchestrator.error"]
    assert "ensemble/top1_err" not in parent.data.metrics
    assert {c.info.status for c in _children(client, parent)} == {"FAILED"}


# ------------------------------------------------------------------------------- secrets


def test_ensemble_runs_keep_secrets_out_of_mlflow(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials in the dataset and checkpoint URLs, a secret environment variable's value in
    the run's name and in the error: none reaches the parent's or the children's params, tags
    (the error tag included), run names or logged texts."""
    from orchestrator.ensemble_eval import EnsembleRuns
    from orchestrator.evaluation import EvalResult
    from orchestrator.spec import DataConfig

    aws_secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # the test stack's real S3 secret
    token = f"hf_{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", token)
    key_id, key = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
    data_url = f"s3://{key_id}:{key}@resnet/datasets/imagenet"
    secrets = [key_id, key, aws_secret, token, "hunter2-pw", "sig-0123456789"]

    def member(i: int) -> Member:
        url = (
            f"https://ckpt:hunter2-pw@store.example/runs/job{i}/checkpoints/step-00000012"
            "?X-Amz-Signature=sig-0123456789"
        )
        return Member(
            label=f"m{i}",
            selected_by="run",
            run_id=None,
            run_name=None,
            checkpoint_url=url,
            step=12,
            marker_metrics={"val/top1_err": 0.5},
            model_name="resnet50",
            model_options={},
            shortcut=None,
            num_classes=2,
            data=DataConfig(url=data_url),
            seed=0,
        )

    members = [member(0), member(1)]
    out_exp = f"ens-secret-{uuid.uuid4().hex[:8]}"
    cfg = EnsembleConfig(runs=["x"], name=f"ens-{token}", output_experiment=out_exp)
    runs = EnsembleRuns(MlflowClient(), cfg, members, data_url)
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]], dtype=np.float32)
    result = EvalResult(
        protocol="center",
        samples=4,
        top1_err=0.25,
        top5_err=0.0,
        loss=0.4,
        class_total=np.array([2, 2]),
        class_correct=np.array([2, 1]),
        views=1,
        indices=np.arange(4),
        labels=labels,
        probs=probs,
    )
    runs.log_member(0, {"result": result, "device": "cpu", "seconds": 1.0, "bn_batches": 0}, True)
    runs.close(runs.children[0])
    scores = [Scores(0.25, 0.0, 4), Scores(0.25, 0.0, 4)]
    rows = ensemble_rows(members, scores, Scores(0.25, 0.0, 4, 0.4), "center")
    table = ensemble_markdown(rows, f"Ensemble of 2 ({data_url}, {token}); errors in %")
    runs.log_ensemble(Scores(0.25, 0.0, 4, 0.4), scores, rows, table, {"class_total": [2, 2]})
    # member 1 never finished: the failure closes it and the parent, with the error
    runs.fail(f"DataError: cannot read {data_url}/val-000.tar (key {aws_secret}, {token})")

    client = MlflowClient()
    parent = client.get_run(runs.parent)
    children = [client.get_run(c) for c in runs.children]
    assert [c.info.status for c in children] == ["FINISHED", "FAILED"]
    assert parent.info.status == "FAILED"
    error = parent.data.tags["orchestrator.error"]
    assert error.startswith("DataError: cannot read s3://***@resnet/datasets/imagenet/val-000.tar")
    assert parent.data.params["data.url"] == "s3://***@resnet/datasets/imagenet"
    assert children[1].data.params["checkpoint.url"].startswith("https://***@store.example/")
    seen: dict[str, str] = {}
    for run in (parent, *children):
        rid = run.info.run_id
        seen[f"{rid} name"] = run.info.run_name
        seen[f"{rid} params"] = json.dumps(run.data.params)
        seen[f"{rid} tags"] = json.dumps(run.data.tags)
        for artifact in client.list_artifacts(rid):
            if artifact.path.endswith((".md", ".json")):
                local = download_artifacts(
                    run_id=rid, artifact_path=artifact.path, dst_path=str(tmp_path / rid)
                )
                seen[f"{rid} {artifact.path}"] = Path(local).read_text()
    logged = {k.split(" ", 1)[1] for k in seen}
    assert {"comparison.md", "comparison.json", "per_class_accuracy.json"} <= logged
    for where, text in seen.items():
        for secret in secrets:
            assert secret not in text, f"a secret reached {where}"
