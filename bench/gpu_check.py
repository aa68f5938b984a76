"""All GPU checks in one bounded run: our jobs vs plain PyTorch on the same card, data included.

    python bench/gpu_check.py            # on an H100/H200 box with torch + torchvision, no network
    python bench/gpu_check.py --budget-s 300 --models r50     # a shorter slot
    python bench/gpu_check.py --dry-run --budget-s 60         # the same plumbing on a CPU

Made for a GPU slot that may last ten minutes: the whole run ends by --budget-s (default 8
min), every child's timeout capped by the time left (a child cut at the deadline is killed
with its loader workers and its row says so), and each row is printed and appended to the
results file (--results, JSON lines) the moment it is measured, so a run cut short still
leaves every figure it made.

Stages: (1) a small ImageNet-layout JPEG set converted to shards on local disk
(datasets/synthetic.py, datasets/imagenet.py), its train shards listed again and again in the
manifest so the data rows read one epoch long enough for steady state (no epoch turnover, no
loader restart inside a row); (2) a smoke stage of at most a minute: one batch of JPEGs
decoded as the jobs decode them on the device (nvJPEG), timed, and a tiny compiled training
step; (3) the rows, most important first: for each --runs entry, each net: the plain-PyTorch
baseline of that net and mode (bench/plain_baseline.py, one child per net and mode, so a
failure costs only its own row; measured before the first job row that needs it), then
jobs/imagenet_r50.py / _r152.py with --local for a fixed number of steps. Default order: R50
and R152 synthetic compiled, then GPU decode and the CPU/GPU split compiled, then synthetic
eager, then CPU decode eager (its ceiling: data-bound, compiling is moot).

Each job row: img/s (the median of the job's logged windows after warm-up), its ratio to the
baseline of the same net (the jobs' v1 nets from orchestrator.models, the same optimizer,
precision and memory format) and mode, the data-wait fraction, peak memory, the split's CPU
share once the balancer's window has closed (printed as each window closes), and the host
syncs between fetching a batch and the optimizer step (ORCH_CUDA_SYNC_DEBUG=1): in this
project's code ("ours", must be 0) and inside torch ("torch": e.g. inductor's autotuning while
compiling). nvJPEG's own stream wait is not such a sync: the smoke row times the decode instead.

Needs only torch, torchvision, PIL, numpy and this checkout (not installed: it is put on
PYTHONPATH). docs/performance-anchors.md has the figures torchvision's nets gave on an H200;
docs/benchmarks.md what this script printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "bench" / "plain_baseline.py"
MODELS = ("r50", "r152")
DATA = ("synthetic", "gpu", "split", "cpu")
MODES = ("compiled", "eager")
# what the targets need, most important first: synthetic compiled (>= 0.97 x baseline), GPU
# decode and the split compiled (>= 0.95 / 0.9 of the compiled baseline), then eager, then
# CPU decode eager (its ceiling)
RUNS = "synthetic:compiled,gpu:compiled,split:compiled,synthetic:eager,cpu:eager"
SYNC = re.compile(r"(\S+\.py):(\d+): UserWarning: called a synchronizing CUDA operation")
BALANCER = re.compile(r"split balancer: .*CPU share ([\d.]+) -> ([\d.]+)")


@dataclass(frozen=True)
class Sizes:
    """What the rows train on: the baseline and the jobs take the same batch and image size."""

    batch: int
    image_size: int
    steps: int  # a synthetic row
    data_steps: int  # a data row: past the loader's start-up, inside one epoch
    workers: int  # loader workers of a data row
    per_class: int  # generated train JPEGs per class (10 classes)
    jpeg_size: str
    smoke_batch: int

    @property
    def split_steps(self) -> int:
        """The split row: the balancer skips an epoch's first window (its workers start with
        empty queues), then judges a window at a time; two judged windows and a few steps.
        The window is orchestrator.data.train_loader.SplitBalancer's: 2 x workers x prefetch
        (2), at least 10."""
        window = max(10, 2 * self.workers * 2)
        return 3 * window + 4

    @property
    def epoch_images(self) -> int:
        return (max(self.data_steps, self.split_steps) + 8) * self.batch

    def jpegs(self, work: Path) -> Path:
        """Named by what they hold: a dry run's set is never taken for a real run's."""
        return work / f"jpegs-{self.per_class}x10-{self.jpeg_size}"

    def shards(self, work: Path) -> Path:
        return work / f"shards-{self.per_class}x10-{self.jpeg_size}-{self.epoch_images}"


REAL = Sizes(256, 224, 40, 60, max(1, min(14, (os.cpu_count() or 2) - 2)), 100, "500x375", 64)
DRY = Sizes(4, 32, 6, 8, 1, 8, "160x120", 8)


class ChildFailed(RuntimeError):
    """A child exited with an error; `output` is what it printed."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class OutOfTime(ChildFailed):
    """A child ran into the run's deadline (or its own cap) and was killed."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def spent(self) -> float:
        return self.seconds - self.left()


def repo_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the checkout on PYTHONPATH: the package need not be installed (the
    GPU box has no network for `pip install -e .`)."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run(
    cmd: list[str],
    deadline: Deadline,
    cap: float,
    env: dict[str, str] | None = None,
    echo: re.Pattern[str] | None = None,
) -> str:
    """The child's output; its lines matching `echo` printed as they come. Killed (with its
    own children: a session of its own) at min(cap, the time left)."""
    timeout = min(cap, deadline.left())
    if timeout < 1:
        raise OutOfTime("no time left before the deadline")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=repo_env(env),
        start_new_session=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            shown = echo.search(line) if echo is not None else None
            if shown:
                print(f"    {shown.group(0)}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(5)
        raise OutOfTime(f"cut after {timeout:.0f} s (deadline or cap)", "".join(lines)) from None
    reader.join()
    out = "".join(lines)
    if proc.returncode != 0:
        raise ChildFailed(f"{' '.join(cmd[1:3])} failed ({proc.returncode}): {out[-3000:]}", out)
    return out


class Results:
    """Each row appended to the results file (JSON lines), then printed, as it is measured."""

    HEAD = (
        ("model", 6),
        ("mode", 9),
        ("data", 10),
        ("img/s", 9),
        ("vs base", 8),
        ("wait", 7),
        ("GiB", 6),
        ("CPU share", 11),
        ("syncs ours", 11),
        ("syncs torch", 12),
        ("note", 0),
    )
    KEYS = ("model", "mode", "data", "img_s", "ratio", "wait", "mem", "share", "ours", "torch")

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self.rows: list[dict[str, Any]] = []

    def header(self) -> None:
        print("".join(name.ljust(width) for name, width in self.HEAD).rstrip(), flush=True)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        cells = [_cell(row.get(key)) for key in self.KEYS]
        if row["status"] != "ok":
            cells[3] = row["status"]
        cells.append(row.get("note", ""))
        line = "".join(c.ljust(w) for c, (_, w) in zip(cells, self.HEAD, strict=True))
        print(line.rstrip(), flush=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    return str(value)


def make_shards(work: Path, sizes: Sizes, deadline: Deadline) -> Path:
    """Generated JPEGs as shards; the train shards listed again until an epoch holds
    `sizes.epoch_images` (hard links: no more disk, the page cache holds one copy)."""
    src, shards = sizes.jpegs(work), sizes.shards(work)
    manifest = shards / "manifest.json"
    if not manifest.exists():
        shutil.rmtree(shards, ignore_errors=True)
        generate = f"imagenet --out {src} --classes 10 --train-per-class {sizes.per_class} "
        generate += f"--val-per-class 2 --size {sizes.jpeg_size}"
        run([sys.executable, "datasets/synthetic.py", *generate.split()], deadline, 240)
        convert = f"--src {src} --dest {shards} --shard-size-mb 16"
        run([sys.executable, "datasets/imagenet.py", *convert.split()], deadline, 240)
        repeat_train_shards(manifest, sizes.epoch_images)
    return shards


def repeat_train_shards(manifest: Path, images: int) -> None:
    meta = json.loads(manifest.read_text())
    train = meta["splits"]["train"]
    originals, copy = list(train["shards"]), 1
    while train["samples"] < images:
        for shard in originals:
            name = f"train-r{copy:03d}-{shard['name'].removeprefix('train-')}"
            for suffix in ("", ".json"):
                first = manifest.parent / (shard["name"] + suffix)
                if first.exists():
                    os.link(first, manifest.parent / (name + suffix))
            train["shards"].append({**shard, "name": name})
            train["samples"] += shard["samples"]
        copy += 1
    manifest.write_text(json.dumps(meta, indent=1))


def smoke(work: Path, dry: bool) -> None:
    """The child of the smoke stage: one batch of JPEGs decoded on the device, timed (nvJPEG;
    the host decoder on a CPU), then a tiny training step (compiled on a GPU), timed. Each
    result is printed (a JSON line) as soon as it is known: a slow compile keeps the decode's."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from orchestrator.data.gpu_augment import decode_jpegs
    from orchestrator.data.transforms import cpu_decoder

    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        raise SystemExit("gpu_check.py: no CUDA GPU here; run with --dry-run on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    sizes = DRY if dry else REAL
    folder = sizes.jpegs(work)
    files = sorted(folder.rglob("*.JPEG")) or sorted(folder.rglob("*.jp*g"))
    blobs = [p.read_bytes() for p in files[: sizes.smoke_batch]]
    decode_jpegs(blobs[:2], device)  # first call: nvJPEG's handles
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    decode_jpegs(blobs, device)
    sync()
    decode_s = time.perf_counter() - t0
    found = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "decoder": "nvJPEG" if cuda else "host (no GPU)",
        "cpu_decoder": cpu_decoder(),
        "decode_img_s": len(blobs) / decode_s,
        "jpegs": len(blobs),
    }
    print(json.dumps(found), flush=True)
    model = nn.Sequential(  # tiny: the check is that compiling works here, and its cost
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).to(device)
    forward = torch.compile(model, dynamic=False) if cuda else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    n = sizes.smoke_batch
    x, y = torch.randn(n, 3, 32, 32, device=device), torch.randint(0, 10, (n,), device=device)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    step = {"first_step_s": times[0], "step_ms": 1000 * statistics.median(times[1:])}
    print(json.dumps({**step, "compiled": cuda}), flush=True)


