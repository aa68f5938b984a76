"""The scale model (orchestrator.plan): its formulas on hand-computed cases, how it resolves a job
for a cluster size, and the command line, including its errors."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest

from orchestrator import plan
from orchestrator.paper import numbers as paper
from orchestrator.plan import formulas, job, numbers, report
from orchestrator.spec import CheckpointConfig, DataConfig, JobSpec, ScalingConfig, ScheduleConfig

ROOT = Path(__file__).resolve().parent.parent
R152 = str(ROOT / "jobs" / "imagenet_r152.py")
R152_PARAMS = paper.IMAGENET_PARAMS[152]  # Table 1, as torchvision counts it

# ------------------------------------------------------------------- formulas, by hand


@pytest.mark.parametrize(
    ("n", "factor"), [(1, 0.0), (2, 1.0), (4, 1.5), (8, 1.75), (512, 1022 / 512)]
)
def test_ring_allreduce_factor_is_2_n_minus_1_over_n(n: int, factor: float) -> None:
    assert formulas.ring_allreduce_factor(n) == pytest.approx(factor)


def test_ring_allreduce_factor_rejects_no_gpus() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        formulas.ring_allreduce_factor(0)


def test_resnet152_gradients_are_240_8_mb() -> None:
    grads = formulas.gradient_bytes(R152_PARAMS)
    assert grads == 240_771_232  # 60,192,808 x 4 bytes
    assert report.bytes_text(grads) == "240.8 MB"
    # 8 GPUs: each sends 2 x 7/8 of that per step
    assert formulas.allreduce_bytes_per_gpu(grads, 8) == pytest.approx(1.75 * 240_771_232)


def test_resnet152_checkpoint_is_weights_plus_momentum() -> None:
    assert formulas.checkpoint_bytes(R152_PARAMS) == 481_542_464  # 2 x 240,771,232
    assert formulas.transfer_time_s(481_542_464, 10) == pytest.approx(0.385233971, rel=1e-6)


def test_small_formulas_by_hand() -> None:
    assert formulas.step_time_s(32, 1, 1000) == pytest.approx(0.032)
    assert formulas.step_time_s(16, 2, 1000) == pytest.approx(0.032)  # same images per step
    assert formulas.bandwidth_gbps(6e6, 0.032) == pytest.approx(1.5)  # 48 Mbit in 32 ms
    assert formulas.transfer_time_s(8e6, 1) == pytest.approx(0.064)
    assert formulas.read_bytes_per_s_per_node(2, 1000, 110e3) == pytest.approx(2.2e8)
    assert formulas.decode_cores_per_node(8, 292) == pytest.approx(8)
    assert formulas.shards_needed(64, 8, 8) == 4096
    assert formulas.shards_needed(2, 2, 0) == 4  # no loader workers: each rank reads its own
    assert formulas.max_shard_bytes(140.9e9, 4096) == pytest.approx(34.4e6, rel=1e-3)
    # 600,000 iterations of 256 images on 8 GPUs at 2,000 img/s each: 153.6M / 16,000 = 9,600 s
    assert formulas.train_time_s(600_000, 256, 8, 2000) == pytest.approx(9600)


def test_checkpoint_interval_takes_the_sooner_of_every_iters_and_an_epoch() -> None:
    assert formulas.checkpoint_interval_iters(5000, at_epoch_end=True, iters_per_epoch=79) == 79
    assert (
        formulas.checkpoint_interval_iters(5000, at_epoch_end=True, iters_per_epoch=10_010) == 5000
    )
    assert formulas.checkpoint_interval_iters(5000, at_epoch_end=False, iters_per_epoch=79) == 5000
    assert formulas.checkpoint_interval_iters(0, at_epoch_end=False, iters_per_epoch=79) == 0


def test_scale_iterations() -> None:
    assert formulas.scale_iterations(600_000, 256 / 16_384) == 9375
    assert formulas.scale_iterations(5000, 256 / 16_384) == 78  # 78.125, rounded
    assert formulas.scale_iterations(5, 0.01) == 1  # never below one iteration
    assert formulas.scale_iterations(0, 0.5) == 0  # 0 means "off" and stays off


# ------------------------------------------------------------- communication, by hand

MIB = 2**20
P5 = formulas.Links(nodes=64, gpus_per_node=8, intra_gbps=3600, inter_gbps=3200)


@pytest.mark.parametrize(("n", "factor"), [(1, 0.0), (2, 0.5), (8, 0.875), (64, 63 / 64)])
def test_reduce_scatter_factor_is_n_minus_1_over_n(n: int, factor: float) -> None:
    assert formulas.reduce_scatter_factor(n) == pytest.approx(factor)


def test_hierarchical_all_reduce_levels_by_hand() -> None:
    g = 240_771_232  # ResNet-152's fp32 gradients
    intra, inter = formulas.level_times_s(g, P5, passes=2)
    assert intra == pytest.approx(2 * 7 / 8 * g * 8 / 3600e9)  # NVLink, per GPU
    assert inter == pytest.approx(2 * 63 / 64 * g * 8 / 3200e9)  # the node's NICs
    assert formulas.collective_time_s(g, P5, passes=2) == pytest.approx(inter)  # the slower
    one_node = formulas.Links(nodes=1, gpus_per_node=8, intra_gbps=3600, inter_gbps=3200)
    assert formulas.level_times_s(g, one_node, passes=2)[1] == 0  # nothing leaves the node
    half = formulas.collective_time_s(g, P5, passes=1)  # a reduce-scatter is half the traffic
    assert half == pytest.approx(inter / 2)


def test_ddp_buckets_are_one_mib_then_25_mib_then_the_rest() -> None:
    assert formulas.ddp_bucket_bytes(60 * MIB) == [MIB, 25 * MIB, 25 * MIB, 9 * MIB]
    assert formulas.ddp_bucket_bytes(0.5 * MIB) == [0.5 * MIB]
    assert formulas.ddp_bucket_bytes(0) == []
    # ResNet-152: 240,771,232 - 1 MiB - 9 x 25 MiB = 3,793,056 bytes in the last of 11 buckets
    r152 = formulas.ddp_bucket_bytes(240_771_232)
    assert len(r152) == 11 and r152[-1] == 3_793_056


def test_overlap_hides_all_but_the_last_bucket_when_backward_is_long_enough() -> None:
    # 60 MiB at 1 s per 100 MiB of traffic: buckets take 10, 250, 250 and 90 ms
    buckets = [MIB, 25 * MIB, 25 * MIB, 9 * MIB]
    times = [b / (100 * MIB) for b in buckets]
    # backward of 2 s fills 25 MiB every ~0.83 s, longer than each bucket's 250 ms on the wire
    assert formulas.exposed_after_backward_s(buckets, times, 2.0) == pytest.approx(0.09)


def test_overlap_exposes_what_backward_cannot_hide() -> None:
    # two 2-byte buckets of 3 s and 1 s, backward 4 s: the first is ready at 2 s and done at 5 s,
    # the second ready at 4 s waits for it and is done at 6 s: 2 s after backward, not just 1 s
    assert formulas.exposed_after_backward_s([2, 2], [3, 1], 4) == pytest.approx(2)
    # no backward to hide behind (all gradients ready at once): the whole traffic is exposed
    assert formulas.exposed_after_backward_s([2, 2], [3, 1], 0) == pytest.approx(4)
    # a single bucket is ready only when backward ends: all of it is exposed however long
    assert formulas.exposed_after_backward_s([5], [0.3], 100) == pytest.approx(0.3)


def test_zero_volumes_match_the_zero_paper() -> None:
    g, n = 100e6, 16
    # stage 1/2: reduce-scatter Psi + all-gather Psi = 2 Psi x (N-1)/N, DDP's all-reduce volume
    for stage in (1, 2):
        zero = formulas.zero_bytes_per_gpu(stage, g, g, n, accumulation=1)
        assert zero == pytest.approx(2 * 15 / 16 * g)
        assert zero == pytest.approx(formulas.allreduce_bytes_per_gpu(g, n))
    # stage 2 reduce-scatters after every micro-batch: 4 micro-batches, 4 scatters, 1 gather
    assert formulas.zero_bytes_per_gpu(2, g, g, n, 4) == pytest.approx(15 / 16 * 5 * g)
    assert formulas.zero_bytes_per_gpu(1, g, g, n, 4) == pytest.approx(15 / 16 * 2 * g)
    assert formulas.zero_bytes_per_gpu(0, g, g, n, 4) == pytest.approx(2 * 15 / 16 * g)


def test_zero_exposes_its_whole_traffic() -> None:
    one_node = formulas.Links(nodes=1, gpus_per_node=8, intra_gbps=8, inter_gbps=1)
    g = 1e9  # 8 Gbit: one pass of 7/8 of it at 8 Gbit/s is 0.875 s
    assert formulas.zero_exposed_s(1, g, g, one_node, accumulation=4) == pytest.approx(2 * 0.875)
    assert formulas.zero_exposed_s(2, g, g, one_node, accumulation=4) == pytest.approx(5 * 0.875)
    assert formulas.zero_exposed_s(0, g, g, one_node, accumulation=4) == pytest.approx(2 * 0.875)
    # the all-gather moves the weights in their dtype: half the bytes, half the time
    assert formulas.zero_exposed_s(1, g, g / 2, one_node, 1) == pytest.approx(1.5 * 0.875)


def shape(**kw: object) -> formulas.StepShape:
    base: dict[str, object] = {"strategy": "ddp", "zero_stage": 0, "micro_batch": 32}
    base |= {"accumulation": 1, "grad_bytes": 240_771_232, "param_bytes": 240_771_232}
    return formulas.StepShape(**{**base, **kw})  # type: ignore[arg-type]


def test_step_time_falls_as_bandwidth_rises() -> None:
    steps = []
    for gbps in [10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400]:
        links = formulas.Links(nodes=64, gpus_per_node=8, intra_gbps=3600, inter_gbps=gbps)
        steps.append(formulas.predicted_step_s(shape(), links, 2233))
    assert all(a >= b for a, b in itertools.pairwise(steps))
    assert steps[0] > steps[4] > steps[-1]  # strictly, while the network is the bound
    assert steps[-1] >= 32 / 2233  # never below compute alone


def test_gradient_accumulation_hides_behind_the_last_micro_batch_only() -> None:
    slow = formulas.Links(nodes=4, gpus_per_node=8, intra_gbps=3600, inter_gbps=100)
    one = formulas.exposed_comm_s(shape(micro_batch=32, accumulation=1), slow, 2233)
    four = formulas.exposed_comm_s(shape(micro_batch=8, accumulation=4), slow, 2233)
    assert four > one  # the same 32 images, a quarter of the backward to hide behind


def test_calibration_inverts_the_step_model() -> None:
    links = formulas.Links(nodes=2, gpus_per_node=8, intra_gbps=3600, inter_gbps=400)
    for s in (shape(), shape(strategy="deepspeed", zero_stage=2, accumulation=2)):
        rate = formulas.compute_rate_from_step(s, links, 0.05)
        assert formulas.predicted_step_s(s, links, rate) == pytest.approx(0.05, rel=1e-9)
        assert rate > s.micro_batch * s.accumulation / 0.05  # communication taken out
    single = formulas.Links(nodes=1, gpus_per_node=1, intra_gbps=3600, inter_gbps=400)
    assert formulas.compute_rate_from_step(shape(), single, 0.032) == pytest.approx(1000)
    with pytest.raises(ValueError, match="shorter than the model's communication"):
        formulas.compute_rate_from_step(shape(), links, 1e-4)


def test_gradient_dtype_follows_strategy_and_precision(r152: JobSpec) -> None:
    def dtype(*overrides: str, flag: str | None = None) -> int:
        spec = job.resolve_for_cluster(r152, list(overrides), 8).spec
        return numbers.gradient_dtype(spec, flag)[0]

    assert dtype() == 4  # DDP: fp32 weights under autocast
    assert dtype("scaling.strategy=deepspeed", "scaling.zero_stage=2") == 2  # bf16 weights
    assert dtype("scaling.strategy=deepspeed", "scaling.precision=fp32") == 4
    assert dtype(flag="bf16") == 2


# ------------------------------------------------------- a tiny cluster, end to end by hand


def tiny_job() -> JobSpec:
    """One GPU x 32 images, 4 loader workers, the paper's 600k iterations."""
    return JobSpec(
        name="tiny",
        data=DataConfig(num_workers=4),
        schedule=ScheduleConfig(max_iters=600_000, milestones=[300_000, 450_000], warmup_iters=400),
        scaling=ScalingConfig(num_workers=1, global_batch=32),
        checkpoint=CheckpointConfig(every_iters=5000, at_epoch_end=True),
    ).validate()


