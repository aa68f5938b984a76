"""The scale model: what a job asks of a cluster of a given size, before you rent it.

    python -m orchestrator.plan jobs/imagenet_r152.py --nodes 64 --gpus-per-node 8 \\
        [section.key=value ...] [--img-per-s-per-gpu 3084] [--interconnect-gbps 400] \\
        [--storage-gbps 10] [--kb-per-image 110] [--train-images 1281167]

It loads the job file's SPEC, applies the overrides (orchestrator.spec.apply_overrides) with
scaling.num_workers = N = nodes x GPUs per node, and prints one table. Nothing is measured:
every number comes from the formulas below and the inputs, and the output names its sources.

  anchors.py   the measured figures it starts from (docs/performance-anchors.md)
  formulas.py  the formulas below, one function each
  job.py       a job file resolved for N GPUs: the batch policy below
  report.py    the numbers for one job on one cluster, and the table and notes that show them
  cli.py       the command line

Formulas (units: MB = 10^6 bytes, Gbit/s = 10^9 bits/s):

  batch        The job's per-GPU batch b = spec.micro_batch() and accumulation a (at the size
               the job was written for) are kept, so the global batch grows with the cluster:
               B = b x a x N; overriding scaling.global_batch yourself sets B instead.
               lr = spec.lr() = optim.base_lr x B / 256 (the linear scaling rule) unless
               optim.lr is set. When B differs from the global batch B0 in the job file, the
               iteration counts (schedule.max_iters, milestones, warmup_iters, eval.every_iters)
               are scaled by B0 / B so the schedule covers the same images; a count you
               override yourself is left alone. The plan prints every override it added, and
               the `ray job submit` command that runs the job it describes.
  step time    t = b x a / r, with r the images per second one GPU trains (the anchors of
               docs/performance-anchors.md unless --img-per-s-per-gpu is given).
  gradients    G = P x 4 bytes for P parameters: DDP all-reduces fp32 gradients even when the
               forward pass runs in bf16 autocast.
  all-reduce   A ring all-reduce sends (and receives) 2(N-1)/N x G per GPU per step. Hiding it
               within one step needs 2(N-1)/N x G x 8 / t bit/s per GPU (NCCL calls this the
               bus bandwidth). DDP overlaps it with the backward pass only, so treat this as a
               lower bound.
  object store Per node: GPUs per node x r x image size (about 110 KB per ImageNet JPEG).
  JPEG decode  Per node: GPUs per node x r / 292 cores (docs/performance-anchors.md: one
               core decodes and resizes about 292 ImageNet images per second with PIL).
  shards       At least N x max(1, data.num_workers), so every DataLoader worker has its own;
               shard size at most (train images x image size) / that.
  checkpoint   C = P x 4 x 2 bytes (fp32 weights + SGD momentum buffers); written at S Gbit/s
               in C x 8 / S seconds, every checkpoint.every_iters iterations or every epoch
               (ceil(train images / B) iterations) with checkpoint.at_epoch_end, whichever
               comes first.
  time         schedule.max_iters x t = max_iters x B / (N x r) seconds, ASSUMING throughput
               scales linearly with N (no communication or input stalls). When the schedule was
               rescaled, the job file's own max_iters at this step time is shown too.
"""

from orchestrator.plan.cli import main
from orchestrator.plan.job import PlanError, load_job_spec, resolve_for_cluster

__all__ = ["PlanError", "load_job_spec", "main", "resolve_for_cluster"]
