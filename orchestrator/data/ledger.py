"""The per-sample ledger (`data.ledger=true`): which samples every optimizer step trained on,
kept with the checkpoints, and the command that checks each epoch saw every sample once.

    ids = sample_ids(shard_offsets(counts), shards, indices)   # int64: position in the split
    ledger = Ledger(checkpoints_url, rank, attempt)            # attempt: rank 0's time_ns
    ledger.record(epoch, step, ids)                            # this rank's share of a step
    ledger.flush()                                             # at every save, before the marker
    report = read_ledger(checkpoints_url)                      # duplicates and drops per epoch

    python -m orchestrator.data.ledger s3://resnet/runs/r152/checkpoints [--split-size N]
    python -m orchestrator.data.ledger r152 [--storage s3://resnet/runs]   # a job name

A sample id is the sample's position in the manifest's order of the training split: the offset
of its shard (the samples of the split's shards before it) plus its index inside the shard.

Files: `{checkpoints}/ledger/steps-FIRST-LAST.attempt-A.rank-R.npz`, one per rank per flush,
holding `steps`, `epochs`, `offsets` (step i's ids are ids[offsets[i]:offsets[i+1]]), `ids` and
`meta` (JSON: the split size, the epoch mode and the world size where the trainer gave them).
They lie outside the step folders, so checkpoint retention never deletes them; ids take 8 bytes
a sample, so an ImageNet epoch is about 10 MB of ledger.

Reading, attempt by attempt: an attempt resumed from a commit and trained again what followed
it, so an attempt's entries count only up to the first step any newer attempt wrote (its
resume point): for every step the newest attempt that wrote it wins, and the steps an older
attempt trained past a newer one's resume point are dropped even where the newer one has not
got that far yet (they belong to weights that were thrown away). Ranks are joined per step.

The split size (for drops) is, in this order: `--split-size`; the `meta` of the ledger files;
the training split of the dataset named by the spec in the newest committed checkpoint's
trainer.pt (this reads the whole trainer.pt and needs torch). Without one, drops are not
counted, and the report says so. An epoch counts as complete when a later epoch has steps, when
every sample was seen, or when the newest commit marker's position stands at its end; drops of
an epoch still in progress are not counted. In resampled mode (shards drawn with replacement)
repeats are expected and drops do not apply: both are reported, neither fails the check.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.cli import run_cli
from orchestrator.errors import OrchestratorError, UsageError
from orchestrator.storage import Storage, open_storage

log = logging.getLogger(__name__)
FOLDER = "ledger"  # under the job's checkpoint folder, beside the step-NNNNNNNN folders
NAME = re.compile(r"steps-(\d+)-(\d+)\.attempt-(\d+)\.rank-(\d+)\.npz")


class LedgerError(UsageError, ValueError):
    """A ledger that cannot be read or checked: the message names the URL and the fix."""


# ---------------------------------------------------------------------------- sample ids


def shard_offsets(counts: Sequence[int]) -> np.ndarray:
    """int64 [len(counts)]: the split position of each shard's first sample (manifest order)."""
    c = np.asarray(counts, dtype=np.int64)
    out = np.zeros(len(c), dtype=np.int64)
    np.cumsum(c[:-1], out=out[1:])
    return out