def test_tiny_cluster_by_hand() -> None:
    """2 nodes x 2 GPUs, 1M parameters, 1,000 img/s per GPU, 110 KB images, storage 1 Gbit/s."""
    resolved = job.resolve_for_cluster(tiny_job(), [], num_gpus=4)
    inputs = numbers.ClusterInputs(nodes=2, gpus_per_node=2, img_per_s_per_gpu=1000, storage_gbps=1)
    x = numbers.compute(resolved, params=1_000_000, inputs=inputs)
    spec = resolved.spec
    # per-GPU batch 32 kept: global 4 x 32 = 128, lr 0.1 x 128/256, schedule halved (32/128 x 2)
    assert (spec.micro_batch(), spec.accumulation(), spec.scaling.global_batch) == (32, 1, 128)
    assert spec.lr() == pytest.approx(0.05)
    assert resolved.added == [
        "scaling.num_workers=4",
        "scaling.global_batch=128",
        "schedule.max_iters=150000",
        "schedule.milestones=[75000,112500]",
        "schedule.warmup_iters=100",
        "eval.every_iters=1250",
    ]
    assert x.compute_step_s == pytest.approx(0.032)  # 32 images at 1,000 img/s
    assert x.grad_bytes == 4_000_000  # 1M x 4 bytes
    assert x.sent_bytes_per_gpu == pytest.approx(6_000_000)  # 2 x 3/4 x 4 MB
    assert x.allreduce_gbps_needed == pytest.approx(1.5)  # 48 Mbit per 32 ms
    # DDP's buckets: 1 MiB first, the remaining 2,951,424 bytes last. Backward (2/3 x 32 ms) is
    # far longer than the traffic, so only the last bucket is exposed: 2 x 1/2 x its bytes over
    # the 3,200 Gbit/s per node between the 2 nodes (slower than 2 x 1/2 x them at 3,600 inside)
    assert x.buckets == [1_048_576, 2_951_424]
    assert x.exposed_s == pytest.approx(2_951_424 * 8 / 3200e9)
    assert x.step_s == pytest.approx(0.032 + 2_951_424 * 8 / 3200e9)
    # 2 GPUs x the predicted img/s (32 images per step) x 110 KB
    assert x.read_bytes_per_s_per_node == pytest.approx(2 * 32 / x.step_s * 110e3)
    assert x.shards == 16  # 2 nodes x 2 GPUs x 4 workers
    assert x.checkpoint_bytes == 8_000_000
    assert x.checkpoint_write_s == pytest.approx(0.064)  # 64 Mbit at 1 Gbit/s
    assert x.checkpoint_every_iters == 5000  # an epoch is ceil(1,281,167 / 128) = 10,010
    # 150,000 iterations x 128 images = 19.2M images at 4,000 img/s, plus the exposed traffic
    assert x.train_s == pytest.approx(4800 + 150_000 * 2_951_424 * 8 / 3200e9)


