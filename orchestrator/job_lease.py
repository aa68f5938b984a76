"""One writer per job: a lease object in the job's checkpoint folder, `<checkpoints>/LEASE`.

A second submission of a live job would share its checkpoint folder and MLflow run: each
one's clean-up deleting the other's uploads, each commit listing the other's files. So the
driver of a job (launch: `--local` and Ray alike, a study's trial too) and of a study take the
lease before any worker starts, renew it from a thread every RENEW_S and release it when the
job ends, whether it succeeded or failed; a crashed driver's lease expires TTL_S after its last
renewal. A second driver finds the lease held and is refused (LeaseHeld: exit 2), naming the
holder (its Ray job and cluster, or its process, its host, since when) and how to take over.

    with job_lease(spec, take_over=False):   # LeaseHeld if a live driver holds it
        ...                                  # renewed in the background; released on exit

The writes are conditional (`storage.put_if`: S3's If-None-Match / If-Match, a lock file on a
local folder), so of two drivers that start at once exactly one gets the lease; each reads its
lease back too, which settles it on a store that ignores the conditions. Expiry is measured by
the store's own clock (the object's age, `storage.Versioned.age_s`), never by comparing the
holder's clock with the reader's. A lease is free before it expires where its holder is
provably gone: released, its process on this host is gone, or its Ray job on this Ray cluster
has ended; or by `--take-over` (the operator knows it is gone: a live holder finds its lease
taken at its next renewal and stops).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

from orchestrator.checkpoint_refs import spec_checkpoints_url
from orchestrator.errors import UsageError
from orchestrator.storage import open_storage

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)

LEASE = "LEASE"  # the object's name in the folder it guards
TTL_S = 120.0  # a lease not renewed for this long (by the store's clock) is free
RENEW_S = 30.0  # how often the holder renews it: four renewals may fail before it expires
RETRY_S = 5.0  # after a failed renewal (a store outage), try again this soon
ENDED = ("FAILED", "STOPPED", "SUCCEEDED")  # Ray job states of a driver that is gone


class LeaseHeld(UsageError, RuntimeError):
    """A live driver holds the lease: the message names it and how to take over a dead one."""


def this_owner() -> dict[str, Any]:
    """Who is asking: host and pid, and the Ray job and cluster where Ray is connected (Ray job
    ids repeat across clusters; the cluster's session name does not)."""
    owner: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ctx = ray.get_runtime_context()
        owner.update(ray_job=ctx.get_job_id(), ray_cluster=ctx.get_session_name())
    return owner


def describe(holder: dict[str, Any]) -> str:
    """The holder in words: its Ray job and cluster, or its process, and its host."""
    where = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("ray_job"):
        return f"Ray job {holder['ray_job']} (cluster {holder.get('ray_cluster', '?')}), {where}"
    return where


def process_gone(holder: dict[str, Any]) -> str | None:
    """Why the holder is gone, if it ran on this host and its process no longer exists."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"its process {pid} on this host is gone"
    except PermissionError:
        pass  # another user's live process
    return None


def ray_job_ended(holder: dict[str, Any]) -> str | None:
    """Why the holder is gone, if it was a Ray job of the cluster this process is connected to
    and Ray says that job has ended; None where that cannot be known."""
    ray = sys.modules.get("ray")
    job = holder.get("ray_job")
    if not job or ray is None or not ray.is_initialized():
        return None
    if holder.get("ray_cluster") != ray.get_runtime_context().get_session_name():
        return None  # another cluster (or none recorded): its job ids mean other jobs here
    try:
        from ray.util.state import list_jobs

        states = {j.job_id: str(j.status) for j in list_jobs(limit=10_000) if j.job_id}
    except Exception as err:  # noqa: BLE001 - no state API: expiry decides
        log.info("Ray's job states not read (%s): the lease's expiry decides", err)
        return None
    state = states.get(job, "")
    return f"its Ray job {job} ended {state}" if state in ENDED else None


def _now_text() -> str:
    # for the reader only: nothing compares this with another machine's clock
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Lease:
    """The lease object `LEASE` in `folder`, for `what` ("job NAME", "study NAME").

    `acquire` takes it or raises LeaseHeld; as a context manager it is renewed every renew_s
    from a daemon thread and released on exit. `on_lost(message)` is called once should the
    holder find at a renewal that another driver has taken it (expired, or `--take-over`)."""

    def __init__(
        self,
        folder: str,
        what: str,
        *,
        ttl_s: float = TTL_S,
        renew_s: float = RENEW_S,
        on_lost: Callable[[str], None] | None = None,
        retake_own_ray_job: bool = False,
    ) -> None:
        self.store = open_storage(folder)
        # a holder of this same Ray job (on this cluster) is an earlier attempt of this driver:
        # a study's trial that Tune restarts after its actor was lost (Tune runs one attempt of
        # a trial at a time, and the study's own lease keeps other submissions of it out)
        self.retake_own_ray_job = retake_own_ray_job
        self.url, self.what = self.store.url(LEASE), what
        self.ttl_s, self.renew_s, self.on_lost = ttl_s, renew_s, on_lost
        self.token = uuid.uuid4().hex
        self.owner: dict[str, Any] = {}
        self.since = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, state: str = "held") -> bytes:
        body = {"what": self.what, "token": self.token, "state": state, "since": self.since}
        return json.dumps({**body, **self.owner, "ttl_s": self.ttl_s}).encode()

    def acquire(self, take_over: bool = False) -> Self:
        """Take the lease: create it, or replace one whose holder is gone (`free_because`);
        raises LeaseHeld naming a live holder."""
        self.owner, self.since = this_owner(), _now_text()
        for _ in range(5):  # each pass loses only to a driver that took it meanwhile
            current = self.store.read_versioned(LEASE)
            if current is None:
                written = self.store.put_if(LEASE, self._body(), None)
                holder: dict[str, Any] = {}
            else:
                holder = _parse(current.data)
                why = self.free_because(holder, current.age_s, take_over)
                if why is None:
                    raise LeaseHeld(self.held_message(holder, current.age_s))
                written = self.store.put_if(LEASE, self._body(), current.version)
            if written is not None and self._still_mine():
                if current is not None and holder.get("state") != "released":
                    log.warning(
                        "%s: took over its lease %s from %s (since %s): %s",
                        self.what,
                        self.url,
                        describe(holder),
                        holder.get("since", "?"),
                        why,
                    )
                return self
        raise LeaseHeld(f"{self.what}: its lease {self.url} changed hands 5 times while read")

    def free_because(
        self, holder: dict[str, Any], age_s: float, take_over: bool = False
    ) -> str | None:
        """Why a lease whose holder is `holder`, last written `age_s` ago, may be taken; None
        while its holder may be alive."""
        ttl = float(holder.get("ttl_s", self.ttl_s))
        if holder.get("state") == "released":
            return "released"
        if age_s > ttl:
            return f"expired: not renewed for {age_s:.0f} s (its lease lasts {ttl:.0f} s)"
        why = process_gone(holder) or ray_job_ended(holder)
        if why:
            return why
        if self.retake_own_ray_job and same_ray_job(holder, self.owner):
            return "an earlier attempt under this Ray job (a study's trial restarted by Tune)"
        return "--take-over" if take_over else None

    def held_message(self, holder: dict[str, Any], age_s: float) -> str:
        ttl = float(holder.get("ttl_s", self.ttl_s))
        return (
            f"{self.what} is already running: its lease {self.url} is held by "
            f"{describe(holder)} since {holder.get('since', '?')}, renewed {age_s:.0f} s ago. "
            "A second driver would write the same checkpoints and MLflow run. If that driver "
            f"is dead, resubmit once its lease has expired (at most {max(0.0, ttl - age_s):.0f} "
            "s from now, unless it renews it), or now with --take-over (only if you know it is "
            "gone: a live holder finds its lease taken at its next renewal and stops)"
        )

    def _still_mine(self) -> bool:
        """Read the lease back: ours, or another driver's write won."""
        current = self.store.read_versioned(LEASE)
        return current is not None and _parse(current.data).get("token") == self.token

    def renew(self) -> bool:
        """Rewrite the lease over its current version if it is still ours; False if another
        driver holds it now. Store errors propagate (the caller retries)."""
        current = self.store.read_versioned(LEASE)
        if current is None or _parse(current.data).get("token") != self.token:
            return False
        # refused or not, reading it back decides: a retried write of ours, or another's takeover
        self.store.put_if(LEASE, self._body(), current.version)
        return self._still_mine()

    def release(self) -> None:
        """Mark the lease released if it is still ours; never raises (a job's end must not
        fail on it: an unreleased lease expires)."""
        try:
            current = self.store.read_versioned(LEASE)
            if current is not None and _parse(current.data).get("token") == self.token:
                self.store.put_if(LEASE, self._body("released"), current.version)
        except Exception as err:  # noqa: BLE001
            log.warning(
                "%s: lease %s not released (%s): it expires by itself", self.what, self.url, err
            )

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._beat, name="job-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.release()

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(RETRY_S if failing else self.renew_s):
            try:
                held = self.renew()
            except Exception as err:  # noqa: BLE001 - a store outage: retried soon
                if not failing:
                    log.warning(
                        "%s: lease %s not renewed (%s); retrying every %.0f s (it expires %.0f "
                        "s after the last renewal)",
                        self.what,
                        self.url,
                        err,
                        RETRY_S,
                        self.ttl_s,
                    )
                failing = True
                continue
            failing = False
            if not held:
                message = (
                    f"{self.what}: its lease {self.url} was taken by another driver (it "
                    "expired, or --take-over): two writers must not share a job"
                )
                log.error(message)
                if self.on_lost is not None:
                    self.on_lost(message)
                return


def _parse(data: bytes) -> dict[str, Any]:
    try:
        found = json.loads(data)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def job_lease(
    spec: JobSpec,
    take_over: bool = False,
    on_lost: Callable[[str], None] | None = None,
    retake_own_ray_job: bool = False,
) -> Lease:
    """The job's lease, taken (LeaseHeld if a live driver holds it); `with` it to renew and
    release it."""
    lease = Lease(
        spec_checkpoints_url(spec),
        f"job {spec.name}",
        on_lost=on_lost,
        retake_own_ray_job=retake_own_ray_job,
    )
    return lease.acquire(take_over)


def same_ray_job(holder: dict[str, Any], me: dict[str, Any]) -> bool:
    """Whether `holder` and `me` (this_owner) are one Ray job on one cluster."""
    return bool(me.get("ray_job")) and (holder.get("ray_job"), holder.get("ray_cluster")) == (
        me["ray_job"],
        me.get("ray_cluster"),
    )


def study_lease(storage: str, study: str, take_over: bool = False) -> Lease:
    """A study's lease, `{checkpoint.storage}/studies/{study}/LEASE`, taken."""
    folder = f"{storage.rstrip('/')}/studies/{study}"
    return Lease(folder, f"study {study}").acquire(take_over)
