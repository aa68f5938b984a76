"""All GPU checks in one run: our jobs vs plain PyTorch on the same card, data included.

    python bench/gpu_check.py              # on an H100/H200 box with torch + torchvision (no network)
    python bench/gpu_check.py --baseline shared/tools/gpu_baseline.py   # a copy in the checkout
    python bench/gpu_check.py --dry-run    # the same plumbing on a CPU, tiny sizes, in a minute

Steps: (1) generate a small ImageNet-layout JPEG set and convert it to shards on local disk
(datasets/synthetic.py, datasets/imagenet.py: PIL and numpy only); (2) rerun
../shared/tools/gpu_baseline.py for plain PyTorch figures on this card; (3) run
jobs/imagenet_r50.py and jobs/imagenet_r152.py with --local for a fixed number of steps on
synthetic on-device data (eager and compiled), GPU decode and the CPU/GPU split (the loop
balancing the share; compiled) and CPU decode (eager: its ceiling), most important first, and
skip what is left after --budget-s; (4) print one table: img/s, ratio to the same-run baseline,
data-wait fraction, peak memory, the split's final CPU share, and the places where the host
waited for the GPU inside a step. Each figure is the median of the job's logged windows after
warm-up. Needs only torch, torchvision, PIL, numpy
(webdataset/braceexpand are not needed: the loader reads tar shards itself).
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the plain-PyTorch baseline script: beside the checkout on a developer's machine; a GPU box
# gets only the checkout, so copy it in (shared/tools/ there, or anywhere with --baseline)
BASELINE_PLACES = (REPO.parent / "shared" / "tools" / "gpu_baseline.py", REPO / "shared" / "tools" / "gpu_baseline.py")


def find_baseline(given: Path | None) -> Path:
    places = (given,) if given else BASELINE_PLACES
    for place in places:
        if place.is_file():
            return place
    raise SystemExit(
        f"gpu_baseline.py not found (looked at {', '.join(map(str, places))}): copy "
        "../shared/tools/gpu_baseline.py into the checkout, e.g. shared/tools/, or pass --baseline PATH"
    )


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    t0 = time.monotonic()
    env = {**os.environ, **(env or {})}
    # the package need not be installed (the GPU box has no network for `pip install -e .`)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{out[-3000:]}")
    print(f"  {' '.join(cmd[1:3])} ... {time.monotonic() - t0:.0f} s", flush=True)
    return out


def make_shards(work: Path, dry: bool) -> Path:
    src, shards = work / "jpegs", work / "shards"
    if not (shards / "manifest.json").exists():
        per_class, size = ("8", "160x120") if dry else ("100", "500x375")
        run([sys.executable, "datasets/synthetic.py", "imagenet", "--out", str(src), "--classes", "10",
             "--train-per-class", per_class, "--val-per-class", "2", "--size", size], 600)  # fmt: skip
        run([sys.executable, "datasets/imagenet.py", "--src", str(src), "--dest", str(shards), "--shard-size-mb", "16"], 600)
    return shards


def baseline(dry: bool, work: Path, script: Path | None) -> dict:
    """gpu_baseline.py's figures on this card (`script`: its path; None only in a dry run)."""
    if dry:
        return {"device": "cpu (dry run)", "r50_bs256_cl_bf16": {"img_s": 1.0}, "r152_bs256_cl_bf16": {"img_s": 1.0},
                "r50_bs256_cl_bf16_compile": {"img_s": 1.0}, "r152_bs256_cl_bf16_compile": {"img_s": 1.0}}  # fmt: skip
    out = run([sys.executable, str(script), "300"], 420, env={"OUT": str(work)})
    return json.loads((work / "gpu_baseline.json").read_text()) if (work / "gpu_baseline.json").exists() else json.loads(out[out.rindex("\n{"):])


