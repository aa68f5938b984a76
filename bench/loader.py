"""Input pipeline benchmark: our TrainLoader streaming shards from the local S3 store vs the
plain PyTorch recipe reading the same JPEGs from local disk.

    python -m orchestrator.stack up && eval $(python -m orchestrator.stack env)
    python bench/loader.py [--images 2000] [--workers N] [--batch 64] [--passes 3]

Setup (cached between runs): an ImageNet-layout JPEG set from `datasets/synthetic.py imagenet`
(about 500x375, quality 90) under --cache, converted by `datasets/imagenet.py` to shards at
s3://resnet/datasets/bench-loader.

Measured in one run, alternating, same worker count, same batch size, the paper's training
transform at 224 (shorter side ~U[256,480], random crop, flip):
  ours      TrainLoader(url=s3://...): streamed tar shards (the loader's own tar reader),
            only the crop box's rows and columns decoded (orchestrator/_jpeg_region.c; else
            simplejpeg; DCT-domain downscale where allowed), one torch resample of the box,
            batches built in the workers and handed over in reused shared buffers
            (orchestrator/data/batch_ring.py).
  baseline  a map-style Dataset over the JPEG files: Image.open().convert("RGB") (full decode,
            no draft), resize the whole image to the drawn shorter side, crop, flip (the
            torchvision recipe), default collate, torch DataLoader.
  decode bound   one core's full Pillow decode rate (no draft, no resize; per CPU second) x
            workers; the same with simplejpeg, the faster decoder ours uses, is printed too.
            The bound assumes each worker has a core to itself, so --workers defaults to one
            fewer than the cores: the main process and the S3 server need the last one (with
            as many workers as cores, every figure measures how the cores are shared).
  ours, unverified   the same TrainLoader with data.verify_shards=false: each pass also runs
            it, so the cost of checking every shard's sha256 as it streams shows as an img/s
            ratio and a CPU-ms difference; `digest` is sha256's own rate on a shard in memory,
            over the shard's images (the CPU the check adds per image, on one core).
Whole passes are timed (worker start-up included); img/s are medians over passes, and the
ratio is the median of the per-pass ratios (each pass runs ours and the baseline back to back,
so the pair sees the same background load). CPU time per image (this process and its
workers, from getrusage) is printed too: unlike img/s it hardly moves with other load. A longer
resampled pass samples each of our workers' RSS: flat first-vs-last-quarter peaks = no leak.
The machine's other load is printed: on a shared 2-core box every figure moves with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import io
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from orchestrator import s3
from orchestrator.data import DataConfig, DataError, TrainLoader, load_manifest, open_url
from orchestrator.data import transforms as T
from orchestrator.data.batch_ring import BatchRing
from orchestrator.data.tar import tar_files
from orchestrator.data.train_loader import build_batch
from orchestrator.storage import open_storage

REPO = Path(__file__).resolve().parent.parent  # datasets/*.py run as scripts, never imported

DEST = "s3://resnet/datasets/bench-loader"
STACK_HINT = "run `python -m orchestrator.stack up` and `eval $(python -m orchestrator.stack env)`"


def require_stack() -> None:
    """Exit with the fix if the object store is not configured or not answering."""
    if not s3.endpoint_url() or not os.environ.get("AWS_ACCESS_KEY_ID"):
        sys.exit(f"bench/loader.py needs the local S3 store: {STACK_HINT}")
    try:
        s3.client().head_bucket(Bucket="resnet")
    except Exception as err:  # noqa: BLE001 - any failure means the same fix
        sys.exit(f"bench/loader.py: S3 at {s3.endpoint_url()} not usable ({err}): {STACK_HINT}")


def prepare(images: int, cache: Path, classes: int = 10) -> tuple[Path, str]:
    """The JPEG folder and the shard URL, generated and converted only when missing."""
    per_class = -(-images // classes)
    src = cache / f"imagenet-{classes}x{per_class}"
    if not (src / "LOC_synset_mapping.txt").exists():
        print(f"generating {classes * per_class} JPEGs in {src} (once) ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                str(REPO / "datasets/synthetic.py"),
                "imagenet",
                "--out",
                str(src),
                "--classes",
                str(classes),
                "--train-per-class",
                str(per_class),
                "--val-per-class",
                "1",
                "--workers",
                str(os.cpu_count() or 1),
            ],
            check=True,
        )
    try:
        manifest = load_manifest(DEST)
        fresh = manifest.get("source", {}).get("src") == str(src)
    except DataError:
        fresh = False
    if not fresh:
        print(f"converting {src} to shards at {DEST} (once) ...", flush=True)
        root, _, name = DEST.rpartition("/")
        open_storage(root).delete_prefix(name)  # shards of an earlier source must not linger
        subprocess.run(
            [
                sys.executable,
                str(REPO / "datasets/imagenet.py"),
                "--src",
                str(src),
                "--dest",
                DEST,
                "--shard-size-mb",
                "16",
                "--workers",
                str(os.cpu_count() or 1),
            ],
            check=True,
        )
    return src, DEST


class JpegFolder(torch.utils.data.Dataset):
    """The baseline: plain PIL decode and the torchvision-style paper augmentation."""

    def __init__(self, root: Path, size: int = 224, scale_range: tuple[int, int] = (256, 480)):
        wnids = sorted(p.name for p in (root / "train").iterdir())
        self.items = [
            (p, c) for c, w in enumerate(wnids) for p in sorted((root / "train" / w).iterdir())
        ]
        self.size, self.scale_range = size, scale_range
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        im = Image.open(path).convert("RGB")
        rng = np.random.default_rng([self.epoch, i])
        s = int(rng.integers(self.scale_range[0], self.scale_range[1] + 1))
        rw, rh = T.resized_shape(*im.size, s)
        im = im.resize((rw, rh), Image.Resampling.BILINEAR)
        x0, y0 = int(rng.integers(0, rw - self.size + 1)), int(rng.integers(0, rh - self.size + 1))
        im = im.crop((x0, y0, x0 + self.size, y0 + self.size))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()), label


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (DataLoader workers, once joined)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed_pass(batches: Iterable[Any]) -> tuple[float, float, int, float]:
    """(wall seconds, CPU seconds, images, seconds to the first batch) of one whole pass,
    worker start-up included. The CPU time is what the pass costs whatever else the machine
    runs; wall time is not."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    n, first = 0, 0.0
    for _, labels in batches:
        first = first or time.perf_counter() - t0
        n += len(labels)
    wall = time.perf_counter() - t0
    gc.collect()  # the finished DataLoader iterator joins its workers: their CPU time counts
    return wall, cpu_seconds() - c0, n, first


