"""Index WebDataset shards that other tools wrote, where they lie: only a manifest is written.

    python datasets/index_shards.py SOURCE [SOURCE ...] [--dest URL] [--split NAME=GLOB ...]
        [--label-key cls | json:FIELD | txt] [--classes FILE] [--image-keys jpg,png,...]
        [--mean-image [--mean-samples N] [--seed S]]

SOURCE is a folder or s3:// prefix (every .tar below it), one shard, or a brace pattern
(`s3://bucket/imagenet1k-train-{0000..1023}.tar`). Each shard is streamed once, in parallel
(--workers), and never rewritten. What lands at --dest (default: the folder holding the shards):

    shards.index.json   per shard: its fingerprint (size + ETag on S3, size + mtime on disk), its
                        sample count, bytes, sha256, keys, label counts and bad samples; a rerun
                        re-reads only shards whose fingerprint changed, and writes nothing when
                        none did
    manifest.json       written last, the commit marker the loaders read: per split its shards
                        with sample count, bytes and sha256; the classes; the `layout` section
                        saying which members hold the image and the label; the bad samples
    mean_image.npy      with --mean-image: the train split's per-pixel mean image, computed as
                        datasets/imagenet.py computes it (datasets/pixel_mean.py: the same
                        centre views, the same seeded sample of --mean-samples keys), named in
                        the manifest's `mean_image` section, for data.normalize=per_pixel_mean;
                        each train shard holding a drawn image is streamed once more, in
                        parallel, decoding only those

A shard's split comes from its name (train, val/valid/validation, test, as a word of the name or
of a folder) or from --split NAME=GLOB. Labels come from `.cls` (a class number), a JSON member's
field, or a text member; numbers are class indices, anything else a class name, mapped through
--classes FILE (one name per line, or a JSON list) or else sorted, as torchvision's ImageFolder
does. A damaged image (it does not decode; --check header only parses headers) is counted and
named; the loaders skip and count it as they do any bad sample. Anything the loaders could not
read as intended (no label, keys out of order, class-sorted training shards) is refused with
the shard, the member and the flag that fixes it; so is a tar without the two zero blocks that
end every archive (a shard still being written: index it once its writer has closed it). The
loaders check each shard's sample count and sha256 against the manifest as they read it
(orchestrator/data/tar.py): a shard replaced after indexing stops the job until this is re-run.
Before any shard is read: every flag, the sources (a local path or s3://, the store answering)
and --dest (a probe object written and deleted) are checked, and a refusal exits 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import multiprocessing
import os
import re
import statistics
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pixel_mean
from destination import open_dest, readable_source, writable_store
from shard_reading import (
    Extract,
    ShardRef,
    expand,
    find_shards,
    index_shard,
    local_path,
    root_of,
    split_of,
)
from shardwriter import MANIFEST, ConversionError, log, progress, put_mean_image, run_cli

from orchestrator import s3, storage
from orchestrator.data.manifest import (
    IMAGE_EXTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_manifest,
)

INDEX = "shards.index.json"
INDEX_VERSION = 1
SORTED_SHARE = 0.9  # a training shard whose top class holds this share of it is class-sorted


# ---------------------------------------------------------------- the whole dataset


@dataclass
class Options:
    """The command line, checked."""

    sources: list[str]
    dest: str
    extract: Extract
    split_rules: list[tuple[str, str]]
    classes_file: str = ""
    num_classes: int = 0
    unlabeled: str = "refuse"  # or "bad": kept, and counted bad by the loaders
    allow_class_sorted: bool = False
    max_bad_fraction: float = 0.001
    workers: int = 1
    # --mean-image: its flags (mean_samples, mean_min_samples, seed, workers) and its view
    mean: argparse.Namespace | None = None
    mean_view: pixel_mean.CentreViewSum | None = None


def _read_classes(path: str) -> list[str]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConversionError(f"--classes {path}: {err.strerror or err}") from None
    if text.lstrip().startswith("["):
        classes = [str(c) for c in json.loads(text)]
    else:
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(classes)) != len(classes) or not classes:
        raise ConversionError(f"--classes {path}: names must be unique, one per line")
    return classes


def _load_index(store: storage.Storage, extract: Extract) -> dict[str, dict[str, Any]]:
    """The earlier run's entries by URL, if it read the shards the same way."""
    try:
        index = json.loads(store.get(INDEX))
    except (storage.NotFound, ValueError):
        return {}
    if index.get("version") != INDEX_VERSION or index.get("extract") != _jsonable(extract):
        return {}
    return {e["url"]: e for e in index.get("shards", [])}