def smoke_row(work: Path, dry: bool, deadline: Deadline) -> tuple[dict[str, Any], dict]:
    cmd = [sys.executable, "bench/gpu_check.py", "--smoke", "--work", str(work)]
    cmd += ["--dry-run"] if dry else []
    error: Exception | None = None
    try:
        out = run(cmd, deadline, 60)
    except Exception as err:  # noqa: BLE001 - the smoke stage must not stop the rows
        out, error = getattr(err, "output", ""), err
    found: dict[str, Any] = {}
    for line in out.splitlines():
        if line.startswith("{"):
            found.update(json.loads(line))
    row = {"kind": "smoke", "model": "tiny", "mode": "compiled", "data": "smoke"}
    if "decode_img_s" not in found:
        assert error is not None
        return {**row, "status": failed(error), "note": note(error)}, found
    decode = f"{found['decoder']} decode of {found['jpegs']} JPEGs"
    if "step_ms" in found:
        row["mode"] = "compiled" if found["compiled"] else "eager"
        step = f"tiny {row['mode']} step {found['step_ms']:.1f} ms"
        step += f" (first {found['first_step_s']:.2f} s)"
    else:  # cut or failed while compiling: the decode's figure stays
        step = f"tiny step {failed(error)}: {note(error)}" if error else "tiny step: no result"
    row.update(img_s=found["decode_img_s"], status="ok", note=f"{decode}; {step}")
    return row, found