def pillow_decode(data: bytes) -> Any:
    return Image.open(io.BytesIO(data)).convert("RGB")


def decode_rate(files: list[bytes], decode: Any = pillow_decode, seconds: float = 2.0) -> float:
    """One core: full decodes (no draft, no resize) per CPU second."""
    n, c0 = 0, time.process_time()
    while time.process_time() - c0 < seconds:
        decode(files[n % len(files)])
        n += 1
    return n / (time.process_time() - c0)


def stage_costs(files: list[bytes], n: int = 300) -> dict[str, float]:
    """CPU-ms per image of each stage of our transform on one core, beside Pillow's: where the
    time goes (docs/benchmarks.md quotes this line). our_transform_whole: the transform with
    whole-image decodes (no partial decoder)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    pil = Image.open(io.BytesIO(files[0])).convert("RGB")
    box = (10.0, 10.0, 310.0, 310.0)  # a ~300 px crop box, to 224: the paper's typical case
    arr = np.asarray(pil).copy()

    def whole_image_transform(d: bytes, i: int) -> None:
        """The same transform where the partial decoder is not built: whole-image decodes."""
        region, T._jpeg_region = T._jpeg_region, None
        try:
            T.paper_train(d, np.random.default_rng(i))
        finally:
            T._jpeg_region = region

    def per_image(fn: Any) -> float:
        c0 = time.process_time()
        for i in range(n):
            fn(files[i % len(files)], i)
        return (time.process_time() - c0) / n * 1e3

    sizes = [T.image_size(d) for d in files]
    plans = [T.plan_paper(*sizes[i % len(files)], np.random.default_rng(i)) for i in range(n)]
    costs = {
        "pillow_decode": per_image(lambda d, i: pillow_decode(d)),
        "our_decode": per_image(lambda d, i: T.decode(d)),
        "our_box_decode": per_image(lambda d, i: T.decode_box(d, plans[i], *sizes[i % len(files)])),
        "pillow_resample": per_image(lambda d, i: pil.resize((224, 224), Image.BILINEAR, box=box)),
        "our_resample": per_image(lambda d, i: T.resample(arr[10:310, 10:310], (224, 224))),
        "our_transform": per_image(lambda d, i: T.paper_train(d, np.random.default_rng(i))),
        "our_transform_whole": per_image(whole_image_transform),
    }
    torch.set_num_threads(threads)
    return costs


def tar_costs(shard: bytes) -> dict[str, float]:
    """CPU-ms per sample of splitting one shard (in memory) into its members: tarfile's stream
    mode (what the loader used before) vs the loader's own reader (`data._tar_files`)."""

    def with_tarfile() -> int:
        members = 0
        with tarfile.open(fileobj=io.BytesIO(shard), mode="r|", bufsize=64 << 10) as tar:
            for member in tar:
                if member.isfile():
                    tar.extractfile(member).read()
                    members += 1
        return members

    def ours() -> int:
        return sum(1 for _ in tar_files(io.BytesIO(shard)))

    costs = {}
    for name, read in (("tarfile_read", with_tarfile), ("our_tar_read", ours)):
        spent = []
        for _ in range(3):
            c0 = time.process_time()
            samples = read() / 2  # a .jpg and a .cls member each
            spent.append((time.process_time() - c0) / samples * 1e3)
        costs[name] = statistics.median(spent)
    return costs