def sample_ids(offsets: np.ndarray, shards: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """int64 ids of samples given by (shard index in the split's list, index in the shard)."""
    return offsets[np.asarray(shards, dtype=np.int64)] + np.asarray(indices, dtype=np.int64)


# ---------------------------------------------------------------------------- writing


def file_name(first: int, last: int, attempt: int, rank: int) -> str:
    """One flush's file name: the steps it covers, the attempt and the rank that wrote it."""
    return f"steps-{first:010d}-{last:010d}.attempt-{attempt}.rank-{rank:05d}.npz"


class Ledger:
    """One rank's ledger of one training attempt: `record` keeps each optimizer step's sample
    ids in memory, `flush` writes them as one file and forgets them."""

    def __init__(
        self,
        root_url: str,
        rank: int,
        attempt: int,
        *,
        split_size: int = 0,
        epoch_mode: str = "exact",
        world_size: int = 0,
        steps_per_epoch: int = 0,
    ) -> None:
        """`root_url`: the job's checkpoint folder; `attempt`: the same on every rank of one
        training attempt, larger for a later one (rank 0's time_ns, broadcast). The optional
        `split_size`, `epoch_mode`, `world_size` and `steps_per_epoch` go into every file, so
        the reader needs neither the spec nor the dataset, tells a missing rank's file, and
        knows an epoch ended even when its last step dropped a sample."""
        if rank < 0 or attempt < 0:
            raise ValueError(f"Ledger: rank {rank} and attempt {attempt} must be >= 0")
        self.storage = open_storage(root_url)
        self.rank, self.attempt = rank, attempt
        self.meta = {
            "split_size": split_size,
            "epoch_mode": epoch_mode,
            "world_size": world_size,
            "steps_per_epoch": steps_per_epoch,
        }
        self.last_written: str | None = None  # the URL of the newest file flush wrote
        self._steps: list[int] = []
        self._epochs: list[int] = []
        self._ids: list[np.ndarray] = []

    def record(self, epoch: int, step: int, ids: Any) -> None:
        """This rank's samples of optimizer step `step` (Trainer.step after it: 1 for the first)
        of `epoch`. Several calls for one step (micro-batches) add up."""
        arr = np.array(ids, dtype=np.int64).ravel()  # a copy: the caller may reuse its buffer
        if self._steps and step == self._steps[-1]:
            if epoch != self._epochs[-1]:
                raise ValueError(
                    f"ledger: step {step} recorded in epochs {self._epochs[-1]} and {epoch}"
                )
            self._ids[-1] = np.concatenate([self._ids[-1], arr])
            return
        if self._steps and step < self._steps[-1]:
            raise ValueError(f"ledger: step {step} recorded after step {self._steps[-1]}")
        self._steps.append(int(step))
        self._epochs.append(int(epoch))
        self._ids.append(arr)

    def flush(self) -> None:
        """Write what was recorded since the last flush as one file under `ledger/`, then
        forget it; nothing to write, no file. A failed write raises (after the storage's
        retries): a checkpoint whose steps the ledger lacks would read as drops later."""
        if not self._steps:
            return
        sizes = np.array([len(a) for a in self._ids], dtype=np.int64)
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        buf = io.BytesIO()
        np.savez(
            buf,
            steps=np.array(self._steps, dtype=np.int64),
            epochs=np.array(self._epochs, dtype=np.int64),
            offsets=offsets,
            ids=np.concatenate(self._ids),
            meta=np.array(json.dumps(self.meta)),
        )
        name = file_name(self._steps[0], self._steps[-1], self.attempt, self.rank)
        self.storage.put(f"{FOLDER}/{name}", buf.getvalue())
        self.last_written = self.storage.url(FOLDER, name)
        self._steps, self._epochs, self._ids = [], [], []


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LedgerFile:
    name: str
    first: int
    last: int
    attempt: int
    rank: int


@dataclass
class EpochReport:
    """One epoch's steps and samples, joined over ranks, newest attempt per step."""

    epoch: int
    steps: list[int]
    samples: int  # ids recorded, repeats included
    duplicates: int  # distinct ids seen more than once
    out_of_range: int  # ids outside 0..split_size-1 (a wrong split size, or a bug)
    drops: int | None  # ids of range(split_size) never seen; None: not counted (`no_drops`)
    complete: bool
    no_drops: str = ""  # why drops are not counted

    def line(self, mode: str) -> str:
        first, last = (self.steps[0], self.steps[-1]) if self.steps else (0, -1)
        out = f"epoch {self.epoch}: steps {first}-{last} ({len(self.steps)} steps), "
        out += f"{self.samples} samples, "
        if mode == "resampled":
            out += f"{self.duplicates} drawn more than once (resampled: with replacement)"
        else:
            out += f"{self.duplicates} duplicates"
        if self.out_of_range:
            out += f", {self.out_of_range} ids outside the split"
        return out + (f", {self.drops} drops" if self.drops is not None else f"; {self.no_drops}")


@dataclass
class LedgerReport:
    """What `read_ledger` found; `ok` is the command's verdict, `lines` its output."""

    root: str
    mode: str  # exact or resampled
    split_size: int  # 0: unknown
    epochs: list[EpochReport]
    gaps: list[tuple[int, int]]  # step ranges no kept ledger entry covers, inclusive
    uncommitted: tuple[int, int] | None  # kept steps after the newest commit
    attempts: dict[int, tuple[int, int]]  # attempt -> (first, last) step it counts for
    notes: list[str] = field(default_factory=list)

    @property
    def complete_epochs(self) -> list[EpochReport]:
        return [e for e in self.epochs if e.complete]

    @property
    def duplicates(self) -> int:
        return 0 if self.mode == "resampled" else sum(e.duplicates for e in self.epochs)

    @property
    def drops(self) -> int:
        return sum(e.drops or 0 for e in self.epochs)

    @property
    def out_of_range(self) -> int:
        return sum(e.out_of_range for e in self.epochs)

    @property
    def ok(self) -> bool:
        """No duplicate (exact mode), no drop, no id outside the split."""
        return not (self.duplicates or self.drops or self.out_of_range)

    def summary(self) -> str:
        """The last line: `ledger: every sample once per epoch in E/E epochs (0 duplicates, 0
        drops)` (exact mode), or what resampled mode can say."""
        if self.mode == "resampled":
            return (
                f"ledger: {len(self.epochs)} resampled epochs (shards drawn with replacement): "
                "duplicates and drops not applicable"
                + (f"; {self.out_of_range} ids outside the split" if self.out_of_range else "")
            )
        done = self.complete_epochs
        good = sum(1 for e in done if not (e.duplicates or e.drops or e.out_of_range))
        return (
            f"ledger: every sample once per epoch in {good}/{len(done)} epochs "
            f"({self.duplicates} duplicates, {self.drops} drops)"
        )

    def lines(self) -> list[str]:
        out = [f"ledger of {self.root}: {len(self.attempts)} attempt(s)"]
        for attempt, (first, last) in sorted(self.attempts.items()):
            out.append(f"  attempt {attempt}: counts for steps {first}-{last}")
        out += [f"note: {n}" for n in self.notes]
        out += [e.line(self.mode) for e in self.epochs]
        out += [f"gap: steps {a}-{b} have no ledger entry" for a, b in self.gaps]
        if self.uncommitted:
            a, b = self.uncommitted
            out.append(
                f"uncommitted: steps {a}-{b} are after the newest commit (a resume "
                "trains them again)"
            )
        return [*out, self.summary()]


def list_files(storage: Storage) -> list[LedgerFile]:
    """The ledger files under `ledger/`; other names there are said once and skipped."""
    found = []
    for name in storage.list_files(FOLDER):
        m = NAME.fullmatch(name)
        if m is None:
            log.warning("ledger: skipping %s: not a ledger file name", storage.url(FOLDER, name))
            continue
        first, last, attempt, rank = (int(g) for g in m.groups())
        found.append(LedgerFile(name, first, last, attempt, rank))
    return found


def attempt_cuts(files: Sequence[LedgerFile]) -> dict[int, int | None]:
    """attempt -> the first step it no longer counts for (the earliest first step of any newer
    attempt, its resume point), or None for the newest attempt."""
    starts: dict[int, int] = {}
    for f in files:
        starts[f.attempt] = min(f.first, starts.get(f.attempt, f.first))
    cuts: dict[int, int | None] = {}
    for attempt in starts:
        later = [s for a, s in starts.items() if a > attempt]
        cuts[attempt] = min(later) if later else None
    return cuts


def _load(storage: Storage, f: LedgerFile) -> dict[str, Any]:
    url = storage.url(FOLDER, f.name)
    try:
        with np.load(io.BytesIO(storage.get(f"{FOLDER}/{f.name}")), allow_pickle=False) as z:
            data = {k: z[k] for k in ("steps", "epochs", "offsets", "ids")}
            data["meta"] = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (OSError, ValueError, KeyError) as err:
        raise LedgerError(
            f"ledger file {url} is unreadable ({err}): delete it to check the "
            "rest (its steps then read as a gap)"
        ) from err
    if len(data["offsets"]) != len(data["steps"]) + 1:
        raise LedgerError(
            f"ledger file {url}: {len(data['offsets'])} offsets for {len(data['steps'])} steps"
        )
    return data


@dataclass
class _Facts:
    """What checking needs besides the ids: the split size and mode, and the newest commit."""

    split_size: int = 0
    mode: str = ""
    steps_per_epoch: int = 0  # 0: unknown
    committed_step: int = 0
    done_epoch: int = -1  # the newest commit's position is at or past this epoch's end
    notes: list[str] = field(default_factory=list)


def _epoch_report(
    epoch: int, steps: set[int], chunks: list[np.ndarray], later: bool, facts: _Facts
) -> EpochReport:
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    n = facts.split_size
    inside = uniq[(uniq >= 0) & (uniq < n)] if n else uniq
    out_of_range = int(len(uniq) - len(inside)) if n else int((uniq < 0).sum())
    complete = (
        later
        or epoch <= facts.done_epoch
        or bool(n and len(inside) == n)
        or bool(facts.steps_per_epoch and len(steps) >= facts.steps_per_epoch)
    )
    drops, why = None, ""
    if facts.mode == "resampled":
        why = "drops not applicable (resampled: shards drawn with replacement)"
    elif not n:
        why = "drops not counted (split size unknown: pass --split-size N)"
    elif not complete:
        why = "in progress (the ledger ends mid-epoch): drops not counted"
    else:
        drops = n - len(inside)
    return EpochReport(
        epoch, sorted(steps), len(ids), int((counts > 1).sum()), out_of_range, drops, complete, why
    )


def read_ledger(root_url: str, split_size: int | None = None) -> LedgerReport:
    """Check the ledger of the job whose checkpoint folder is `root_url`: per epoch, the steps,
    samples, duplicates and drops, newest attempt per step, ranks joined."""
    storage = open_storage(root_url)
    files = list_files(storage)
    if not files:
        raise LedgerError(
            f"no ledger files under {storage.url(FOLDER)}: was the job run with "
            "data.ledger=true, and is this its checkpoint folder?"
        )
    cuts = attempt_cuts(files)
    files.sort(key=lambda f: (f.first, f.attempt, f.rank))
    facts: _Facts | None = None
    open_epochs: dict[int, tuple[set[int], list[np.ndarray]]] = {}
    reports: list[EpochReport] = []
    kept: set[int] = set()
    attempts: dict[int, tuple[int, int]] = {}
    flushes: dict[tuple[int, int, int], set[int]] = {}  # (attempt, first, last) -> ranks
    world: dict[int, int] = {}  # attempt -> world size its files state (0: not stated)
    for f in files:
        cut = cuts[f.attempt]
        if cut is not None and f.first >= cut:
            continue  # wholly superseded: a newer attempt resumed before it
        data = _load(storage, f)
        flushes.setdefault((f.attempt, f.first, f.last), set()).add(f.rank)
        world[f.attempt] = max(world.get(f.attempt, 0), int(data["meta"].get("world_size") or 0))
        if facts is None:
            facts = _facts(storage.root, data["meta"], split_size)
        steps, epochs, offsets, ids = data["steps"], data["epochs"], data["offsets"], data["ids"]
        rows = np.nonzero(steps < cut)[0] if cut is not None else np.arange(len(steps))
        if not len(rows):
            continue
        for i in rows:
            step, epoch = int(steps[i]), int(epochs[i])
            entry = open_epochs.setdefault(epoch, (set(), []))
            entry[0].add(step)
            entry[1].append(ids[offsets[i] : offsets[i + 1]])
            kept.add(step)
        lo, hi = attempts.get(f.attempt, (int(steps[rows[0]]), int(steps[rows[-1]])))
        attempts[f.attempt] = (min(lo, int(steps[rows[0]])), max(hi, int(steps[rows[-1]])))
        # kept steps form one timeline, epochs rising with steps: an epoch below this file's
        # first one is finished, and no later file adds to it
        low = int(epochs[rows].min())
        for e in sorted(k for k in open_epochs if k < low):
            reports.append(_epoch_report(e, *open_epochs.pop(e), True, facts))
    if facts is None:  # every file superseded: cannot happen, the newest attempt is never cut
        raise LedgerError(f"{storage.url(FOLDER)}: no ledger entry survives the attempt rule")
    for e in sorted(open_epochs):
        reports.append(_epoch_report(e, *open_epochs[e], e < max(open_epochs), facts))
    for (attempt, first, last), ranks in sorted(flushes.items()):
        if len(ranks) < world[attempt]:
            missing = sorted(set(range(world[attempt])) - ranks)
            facts.notes.append(
                f"steps {first}-{last} of attempt {attempt}: no file from "
                f"rank(s) {missing} of {world[attempt]}"
            )
    newest, committed = max(kept), facts.committed_step
    uncommitted = (committed + 1, newest) if committed and newest > committed else None
    gaps = _gaps(kept, max(newest, committed))
    return LedgerReport(
        storage.root,
        facts.mode,
        facts.split_size,
        reports,
        gaps,
        uncommitted,
        attempts,
        facts.notes,
    )


def read_steps(root_url: str) -> dict[int, np.ndarray]:
    """step -> the global batch's sample ids in canonical order (ranks joined in rank order),
    newest attempt per step: to compare two runs' sample sequences step by step."""
    storage = open_storage(root_url)
    files = list_files(storage)
    cuts = attempt_cuts(files)
    parts: dict[int, dict[int, np.ndarray]] = {}  # step -> rank -> ids
    for f in sorted(files, key=lambda f: (f.attempt, f.first)):  # newer attempts overwrite
        cut = cuts[f.attempt]
        data = _load(storage, f)
        for i, step in enumerate(data["steps"].tolist()):
            if cut is None or step < cut:
                ids = data["ids"][data["offsets"][i] : data["offsets"][i + 1]]
                parts.setdefault(step, {})[f.rank] = ids
    return {
        step: np.concatenate([ranks[r] for r in sorted(ranks)])
        for step, ranks in sorted(parts.items())
    }


def _gaps(kept: set[int], last: int) -> list[tuple[int, int]]:
    """Inclusive step ranges in 1..last with no kept entry (steps count from 1)."""
    out, start = [], None
    for step in range(1, last + 1):
        if step not in kept and start is None:
            start = step
        elif step in kept and start is not None:
            out.append((start, step - 1))
            start = None
    if start is not None:
        out.append((start, last))
    return out


# ---------------------------------------------------------------------------- split size, mode


def _facts(root: str, meta: dict[str, Any], split_size: int | None) -> _Facts:
    """The split size and mode (`--split-size`, the files' meta, else the newest checkpoint's
    spec) and where the newest commit stands; each source used is said in the notes."""
    from orchestrator.checkpoint import CheckpointStore

    facts = _Facts()
    committed = CheckpointStore(root).committed()
    if committed:
        newest = committed[-1]
        facts.committed_step = newest.step
        pos = newest.position
        if "epoch" in pos:
            from orchestrator.data.epochs import at_epoch_boundary

            started = pos.get("step_in_epoch", pos.get("batch_in_epoch", 0)) > 0
            at_end = started and at_epoch_boundary(pos)
            facts.done_epoch = int(pos["epoch"]) - (0 if at_end else 1)
    else:
        facts.notes.append(f"no committed checkpoint under {root}")
    meta_size, meta_mode = int(meta.get("split_size") or 0), str(meta.get("epoch_mode") or "")
    facts.split_size, facts.mode = meta_size, meta_mode
    facts.steps_per_epoch = int(meta.get("steps_per_epoch") or 0)
    if split_size is not None:
        if meta_size and meta_size != split_size:
            facts.notes.append(f"--split-size {split_size} overrides the ledger's {meta_size}")
        facts.split_size = split_size
    if (not facts.split_size or not facts.mode) and committed:
        size, mode = _from_spec(committed[-1].url, facts.notes)
        facts.split_size = facts.split_size or size
        facts.mode = facts.mode or mode
    if not facts.mode:
        facts.mode = "exact"
        facts.notes.append("epoch mode unknown (no meta, no checkpoint): taken as exact")
    return facts


def _from_spec(url: str, notes: list[str]) -> tuple[int, str]:
    """(training split size, epoch mode) from the spec in checkpoint `url`'s trainer.pt; (0,
    "") where it cannot be read, with the reason in `notes`."""
    from orchestrator.checkpoint_refs import read_trainer_state
    from orchestrator.data.manifest import load_manifest, split_shards

    try:
        spec = read_trainer_state(url, f"checkpoint {url}")["spec"]
        data = spec["data"]
        mode = str(data.get("epoch_mode") or "exact")
        shards = split_shards(load_manifest(data["url"]), data["url"], data["train_split"])
    except (OrchestratorError, KeyError, TypeError) as err:  # the report goes on, saying why
        notes.append(f"split size not found from {url}/trainer.pt ({type(err).__name__}: {err})")
        return 0, ""
    size = sum(s.samples for s in shards)
    notes.append(
        f"split size {size} and mode {mode} from the spec in {url}/trainer.pt "
        f"({data['url']}, split {data['train_split']})"
    )
    return size, mode


# ---------------------------------------------------------------------------- the command


def resolve_target(target: str, storage: str) -> str:
    """A checkpoints URL (s3://... or a folder) as given; a bare job name under `storage`."""
    from orchestrator.checkpoint_refs import job_checkpoints_url

    if "://" in target or "/" in target or Path(target).exists():
        return target
    return job_checkpoints_url(storage, target)


def _main(argv: list[str]) -> int:
    from orchestrator.spec import CheckpointConfig

    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.data.ledger",
        description="Check a job's sample ledger (data.ledger=true): every sample once per "
        "epoch. Exit 1 on any duplicate or drop.",
    )
    parser.add_argument(
        "target",
        help="the job's checkpoints URL (s3://... or a folder) or its name (under --storage)",
    )
    parser.add_argument(
        "--storage",
        default=CheckpointConfig().storage,
        help="checkpoint.storage a job name is looked up under (default: %(default)s)",
    )
    parser.add_argument(
        "--split-size",
        type=int,
        default=None,
        metavar="N",
        help="samples in the training split (default: from the ledger files, "
        "else from the newest checkpoint's spec)",
    )
    args = parser.parse_args(argv)
    if args.split_size is not None and args.split_size < 1:
        raise LedgerError(f"--split-size {args.split_size}: must be >= 1")
    report = read_ledger(resolve_target(args.target, args.storage), args.split_size)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