def _jsonable(extract: Extract) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(extract)))


def _first(items: list[dict[str, str]]) -> str:
    return "; ".join(
        f"{b['shard']}: {b['key']}{'.' + b['member'] if b.get('member') else ''} ({b['reason']})"
        for b in items[:3]
    )


def _classes(opts: Options, entries: list[dict[str, Any]]) -> tuple[list[str], str]:
    """(class names, label kind) from the labels found and --classes / --num-classes."""
    raw = Counter[str]()
    for e in entries:
        raw.update(e["labels"])
    kind = "index" if all(re.fullmatch(r"-?\d+", v) for v in raw) else "name"
    named = _read_classes(opts.classes_file) if opts.classes_file else None
    if kind == "index":
        top = max((int(v) for v in raw), default=-1)
        n = opts.num_classes or (len(named) if named else top + 1)
        if named is not None and opts.num_classes and opts.num_classes != len(named):
            raise ConversionError(
                f"--num-classes {opts.num_classes} but --classes lists {len(named)} names"
            )
        for e in entries:
            wrong = sorted(int(v) for v in e["labels"] if not 0 <= int(v) < n)
            if wrong:
                raise ConversionError(
                    f"shard {e['name']} holds label {wrong[-1]}, outside 0..{n - 1} ({n} classes "
                    "from --num-classes, --classes or the largest label found): give the right "
                    "--num-classes or --classes"
                )
        return (named or [str(i) for i in range(n)]), kind
    classes = named or sorted(raw)
    known = set(classes)
    for e in entries:
        stray = sorted(v for v in e["labels"] if v not in known)
        if stray:
            raise ConversionError(
                f"shard {e['name']} holds class name {stray[0]!r}, which --classes "
                f"{opts.classes_file} does not list: add it there"
            )
    return classes, kind


def _refuse_unusable(opts: Options, entries: list[dict[str, Any]], total: int) -> None:
    """Everything the loaders could not read as intended, with the shard and the flag."""
    broken = [e for e in entries if e["error"]]
    if broken:
        raise ConversionError(
            f"{len(broken)} shards cannot be read, e.g. {broken[0]['name']}: "
            f"{broken[0]['error']}. Fix or replace them, or leave them out of SOURCE"
        )
    tangled = [e for e in entries if e["out_of_order"]]
    if tangled:
        e = tangled[0]
        raise ConversionError(
            f"shard {e['name']}: the members of sample {e['out_of_order'][0]!r} are not next to "
            "each other; WebDataset readers (this project's too) take a sample as a run of "
            "members sharing a key. Rewrite the shard with each sample's members together"
        )
    images = sum(sum(e["formats"].values()) for e in entries)
    if total and not images:
        bad = [b for e in entries for b in e["bad"]]
        raise ConversionError(
            f"no sample has an image member: {_first(bad)}. Name the image's member with "
            "--image-keys (e.g. --image-keys jpg,png)"
        )
    unlabeled = [u for e in entries for u in e["unlabeled"]]
    if unlabeled and opts.unlabeled == "refuse":
        u = unlabeled[0]
        raise ConversionError(
            f"{len(unlabeled)} samples have no label, e.g. shard {u['shard']}: sample "
            f"{u['key']!r}: {u['reason']}. Name the member holding the label with --label-key "
            "(cls, txt, json:FIELD), or pass --unlabeled bad to keep them as bad samples that "
            "the loaders skip and count"
        )


def _refuse_class_sorted(opts: Options, entries: list[dict[str, Any]], n: int) -> None:
    """Training shards that each hold one class would give the loader batches of one class:
    it mixes shards only through its shuffle buffer."""
    train = [e for e in entries if e["split"] == "train" and e["samples"]]
    if n < 2 or len(train) < 2 or opts.allow_class_sorted:
        return
    shares = [max(e["labels"].values(), default=0) / e["samples"] for e in train]
    if statistics.median(shares) >= SORTED_SHARE:
        e = train[shares.index(max(shares))]
        top = max(e["labels"], key=e["labels"].get)
        raise ConversionError(
            f"the training shards are sorted by class (shard {e['name']}: "
            f"{e['labels'][top]} of its {e['samples']} samples have label {top!r}): the loader "
            "mixes shards only through its shuffle buffer, so batches would hold one or two "
            "classes and BN statistics would be wrong. Re-shard with shuffling (e.g. unpack and "
            "convert with datasets/imagenet.py), or pass --allow-class-sorted to index them "
            "anyway"
        )