def job(model: str, data: str, compiled: bool, shards: Path, dry: bool, work: Path) -> dict:
    steps = 6 if dry else 40
    # a fresh run each time: the same name would resume the last run's final checkpoint (an
    # earlier row, or this script's previous try) and train no step at all
    name = f"gpu-{model}-{data}-{'compiled' if compiled else 'eager'}"
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    common = [f"checkpoint.storage={work / 'runs'}", "checkpoint.every_iters=0", "checkpoint.at_epoch_end=false",
              "tracking.enabled=false", "eval.every_iters=0", "eval.at_end=false", f"schedule.max_iters={steps}",
              "schedule.kind=step",  # throughput only: no validation to drive a plateau
              "tracking.log_every=5" if not dry else "tracking.log_every=2", "scaling.num_workers=1",
              f"model.compile={'true' if compiled else 'false'}", f"name={name}"]  # fmt: skip
    if dry:
        common += ["scaling.global_batch=4", "data.image_size=64", "data.scale_range=[72,96]", "data.eval_resize=72",
                   "data.num_workers=1"]  # fmt: skip
    else:
        common += ["scaling.global_batch=256", f"data.num_workers={max(1, (os.cpu_count() or 2) - 2)}"]
    if data == "synthetic":
        common += ["data.source=synthetic", "data.synthetic_classes=1000"]
    else:
        common += [f"data.url={shards}", f"data.decode={data}"]
    # the loop warns at each host sync between fetching a batch and the optimizer step
    out = run([sys.executable, f"jobs/imagenet_{model}.py", "--local", *common], 600, env={"ORCH_CUDA_SYNC_DEBUG": "1"})
    syncs = sorted(set(re.findall(r"(\S+\.py:\d+): UserWarning: called a synchronizing CUDA operation", out)))
    rates = [float(x) for x in re.findall(r"images_per_s=([\d.e+]+)", out)]
    waits = [float(x) for x in re.findall(r"data_wait_frac=([\d.e+-]+)", out)]
    mems = [float(x) for x in re.findall(r"gpu_mem_gib=([\d.e+-]+)", out)]
    shares = [float(x) for x in re.findall(r"cpu_decode_share=([\d.e+-]+)", out)]
    keep = slice(2, None) if len(rates) > 3 else slice(-1, None)  # drop step 1 and warm-up windows
    return {"img_s": statistics.median(rates[keep]), "wait": statistics.median(waits[keep]),
            "mem": max(mems, default=0.0), "share": f"{shares[-1]:.2f}" if shares else "-", "syncs": syncs}  # fmt: skip


# what the targets need, in this order (the most important first, in case time runs out):
# synthetic eager + compiled (>= 0.97 x baseline), GPU decode and the split compiled (>= 0.95 /
# 0.9 of the compiled baseline), CPU decode eager (its ceiling: data-bound, compiling is moot)
RUNS = "synthetic:eager,synthetic:compiled,gpu:compiled,split:compiled,cpu:eager"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="check the plumbing on a CPU at tiny sizes")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu-check")
    parser.add_argument("--models", default="r50,r152")
    parser.add_argument("--runs", default=RUNS, help="data:mode pairs; data in synthetic,cpu,gpu,split")
    parser.add_argument("--budget-s", type=float, default=540, help="skip the runs left after this long")
    parser.add_argument("--baseline", type=Path, help="gpu_baseline.py (default: ../shared/tools/, then shared/tools/)")
    args = parser.parse_args()
    script = None if args.dry_run else find_baseline(args.baseline)  # before the shards, not after
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print("1/3 shards on local disk", flush=True)
    shards = make_shards(args.work, args.dry_run)
    print("2/3 plain PyTorch baseline (gpu_baseline.py)", flush=True)
    base = baseline(args.dry_run, args.work, script)
    print("3/3 our jobs", flush=True)
    rows, sync_sites = [], {}
    for model in args.models.split(","):
        for data, mode in (run.split(":") for run in args.runs.split(",")):
            compiled = mode == "compiled" and not args.dry_run  # no torch.compile on a CPU
            mode = "compiled" if compiled else "eager"
            ref = base.get(f"{model}_bs256_cl_bf16{'_compile' if compiled else ''}", {}).get("img_s")
            if time.monotonic() - t0 > args.budget_s:
                rows.append((model, mode, data, "SKIPPED", f"over --budget-s {args.budget_s:.0f}", "", "", "", ""))
                continue
            try:
                r = job(model, data, compiled, shards, args.dry_run, args.work)
                ratio = f"{r['img_s'] / ref:.3f}" if ref else "n/a"
                rows.append((model, mode, data, f"{r['img_s']:.0f}", ratio, f"{100 * r['wait']:.1f}%",
                             f"{r['mem']:.1f}", r["share"], str(len(r["syncs"]))))  # fmt: skip
                for site in r["syncs"]:
                    sync_sites.setdefault(site, []).append(f"{model}/{data}")
            except Exception as err:  # noqa: BLE001 - one failed row must not hide the others
                rows.append((model, mode, data, "FAILED", str(err)[:60], "", "", "", ""))
    decoder = subprocess.run(
        [sys.executable, "-c", "from orchestrator.data.transforms import cpu_decoder; print(cpu_decoder())"],
        cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    ).stdout.strip() or "unknown (orchestrator.data.transforms does not import)"  # fmt: skip
    print(f"\ndevice: {base.get('device')}   baseline: gpu_baseline.py, same run   total {time.monotonic() - t0:.0f} s")
    print(f"CPU JPEG decoder (the cpu rows): {decoder}")
    head = ("model", "mode", "data", "img/s", "vs baseline", "data wait", "peak GiB", "CPU share", "sync sites")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print("\nhost syncs between fetching a batch and the optimizer step (ORCH_CUDA_SYNC_DEBUG=1):")
    for site, where in sorted(sync_sites.items()):
        print(f"  {site}  ({', '.join(sorted(set(where)))})")
    if not sync_sites:
        print("  none" if not args.dry_run else "  not checked on a CPU")


if __name__ == "__main__":
    main()