def digest_cost(shard: bytes, images: int, rounds: int = 5) -> dict[str, float]:
    """sha256 over one shard in memory, in the 1 MiB pieces the loader reads: CPU-ms per image
    of the shard, and MB/s (one core; median of `rounds`)."""
    spent = []
    for _ in range(rounds):
        c0 = time.process_time()
        h = hashlib.sha256()
        for i in range(0, len(shard), 1 << 20):
            h.update(shard[i : i + (1 << 20)])
        h.hexdigest()
        spent.append(time.process_time() - c0)
    secs = max(statistics.median(spent), 1e-9)
    return {"digest_ms_per_image": secs / images * 1e3, "digest_mb_per_s": len(shard) / secs / 1e6}


class _Finished(torch.utils.data.IterableDataset):
    """Batches of already augmented 224 px images, made the way our workers make them."""

    def __init__(self, ring: BatchRing | None, batches: int, batch: int):
        self.ring, self.batches, self.batch = ring, batches, batch
        self.cfg = DataConfig(url="unused", num_workers=1)

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        writer = self.ring.writer(info.id) if self.ring is not None else None
        image = np.random.default_rng(0).integers(0, 256, (3, 224, 224), dtype=np.uint8)
        for _ in range(self.batches):
            yield build_batch([(image, 1, True)] * self.batch, self.cfg, writer), {}