def _check_bad(opts: Options, bad: list[dict[str, str]], total: int) -> None:
    if len(bad) > opts.max_bad_fraction * total:
        raise ConversionError(
            f"{len(bad)} of {total} samples are bad, more than --max-bad-fraction="
            f"{opts.max_bad_fraction} allows. First: {_first(bad)}. Fix or replace those "
            "shards, or raise --max-bad-fraction. No manifest was written"
        )


def build_manifest(
    opts: Options, entries: list[dict[str, Any]], store: storage.Storage
) -> dict[str, Any]:
    """The manifest for `entries` (each with its split), after every check passed."""
    total = sum(e["samples"] for e in entries)
    _refuse_unusable(opts, entries, total)
    classes, kind = _classes(opts, entries)
    _refuse_class_sorted(opts, entries, len(classes))
    bad = [b for e in entries for b in e["bad"]]
    if opts.unlabeled == "bad":
        bad += [{**u, "member": opts.extract.label_key} for e in entries for u in e["unlabeled"]]
    _check_bad(opts, bad, total)
    splits: dict[str, dict[str, Any]] = {}
    for e in sorted(entries, key=lambda e: (e["split"], e["name"])):
        split = splits.setdefault(e["split"], {"samples": 0, "shards": [], "image_types": {}})
        split["samples"] += e["samples"]
        split["shards"].append({k: e[k] for k in ("name", "samples", "bytes", "sha256")})
        for fmt, count in e["formats"].items():
            split["image_types"][fmt] = split["image_types"].get(fmt, 0) + count
    layout = replace(opts.extract.layout(), label_kind=kind)
    return {
        "name": store.root.rstrip("/").rpartition("/")[2] or store.root,
        "format": "webdataset",
        "version": 1,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": {
            "indexed": opts.sources,
            "by": "datasets/index_shards.py",
            "check": opts.extract.check,
            "classes": opts.classes_file
            or ("sorted label names" if kind == "name" else "class indices"),
        },
        "classes": classes,
        "num_classes": len(classes),
        "layout": layout.to_manifest(),
        "splits": splits,
        "skipped": [],  # indexing skips nothing: bad samples stay in the shards, listed below
        "bad_samples": sorted(bad, key=lambda b: (b["shard"], b["key"])),
        "converted": [],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "mean_std_source": "ImageNet's usual values (indexed shards: not computed)",
    }


def _pool_map(workers: int, jobs: list[tuple[ShardRef, Extract]]) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(index_shard, jobs)
        return
    with multiprocessing.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(index_shard, jobs)