def failed(err: Exception) -> str:
    return "CUT" if isinstance(err, OutOfTime) else "FAILED"


def note(err: Exception) -> str:
    return " ".join(str(err).split())[:160]


def baseline_row(
    script: Path, model: str, mode: str, sizes: Sizes, dry: bool, work: Path, deadline: Deadline
) -> dict[str, Any]:
    """bench/plain_baseline.py for one net and mode, in a child of its own."""
    out = work / f"baseline-{model}-{mode}.json"
    out.unlink(missing_ok=True)
    path = script.resolve()  # run() works in the checkout: name the script from there
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    options = f"--models {model} --modes {mode} --batch {sizes.batch} "
    options += f"--image-size {sizes.image_size} --json {out}"
    if dry:
        options += " --device cpu --warmup 2 --steps 3"
    row = {"kind": "baseline", "model": model, "mode": mode, "data": "baseline"}
    try:
        run([sys.executable, str(shown), *options.split()], deadline, 300)
        result = json.loads(out.read_text())
    except Exception as err:  # noqa: BLE001 - a failed baseline costs only its own ratio
        return {**row, "status": failed(err), "note": note(err)}
    figures = result["results"][model][mode]
    net = result.get("net", "torchvision")
    return {
        **row,
        "img_s": figures["img_s"],
        "mem": figures["peak_gib"] or None,  # none measured on a CPU
        "status": "ok",
        "note": f"plain PyTorch ({shown.name}, {net} nets, {result['device']})",
    }


