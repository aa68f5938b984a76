"""Plain PyTorch training throughput on one GPU: the baseline bench/gpu_check.py holds the
project's jobs against, measured on the same card in the same call.

    python bench/plain_baseline.py                      # ResNet-50 and -152, eager and compiled
    python bench/plain_baseline.py --models r50 --modes compiled --batch 128 --json out.json
    python bench/plain_baseline.py --net torchvision    # torchvision's v1.5 nets instead

For each net (random init) and mode (eager, or the model under torch.compile with static
shapes): bf16 autocast + channels_last, cuDNN's autotuner on, one synthetic batch of images
and labels created on the GPU once (no input pipeline at all), cross-entropy (in fp32, as the
loop), backward and an SGD step with the jobs' optimizer (momentum 0.9, weight decay 1e-4 on
every weight: the paper's; fused on CUDA, foreach on a CPU, as orchestrator.strategy makes it).
It runs --warmup steps (compilation and cuDNN's first calls), then times --steps steps between
two CUDA syncs, and prints images per second.

The net is the jobs' own by default (`--net project`: orchestrator.models' ResNet-50/152, the
paper's v1, stride 2 in the first 1x1 conv of a down-sampling block), so a ratio of job to
baseline measures the loop and not the net: torchvision's v1.5 (`--net torchvision`, stride in
the 3x3) does 6.0% more multiply-adds than v1 at ResNet-50 (2.0% at ResNet-152), enough to hide
a real loss behind a ratio near 1. docs/performance-anchors.md has what torchvision's nets gave
on an H200; compare figures only from the same card, net and run.

Needs only torch (and this checkout, for the project's nets; torchvision for `--net
torchvision`), and runs on any CUDA GPU. `--device cpu` runs the same code on the host in fp32,
as the jobs do there (slowly; what gpu_check.py --dry-run uses to check its plumbing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NETS = {"r50": "resnet50", "r152": "resnet152"}
MODES = ("eager", "compiled")
SOURCES = ("project", "torchvision")
REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 1000


def measure(
    net: str,
    mode: str,
    *,
    batch: int,
    image_size: int,
    warmup: int,
    steps: int,
    device: torch.device,
    source: str = "project",
) -> dict[str, float]:
    """img/s of `steps` timed training steps after `warmup` untimed ones; peak memory in GiB."""
    model = build(net, device, source).to(device, memory_format=torch.channels_last)
    forward = torch.compile(model, dynamic=False) if mode == "compiled" else model
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}  # as the jobs' SGD
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, **fast)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(forward(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"img_s": steps * batch / seconds, "seconds": seconds, "peak_gib": peak}


def build(net: str, device: torch.device, source: str = "project") -> nn.Module:
    """The jobs' own net (orchestrator.models, the paper's v1), or torchvision's v1.5."""
    if source == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise SystemExit(
                "plain_baseline.py --net torchvision needs torchvision (pip install "
                "torchvision); or leave --net at project"
            ) from None
        return getattr(torchvision.models, NETS[net])(num_classes=NUM_CLASSES)
    sys.path.append(str(REPO))  # the checkout need not be installed (the GPU box has no pip)
    from orchestrator.models import create_model

    return create_model(NETS[net], NUM_CLASSES)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Forget the last net: its compiled graphs and cached memory must not slow the next one."""
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="r50,r152", help="comma-separated, of: r50, r152")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated, of: eager, compiled")
    p.add_argument("--batch", type=int, default=256, help="images per step (default 256)")
    p.add_argument(
        "--image-size", type=int, default=224, help="square side in pixels (default 224)"
    )
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first (default 15)")
    p.add_argument("--steps", type=int, default=50, help="timed steps (default 50)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    p.add_argument(
        "--net",
        default="project",
        choices=SOURCES,
        help="project (default): the jobs' v1 nets from orchestrator.models; torchvision: v1.5",
    )
    p.add_argument("--json", type=Path, help="also write the figures here, as JSON")
    args = p.parse_args(argv)
    for name, allowed in (("models", NETS), ("modes", MODES)):
        unknown = set(getattr(args, name).split(",")) - set(allowed)
        if unknown:
            choices = ", ".join(allowed)
            p.error(f"--{name}: unknown {', '.join(sorted(unknown))} (choose from {choices})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "plain_baseline.py: no CUDA GPU here; pass --device cpu to run on the host"
        )
    torch.backends.cudnn.benchmark = True  # as the jobs: fixed shapes, the fastest algorithms
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "batch": args.batch,
        "image_size": args.image_size,
        "steps": args.steps,
        "net": args.net,
        "results": {},
    }
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    setup = f"{args.net} nets, batch {args.batch} at {args.image_size}px, {precision} + "
    setup += "channels_last"
    print(f"{name}, torch {torch.__version__}: {setup}, synthetic data on the device", flush=True)
    for net in args.models.split(","):
        for mode in args.modes.split(","):
            r = measure(
                net,
                mode,
                batch=args.batch,
                image_size=args.image_size,
                warmup=args.warmup,
                steps=args.steps,
                device=device,
                source=args.net,
            )
            report["results"].setdefault(net, {})[mode] = r
            timing = f"{args.steps} steps in {r['seconds']:.2f} s, peak {r['peak_gib']:.1f} GiB"
            print(f"{net:<5} {mode:<9} {r['img_s']:8.1f} img/s  ({timing})", flush=True)
            _release(device)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