def test_one_gpu_has_nothing_to_all_reduce() -> None:
    resolved = job.resolve_for_cluster(tiny_job(), [], num_gpus=1)
    inputs = numbers.ClusterInputs(nodes=1, gpus_per_node=1, img_per_s_per_gpu=1000)
    x = numbers.compute(resolved, params=1_000_000, inputs=inputs)
    assert x.sent_bytes_per_gpu == 0 and x.exposed_s == 0
    assert x.step_s == x.compute_step_s == pytest.approx(0.032)
    assert x.efficiency_vs_one_node == 1.0 and x.efficiency_vs_compute == 1.0
    assert resolved.added == ["scaling.num_workers=1"]
    rows = {q.strip(): v for q, v, _ in report.plan_rows("tiny.py", resolved, x, inputs)}
    assert rows["bandwidth to hide it"] == "none"
    assert rows["scaling efficiency"] == "100.0%" and rows["vs compute alone"] == "100.0%"


# ------------------------------------------------------------------ resolving a real job


@pytest.fixture(scope="module")
def r152() -> JobSpec:
    return job.load_job_spec(R152)


def test_the_paper_size_changes_nothing(r152: JobSpec) -> None:
    resolved = job.resolve_for_cluster(r152, [], num_gpus=8)
    assert resolved.added == ["scaling.num_workers=8"]
    assert resolved.spec.scaling.global_batch == 256 and resolved.spec.micro_batch() == 32
    assert resolved.spec.schedule.max_iters == 600_000 and resolved.spec.lr() == pytest.approx(0.1)