def index_dataset(opts: Options) -> dict[str, Any] | None:
    """Index the sources and write the manifest at opts.dest; None when nothing changed (and
    nothing was written)."""
    urls = [u for s in opts.sources for u in expand(s)]
    dest = opts.dest or root_of(urls)
    if not s3.is_s3(dest):
        dest = local_path(dest)
    # a probe written and deleted: a read-only store is refused before any shard is read
    store = writable_store(dest, "--dest" if opts.dest else "--dest (default: the shards' folder)")
    before = _refuse_foreign_manifest(store)
    refs = find_shards(urls, dest)
    split_for = {r.url: split_of(r.name, opts.split_rules) for r in refs}
    if opts.mean is not None and "train" not in split_for.values():
        raise ConversionError(
            f"--mean-image averages the train split, but none of the {len(refs)} shards is in "
            "it: name the training shards with --split train=GLOB"
        )
    earlier = _load_index(store, opts.extract)
    if opts.mean is not None:  # entries of an index written before keys were kept: read again
        earlier = {u: e for u, e in earlier.items() if "keys" in e}
    reuse = {
        r.url: earlier[r.url]
        for r in refs
        if r.url in earlier and earlier[r.url]["fingerprint"] == r.fingerprint
    }
    todo = [r for r in refs if r.url not in reuse]
    changed = [r.name for r in todo if r.url in earlier]
    log(
        f"{dest}: {len(refs)} shards, {len(reuse)} unchanged since the last index, "
        f"{len(changed)} changed, {len(todo) - len(changed)} new"
    )
    if changed:
        log(f"changed since the last index: {', '.join(changed[:5])}")
    if not todo and set(reuse) == set(earlier) and store.exists(MANIFEST):
        manifest = load_manifest(dest)
        if _same_outcome(manifest, opts, reuse, split_for):
            log(f"{dest}/{MANIFEST} is up to date: nothing written")
            return None
    entries = list(reuse.values())
    if todo:
        bar = progress(sum(r.size for r in todo), f"indexing {len(todo)} shards", unit="B")
        for entry in _pool_map(opts.workers, [(r, opts.extract) for r in todo]):
            entries.append(entry)
            bar.update(entry["size"])
        bar.close()
    for e in entries:
        e["split"] = split_for[e["url"]]
    manifest = build_manifest(opts, entries, store)
    manifest["source"]["options"] = _outcome_options(opts)
    if opts.mean is not None and opts.mean_view is not None:
        train = [(k, e["url"]) for e in entries if e["split"] == "train" for k in e["keys"]]
        image, note = pixel_mean.from_shards(
            train, opts.mean_view, opts.extract.image_keys, opts.mean
        )
        manifest["mean_image"] = put_mean_image(store, image, note)
    elif before and before.get("mean_image"):
        log(
            f"the earlier {MANIFEST} named a mean image; this run computes none (no "
            "--mean-image), so the new manifest names none: data.normalize=per_pixel_mean "
            "will refuse this dataset"
        )
    index = {
        "version": INDEX_VERSION,
        "extract": _jsonable(opts.extract),
        "shards": sorted(entries, key=lambda e: e["url"]),
    }
    store.put(INDEX, json.dumps(index).encode())
    store.put(MANIFEST, json.dumps(manifest, indent=1).encode())  # the commit marker
    for split, info in manifest["splits"].items():
        log(f"{split}: {info['samples']} samples in {len(info['shards'])} shards")
    log(
        f"wrote {dest}/{MANIFEST}: {manifest['num_classes']} classes, "
        f"{len(manifest['bad_samples'])} bad samples (train with data.url={dest})"
    )
    return manifest


def _refuse_foreign_manifest(store: storage.Storage) -> dict[str, Any] | None:
    """A manifest this tool did not write (a converted dataset's) is never replaced; returns
    the one it wrote before, if any."""
    try:
        manifest = json.loads(store.get(MANIFEST))
    except (storage.NotFound, ValueError):
        return None
    if manifest.get("source", {}).get("by") != "datasets/index_shards.py":
        raise ConversionError(
            f"{store.root} already has a {MANIFEST} that this tool did not write (a converted "
            "dataset needs no indexing): it is left as it is. Give another --dest"
        )
    return dict(manifest)


def _outcome_options(opts: Options) -> dict[str, Any]:
    """The options that shape the manifest beyond the shards' entries."""
    classes = Path(opts.classes_file).read_text() if opts.classes_file else ""
    return {
        "split_rules": [list(r) for r in opts.split_rules],
        "classes_sha256": hashlib.sha256(classes.encode()).hexdigest() if classes else "",
        "num_classes": opts.num_classes,
        "unlabeled": opts.unlabeled,
        "allow_class_sorted": opts.allow_class_sorted,
        "max_bad_fraction": opts.max_bad_fraction,
        "mean_image": None
        if opts.mean is None or opts.mean_view is None
        else {
            "samples": opts.mean.mean_samples,
            "min_samples": opts.mean.mean_min_samples,
            "seed": opts.mean.seed,
            "of": opts.mean_view.describe(),
        },
    }


