"""Indexing benchmark: datasets/index_shards.py on shards webdataset's ShardWriter wrote, against
a plain `tar tvf` listing of the same shards, in the same run.

    python bench/index.py [--images 1200] [--passes 3] [--cache /tmp/bench-index]

Setup (cached between runs): an ImageNet-layout JPEG set from `datasets/synthetic.py imagenet`
(500x375, quality 90, about ImageNet's mean size) under --cache, written by webdataset's
ShardWriter into 32 MB shards (keys jpg and cls, shuffled).

Each pass, back to back on the same files (all in the page cache, so both read at memory
speed and the figures are CPU):
  tar tvf     GNU tar listing every shard, one after another: the floor of reading the bytes
              and parsing every header, nothing decoded
  decode/1    the indexer with one worker process: every JPEG decoded at 1/8 scale (finds a
              damaged body), sha256 of every byte, labels counted
  decode/W    the same with --workers W (default: the cores)
  header/W    --check header: only the image headers parsed
The manifest and index are deleted before each indexer run, so every run reads every shard.
MB/s and img/s are medians over passes; "x tar tvf" is each run's time over tar tvf's in the
same pass, and the last line's ratio is decode/W's rate over tar tvf's (median of the passes).
The time for ImageNet (140 GB) is extrapolated from decode/1's per-process rate: the work is
one process per shard, so it scales with cores until storage bandwidth caps it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGENET_BYTES = 140e9  # ILSVRC2012 train + val as shards: about 140 GB of JPEGs
MB = 1e6


def _setup(cache: Path, images: int) -> Path:
    """Shards of `images` generated JPEGs, written by webdataset's ShardWriter (cached)."""
    shards = cache / f"wds-{images}"
    if (shards / "done").exists():
        return shards
    import webdataset as wds

    src = cache / f"src-{images}"
    per_class = max(1, images // 10)
    if not (src / "train").is_dir():
        subprocess.run(
            [sys.executable, str(ROOT / "datasets/synthetic.py"), "imagenet", "--out", str(src)]
            + ["--classes", "10", "--train-per-class", str(per_class), "--val-per-class", "1"]
            + ["--size", "500x375"],
            check=True,
        )
    files = sorted((src / "train").glob("*/*.JPEG"))
    wnids = sorted(p.name for p in (src / "train").iterdir())
    random.Random(0).shuffle(files)
    shards.mkdir(parents=True, exist_ok=True)
    pattern = str(shards / "train-%06d.tar")
    with wds.ShardWriter(pattern, maxsize=32_000_000, verbose=0) as sink:
        for f in files:
            sink.write(
                {"__key__": f.stem, "jpg": f.read_bytes(), "cls": wnids.index(f.parent.name)}
            )
    (shards / "done").touch()
    return shards


def _time(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def _tar_tvf(shards: list[Path]) -> float:
    t = time.perf_counter()
    for shard in shards:
        subprocess.run(["tar", "tvf", str(shard)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def _index(root: Path, *args: str) -> float:
    for name in ("manifest.json", "shards.index.json"):
        (root / name).unlink(missing_ok=True)
    return _time([sys.executable, str(ROOT / "datasets/index_shards.py"), str(root), *args])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache", type=Path, default=Path("/tmp/bench-index"))
    a = p.parse_args()
    root = _setup(a.cache, a.images)
    shards = sorted(root.glob("*.tar"))
    size = sum(s.stat().st_size for s in shards)
    count = a.images // 10 * 10
    w = str(a.workers)
    runs = {
        "tar tvf": lambda: _tar_tvf(shards),
        "decode/1": lambda: _index(root, "--workers", "1"),
        f"decode/{w}": lambda: _index(root, "--workers", w),
        f"header/{w}": lambda: _index(root, "--workers", w, "--check", "header"),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(a.passes):
        for name, run in runs.items():
            times[name].append(run())
    print(
        f"{len(shards)} shards, {size / MB:.0f} MB, {count} JPEGs; {a.passes} passes; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'run':<12}{'MB/s':>9}{'img/s':>9}{'x tar tvf':>11}")
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["tar tvf"], strict=True)]
        t = statistics.median(ts)
        print(
            f"{name:<12}{size / MB / t:>9.0f}{count / t:>9.0f}{statistics.median(ratios):>10.1f}x"
        )
    per_pass = [b / t for t, b in zip(times[f"decode/{w}"], times["tar tvf"], strict=True)]
    print(f"index: ratio={statistics.median(per_pass):.3f} (decode/{w} MB/s / tar tvf MB/s)")
    one = size / statistics.median(times["decode/1"])  # bytes/s of one indexing process
    print(f"ImageNet ({IMAGENET_BYTES / 1e9:.0f} GB) at decode/1's rate, one process per core:")
    for procs in (1, 2, 16, 64, 128):
        print(f"  {procs:>4} processes: {IMAGENET_BYTES / one / procs / 3600:7.2f} h")


if __name__ == "__main__":
    main()