def test_64_nodes_keep_32_per_gpu_and_scale_the_schedule(r152: JobSpec) -> None:
    resolved = job.resolve_for_cluster(r152, [], num_gpus=512)
    spec = resolved.spec
    assert spec.scaling.global_batch == 16_384 and spec.micro_batch() == 32
    assert spec.lr() == pytest.approx(6.4)  # 0.1 x 16,384 / 256
    assert spec.schedule.max_iters == 9375  # 600,000 x 256 / 16,384: the same 153.6M images
    assert spec.eval.every_iters == 78
    assert spec.checkpoint.every_iters == 5000  # wall-clock matter, reported rather than scaled


def test_an_explicit_global_batch_wins_and_user_counts_are_kept(r152: JobSpec) -> None:
    resolved = job.resolve_for_cluster(
        r152, ["scaling.global_batch=4096", "schedule.max_iters=40000"], num_gpus=512
    )
    spec = resolved.spec
    assert (spec.scaling.global_batch, spec.micro_batch()) == (4096, 8)
    assert spec.schedule.max_iters == 40_000  # the user's, not 600,000 x 256 / 4,096
    assert spec.eval.every_iters == 312  # 5,000 x 256 / 4,096 = 312.5, rounded to even


def test_cifar_milestones_scale_with_the_batch() -> None:
    cifar = job.load_job_spec(ROOT / "jobs" / "cifar10_resnet.py")  # 2 GPUs x 64 = 128
    spec = job.resolve_for_cluster(cifar, [], num_gpus=4).spec
    assert spec.scaling.global_batch == 256
    assert spec.schedule.milestones == [16_000, 24_000] and spec.schedule.max_iters == 32_000