def job_row(
    model: str,
    data: str,
    compiled: bool,
    shards: Path | None,
    sizes: Sizes,
    work: Path,
    deadline: Deadline,
    dry: bool,
) -> dict[str, Any]:
    name = f"gpu-{model}-{data}-{'compiled' if compiled else 'eager'}"
    # a fresh run each time: the same name would resume the last run's final checkpoint
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    steps = {"synthetic": sizes.steps, "split": sizes.split_steps}.get(data, sizes.data_steps)
    common = [
        f"checkpoint.storage={work / 'runs'}",
        "checkpoint.every_iters=0",
        "checkpoint.at_epoch_end=false",
        "tracking.enabled=false",
        "eval.every_iters=0",
        "eval.at_end=false",
        f"schedule.max_iters={steps}",
        "schedule.kind=step",  # throughput only: no validation to drive a plateau
        f"tracking.log_every={2 if dry else 5}",
        "scaling.num_workers=1",
        f"model.compile={'true' if compiled else 'false'}",
        f"name={name}",
        f"scaling.global_batch={sizes.batch}",
        f"data.image_size={sizes.image_size}",
        f"data.num_workers={sizes.workers}",
        "data.prefetch_factor=2",  # Sizes.split_steps counts on it
    ]
    if dry:
        lo = sizes.image_size + sizes.image_size // 8
        common += [f"data.scale_range=[{lo},{2 * lo}]", f"data.eval_resize={lo}"]
    if data == "synthetic":
        common += ["data.source=synthetic", "data.synthetic_classes=1000"]
    elif shards is None:
        raise RuntimeError("no shards: the shard stage failed (see above)")
    else:
        common += [f"data.url={shards}", f"data.decode={data}"]
    # the loop warns at each host sync between fetching a batch and the optimizer step
    out = run(
        [sys.executable, f"jobs/imagenet_{model}.py", "--local", *common],
        deadline,
        600,
        env={"ORCH_CUDA_SYNC_DEBUG": "1"},
        echo=BALANCER,
    )
    return measured(out, data)


def measured(out: str, data: str) -> dict[str, Any]:
    """A job's figures from its log: medians after warm-up, syncs by whose code made them."""
    # the loop's progress lines (orchestrator.metrics_window.progress_line)
    rates = [float(x) for x in re.findall(r"\b([\d.]+) img/s", out)]
    waits = [float(x) / 100 for x in re.findall(r"data wait (\d+)%", out)]
    mems = [float(x) for x in re.findall(r"GPU mem ([\d.]+) GiB", out)]
    keep = slice(2, None) if len(rates) > 3 else slice(-1, None)  # drop step 1 and warm-up
    windows = BALANCER.findall(out)
    share = f"{float(windows[-1][1]):.2f} ({len(windows)}w)" if windows else "unsettled"
    sites = sorted({f"{path}:{line}" for path, line in SYNC.findall(out)})
    ours = [s for s in sites if is_ours(s)]
    return {
        "img_s": statistics.median(rates[keep]),
        "wait": statistics.median(waits[keep]),
        "mem": max(mems, default=None),
        "share": share if data == "split" else None,
        "ours": len(ours),
        "torch": len(sites) - len(ours),
        "sites": sites,
        "status": "ok",
    }


def is_ours(site: str) -> bool:
    """A sync site in this checkout's code (not torch's, not another package's)."""
    path = site.rsplit(":", 1)[0]
    return "site-packages" not in path and (
        path.startswith((str(REPO), "orchestrator/", "jobs/", "bench/"))
    )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple]:
    """(data, mode) pairs of --runs, checked with the other options before anything runs."""
    if not args.baseline.is_file():
        parser.error(f"--baseline {args.baseline}: no such file")
    if not args.budget_s > 0:
        parser.error(f"--budget-s {args.budget_s}: must be a positive number of seconds")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))} (choose from r50, r152)")
    runs = []
    for entry in args.runs.split(","):
        data, _, mode = entry.partition(":")
        if data not in DATA or mode not in MODES:
            parser.error(
                f"--runs: {entry!r} is not data:mode with data in {', '.join(DATA)} and mode in "
                f"{', '.join(MODES)} (e.g. {RUNS.split(',')[0]})"
            )
        runs.append((data, mode))
    return runs


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[tuple]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the plumbing on a CPU at tiny sizes")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu-check")
    p.add_argument("--results", type=Path, help="the rows as JSON lines (default WORK/results)")
    p.add_argument("--models", default="r50,r152", help="comma-separated, of: r50, r152")
    p.add_argument("--runs", default=RUNS, help="data:mode pairs, most important first")
    p.add_argument(
        "--budget-s", type=float, default=480, help="the whole run ends by then (default 480)"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=BASELINE,
        help="the plain-PyTorch baseline script: plain_baseline.py's options and JSON",
    )
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the smoke child
    args = p.parse_args(argv)
    return args, check_args(p, args)


