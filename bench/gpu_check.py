"""All GPU checks in one run: our jobs vs plain PyTorch on the same card, data included.

    python bench/gpu_check.py            # on an H100/H200 box with torch + torchvision, no network
    python bench/gpu_check.py --baseline PATH     # another baseline (plain_baseline.py's options)
    python bench/gpu_check.py --dry-run  # the same plumbing on a CPU, tiny sizes, in minutes

Steps: (1) generate a small ImageNet-layout JPEG set and convert it to shards on local disk
(datasets/synthetic.py, datasets/imagenet.py: PIL and numpy only); (2) run
bench/plain_baseline.py for plain PyTorch figures on this card, at the job rows' batch and image
size; (3) run jobs/imagenet_r50.py and jobs/imagenet_r152.py with --local for a fixed number of
steps on synthetic on-device data (eager and compiled), GPU decode and the CPU/GPU split (the
loop balancing the share; compiled) and CPU decode (eager: its ceiling), most important first,
and skip what is left after --budget-s; (4) print one table: img/s, ratio to the same-run
baseline, data-wait fraction, peak memory, the split's final CPU share, and the places where the
host waited for the GPU inside a step. Each figure is the median of the job's logged windows
after warm-up. Needs only torch, torchvision, PIL, numpy (webdataset/braceexpand are not
needed: the loader reads tar shards itself). docs/performance-anchors.md has the figures the
baseline gave on an H200.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "bench" / "plain_baseline.py"


@dataclass(frozen=True)
class Sizes:
    """What every row trains on: the baseline and the jobs take the same batch and image size."""

    batch: int
    image_size: int
    steps: int  # per job row


REAL = Sizes(batch=256, image_size=224, steps=40)
DRY = Sizes(batch=4, image_size=64, steps=6)


def repo_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the checkout on PYTHONPATH: the package need not be installed (the
    GPU box has no network for `pip install -e .`)."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd,
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=repo_env(env),
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{out[-3000:]}")
    print(f"  {' '.join(cmd[1:3])} ... {time.monotonic() - t0:.0f} s", flush=True)
    return out


def make_shards(work: Path, dry: bool) -> Path:
    src, shards = work / "jpegs", work / "shards"
    if not (shards / "manifest.json").exists():
        per_class, size = ("8", "160x120") if dry else ("100", "500x375")
        generate = f"imagenet --out {src} --classes 10 --train-per-class {per_class} "
        generate += f"--val-per-class 2 --size {size}"
        run([sys.executable, "datasets/synthetic.py", *generate.split()], 600)
        convert = f"--src {src} --dest {shards} --shard-size-mb 16"
        run([sys.executable, "datasets/imagenet.py", *convert.split()], 600)
    return shards


def baseline(script: Path, models: str, sizes: Sizes, dry: bool, work: Path) -> dict:
    """The plain-PyTorch figures on this card (plain_baseline.py's JSON): eager and compiled,
    at the job rows' batch and image size; eager only, on the CPU, in a dry run."""
    out = work / "plain_baseline.json"
    out.unlink(missing_ok=True)
    options = f"--models {models} --batch {sizes.batch} --image-size {sizes.image_size}"
    path = script.resolve()  # run() works in the checkout: name the script from there
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    cmd = [sys.executable, str(shown), *options.split(), "--json", str(out)]
    if dry:
        cmd += ["--device", "cpu", "--modes", "eager", "--warmup", "1", "--steps", "2"]
    run(cmd, 900)
    return json.loads(out.read_text())


def job(
    model: str, data: str, compiled: bool, shards: Path, sizes: Sizes, dry: bool, work: Path
) -> dict:
    # a fresh run each time: the same name would resume the last run's final checkpoint (an
    # earlier row, or this script's previous try) and train no step at all
    name = f"gpu-{model}-{data}-{'compiled' if compiled else 'eager'}"
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    common = [
        f"checkpoint.storage={work / 'runs'}",
        "checkpoint.every_iters=0",
        "checkpoint.at_epoch_end=false",
        "tracking.enabled=false",
        "eval.every_iters=0",
        "eval.at_end=false",
        f"schedule.max_iters={sizes.steps}",
        "schedule.kind=step",  # throughput only: no validation to drive a plateau
        "tracking.log_every=5" if not dry else "tracking.log_every=2",
        "scaling.num_workers=1",
        f"model.compile={'true' if compiled else 'false'}",
        f"name={name}",
        f"scaling.global_batch={sizes.batch}",
        f"data.image_size={sizes.image_size}",
    ]
    if dry:
        common += ["data.scale_range=[72,96]", "data.eval_resize=72", "data.num_workers=1"]
    else:
        common += [f"data.num_workers={max(1, (os.cpu_count() or 2) - 2)}"]
    if data == "synthetic":
        common += ["data.source=synthetic", "data.synthetic_classes=1000"]
    else:
        common += [f"data.url={shards}", f"data.decode={data}"]
    # the loop warns at each host sync between fetching a batch and the optimizer step
    out = run(
        [sys.executable, f"jobs/imagenet_{model}.py", "--local", *common],
        600,
        env={"ORCH_CUDA_SYNC_DEBUG": "1"},
    )
    syncs = sorted(
        set(re.findall(r"(\S+\.py:\d+): UserWarning: called a synchronizing CUDA operation", out))
    )
    rates = [float(x) for x in re.findall(r"images_per_s=([\d.e+]+)", out)]
    waits = [float(x) for x in re.findall(r"data_wait_frac=([\d.e+-]+)", out)]
    mems = [float(x) for x in re.findall(r"gpu_mem_gib=([\d.e+-]+)", out)]
    shares = [float(x) for x in re.findall(r"cpu_decode_share=([\d.e+-]+)", out)]
    keep = slice(2, None) if len(rates) > 3 else slice(-1, None)  # drop step 1 and warm-up windows
    return {
        "img_s": statistics.median(rates[keep]),
        "wait": statistics.median(waits[keep]),
        "mem": max(mems, default=0.0),
        "share": f"{shares[-1]:.2f}" if shares else "-",
        "syncs": syncs,
    }


# what the targets need, in this order (the most important first, in case time runs out):
# synthetic eager + compiled (>= 0.97 x baseline), GPU decode and the split compiled (>= 0.95 /
# 0.9 of the compiled baseline), CPU decode eager (its ceiling: data-bound, compiling is moot)
RUNS = "synthetic:eager,synthetic:compiled,gpu:compiled,split:compiled,cpu:eager"
HEAD = (
    "model",
    "mode",
    "data",
    "img/s",
    "vs baseline",
    "data wait",
    "peak GiB",
    "CPU share",
    "sync sites",
)
UNKNOWN_DECODER = "unknown (orchestrator.data.transforms does not import)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="check the plumbing on a CPU at tiny sizes"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu-check")
    parser.add_argument("--models", default="r50,r152")
    parser.add_argument(
        "--runs", default=RUNS, help="data:mode pairs; data in synthetic,cpu,gpu,split"
    )
    parser.add_argument(
        "--budget-s", type=float, default=540, help="skip the runs left after this long"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=BASELINE,
        help="the plain-PyTorch baseline script: plain_baseline.py's options and "
        "JSON (default: bench/plain_baseline.py)",
    )
    args = parser.parse_args()
    if not args.baseline.is_file():  # before the shards, not after
        raise SystemExit(f"--baseline {args.baseline}: no such file")
    sizes = DRY if args.dry_run else REAL
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print("1/3 shards on local disk", flush=True)
    shards = make_shards(args.work, args.dry_run)
    print(f"2/3 plain PyTorch baseline ({args.baseline.name})", flush=True)
    base = baseline(args.baseline, args.models, sizes, args.dry_run, args.work)
    print("3/3 our jobs", flush=True)
    rows: list[tuple[str, ...]] = []
    sync_sites: dict[str, list[str]] = {}
    for model in args.models.split(","):
        for data, mode in (run.split(":") for run in args.runs.split(",")):
            compiled = mode == "compiled" and not args.dry_run  # no torch.compile on a CPU
            mode = "compiled" if compiled else "eager"
            ref = base["results"].get(model, {}).get(mode, {}).get("img_s")
            if time.monotonic() - t0 > args.budget_s:
                rows.append((model, mode, data, "SKIPPED", f"over --budget-s {args.budget_s:.0f}"))
                continue
            try:
                r = job(model, data, compiled, shards, sizes, args.dry_run, args.work)
                ratio = f"{r['img_s'] / ref:.3f}" if ref else "n/a"
                wait, mem = f"{100 * r['wait']:.1f}%", f"{r['mem']:.1f}"
                figures = (f"{r['img_s']:.0f}", ratio, wait, mem, r["share"], str(len(r["syncs"])))
                rows.append((model, mode, data, *figures))
                for site in r["syncs"]:
                    sync_sites.setdefault(site, []).append(f"{model}/{data}")
            except Exception as err:  # noqa: BLE001 - one failed row must not hide the others
                rows.append((model, mode, data, "FAILED", str(err)[:60]))
    probe = "from orchestrator.data.transforms import cpu_decoder; print(cpu_decoder())"
    found = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True, env=repo_env()
    )
    decoder = found.stdout.strip()
    print(
        f"\ndevice: {base.get('device')}   baseline: {args.baseline.name}, same run, batch "
        f"{sizes.batch} at {sizes.image_size}px   total {time.monotonic() - t0:.0f} s"
    )
    print(f"CPU JPEG decoder (the cpu rows): {decoder or UNKNOWN_DECODER}")
    rows = [r + ("",) * (len(HEAD) - len(r)) for r in rows]  # a skipped or failed row is short
    widths = [max(len(str(r[i])) for r in [HEAD, *rows]) for i in range(len(HEAD))]
    for r in [HEAD, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print("\nhost syncs between fetching a batch and the optimizer step (ORCH_CUDA_SYNC_DEBUG=1):")
    for site, where in sorted(sync_sites.items()):
        print(f"  {site}  ({', '.join(sorted(set(where)))})")
    if not sync_sites:
        print("  none" if not args.dry_run else "  not checked on a CPU")


if __name__ == "__main__":
    main()