@pytest.mark.parametrize(
    ("overrides", "num_gpus", "message"),
    [
        (["scaling.num_workers=3"], 16, "set by --nodes"),
        (["scaling.global_batch=256"], 512, "less than one image per GPU"),
        (["scaling.global_batch=lots"], 16, "expected an integer"),
        (["optim.lrr=3"], 8, "unknown key"),
        (["optim.lr"], 8, "expected section.key=value"),
    ],
)
def test_bad_overrides_are_plan_errors(
    r152: JobSpec, overrides: list[str], num_gpus: int, message: str
) -> None:
    with pytest.raises(job.PlanError, match=message):
        job.resolve_for_cluster(r152, overrides, num_gpus)


def test_throughput_anchors_follow_compile_and_precision(r152: JobSpec) -> None:
    def anchor(*overrides: str) -> float:
        return numbers.throughput_anchor(job.resolve_for_cluster(r152, list(overrides), 8).spec)[0]

    assert anchor() == 2233  # the job file: eager, bf16
    assert anchor("model.compile=true") == 3084
    assert anchor("scaling.precision=fp32") == 1042
    assert anchor("model.name=resnet50", "model.compile=true") == 6670
    with pytest.raises(job.PlanError, match="--img-per-s-per-gpu"):
        anchor("model.name=resnet101")


