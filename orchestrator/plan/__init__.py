"""The scale model: what a job asks of a cluster of a given size, before you rent it.

    python -m orchestrator.plan jobs/imagenet_r152.py --nodes 64 --gpus-per-node 8 \\
        [section.key=value ...] [--img-per-s-per-gpu 3084 | --from-run RUN_ID] \\
        [--interconnect-gbps 3200] [--intra-node-gbps 3600] [--grad-dtype bf16] \\
        [--storage-gbps 10] [--kb-per-image 110] [--train-images 1281167]

It loads the job file's SPEC, applies the overrides (orchestrator.spec.apply_overrides) with
scaling.num_workers = N = nodes x GPUs per node, and prints one table. Nothing is measured:
every number comes from the formulas below and the inputs, and the output names its sources.

  anchors.py   the measured figures it starts from (docs/performance-anchors.md)
  calibrate.py --from-run: a real run's img/s and step time, read from MLflow
  formulas.py  the formulas below, one function each
  job.py       a job file resolved for N GPUs: the batch policy below
  numbers.py   the numbers for one job on one cluster
  report.py    the table and notes that show them
  cli.py       the command line

Formulas (units: MB = 10^6 bytes, Gbit/s = 10^9 bits/s):

  batch        The job's per-GPU batch b = spec.micro_batch() and accumulation a (at the size
               the job was written for) are kept on more GPUs, so the global batch grows with
               the cluster: B = b x a x N. On fewer GPUs (b x a x N < B0, the job file's
               global batch) B0 is kept instead by gradient accumulation: scaling.micro_batch=b
               and ceil(B0 / (N x b)) micro-batches per step, so the batch, lr and schedule
               stay the recipe's (a smaller B would change all three). Overriding
               scaling.global_batch yourself sets B instead.
               lr = spec.lr() = optim.base_lr x B / 256 (the linear scaling rule) unless
               optim.lr is set. When B differs from B0, the
               iteration counts (schedule.max_iters, milestones, warmup_iters, eval.every_iters)
               are scaled by B0 / B so the schedule covers the same images; a count you
               override yourself is left alone.
  warm-up      Above B = 256, where the linear scaling rule raises the lr, the lr warms up as
               Goyal et al. (2017) did: linearly from optim.base_lr (the lr of batch 256) over
               the first 5 epochs: schedule.warmup_iters = ceil(5 x train images / B),
               warmup_factor = 256 / B, warmup_linear = true. A warm-up the job file or you
               set is kept, and a fixed optim.lr is left alone; either is said. The plan
               prints every override it added, the job's --dry-run line to check them, and
               the `ray job submit` command that runs the job it describes.
  compute      t_c = b x a / r, with r the images per second one GPU computes (the anchors of
               docs/performance-anchors.md, --img-per-s-per-gpu, or --from-run: the run's
               median system/step_time_s with the model's share of its own communication
               taken out, so that the model predicts that run's step back).
  gradients    G = P x 4 bytes for P parameters under DDP (fp32 gradients even under bf16
               autocast), P x 2 under DeepSpeed bf16; --grad-dtype overrides.
  all-reduce   A ring all-reduce sends 2(N-1)/N x G per GPU. Hierarchically, on n nodes of g
               GPUs: 2(g-1)/g x G per GPU over NVLink (--intra-node-gbps) and 2(n-1)/n x G
               per node through its NICs (--interconnect-gbps); NCCL pipelines the two, so
               the slower level sets the time.
  overlap      DDP fills 25 MiB buckets (1 MiB first) as backward (2/3 of the last
               micro-batch's compute) produces gradients at an even rate; each bucket's
               all-reduce starts when it is full and the previous one is done. The last bucket
               is ready only when backward ends: it, and whatever the link could not keep up
               with, is exposed.
  ZeRO         DeepSpeed stage 1/2: reduce-scatter of G ((N-1)/N x G; stage 2 after every
               micro-batch) and all-gather of the weights ((N-1)/N x their bytes): the ZeRO
               paper's 2 Psi, DDP's volume. With overlap_comm off (the default below stage 3)
               none of it hides behind backward. Stage 0: one all-reduce after backward.
  step         t = t_c + exposed; img/s per GPU = b x a / t; scaling efficiency = that / the
               same on one node of g GPUs. Bandwidth only: no per-message latency.
  object store Per node: GPUs per node x r x image size (about 110 KB per ImageNet JPEG).
  JPEG decode  Per node: GPUs per node x r / 292 cores (docs/performance-anchors.md: one
               core decodes and resizes about 292 ImageNet images per second with PIL).
  shards       At least N x max(1, data.num_workers), so every DataLoader worker has its own;
               shard size at most (train images x image size) / that.
  checkpoint   C = P x 4 x 2 bytes (fp32 weights + SGD momentum buffers); written at S Gbit/s
               in C x 8 / S seconds, every checkpoint.every_iters iterations or every epoch
               (ceil(train images / B) iterations) with checkpoint.at_epoch_end, whichever
               comes first.
  time         schedule.max_iters x t (and max_iters x t_c: linear scaling). When the
               schedule was rescaled, the job file's own max_iters at this step time is shown too.
"""

from orchestrator.plan.cli import main
from orchestrator.plan.job import PlanError, load_job_spec, resolve_for_cluster

__all__ = ["PlanError", "load_job_spec", "main", "resolve_for_cluster"]