def main(argv: list[str] | None = None) -> None:
    args, runs = parse_args(argv)
    if args.smoke:
        smoke(args.work, args.dry_run)
        return
    deadline = Deadline(args.budget_s)
    sizes = DRY if args.dry_run else REAL
    args.work.mkdir(parents=True, exist_ok=True)
    results = Results(args.results or args.work / "results.jsonl")
    print(f"gpu_check: ends within {args.budget_s:.0f} s; rows also in {results.path}", flush=True)
    print("1/3 shards on local disk", flush=True)
    shards: Path | None = None
    try:
        shards = make_shards(args.work, sizes, deadline)
    except Exception as err:  # noqa: BLE001 - the synthetic rows need no shards
        print(f"  no shards ({failed(err)}): {note(err)}", flush=True)
    print(f"2/3 smoke (at most 60 s), {deadline.spent():.0f} s in", flush=True)
    results.header()
    row, found = smoke_row(args.work, args.dry_run, deadline)
    results.add(row)
    print(f"3/3 rows, most important first, {deadline.spent():.0f} s in", flush=True)
    measure_rows(args, runs, sizes, shards, deadline, results)
    summary(args, sizes, found, deadline, results)


def measure_rows(
    args: argparse.Namespace,
    runs: list[tuple],
    sizes: Sizes,
    shards: Path | None,
    deadline: Deadline,
    results: Results,
) -> None:
    bases: dict[tuple[str, str], float | None] = {}
    for data, wanted in runs:
        for model in args.models.split(","):
            compiled = wanted == "compiled" and not args.dry_run  # no torch.compile on a CPU
            mode = "compiled" if compiled else "eager"
            row = {"kind": "job", "model": model, "mode": mode, "data": data}
            if deadline.left() < 2:
                results.add({**row, "status": "SKIPPED", "note": "past --budget-s"})
                continue
            if (model, mode) not in bases:
                base = baseline_row(
                    args.baseline, model, mode, sizes, args.dry_run, args.work, deadline
                )
                results.add(base)
                bases[model, mode] = base.get("img_s")
            try:
                figures = job_row(
                    model, data, compiled, shards, sizes, args.work, deadline, args.dry_run
                )
            except Exception as err:  # noqa: BLE001 - one failed row must not hide the others
                results.add({**row, "status": failed(err), "note": note(err)})
                continue
            ref = bases[model, mode]
            ratio = figures["img_s"] / ref if ref else None
            wanted_note = "" if wanted == mode else "compiled on a GPU"
            results.add({**row, **figures, "ratio": ratio, "note": wanted_note})


def summary(
    args: argparse.Namespace,
    sizes: Sizes,
    found: dict,
    deadline: Deadline,
    results: Results,
) -> None:
    print(
        f"\ndevice: {found.get('device', 'unknown (the smoke stage failed)')}, torch "
        f"{found.get('torch', '?')}   baseline: {args.baseline.name}, same run, batch "
        f"{sizes.batch} at {sizes.image_size}px   total {deadline.spent():.0f} s "
        f"of {args.budget_s:.0f} s"
    )
    print(f"CPU JPEG decoder (the cpu rows): {found.get('cpu_decoder', 'unknown')}")
    print("host syncs between fetching a batch and the optimizer step (ORCH_CUDA_SYNC_DEBUG=1):")
    sites = {s for row in results.rows for s in row.get("sites", [])}
    for site in sorted(sites):
        print(f"  {'ours ' if is_ours(site) else 'torch'}  {site}")
    if not sites:
        print("  none" if not args.dry_run else "  not checked on a CPU")
    print(f"rows: {results.path}", flush=True)


if __name__ == "__main__":
    main()