def test_parameters_are_counted_on_the_meta_device(r152: JobSpec) -> None:
    spec = job.resolve_for_cluster(r152, ["model.name=resnet50"], 8).spec
    assert job.count_model_parameters(spec) == paper.IMAGENET_PARAMS[50]
    bad = job.resolve_for_cluster(r152, ["model.name=resnet999"], 8).spec
    with pytest.raises(job.PlanError, match="unknown model"):
        job.count_model_parameters(bad)


# ---------------------------------------------------------------------------- job files


def test_a_job_that_imports_its_sibling_loads() -> None:
    spec = job.load_job_spec(ROOT / "jobs" / "imagenet_r50.py")  # imports imagenet_r152
    assert spec.model.name == "resnet50" and spec.scaling.global_batch == 256


def test_bad_job_files(tmp_path: Path) -> None:
    with pytest.raises(job.PlanError, match="job file not found"):
        job.load_job_spec(tmp_path / "missing.py")
    (tmp_path / "no_spec.py").write_text("X = 1\n")
    with pytest.raises(job.PlanError, match="defines no SPEC"):
        job.load_job_spec(tmp_path / "no_spec.py")
    (tmp_path / "wrong.py").write_text("SPEC = {'name': 'x'}\n")
    with pytest.raises(job.PlanError, match="not an orchestrator.spec.JobSpec"):
        job.load_job_spec(tmp_path / "wrong.py")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(job.PlanError, match="importing it failed: ModuleNotFoundError"):
        job.load_job_spec(tmp_path / "broken.py")
    (tmp_path / "notes.txt").write_text("SPEC = 1\n")
    with pytest.raises(job.PlanError, match="expected a Python job file"):
        job.load_job_spec(tmp_path / "notes.txt")


# ------------------------------------------------------------------------- command line