def _same_outcome(
    manifest: dict[str, Any],
    opts: Options,
    entries: dict[str, dict[str, Any]],
    split_for: dict[str, str],
) -> bool:
    listed = {
        (split, s["name"], s["sha256"])
        for split, info in manifest["splits"].items()
        for s in info["shards"]
    }
    current = {(split_for[u], e["name"], e["sha256"]) for u, e in entries.items()}
    return listed == current and manifest.get("source", {}).get("options") == _outcome_options(opts)


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write a manifest for WebDataset shards that other tools wrote, so the "
        "loaders read them where they lie. The shards are read once and never rewritten.",
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a folder or s3:// prefix (every .tar below it), a shard, or a brace pattern "
        "such as s3://bucket/imagenet1k-train-{0000..1023}.tar",
    )
    p.add_argument(
        "--dest",
        default="",
        help="where manifest.json goes (default: the folder holding the shards); data.url of "
        "the jobs that train on them",
    )
    p.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="NAME=GLOB",
        help="shards matching GLOB (their name or path below the root) belong to split NAME; "
        "default: the word train, val/validation or test in the name",
    )
    p.add_argument(
        "--label-key",
        default="cls",
        help="the member holding the label: cls (a class number, default), txt (a number or a "
        "class name), or json:FIELD for a field of a JSON member (dotted for nested ones)",
    )
    p.add_argument(
        "--image-keys",
        default=",".join(IMAGE_EXTS),
        help=f"members that may hold the image, in order of preference ({','.join(IMAGE_EXTS)})",
    )
    p.add_argument(
        "--classes",
        default="",
        metavar="FILE",
        help="class names, one per line (line i = class i) or a JSON list; maps name labels to "
        "indices, names index labels",
    )
    p.add_argument("--num-classes", type=int, default=0, help="default: the largest label + 1")
    p.add_argument(
        "--unlabeled",
        choices=("refuse", "bad"),
        default="refuse",
        help="samples without a label: refuse (default) or keep them as bad samples",
    )
    p.add_argument(
        "--allow-class-sorted",
        action="store_true",
        help="index training shards that each hold (nearly) one class",
    )
    p.add_argument(
        "--check",
        choices=("decode", "header"),
        default="decode",
        help="decode each image to find damaged ones (default), or only parse its header",
    )
    p.add_argument("--max-bad-fraction", type=float, default=0.001)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    _add_mean_flags(p)
    return p


def _add_mean_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mean-image",
        action="store_true",
        help="also compute the train split's per-pixel mean image (the paper's per-pixel "
        "mean, for data.normalize=per_pixel_mean) as datasets/imagenet.py does: the same views "
        "and the same seeded sample; stored as mean_image.npy beside the manifest",
    )
    pixel_mean.add_arguments(
        p,
        "with --mean-image: train images the mean averages (a seeded sample, drawn as the "
        f"converter draws it; default {pixel_mean.DEFAULT_SAMPLES}; 0: every image)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="with --mean-image: the sample's seed (the converter's --seed draws the same "
        "images from the same keys; default 0)",
    )


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The command line, every flag checked before any shard is read."""
    p = _parser()
    a = p.parse_args(argv)
    _check_mean_flags(p, a)
    member, _, fld = a.label_key.partition(":")
    if not member or (member == "json") != bool(fld):
        raise ConversionError(
            f"--label-key {a.label_key!r}: expected cls, txt, or json:FIELD (the field is needed "
            "for a JSON member, and only there)"
        )
    rules = []
    for rule in a.split:
        name, _, glob = rule.partition("=")
        if not name or not glob:
            raise ConversionError(f"--split {rule!r}: expected NAME=GLOB, e.g. train='*train*'")
        rules.append((name, glob))
    keys = tuple(k.strip().lower().lstrip(".") for k in a.image_keys.split(",") if k.strip())
    if not keys or a.num_classes < 0 or not 0 <= a.max_bad_fraction <= 1 or a.workers < 1:
        raise ConversionError(
            "--image-keys must name a member, --num-classes be >= 0, --max-bad-fraction in "
            "0..1 and --workers >= 1"
        )
    for source in a.sources:  # a scheme the project reads, a store that answers: seconds
        readable_source(source, "SOURCE")
    if a.dest:
        open_dest(a.dest, "--dest")  # the scheme now; the probe write once the shards are listed
    if a.classes:
        _read_classes(a.classes)  # a typo found now, not after every shard was read
    return Options(
        sources=a.sources,
        dest=a.dest,
        extract=Extract(keys, member.lower(), fld, a.check),
        split_rules=rules,
        classes_file=a.classes,
        num_classes=a.num_classes,
        unlabeled=a.unlabeled,
        allow_class_sorted=a.allow_class_sorted,
        max_bad_fraction=a.max_bad_fraction,
        workers=a.workers,
        mean=a if a.mean_image else None,
        mean_view=pixel_mean.check_arguments(a) if a.mean_image else None,
    )


def _check_mean_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """A mean-image flag without --mean-image would be ignored: refused instead."""
    if a.mean_image:
        return
    given = [
        "--" + name.replace("_", "-")
        for name in ("mean_samples", "mean_min_samples", "mean_resize", "mean_size", "seed")
        if getattr(a, name) != p.get_default(name)
    ]
    if given:
        raise ConversionError(
            f"{', '.join(given)} shape the mean image, which only --mean-image computes: add "
            "--mean-image, or leave them out"
        )


def main(argv: Sequence[str] | None = None) -> None:
    index_dataset(parse_args(argv))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