def handoff_costs(batches: int = 150, batch: int = 64, rounds: int = 3) -> dict[str, float]:
    """CPU-ms per image (the worker and this process) of handing finished batches from one
    DataLoader worker to this process: `fresh`, a new shared-memory segment per batch (what
    torch's default collate does), vs `ring`, our reused buffers (orchestrator.data.batch_ring)."""
    costs: dict[str, list[float]] = {"fresh": [], "ring": []}
    for _ in range(rounds):
        for kind, spent in costs.items():
            ring = BatchRing(1, 4, (batch, 3, 224, 224)) if kind == "ring" else None
            loader = torch.utils.data.DataLoader(
                _Finished(ring, batches, batch), batch_size=None, num_workers=1
            )
            c0 = cpu_seconds()
            for (images, _), _ in loader:
                del images
            gc.collect()  # joins the worker: its CPU time counts
            spent.append((cpu_seconds() - c0) / (batches * batch) * 1e3)
            if ring is not None:
                ring.close()
    return {f"handoff_{k}": statistics.median(v) for k, v in costs.items()}


def worker_rss(stop: threading.Event, samples: dict[int, list[tuple[float, int]]]) -> None:
    """Sample the RSS of this process's children (the DataLoader workers) every 0.2 s."""
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        now = time.perf_counter()
        for child in me.children():
            try:
                samples.setdefault(child.pid, []).append((now, child.memory_info().rss))
            except psutil.Error:
                pass
        stop.wait(0.2)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=2000)
    p.add_argument(
        "--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="default: cores - 1"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--long-factor", type=int, default=3, help="long pass = this many x --images")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "resnet-orchestrator"
        / "bench-loader",
    )
    a = p.parse_args()
    require_stack()
    src, url = prepare(a.images, a.cache)

    cfg = DataConfig(url=url, num_workers=a.workers, shuffle_buffer=500, train_transform="paper")
    ours_loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=a.batch, seed=0)
    off_cfg = dataclasses.replace(cfg, verify_shards=False)
    off_loader = TrainLoader(off_cfg, rank=0, world_size=1, batch_size=a.batch, seed=0)
    folder = JpegFolder(src)
    baseline = torch.utils.data.DataLoader(
        folder, batch_size=a.batch, shuffle=True, num_workers=a.workers, prefetch_factor=2
    )
    jpegs = [path.read_bytes() for path, _ in folder.items[:200]]
    print(
        f"{len(folder)} images ({sum(map(len, jpegs)) / len(jpegs) / 1e3:.0f} KB avg), "
        f"{a.workers} workers, batch {a.batch}; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores",
        flush=True,
    )

    print(f"CPU JPEG decoder: {T.cpu_decoder()}")
    with open_url(ours_loader.shards[0].url) as f:
        shard = f.read()
    digest = digest_cost(shard, ours_loader.shards[0].samples)
    costs = {**stage_costs(jpegs), **tar_costs(shard), **handoff_costs()}
    print("one core, CPU-ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    ours, base, decode, ours_cpu, base_cpu, off, off_cpu = [], [], [], [], [], [], []
    for i in range(a.passes):  # alternate, so load from other processes hits both alike
        ours_loader.set_epoch(i)
        off_loader.set_epoch(i)
        if i % 2:  # unverified first on odd passes: neither side always reads a cold store
            secs_o, cpu_o, n_o, _ = timed_pass(off_loader)
        secs, cpu, n, first = timed_pass(ours_loader)
        if not i % 2:
            secs_o, cpu_o, n_o, _ = timed_pass(off_loader)
        ours.append(n / secs)
        ours_cpu.append(cpu / n * 1e3)
        off.append(n_o / secs_o)
        off_cpu.append(cpu_o / n_o * 1e3)
        folder.epoch = i
        secs_b, cpu_b, n_b, _ = timed_pass(baseline)
        base.append(n_b / secs_b)
        base_cpu.append(cpu_b / n_b * 1e3)
        decode.append(decode_rate(jpegs))
        print(
            f"pass {i}: ours {ours[-1]:.0f} img/s ({n} in {secs:.1f} s, first batch after "
            f"{first:.2f} s, {ours_cpu[-1]:.2f} CPU-ms/img), unverified {off[-1]:.0f} img/s "
            f"({off_cpu[-1]:.2f} CPU-ms/img), "
            f"baseline {base[-1]:.0f} img/s ({n_b} in {secs_b:.1f} s, "
            f"{base_cpu[-1]:.2f} CPU-ms/img), full decode alone {1e3 / decode[-1]:.2f} "
            f"CPU-ms/img; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )

    # a long pass for the memory trend of our workers
    long_cfg = DataConfig(
        url=url,
        num_workers=a.workers,
        shuffle_buffer=500,
        epoch_mode="resampled",
        samples_per_epoch=a.long_factor * len(folder),
    )
    long_loader = TrainLoader(long_cfg, rank=0, world_size=1, batch_size=a.batch, seed=1)
    stop, rss = threading.Event(), {}
    sampler = threading.Thread(target=worker_rss, args=(stop, rss), daemon=True)
    sampler.start()
    secs_long, _, n_long, _ = timed_pass(long_loader)
    stop.set()
    sampler.join()
    stats = long_loader.stats()
    trend = []
    for pid, points in sorted(rss.items()):
        if len(points) < 8:
            continue  # a short-lived helper, not a worker
        q = len(points) // 4
        first, last = max(r for _, r in points[:q]), max(r for _, r in points[-q:])
        trend.append(f"pid {pid}: {first / 2**20:.0f} -> {last / 2**20:.0f} MB")
    bound_long = statistics.median(decode) * a.workers
    print(
        f"long pass: {n_long} images at {n_long / secs_long:.0f} img/s "
        f"({n_long / secs_long / bound_long:.2f} of the decode bound), "
        f"{stats['bytes_per_s'] / 1e6:.1f} MB/s from S3; peak worker RSS first -> last quarter: "
        f"{'; '.join(trend) or 'n/a'}"
    )

    x, y, z = (
        statistics.median(ours),
        statistics.median(base),
        bound_long,  # the decode bound: one core's decode rate x workers
    )
    oc, bc = statistics.median(ours_cpu), statistics.median(base_cpu)
    dc = 1e3 / statistics.median(decode)
    # each pass pairs ours and the baseline a few seconds apart: the median of the paired
    # ratios is steadier than a ratio of medians when other processes come and go
    ratio = statistics.median(o / b for o, b in zip(ours, base, strict=True))
    print(
        f"CPU per image (workers + main process; the S3 server's not counted): ours {oc:.2f} "
        f"ms, baseline {bc:.2f} ms, full decode alone {dc:.2f} ms -> CPU ratio {bc / oc:.2f}, "
        f"ours/decode-bound by CPU {dc / oc:.2f}"
    )
    if T.simplejpeg is not None:  # the decoder ours uses: a higher bound, quoted beside
        fast = decode_rate(jpegs, lambda data: T.simplejpeg.decode_jpeg(data, colorspace="RGB"))
        print(
            f"simplejpeg full decode alone {1e3 / fast:.2f} CPU-ms/img: ours / its decode "
            f"bound = {x / (fast * a.workers):.2f}"
        )
    print(f"ours/decode-bound = {x / z:.2f} (target >= 0.8); ours/baseline target >= 1.5")
    print(
        f"loader: ratio={ratio:.2f} (ours {x:.0f} img/s, baseline {y:.0f} img/s, "
        f"decode bound {z:.0f} img/s)"
    )
    # the same pairing for the shard check: verified / unverified pass by pass
    v_ratio = statistics.median(o / u for o, u in zip(ours, off, strict=True))
    vc, uc = statistics.median(ours_cpu), statistics.median(off_cpu)
    print(
        f"shard verification: verified/unverified img/s ratio={v_ratio:.2f}; CPU per image "
        f"{vc:.2f} vs {uc:.2f} ms ({vc - uc:+.2f}); sha256 alone "
        f"{digest['digest_ms_per_image']:.3f} CPU-ms/img ({digest['digest_mb_per_s']:.0f} MB/s "
        f"on one core) = {digest['digest_ms_per_image'] / vc:.1%} of our CPU per image"
    )


if __name__ == "__main__":
    main()