def test_cli_prints_the_table_for_64_p5_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    rc = plan.main([R152, "--nodes", "64", "--gpus-per-node", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    for expected in [
        "on 64 nodes x 8 GPUs = 512 GPUs",
        f"{R152_PARAMS:,}",  # counted on the meta device: Table 1's number
        "240.8 MB",  # fp32 gradients
        "480.6 MB",  # 2 x 511/512 x 240.8 MB per GPU
        "2(N-1)/N = 1.9961",
        "16,384",  # global batch, 32 per GPU kept
        "anchor (docs/performance-anchors.md): resnet152, eager",  # the source of the img/s
        "14.3 ms",  # 32 / 2,233 img/s
        "268.3 Gbit/s per GPU",  # 480.6 MB x 8 / 14.3 ms
        "at 3,600 Gbit/s per GPU (default: NVLink 4",
        "at 3,200 Gbit/s per node (default: 8 x 400 Gbit/s NICs",
        "the last 3.8 MB is ready when backward ends",  # 240,771,232 - 1 MiB - 9 x 25 MiB
        "11  ",  # buckets
        # the last bucket alone is exposed: 2 x 63/64 x 3,793,056 bytes at 3,200 Gbit/s
        f"the last bucket's {2 * 63 / 64 * 3_793_056 * 8 / 3200e9 * 1e6:.0f} us; the others hide",
        ">= 4,096",  # shards: 64 x 8 x 8 loader workers
        "481.5 MB",  # checkpoint
        "max_iters x predicted step time",
        "the job file's 600,000 iterations at 16,384 = 7,673 epochs",
        "ray job submit -- python",
        "scaling.num_workers=512 scaling.global_batch=16384 schedule.max_iters=9375",
    ]:
        assert expected in out, f"{expected!r} missing from:\n{out}"
    # linear scaling, by hand: 9,375 x 16,384 images at 512 x 2,233 img/s
    assert f"{9375 * 16384 / (512 * 2233) / 60:.1f} min" in out


def test_cli_slow_network_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    """64 nodes at 100 Gbit/s each: from the second bucket on the link cannot keep up with
    backward, so the buckets queue and the queue's tail is exposed."""
    rc = plan.main([R152, "--nodes", "64", "--interconnect-gbps", "100"])
    out = capsys.readouterr().out
    assert rc == 0
    grads, compute = 240_771_232, 32 / 2233
    backward = 2 / 3 * compute
    per_byte = 2 * 63 / 64 * 8 / 100e9  # inter-node; NVLink's 2 x 7/8 x 8 / 3,600e9 is less
    assert per_byte > backward / grads  # slower than backward fills buckets
    # the 1 MiB first bucket is done before the second (26 MiB in) is ready; from the second on
    # the link never idles, so it finishes the other G - 1 MiB bytes after that
    second_ready = backward * 26 * 2**20 / grads
    assert backward * 2**20 / grads + 2**20 * per_byte < second_ready
    exposed = second_ready + (grads - 2**20) * per_byte - backward
    step = compute + exposed
    one_node_last = 2 * 7 / 8 * 3_793_056 * 8 / 3600e9  # one node: only its last bucket shows
    efficiency = (compute + one_node_last) / step
    for expected in [
        f"{exposed * 1e3:.1f} ms",
        f"{step * 1e3:.1f} ms",
        f"{32 / step:,.0f}",  # img/s per GPU
        f"{efficiency:.1%}",
        f"{compute / step:.1%}",
        "that backward did not hide",
        f"{9375 * step / 60:.1f} min",  # time to train
    ]:
        assert expected in out, f"{expected!r} missing from:\n{out}"


def test_cli_zero2_with_accumulation(capsys: pytest.CaptureFixture[str]) -> None:
    rc = plan.main(
        [R152, "--nodes", "2", "scaling.strategy=deepspeed", "scaling.zero_stage=2"]
        + ["scaling.micro_batch=16", "scaling.global_batch=512"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    grads = R152_PARAMS * 2  # bf16
    # 2 reduce-scatters (one per micro-batch) + 1 all-gather, each 15/16 x bf16 bytes per GPU
    assert bytes_text_by_hand(15 / 16 * 3 * grads) in out
    # each half-collective: max(7/8 x bytes at 3,600, 1/2 x bytes at 3,200 per node)
    half = max(7 / 8 * grads * 8 / 3600e9, 1 / 2 * grads * 8 / 3200e9)
    assert f"{3 * half * 1e6:.0f} us" in out  # 2 scatters + 1 gather, none hidden
    assert "ZeRO-2, not overlapped" in out and "reduce-scatter at every micro-batch" in out


def bytes_text_by_hand(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def test_cli_takes_overrides_after_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    rc = plan.main([R152, "--nodes", "1", "--img-per-s-per-gpu", "1000", "model.compile=true"])
    out = capsys.readouterr().out
    assert rc == 0 and "--img-per-s-per-gpu" in out and "1,000" in out
    assert "bandwidth to hide it" in out and "as in the job file" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["jobs/no_such_job.py", "--nodes", "2"], "job file not found"),
        (["orchestrator/s3.py", "--nodes", "2"], "defines no SPEC"),
        ([R152, "--nodes", "2", "scaling.num_workers=3"], "set by --nodes"),
        ([R152, "--nodes", "2", "model.name=resnet101"], "no throughput anchor"),
    ],
)
def test_cli_errors_are_one_clear_line(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    assert plan.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("flag", [["--nodes", "0"], ["--gpus-per-node", "0"], ["--nodes", "two"]])
def test_cli_rejects_bad_sizes(flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = [R152, *(["--nodes", "1"] if flag[0] != "--nodes" else []), *flag]
    with pytest.raises(SystemExit) as exit_info:
        plan.main(argv)
    assert exit_info.value.code == 2
    assert flag[0] in capsys.readouterr().err


def test_module_docstring_documents_every_formula() -> None:
    doc = plan.__doc__ or ""
    for term in [
        "2(N-1)/N",
        "P x 4 bytes",
        "P x 4 x 2",
        "110 KB",
        "292",
        "2(g-1)/g",
        "2(n-1)/n",
        "25 MiB",
        "2/3",
        "2 Psi",
        "linear scaling",
    ]:
        assert term in doc
    assert math.isclose(numbers.DEFAULT_KB_PER_IMAGE, 110)


# ------------------------------------------------------- --from-run, against the real MLflow


def table(out: str) -> dict[str, str]:
    """The printed table as {quantity: value} (columns are two or more spaces apart)."""
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 2 and not line.startswith("note:"):
            rows[cells[0]] = cells[1]
    return rows


def log_training_run(
    world: int, global_batch: int, step_s: list[float], model: str = "resnet152"
) -> str:
    """A run as the loop logs it (orchestrator/train.py): the spec's dotted params, and
    system/images_per_s (the whole job) and system/step_time_s every log window."""
    import uuid

    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.create_experiment(f"plan-{uuid.uuid4().hex[:10]}")
    run_id = client.create_run(experiment).info.run_id
    params = {
        "model.name": model,
        "scaling.num_workers": str(world),
        "scaling.global_batch": str(global_batch),
        "scaling.micro_batch": "None",
        "scaling.strategy": "ddp",
        "scaling.zero_stage": "0",
        "scaling.precision": "auto",
    }
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for i, seconds in enumerate(step_s):
        step = 50 * (i + 1)
        client.log_metric(run_id, "system/step_time_s", seconds, step=step)
        client.log_metric(run_id, "system/images_per_s", global_batch / seconds, step=step)
    client.set_terminated(run_id)
    return run_id


def test_from_run_one_gpu_calibrates_the_compute_rate(
    stack: object, capsys: pytest.CaptureFixture[str]
) -> None:
    # first window slow (warm-up), then 32, 33 and 31 ms: the median of the last three is 32 ms
    run_id = log_training_run(world=1, global_batch=32, step_s=[0.080, 0.032, 0.033, 0.031])
    rc = plan.main([R152, "--nodes", "1", "--gpus-per-node", "1", "--from-run", run_id])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = table(out)
    # one GPU has no communication to take out: 32 images / 32 ms = 1,000 img/s
    assert rows["run's img/s per GPU"] == "1,000"  # median of 32/0.032, 32/0.033, 32/0.031
    assert rows["run's step time"] == "32.0 ms"
    assert rows["img/s per GPU, compute"] == "1,000"
    assert f"--from-run {run_id}" in out
    # the schedule's 153.6M images (600,000 x 256) at 1,000 img/s on one GPU
    assert rows["expected time"] == f"{600_000 * 256 / 1000 / 3600:.1f} h"


def test_from_run_takes_the_runs_own_communication_out(
    stack: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run on 2 nodes x 8 GPUs with a 40 ms step over 100 Gbit/s: the calibrated compute
    rate is faster than the run's measured img/s, and planning the run's own cluster with it
    predicts the run's own step time back."""
    run_id = log_training_run(world=16, global_batch=512, step_s=[0.2, 0.040, 0.040])
    argv = [R152, "--nodes", "2", "--from-run", run_id, "--interconnect-gbps", "100"]
    rc = plan.main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = table(out)
    assert rows["run's img/s per GPU"] == "800"  # 512 / 16 GPUs / 40 ms
    assert rows["step time"] == "40.0 ms"  # the run's cluster, predicted: the measurement
    assert int(rows["img/s per GPU, compute"].replace(",", "")) > 800
    # the same compute rate on 64 nodes of the same network is slower per GPU than on 2
    rc = plan.main([R152, "--nodes", "64", "--from-run", run_id, "--interconnect-gbps", "100"])
    far = capsys.readouterr().out
    far_rows = table(far)
    assert rc == 0 and far_rows["img/s per GPU, compute"] == rows["img/s per GPU, compute"]
    assert float(far_rows["step time"].split()[0]) > 40.0


def test_from_run_errors_are_one_clear_line(
    stack: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    other = log_training_run(world=1, global_batch=32, step_s=[0.05], model="resnet50")
    assert plan.main([R152, "--nodes", "1", "--from-run", other]) == 2
    assert "trained resnet50, the job trains resnet152" in capsys.readouterr().err
    assert plan.main([R152, "--nodes", "1", "--from-run", "0" * 32]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --from-run 00000000") and err.count("\n") == 1
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert plan.main([R152, "--nodes", "1", "--from-run", other]) == 2
    assert "needs MLFLOW_TRACKING_URI" in capsys.readouterr().err
