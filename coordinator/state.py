"""The coordinator's state machine: peer registry, jobs and synchronous rounds.

Deterministic and free of I/O: every method takes ``now_ms`` from the caller and returns what
changed; the caller (``coordinator.service``) persists, wakes waiters and logs. ``now_ms`` is a
monotonic clock: every lease, deadline and grace period is measured on it, so a step of the wall
clock changes none of them. Timestamps shown to people (``*_unix_ms`` in the API: created,
updated, committed, evictions, epochs) are ``now_ms + wall_offset_ms``, which the caller keeps
up to date. Timers are not carried across a restart: :meth:`ClusterState.restore` starts every
lease and deadline afresh. Round rules:

- A job starts when at least ``min_peers`` live peers are idle; it takes them all (up to its
  shard count) in registration order as the ring of epoch 1.
- Round ``r`` commits when every member of the current epoch reported ``r`` with the same digest.
- A member that leaves (evicted, or reported broken by a neighbour) bumps the epoch; only its
  shards move; round ``r`` is re-issued to the survivors from the parameters of ``r - 1``.
- Idle live peers join a running job at the next round boundary (a new epoch).
- Pools: a job runs only on peers of its pool (``JobSpec.pool``; ``dml-peer --pool``, and
  "default" for a job or a peer that names none, as Slurm's default partition: a job without a
  pool never takes a named pool's peers, so a job on that pool submitted after it is not
  starved), is offered to no other peer for a take, and takes at most ``max_peers`` members
  when that is set; idle peers go to the waiting jobs of their pool in submission order (a job
  that cannot start with the idle ones holds none of them back), and return to their pool when
  their job ends. Jobs whose peers differ run at the same time. A pending job's reason counts
  its pool's idle peers and names the jobs holding the others.
- A peer registering at the address of a registered one replaces it (a restart): the old one is
  evicted as for any other cause.
- A member that cannot reach a neighbour does not get it evicted on its word: the job keeps the
  links its members reported broken and decides from all of them (``coordinator.partitions``):
  the ring is re-formed around a broken link when it can be, and a peer nobody can reach (or
  that reaches nobody) is *held out*: it leaves the ring (cause UNREACHABLE), stays registered,
  its heartbeats tell it why, and it is not admitted to that job again while the job has
  ``min_peers`` without it: each try of a dead address costs the ring two re-issued rounds. A
  job short of peers tries it again, ``HOLD_OUT_RETRY_MS`` after its hold-out at the soonest,
  twice as long after each further one (a transient fault must not stall a small job for good).
  It comes back at once when it registers again (a restart, with a fixed address perhaps).
- Takes: a job submitted without its shard sizes (every job the coordinator accepts: it never
  loads a task's data) is first *taken*. An idle peer is offered the oldest job that needs
  peers and that it has not taken (:meth:`ClusterState.take_for`); it loads the task and
  answers (:meth:`ClusterState.take`): READY with what it found of the data (the first READY
  take fixes the job's data, its shard sizes and, when the job gave none, its batch size; a
  later one must find the same data, else the peer is refused the job), DECLINED (it is not
  offered the job again until it registers again; the reason shows in the job's status), or
  TASK_ERROR (the task failed there: the job fails with the task's error). Only peers that took
  a job are admitted to its rings. A task error during a round fails the job the same way.
- Peer-local data (``placement="local"``): a job is offered only to peers offering its
  ``local_data`` (``dml-peer --data NAME=PATH``); each READY take brings the peer's own data (its
  sample and label counts only) as a shard of its own, keyed by (address, data digest); each
  member holds and is allocated only its own shard; one that leaves takes its data with it and
  nothing moves; a joiner brings its data at the next round boundary (docs/architecture.md).
- Below ``min_peers`` the job waits and says why; after ``peer_grace_s`` it fails.
- Shards are placed by measured samples/s and never past a member's ``--max-samples`` cap
  (``coordinator.planner``). What the caps cannot hold is left unassigned, and the job's reason
  says how much; a joiner is admitted for it even when the ring is as wide as the shard count.
  A job whose members hold no data at all runs no round: it waits for a peer with room.
- A round running past ``round_deadline_ms`` evicts the members that did not report (or, if
  none did, is re-issued under a new epoch).
- Sample ledger: each round is allocated contiguous ranges of each member's shards (continuing
  each shard's committed cursor: pass and position); a commit advances the cursors and records
  the ranges, a re-issued round re-allocates from the committed cursors, so every sample is used
  exactly once per pass in committed rounds whatever failed.

Gossip jobs (``aggregation="gossip"``) have no barrier until their last round. In the gossip
phase every member runs its own numbered steps: it is given one step's samples from its own
shards, trains, averages with one partner of its choosing (peer to peer; the coordinator is not
involved), and reports; the report advances its shards' cursors and the next step is issued at
once. Nobody waits for anybody. Every ``gossip.peers`` reported steps (the members at the start)
make one *virtual round* in the history, with the mean of the members' latest test metrics and
the estimated consensus distance, so status, progress and plots read the same as for a ring job.
After ``(rounds - 1) * gossip.peers`` steps the phase ends and round ``rounds`` runs as a normal
synchronous ring round from each member's own parameters: one exact average, committed with
equal digests and checkpointed, which ``dml model`` serves. Membership works as in ring jobs
(heartbeat eviction moves only the dead member's shards; idle peers join at once and start from
the seeded model with weight 0, so their first exchange adopts their partner's parameters). A
member that holds its step past the round deadline is evicted. The ledger is at-least-once in
this phase: a member that dies mid-step may already have averaged what it trained into a
partner, and its samples are trained again by whoever takes its shards.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import replace
from typing import Any, TypeVar

from dml.common import version
from dml.common.spec import DEFAULT_POOL, MAX_SAMPLES_PER_ROUND, JobSpec
from dml.common.task import DEFAULT_BATCH_SIZE
from dml.coordinator import partitions, placement, planner, utilisation
from dml.coordinator.records import (
    CANCELLED,
    FAILED,
    FINISHED,
    HEARTBEAT_TIMEOUT,
    MAX_JOB_EVENTS,
    PENDING,
    PROTOCOL_MISMATCH,
    QUARANTINED,
    REPLACED,
    ROUND_DEADLINE,
    RUNNING,
    SELF_REPORT,
    SUCCEEDED,
    UNREACHABLE,
    BadReport,
    BrokenLink,
    Changes,
    DataUsage,
    Eviction,
    Exclusion,
    Forbidden,
    GossipWindow,
    Job,
    JobData,
    MembershipEpoch,
    NotFound,
    PeerRecord,
    Quarantine,
    Report,
    RoundRecord,
    Stale,
    check_report,
    check_usage,
    job_pool,
    max_samples,
    peer_workers,
    peer_pool,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# The ReportFailure kind (dml.v1.FailureKind without its prefix) that quarantines; LOCAL (an
# error: the reporter gives up its place) and UNREACHABLE take the paths above it.
POISONED = "POISONED"
TASK = "TASK"  # the FailureKind of a task's own error during a round: the job fails with it

# A take's outcome (dml.v1.TakeOutcome without its prefix).
READY, DECLINED, TASK_ERROR = "READY", "DECLINED", "TASK_ERROR"
MAX_TASK_ERROR_CHARS = 2000  # of a task's error kept in a failed job's reason

MAX_DIGEST_MISMATCHES = 3
MAX_REISSUES = 50  # a round re-issued this often without committing fails the job
HOLD_OUT_RETRY_MS = 120_000  # a held-out peer is tried again no sooner, doubling with each hold-out
MAX_HOLD_OUT_RETRY_MS = 3_600_000


class ClusterState:
    """Peers and jobs. A job's shard sizes are given at submit time: nothing here loads data."""

    def __init__(self, peer_timeout_ms: int, round_deadline_ms: int = 120_000) -> None:
        self.peer_timeout_ms = peer_timeout_ms
        self.round_deadline_ms = round_deadline_ms
        self.peers: dict[str, PeerRecord] = {}
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._doomed: set[str] = set()
        # What each peer's accepted reports say it did in the last minute (not stored: the
        # times are this process's monotonic clock).
        self.activity: dict[str, deque[utilisation.Activity]] = {}
        self.wall_offset_ms = 0  # Unix ms minus now_ms: the caller sets it from its clocks

    def wall_ms(self, now_ms: int) -> int:
        """``now_ms`` (monotonic) as Unix ms, for timestamps people read."""
        return now_ms + self.wall_offset_ms

    def restore(self, jobs: list[Job], peers: list[PeerRecord], now_ms: int) -> None:
        """Replaces every job and peer with stored ones (at start-up, or to undo a change the
        store refused), timers started afresh from ``now_ms``: a stored monotonic time means
        nothing to this process, and the time the coordinator could not serve is nobody's fault.
        Every peer gets a lease of two timeouts (their reconnects back off), each round and
        gossip step its whole deadline, each waiting job its whole grace period, each held-out
        peer its whole wait before a retry."""
        self.jobs = {j.job_id: j for j in jobs}
        self.peers = {}
        self._doomed = set()
        for j in jobs:
            if j.state != RUNNING:
                continue
            j.round_started_ms = now_ms
            j.waiting_since_ms = now_ms if j.waiting_since_ms else 0
            j.gossip.issued_ms = {m: now_ms + self.peer_timeout_ms for m in j.gossip.issued_ms}
            j.gossip.window.start_ms = now_ms
            seen: dict[str, int] = {}
            for x in j.held_out:  # each hold-out's wait before a retry, counted from now
                before = seen[x.peer_id] = seen.get(x.peer_id, -1) + 1
                x.retry_ms = now_ms + min(HOLD_OUT_RETRY_MS * 2 ** before, MAX_HOLD_OUT_RETRY_MS)
            if j.reissues >= MAX_REISSUES:
                self._doomed.add(j.job_id)
        for p in peers:
            p.last_seen_ms = now_ms + self.peer_timeout_ms
            job = self.jobs.get(p.job_id)
            if job is None or job.state != RUNNING or p.peer_id not in job.members:
                p.job_id = ""
            self.peers[p.peer_id] = p

    # -- ids --------------------------------------------------------------------------------
    def _new_id(self, prefix: str, taken: dict[str, Any], now_ms: int) -> str:
        while True:
            cand = f"{prefix}-{self.wall_ms(now_ms) % 10**8:08d}-{next(self._ids)}"
            if cand not in taken:
                return cand

    # -- peers ------------------------------------------------------------------------------
    def register(self, address: str, capability: dict[str, Any], now_ms: int, token_hash: str = "",
                 public_key: str = "", protocol_version: int = version.PROTOCOL_VERSION) -> tuple[str, Changes]:
        """Adds a peer (with the hash of the credential issued to it, its public key, hex, and
        the protocol version it registered with); returns its id. A registered peer at the same
        address is stale (that peer restarted, or its container came back at the same
        host:port): it is removed first, evicted from its job as ``REPLACED``, its shards moving
        as for any eviction."""
        changes = Changes()
        for old in [p.peer_id for p in self.peers.values() if p.address == address]:
            log.warning("peer %s: a new peer registered at its address %s; replacing it", old, address)
            changes = changes | self.remove_peer(old, now_ms, REPLACED, detail=f"a new peer registered at {address}")
        pid = self._new_id("peer", self.peers, now_ms)
        self.peers[pid] = PeerRecord(pid, address, capability, self.wall_ms(now_ms), now_ms, token_hash=token_hash,
                                     public_key=public_key, protocol_version=protocol_version)
        return pid, changes | Changes(peers=(pid,)) | self.schedule(now_ms)

    def evict_other_protocols(self, protocol_version: int, now_ms: int) -> Changes:
        """Evicts every peer registered with another protocol version than ``protocol_version``
        (``PROTOCOL_MISMATCH``), its shards moving as for any eviction: at start-up, for a
        coordinator restarted on another release under running peers. Restored, they would
        never register again, and so never be told; evicted, their next call registers again
        and is refused with the reason."""
        changes = Changes()
        for p in [p for p in self.peers.values() if p.protocol_version != protocol_version]:
            why = (f"registered with {version.describe(p.protocol_version)}; the coordinator now speaks "
                   f"{version.describe(protocol_version)}")
            log.warning("peer %s %s; evicting it", p.peer_id, why)
            changes = changes | self.remove_peer(p.peer_id, now_ms, PROTOCOL_MISMATCH, detail=why)
        return changes

    def heartbeat(self, peer_id: str, now_ms: int) -> tuple[str, int]:
        """Renews a lease; returns the peer's job and its epoch (("", 0) if idle; see also
        :meth:`held_out_reason`)."""
        p = self._peer(peer_id)
        p.last_seen_ms = now_ms
        job = self.jobs.get(p.job_id)
        return (job.job_id, job.epoch) if job else ("", 0)

    def held_out_reason(self, peer_id: str) -> str:
        """Why a running job holds the peer out of its rings ("" when none does)."""
        p = self._peer(peer_id)
        job = self.jobs.get(p.held_out_job)
        return p.held_out_reason if job is not None and job.state == RUNNING else ""

    def _peer(self, peer_id: str) -> PeerRecord:
        p = self.peers.get(peer_id)
        if p is None:
            raise NotFound(f"peer {peer_id} is not registered (evicted or unknown); register again")
        return p

    def extend_leases(self, by_ms: int, now_ms: int) -> None:
        """Starts every peer's lease ``by_ms`` later, but not past ``now_ms`` (and never earlier
        than it started): the coordinator could hear no heartbeat for that long (it stalled),
        which is no peer's silence."""
        for p in self.peers.values():
            p.last_seen_ms = max(p.last_seen_ms, min(p.last_seen_ms + by_ms, now_ms))

    def expire(self, now_ms: int) -> Changes:
        """Evicts peers silent for longer than the peer timeout, enforces round deadlines and
        fails jobs that waited for peers longer than their grace period."""
        dead = [p.peer_id for p in self.peers.values() if now_ms - p.last_seen_ms > self.peer_timeout_ms]
        changes = Changes()
        for pid in dead:
            p = self.peers[pid]
            silent = now_ms - p.last_seen_ms
            if not p.job_id and p.held_out_reason:  # in no ring any more: only its registration goes
                log.warning("peer %s (%s) silent for %d ms; forgetting it", pid, p.held_out_reason, silent)
            else:
                log.warning("peer %s: no heartbeat for %d ms, evicting", pid, silent)
            changes = changes | self.remove_peer(pid, now_ms, HEARTBEAT_TIMEOUT, detail=f"no heartbeat for {silent} ms")
        for jid in sorted(self._doomed):
            job = self.jobs[jid]
            if job.state == RUNNING:
                changes = changes | self._finish(job, FAILED, job.reason, now_ms)
        self._doomed.clear()
        for job in list(self.jobs.values()):
            if job.state != RUNNING:
                continue
            if job.gossip.active and self.active(job):
                stuck = [m for m in job.members if now_ms - job.gossip.issued_ms.get(m, now_ms) > self.round_deadline_ms]
                for pid in stuck:
                    why = f"held gossip step {job.gossip.step.get(pid, 0)} past the deadline of {self.round_deadline_ms} ms"
                    log.warning("job %s: peer %s %s; evicting", job.job_id, pid, why)
                    changes = changes | self.remove_peer(pid, now_ms, ROUND_DEADLINE, detail=why)
            elif self.active(job) and now_ms - job.round_started_ms > self.round_deadline_ms:
                changes = changes | self._round_overdue(job, now_ms)
            elif job.waiting_since_ms and self._retry_due(job, now_ms) and (tried := self.schedule(now_ms)).jobs:
                changes = changes | tried  # a held-out peer tried again (else the grace period runs on)
            elif job.waiting_since_ms and now_ms - job.waiting_since_ms > job.spec.peer_grace_s * 1000:
                changes = changes | self._finish(
                    job, FAILED, f"only {len(job.members)} of {job.spec.min_peers} peers for "
                    f"{job.spec.peer_grace_s}s (peer grace period); last committed round {job.committed_round}", now_ms)
        return changes

    def _round_overdue(self, job: Job, now_ms: int) -> Changes:
        laggards = [m for m in job.members if m not in job.reports]
        if job.reports and laggards:
            log.warning("job %s round %d: deadline of %d ms passed; evicting %s, which did not report",
                        job.job_id, job.round, self.round_deadline_ms, laggards)
            changes = Changes()
            why = f"had not reported round {job.round} when its deadline of {self.round_deadline_ms} ms passed"
            for pid in laggards:
                changes = changes | self.remove_peer(pid, now_ms, ROUND_DEADLINE, detail=why)
            return changes
        self._new_epoch(job, now_ms, f"round deadline of {self.round_deadline_ms} ms passed with no report")
        return Changes(jobs=(job.job_id,))

    def remove_peer(self, peer_id: str, now_ms: int, cause: str, reporter: str = "", detail: str = "") -> Changes:
        """Evicts a peer for ``cause`` (one of ``EVICTION_CAUSES``); its job records the eviction
        and re-forms the ring without it."""
        p = self.peers.pop(peer_id, None)
        self.activity.pop(peer_id, None)
        if p is None:
            return Changes()
        changes = Changes(removed_peers=(peer_id,))
        for j in self.jobs.values():  # a peer that registers again takes again
            if j.state not in FINISHED and peer_id in j.ready:
                j.ready.remove(peer_id)
                changes = changes | Changes(jobs=(j.job_id,))
        job = self.jobs.get(p.job_id)
        if job is not None:
            changes = changes | self._leave(job, peer_id, cause, reporter, detail, now_ms)
        return changes | self.schedule(now_ms)

    def _leave(self, job: Job, peer_id: str, cause: str, reporter: str, detail: str, now_ms: int) -> Changes:
        """Takes a peer out of a job's membership (recorded as an eviction for ``cause``); the
        ring re-forms without it and only its shards move."""
        if peer_id in job.holders:
            job.holders = [h for h in job.holders if h != peer_id]
        if job.state != RUNNING or peer_id not in job.members:
            return Changes()
        _keep_recent(job.evictions, Eviction(peer_id, cause, reporter, self.wall_ms(now_ms), job.epoch, job.round,
                                             detail))
        job.evictions_total += 1
        sizes = job.shard_sizes
        job.members = [m for m in job.members if m != peer_id]
        if job.local:  # its data leaves with it: nothing moves
            job.assignment = {m: s for m, s in job.assignment.items() if m != peer_id}
        elif job.members:
            job.assignment = planner.remove_peers(job.assignment, {peer_id}, sizes, self._capacity(job, job.members),
                                                  self._caps(job.members), **self._data_limits(job, job.members))
        else:
            job.assignment = {}
        self._new_epoch(job, now_ms, f"peer {peer_id} left")
        return Changes(jobs=(job.job_id,))

    def report_failure(self, reporter: str, job_id: str, rnd: int, epoch: int, suspect: str, now_ms: int,
                       detail: str = "", kind: str = "", refused: str = "") -> Changes:
        """A member's exchange of (round, epoch) failed (``detail``: what it saw; ``kind``: a
        FailureKind name without its prefix, "" for unspecified). Naming itself, the reporter
        gives up its place (a local failure). Naming another member (UNREACHABLE, or
        unspecified), it does not get it evicted on its word: the link is recorded and the job's
        broken links decide (:meth:`_unreachable`). Without a suspect the round is re-issued under
        a new epoch so nobody waits on an exchange that cannot finish. Stale reports are ignored.
        ``refused`` is the coordinator's own evidence ("" when none): it found nothing listening
        at the suspect's address, a second witness that holds it out at once. Forbidden when the
        reporter never was a member of the job, or (for the current epoch) names a live peer
        outside it. POISONED: see :meth:`_report_poison`."""
        self._peer(reporter).last_seen_ms = now_ms
        job = self.jobs.get(job_id)
        if job is None:
            return Changes()
        self.check_member(job, reporter)
        if (suspect and suspect != reporter and suspect in self.peers and suspect not in job.members
                and job.state == RUNNING and not job.gossip.active and (rnd, epoch) == (job.round, job.epoch)):
            raise Forbidden(f"suspect {suspect} is not a member of job {job_id} epoch {epoch}")
        if kind == TASK:
            if job.state in FINISHED:
                return Changes()
            log.error("job %s: the task failed on peer %s: %s", job_id, reporter, detail)
            return self._finish(job, FAILED, task_error_reason(reporter, detail), now_ms)
        if kind == POISONED:
            return self._report_poison(reporter, job, epoch, suspect, detail, now_ms)
        if job.state == RUNNING and job.gossip.active:
            # Gossip members route around partners they cannot reach themselves (backing off from
            # each for longer every time it fails); only a member giving up its own place is acted on.
            if suspect == reporter and reporter in job.members:
                log.warning("peer %s gives up its place in job %s (local failure)", reporter, job_id)
                return self.remove_peer(reporter, now_ms, SELF_REPORT, detail=detail)
            return Changes()
        if job.state != RUNNING or (rnd, epoch) != (job.round, job.epoch) or reporter not in job.members:
            return Changes()
        if suspect and suspect in self.peers:
            if suspect == reporter:
                log.warning("peer %s gives up its place in job %s (local failure)", reporter, job_id)
                return self.remove_peer(reporter, now_ms, SELF_REPORT, detail=detail)
            if reporter in job.members and suspect in job.members and kind in ("", UNREACHABLE):
                return self._unreachable(job, reporter, suspect, detail, now_ms, refused)
            return Changes()
        if not suspect:
            self._new_epoch(job, now_ms, f"exchange failed at {reporter}")
            return Changes(jobs=(job_id,))
        return Changes()

    def _unreachable(self, job: Job, reporter: str, suspect: str, detail: str, now_ms: int,
                     refused: str = "") -> Changes:
        """``reporter`` could not reach ``suspect`` (both members of a ring job): records the
        broken link and acts on the job's broken links as :func:`partitions.judge` decides:
        hold a peer out, or re-form the ring around the link."""
        sender, receiver = partitions.link_of(job.members, reporter, suspect)
        _keep_recent(job.broken_links, BrokenLink(reporter, suspect, sender, receiver, job.round, self.wall_ms(now_ms),
                                                          detail[:200]))
        log.warning("peer %s reported by %s as unreachable (link %s -> %s): %s", suspect, reporter, sender, receiver,
                    detail)
        verdict = partitions.judge(job.members, job.broken_links, reporter, suspect, refused)
        if verdict.hold_out:
            return self._hold_out(job, verdict, now_ms)
        job.members = list(verdict.ring)
        self._new_epoch(job, now_ms, f"{reporter} could not reach {suspect}: ring re-formed around the broken link")
        return Changes(jobs=(job.job_id,))

    def _hold_out(self, job: Job, verdict: partitions.Verdict, now_ms: int) -> Changes:
        """Takes ``verdict.hold_out`` out of the job's rings for good (it stays registered, and
        its heartbeats say why); recorded as an UNREACHABLE eviction and in ``job.held_out``."""
        pid = verdict.hold_out
        p = self.peers[pid]
        log.warning("job %s: holding peer %s out of its rings: %s", job.job_id, pid, verdict.reason)
        before = sum(1 for x in job.held_out if x.peer_id == pid)
        retry = now_ms + min(HOLD_OUT_RETRY_MS * 2 ** before, MAX_HOLD_OUT_RETRY_MS)
        _keep_recent(job.held_out, Exclusion(pid, job.round, verdict.reason, self.wall_ms(now_ms),
                                                 list(verdict.witnesses), retry))
        p.job_id, p.held_out_job = "", job.job_id
        p.held_out_reason = f"held out of job {job.job_id}: {verdict.reason}"
        changes = Changes(jobs=(job.job_id,), peers=(pid,))
        return changes | self._leave(job, pid, UNREACHABLE, "", verdict.reason, now_ms) | self.schedule(now_ms)

    def _report_poison(self, reporter: str, job: Job | None, epoch: int, suspect: str, detail: str,
                       now_ms: int) -> Changes:
        """A member saw non-finite or absurd values, sent to it by ``suspect`` (a ring
        predecessor or gossip partner), or, when it names itself, in its own update (it is then
        quarantined as having failed itself, never as poisoned by another). Either way the
        culprit is quarantined for the job, and a ring round is re-run without it. (A LOCAL
        report is an error, not poison: the reporter gives up its place and may come back.)

        One report is enough: it models a broken peer, not a lying one. A member that lies can
        frame a neighbour it exchanges with (costing the job that peer, not its model); what
        bounds it is that only members of the job, reporting about a member of an epoch that
        they were in, count (H2 binds the reporter to its credential)."""
        if job is None or job.state != RUNNING or reporter not in job.members or epoch > job.epoch:
            return Changes()
        if suspect in ("", reporter):
            return self.quarantine(job, reporter, reporter, f"its own parameters or update were not finite: {detail}",
                                   now_ms)
        then = next((e.peers for e in job.epochs if e.epoch == epoch), job.members)
        if suspect not in then:
            log.warning("job %s: %s reported %s as poisoned, but it was no member of epoch %d; ignored",
                        job.job_id, reporter, suspect, epoch)
            return Changes()
        return self.quarantine(job, suspect, reporter, f"sent non-finite or absurd values to {reporter}: {detail}", now_ms)

    def quarantine(self, job: Job, peer_id: str, reporter: str, reason: str, now_ms: int) -> Changes:
        """Keeps ``peer_id`` out of ``job`` for good (listed in its status) and evicts it from
        the job's membership, so the round under way is re-run without it."""
        if any(q.peer_id == peer_id for q in job.quarantined):
            return Changes()
        p = self.peers.get(peer_id)
        job.quarantined.append(Quarantine(peer_id, p.address if p else "", job.round, reason, now_ms, reporter))
        job.updated_ms = now_ms
        log.error("job %s round %d: peer %s quarantined (reported by %s): %s", job.job_id, job.round, peer_id,
                  reporter, reason)  # counted by the service (CoordinatorMetrics.record_quarantine)
        changes = Changes(jobs=(job.job_id,))
        if p is not None and p.job_id == job.job_id:
            changes = changes | self.remove_peer(peer_id, now_ms, QUARANTINED, reporter=reporter, detail=reason)
        return changes

    def _capacity(self, job: Job, members: list[str]) -> dict[str, float]:
        """Each member's measured samples/s on this job (a peer's speed on another job's task says
        little about this one's); members not yet measured count as the average."""
        known = {m: job.speeds[m] for m in members if job.speeds.get(m, 0) > 0}
        default = sum(known.values()) / len(known) if known else 1.0
        return {m: known.get(m, default) for m in members}

    def _workers(self, members: list[str]) -> dict[str, int]:
        """Each member's training workers (``dml-peer --workers`` / ``--gpus``): a host of N
        workers is allocated N members' samples a round (docs/architecture.md, "Multi-worker peers")."""
        return {m: peer_workers(self.peers[m]) for m in members if m in self.peers}

    def _caps(self, members: list[str]) -> dict[str, int]:
        """Each member's ``dml-peer --max-samples`` (0: no cap), from its registration."""
        return {m: max_samples(self.peers[m]) for m in members if m in self.peers}

    def _data_limits(self, job: Job, members: list[str]) -> dict[str, Any]:
        """What placement needs of the members' caches for a job on a store dataset (none for any
        other job, so local data places as before): ``shard_bytes`` (:func:`shard_bytes`), the
        shards each member reported caching, and each one's free cache bytes (from its last data
        usage for this job, else its registration; absent: no limit)."""
        sizes = shard_bytes(job)
        if sizes is None:
            return {}
        cached: dict[str, set[int]] = {}
        free: dict[str, int] = {}
        for m in members:
            u = job.data_usage.get(m)
            if u is not None and u.cached_shards:
                cached[m] = set(u.cached_shards)
            room = u.cache_free if u is not None else None
            if room is None and m in self.peers:
                room = cache_free(self.peers[m])
            if room is not None:
                free[m] = room
        return {"cached": cached, "shard_bytes": sizes, "cache_free": free}

    def room_reason(self, job: Job) -> str:
        """Why part of a running job's data is not trained on ("" when every shard is placed):
        the members' caps (``--max-samples``) have no room for the unassigned shards, and when the
        caps together hold less than the data, how much they hold (:func:`placement.shortfall`).
        They are placed when a peer with room joins; nothing is squeezed past a cap."""
        if job.local:
            return local_presence(job)
        left = planner.unassigned(job.assignment, len(job.shard_sizes))
        if not left or not job.members:
            return ""
        missing = sum(job.shard_sizes[s] for s in left)
        total = sum(job.shard_sizes)
        what = (f"{len(left)} of {len(job.shard_sizes)} shards ({missing} of {total} samples) unassigned: "
                + (placement.shortfall(job.shard_sizes, job.members, self._caps(job.members),
                                       **self._data_limits(job, job.members))
                   or "the members' limits (--max-samples, --cache-max-gb) have no room for them"))
        if missing == total:
            return f"waiting for room: {what}; no member can hold a shard"
        return f"{what}; they are placed when a peer with room joins"

    def holds_samples(self, job: Job) -> bool:
        """Whether any member holds a shard with samples (else no round can train anything)."""
        sizes = job.shard_sizes
        return any(sizes[s] for m in job.members for s in job.assignment.get(m, []))

    def live_idle(self) -> list[str]:
        """Idle peers in registration order."""
        idle = [p for p in self.peers.values() if not p.job_id]
        return [p.peer_id for p in sorted(idle, key=lambda p: (p.registered_ms, p.peer_id))]

    def _note_activity(self, peer_id: str, rep: Report, now_ms: int) -> None:
        utilisation.note(self.activity.setdefault(peer_id, deque()),
                         utilisation.Activity(now_ms, rep.train_ms, rep.exchange_ms, rep.eval_ms), now_ms)

    def usage(self, peer_id: str, now_ms: int) -> utilisation.Shares:
        """The share of the last minute the peer spent training, exchanging and idle, from its
        accepted reports (all idle for a peer that reported nothing in it)."""
        return utilisation.shares(self.activity.get(peer_id, ()), now_ms)

    def peer_state(self, peer_id: str) -> tuple[str, str]:
        """What a peer is doing, as (state, job id): ``training`` (a member of a job whose round
        runs), ``waiting`` (a member of a job short of peers or data), ``held out`` (of a running
        job's rings, which keeps it), ``quarantined`` (by a running job; it may serve others),
        ``taking`` (offered a job to load), ``ready`` (took a job that waits for more peers), or
        ``idle``."""
        p = self._peer(peer_id)
        job = self.jobs.get(p.job_id)
        if job is not None and peer_id in job.members:
            return ("training" if self.active(job) else "waiting"), job.job_id
        if p.held_out_job:
            return "held out", p.held_out_job
        offered = self.take_for(peer_id)
        if offered is not None:
            return "taking", offered.job_id
        live = [j for j in sorted(self.jobs.values(), key=lambda j: (j.created_ms, j.job_id))
                if j.state in (PENDING, RUNNING)]
        for j in live:
            if peer_id in j.ready and self.in_pool(j, p) and not j.excludes(p):
                return "ready", j.job_id
        for j in live:
            if j.excludes(p):
                return "quarantined", j.job_id
        return "idle", ""

    # -- jobs -------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, shard_sizes: list[int] | None, now_ms: int,
               dataset_bytes: int = 0) -> tuple[str, Changes]:
        """Queues a validated job. With ``shard_sizes`` its training set is known already, cut
        into shards of those sizes, and any idle peer may run it; without (None), peers take it
        first and the first READY take fixes its data (see the module). ``dataset_bytes``: the
        size of the store dataset the job names (0 for none), which sizes its shards in bytes."""
        if shard_sizes is not None and len(shard_sizes) != spec.num_shards:
            raise ValueError(f"{len(shard_sizes)} shard sizes for a job of {spec.num_shards} shards")
        if shard_sizes is not None and not spec.batch_size:
            spec = replace(spec, batch_size=DEFAULT_BATCH_SIZE)
        jid = self._new_id("job", self.jobs, now_ms)
        wall = self.wall_ms(now_ms)
        self.jobs[jid] = Job(jid, spec, created_ms=wall, shard_sizes=list(shard_sizes or []), updated_ms=wall,
                             reason="waiting for peers", needs_take=shard_sizes is None,
                             dataset_bytes=max(0, dataset_bytes) if spec.dataset else 0)
        return jid, Changes(jobs=(jid,)) | self.schedule(now_ms)

    def job(self, job_id: str) -> Job:
        """A job by id."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def cancel(self, job_id: str, now_ms: int) -> Changes:
        """Stops a job and frees its peers (no-op once finished)."""
        job = self.job(job_id)
        if job.state in FINISHED:
            return Changes()
        return self._finish(job, CANCELLED, "cancelled by user", now_ms)

    def _finish(self, job: Job, state: str, reason: str, now_ms: int) -> Changes:
        job.state, job.reason, job.updated_ms = state, reason, self.wall_ms(now_ms)
        freed = []
        for pid in job.members:
            if pid in self.peers:
                self.peers[pid].job_id = ""
                freed.append(pid)
        job.members, job.reports, job.broken_links = [], {}, []
        for p in self.peers.values():
            if p.held_out_job == job.job_id:  # free for other jobs, and no longer told it is held out
                p.held_out_job = p.held_out_reason = ""
                freed.append(p.peer_id)
        log.info("job %s: %s (%s)", job.job_id, state, reason)
        return Changes(jobs=(job.job_id,), peers=tuple(freed)) | self.schedule(now_ms)

    def _rollback_if_orphaned(self, job: Job) -> None:
        """If no live member holds the committed round, go back to the last checkpoint (or the
        seeded initial model): the rounds after it are lost, but the job can go on."""
        if not job.committed_round or any(h in job.members for h in job.holders) or not job.members:
            return
        if job.checkpoint_round == job.committed_round:
            return  # joiners fetch the committed round from the coordinator's checkpoint
        lost = job.committed_round - job.checkpoint_round
        log.error("job %s: every peer holding round %d is gone; rolling back %d rounds to checkpoint round %d",
                  job.job_id, job.committed_round, lost, job.checkpoint_round)
        job.history = job.history[: job.checkpoint_round]
        job.committed_round = job.checkpoint_round
        job.samples = sum(r.samples for r in job.history)
        sizes = job.shard_sizes
        job.cursors = {}
        for r in job.history:
            for ranges in r.consumed.values():
                planner.advance(job.cursors, [tuple(x) for x in ranges], sizes)  # type: ignore[misc]
        job.data_epoch = data_epoch(job)
        job.rolled_back_rounds += lost

    def _issue(self, job: Job, now_ms: int) -> None:
        """(Re)starts the current round: clears reports and allocates samples from the
        committed cursors."""
        if job.gossip.active:
            self._issue_gossip(job, now_ms)
            return
        self._rollback_if_orphaned(job)
        job.reports = {}
        job.pending_checkpoint, job.pending_checkpoint_peer, job.pending_checkpoint_state = None, "", ""
        job.round_started_ms = now_ms
        job.updated_ms = self.wall_ms(now_ms)
        if not job.members:
            job.allocation = {}
            return
        sizes = job.shard_sizes
        alloc = planner.allocate(job.assignment, sizes, job.cursors, job.spec.local_steps * job.spec.batch_size,
                                 self._workers(job.members))
        job.allocation = {p: [list(r) for r in rs] for p, rs in alloc.items()}

    def _issue_gossip(self, job: Job, now_ms: int) -> None:
        """Gossip phase: forgets departed members and gives each member without a step its
        first one. Members mid-step keep theirs: nothing they do depends on the others."""
        job.reports = {}
        job.updated_ms = self.wall_ms(now_ms)
        members = set(job.members)
        for d in (job.gossip.step, job.gossip.issued_ms, job.gossip.eval_step, job.gossip.distance, job.allocation):
            for k in [k for k in d if k not in members]:
                del d[k]
        for m in job.members:
            if m not in job.gossip.step:
                job.gossip.step[m] = 1
            if m not in job.allocation:
                self._allocate_step(job, m, now_ms)
            elif job.waiting_since_ms:  # nobody got a plan while the job waited for peers
                job.gossip.issued_ms[m] = now_ms

    def _allocate_step(self, job: Job, peer_id: str, now_ms: int) -> None:
        """One gossip step's samples for a member, from its own shards' cursors."""
        sizes = job.shard_sizes
        alloc = planner.allocate({peer_id: job.assignment.get(peer_id, [])}, sizes, job.cursors,
                                 job.spec.local_steps * job.spec.batch_size, self._workers([peer_id]))
        job.allocation[peer_id] = [list(r) for r in alloc[peer_id]]
        job.gossip.issued_ms[peer_id] = now_ms

    def _start_gossip(self, job: Job, now_ms: int) -> None:
        """Enters the gossip phase (a gossip job of more than one round) with its first members."""
        if job.spec.aggregation != "gossip" or job.spec.rounds < 2 or job.committed_round:
            return
        job.gossip.active = True
        job.gossip.peers = len(job.members)
        job.gossip.window = GossipWindow(start_ms=now_ms)
        job.gossip.eval_step = {job.members[0]: 1} if job.members else {}
        job.allocation = {}
        job.holders = list(job.members)

    def _gossip_report(self, job: Job, peer: PeerRecord, step: int, rep: Report, now_ms: int) -> Changes:
        """A member finished gossip step ``step``: count it, give it the next one, and close a
        virtual round (or the phase) when enough steps are in."""
        pid = peer.peer_id
        if job.state != RUNNING or not job.gossip.active:
            raise Stale(f"job {job.job_id} is past its gossip phase")
        if pid not in job.members:
            raise Stale(f"peer {pid} is not a member of job {job.job_id}")
        if step != job.gossip.step.get(pid):
            raise Stale(f"gossip step {step} is stale; peer {pid} runs step {job.gossip.step.get(pid)}")
        if rep.samples != job.allocated(pid):
            raise BadReport(f"peer {pid} reports {rep.samples} samples for gossip step {step}; "
                            f"{job.allocated(pid)} were allocated")
        _note_speed(peer, rep, job)
        self._note_activity(peer.peer_id, rep, now_ms)
        sizes = job.shard_sizes
        ranges = job.allocation.pop(pid, [])
        mine = set(job.assignment.get(pid, []))
        # A shard that moved to a joiner mid-step may have been allocated again from the same
        # cursor: advance only where the cursor still stands at the range's start.
        # One range at a time: a step that read a shard to its end and on into its next pass
        # holds two ranges of it, the second starting where the first leaves the cursor.
        for r in ranges:
            if r[0] in mine and job.cursors.get(r[0], (1, 0)) == (r[1], r[2]):
                planner.advance(job.cursors, [tuple(r)], sizes)  # type: ignore[list-item]
        w = job.gossip.window
        w.consumed.setdefault(pid, []).extend(ranges)
        w.samples += rep.samples
        w.loss_sum += rep.train_loss * rep.samples
        w.bytes_sent += rep.bytes_sent
        w.train_ms, w.exchange_ms = max(w.train_ms, rep.train_ms), max(w.exchange_ms, rep.exchange_ms)
        w.eval_ms = max(w.eval_ms, rep.eval_ms)
        if rep.test_accuracy is not None:
            w.evaluations += 1
            w.accuracy_sum += rep.test_accuracy
            w.test_loss_sum += rep.test_loss if rep.test_loss is not None else float("nan")
            for k, v in rep.test_metrics.items():
                s = w.metric_sums.setdefault(k, [0.0, 0])
                s[0], s[1] = s[0] + v, s[1] + 1
        if rep.pair_distance is not None:
            job.gossip.distance[pid] = rep.pair_distance
        job.gossip.steps += 1
        job.gossip.step[pid] = step + 1
        job.samples += rep.samples
        job.updated_ms = self.wall_ms(now_ms)
        self._allocate_step(job, pid, now_ms)
        changes = Changes(jobs=(job.job_id,))
        if job.gossip.steps >= (job.committed_round + 1) * job.gossip.peers:
            changes = changes | self._gossip_record(job, pid, now_ms)
        if job.committed_round >= job.spec.rounds - 1:
            job.gossip.active = False
            job.allocation = {}
            job.gossip.step, job.gossip.issued_ms, job.gossip.eval_step = {}, {}, {}
            self._new_epoch(job, now_ms, f"gossip phase done after {job.gossip.steps} steps; exact average of the live members")
        return changes

    def consensus_estimate(self, job: Job) -> float:
        """sqrt(mean_i ||x_i - mean||^2) from the members' last partner distances: for two
        members drawn at random, E||x_i - x_j||^2 = 2n/(n-1) times its square. Exact for the
        uniform topology; sparse topologies pair close neighbours, so it reads low for them."""
        d = [job.gossip.distance[m] for m in job.members if m in job.gossip.distance]
        n = len(job.members)
        if not d or n < 2:
            return 0.0
        return (sum(x * x for x in d) / len(d) * (n - 1) / (2 * n)) ** 0.5

    def _gossip_record(self, job: Job, closer: str, now_ms: int) -> Changes:
        """Closes a virtual round of the gossip phase (its last step was ``closer``'s) into the
        history. Test metrics: the mean of the evaluations reported in the round (each of a
        member's own model), else carried from the last round."""
        w = job.gossip.window
        prev = job.history[-1] if job.history else None
        acc = w.accuracy_sum / w.evaluations if w.evaluations else prev.test_accuracy if prev else float("nan")
        loss = w.test_loss_sum / w.evaluations if w.evaluations else prev.test_loss if prev else float("nan")
        metrics = ({k: s / n for k, (s, n) in w.metric_sums.items()} if w.evaluations
                   else dict(prev.test_metrics) if prev else {})
        sizes = job.shard_sizes
        rec = RoundRecord(
            round=job.committed_round + 1, epoch=job.epoch, samples=w.samples,
            train_loss=w.loss_sum / max(w.samples, 1), test_accuracy=acc, test_loss=loss, digest="",
            duration_ms=now_ms - w.start_ms, members=list(job.members), committed_ms=self.wall_ms(now_ms),
            data_epoch=planner.data_epoch(job.cursors, len(sizes)), consumed=w.consumed,
            train_ms=w.train_ms, exchange_ms=w.exchange_ms, test_evaluated=bool(w.evaluations), eval_ms=w.eval_ms,
            consensus_distance=self.consensus_estimate(job), bytes_sent=w.bytes_sent, test_metrics=metrics,
        )
        job.history.append(rec)
        job.committed_round = rec.round
        job.data_epoch = rec.data_epoch
        job.holders = list(job.members)
        job.reissues = 0
        job.gossip.window = GossipWindow(start_ms=now_ms)
        # One evaluation per evaluated virtual round, as a ring round has: the next step of the
        # member that closed this one (it is live and, having just reported, not the slowest).
        if (rec.round + 1) % job.spec.eval_every_rounds == 0 and closer in job.gossip.step:
            job.gossip.eval_step = {closer: job.gossip.step[closer]}
        return Changes(jobs=(job.job_id,), committed=((job.job_id, rec.round),))

    def _new_epoch(self, job: Job, now_ms: int, why: str) -> None:
        live = set(job.members)
        job.broken_links = [lk for lk in job.broken_links if lk.sender in live and lk.receiver in live]
        if job.broken_links and not job.gossip.active:  # keep the ring off the links known broken
            ring = partitions.ring_order(job.members, [(lk.sender, lk.receiver) for lk in job.broken_links])
            if ring is not None:
                job.members = ring
        job.epoch += 1
        job.reissues += 1
        self._issue(job, now_ms)
        _keep_recent(job.epochs, MembershipEpoch(job.epoch, list(job.members), self.wall_ms(now_ms), job.round))
        if len(job.members) < job.spec.min_peers:
            job.reason = f"waiting for peers: {len(job.members)} live, {job.spec.min_peers} needed"
            job.waiting_since_ms = job.waiting_since_ms or now_ms
        else:
            reason = self.room_reason(job)
            if reason and reason != job.reason:
                log.warning("job %s epoch %d: %s", job.job_id, job.epoch, reason)
            job.reason = reason
            job.waiting_since_ms = 0
        log.info("job %s: epoch %d, round %d, ring %s (%s)", job.job_id, job.epoch, job.round, job.members, why)
        if job.reissues >= MAX_REISSUES:
            job.reason = f"round {job.round} re-issued {job.reissues} times without committing (last: {why})"
            self._doomed.add(job.job_id)  # failed by the next expire(), which persists the freed peers

    def _held_out(self, job: Job, now_ms: int) -> set[str]:
        """The peers the job keeps out now: all it held out, but, while it is short of peers,
        those whose retry time has come."""
        latest = {x.peer_id: x for x in job.held_out}
        short = len(job.members) < job.spec.min_peers
        return {p for p, x in latest.items() if not (short and x.retry_ms <= now_ms)}

    def _retry_due(self, job: Job, now_ms: int) -> bool:
        """Whether a job short of peers may try again an idle peer it held out."""
        if len(job.members) >= job.spec.min_peers or not job.held_out:
            return False
        out = self._held_out(job, now_ms)
        return any(x.peer_id not in out for x in job.held_out if x.peer_id in self.peers
                   and not self.peers[x.peer_id].job_id)

    def _admit(self, job: Job, now_ms: int) -> bool:
        """Adds idle peers to a job at a round boundary. True if the ring changed. A job takes
        at most ``max_peers`` members (when set), even for data the caps left out."""
        room = job.spec.num_shards - len(job.members)
        if planner.unassigned(job.assignment, len(job.shard_sizes)) and job.members:
            room = max(room, 1)  # the caps left data out: a joiner may have room for it
        if job.local:
            room = len(self.peers)  # every peer that brings its data (a peer is its own shard)
        if job.spec.max_peers:
            room = min(room, job.spec.max_peers - len(job.members))
        out = self._held_out(job, now_ms)
        joiners = [p for p in self.eligible(job) if p not in out][: max(room, 0)]
        if not joiners:
            return False
        sizes = job.shard_sizes
        for pid in joiners:
            p = self.peers[pid]
            p.job_id = job.job_id
            p.held_out_job = p.held_out_reason = ""  # held out of another job, taken by this one
        job.members = job.members + joiners
        capacity, caps = self._capacity(job, job.members), self._caps(job.members)
        limits = self._data_limits(job, job.members)
        if job.local:  # each member holds its own data, and nothing else
            job.assignment = planner.local_assignment(job.members, job.local_shard)
        elif job.assignment:
            job.assignment = planner.add_peers(job.assignment, joiners, sizes, capacity, caps, **limits)
        else:
            job.assignment = planner.assign_shards(sizes, job.members, capacity, caps,
                                                   ordered=planner.ordered_sharding(job.spec.sharding), **limits)
        return True

    def schedule(self, now_ms: int) -> Changes:
        """Starts pending jobs and tops up waiting ones with idle peers."""
        changed: list[str] = []
        for job in sorted(self.jobs.values(), key=lambda j: (j.created_ms, j.job_id)):
            if job.state == RUNNING and job.gossip.active and self.live_idle():
                if self._admit(job, now_ms):  # no round boundary to wait for
                    job.holders = list(job.members)
                    self._new_epoch(job, now_ms, "peers joined the gossip")
                    changed.append(job.job_id)
            elif job.state == RUNNING and (len(job.members) < job.spec.min_peers or not self.holds_samples(job)):
                if self._admit(job, now_ms):
                    self._new_epoch(job, now_ms, "peers joined a waiting job")
                    changed.append(job.job_id)
            elif job.state == PENDING and len(self.eligible(job)) >= job.spec.min_peers:
                job.state = RUNNING
                self._admit(job, now_ms)
                self._start_gossip(job, now_ms)
                self._new_epoch(job, now_ms, "job started")
                changed.append(job.job_id)
        for job in self.jobs.values():  # after every admission: the reasons count what is idle now
            if job.state == PENDING:
                reason = self._pending_reason(job)
                if reason != job.reason:
                    job.reason = reason
                    changed.append(job.job_id)
        return Changes(jobs=tuple(changed), peers=tuple(p for j in changed for p in self.jobs[j].members))

    def eligible(self, job: Job) -> list[str]:
        """Idle peers (registration order) the job may take into its rings: of its pool
        (:meth:`in_pool`), not quarantined for it, and, for a job that needs takes, having taken it."""
        return [p for p in self.live_idle() if job.may_admit(p) and self.in_pool(job, self.peers[p])
                and not job.excludes(self.peers[p])]

    @staticmethod
    def in_pool(job: Job, peer: PeerRecord) -> bool:
        """Whether ``peer`` serves the job's pool (:func:`job_pool`: ``default`` for a job that
        names none, the pool of every peer started without ``--pool``)."""
        return peer_pool(peer) == job_pool(job)

    def pool_idle(self, job: Job) -> list[str]:
        """Idle peers of the job's pool, registration order."""
        return [p for p in self.live_idle() if self.in_pool(job, self.peers[p])]

    def _pending_reason(self, job: Job) -> str:
        """Why a pending job waits: its pool's idle (or ready) peers against ``min_peers``, then
        which jobs hold the pool's other peers, and, for a job that named no pool, the idle
        peers of other pools it will not take."""
        where = f" in pool {job.spec.pool!r}" if job.spec.pool else ""
        if job.local:
            where += f" offering local dataset {job.spec.local_data!r}"
        if not job.needs_take:
            head = f"waiting for peers{where}: {len(self.pool_idle(job))} idle, {job.spec.min_peers} needed"
        else:
            declined = sum(1 for p in {x.peer_id for x in job.declined} if p in self.peers)
            head = (f"waiting for peers{where} to take the job: {len(self.eligible(job))} ready, {declined} declined, "
                    f"{job.spec.min_peers} needed")
        return head + self._busy_note(job) + self._elsewhere_note(job)

    def _busy_note(self, job: Job) -> str:
        """``; 2 busy with job X, 1 with job Y``: the members of other jobs in ``job``'s pool, by
        job in submission order ("" when there are none)."""
        busy: dict[str, int] = {}
        for p in self.peers.values():
            if p.job_id and p.job_id != job.job_id and self.in_pool(job, p):
                busy[p.job_id] = busy.get(p.job_id, 0) + 1
        if not busy:
            return ""
        order = sorted(busy, key=lambda j: (self.jobs[j].created_ms, j) if j in self.jobs else (0, j))
        parts = [f"{busy[j]} busy with job {j}" if i == 0 else f"{busy[j]} with job {j}" for i, j in enumerate(order)]
        return "; " + ", ".join(parts)

    def _elsewhere_note(self, job: Job) -> str:
        """For a job that named no pool: the idle peers of named pools, which it does not take
        ("" when there are none, or the job named its pool)."""
        if job.spec.pool:
            return ""
        idle: dict[str, int] = {}
        for pid in self.live_idle():
            pool = peer_pool(self.peers[pid])
            if pool != DEFAULT_POOL:
                idle[pool] = idle.get(pool, 0) + 1
        if not idle:
            return ""
        listed = ", ".join(f"{n} in {pool!r}" for pool, n in sorted(idle.items()))
        return f"; a job without --pool runs on pool {DEFAULT_POOL!r} only (idle elsewhere: {listed})"

    # -- takes ------------------------------------------------------------------------------
    def take_for(self, peer_id: str) -> Job | None:
        """The job an idle peer should take now: the oldest that needs takes and peers (pending,
        or running with room in its rings) that this peer has neither taken nor declined, and
        that does not exclude it. None for a member of a job, or when there is none."""
        p = self._peer(peer_id)
        if p.job_id:
            return None
        for job in sorted(self.jobs.values(), key=lambda j: (j.created_ms, j.job_id)):
            if not job.needs_take or job.state not in (PENDING, RUNNING):
                continue
            if job.local and not offers(p, job.spec.local_data):
                continue  # a local job runs only where its data is
            if (not job.local and job.state == RUNNING and len(job.members) >= job.spec.num_shards
                    and not planner.unassigned(job.assignment, len(job.shard_sizes))):
                continue  # no room in its rings (the caps left no data out either)
            if job.state == RUNNING and job.spec.max_peers and len(job.members) >= job.spec.max_peers:
                continue  # as many members as it may take
            if not self.in_pool(job, p):
                continue
            if peer_id in job.ready or job.declined_by(peer_id) or job.excludes(p):
                continue
            return job
        return None

    def take(self, peer_id: str, job_id: str, outcome: str, now_ms: int, detail: str = "",
             data: JobData | None = None, shard_sizes: list[int] | None = None, cut_error: str = "",
             usage: DataUsage | None = None, label_counts: list[int] | None = None) -> Changes:
        """A peer's answer to a take (``outcome``: READY, DECLINED or TASK_ERROR).

        READY: ``data`` is what it found. The first READY take fixes the job's data: unless
        :func:`planner.data_problem` finds the job cannot run on it, or the caller could not cut
        its shards (``cut_error``: why), in which case the job fails saying why, ``shard_sizes``
        (cut by the caller from the labels) become the job's, and a job
        without a batch size gets the task's (else dml's default). A later READY take must find
        data of the same digest, or the peer is refused the job (listed as declined). DECLINED:
        the peer is not offered the job again; ``detail`` is why. TASK_ERROR: the job fails with
        ``detail``, the task's own error. Stale for a finished job, from one of its members (they
        took it already: a task error in a round is reported as a failure) or from a peer that
        declined it or was refused it; BadReport for
        a READY take without data, or shard sizes that do not fit it, or a ``usage`` (what the
        data cost the peer, which shards it caches) that cannot be true of the job
        (:func:`check_usage`): it is kept on the job for placement (:meth:`note_usage`).

        A ``local`` job (:meth:`_take_local`): each READY take brings the peer's own data,
        described by its sample count and ``label_counts`` only, as a shard of its own."""
        peer = self._peer(peer_id)
        peer.last_seen_ms = now_ms
        job = self.job(job_id)
        if job.state in FINISHED:
            raise Stale(f"job {job_id} is {job.state}")
        if not job.needs_take:
            return Changes()
        if peer.job_id == job_id:  # a member took the job before it was admitted: its take stands
            raise Stale(f"peer {peer_id} is a member of job {job_id} already")
        if job.declined_by(peer_id):
            raise Stale(f"peer {peer_id} declined job {job_id} (or was refused it); it takes it again only once it "
                        "registers again")
        if outcome == TASK_ERROR:
            log.error("job %s: the task failed on peer %s: %s", job_id, peer_id, detail)
            return self._finish(job, FAILED, task_error_reason(peer_id, detail), now_ms)
        if outcome == DECLINED:
            return self._decline(job, peer_id, detail or "declined (no reason given)", now_ms)
        if outcome != READY:
            raise BadReport(f"unknown take outcome {outcome!r}")
        if data is None:
            raise BadReport(f"peer {peer_id} took job {job_id} as READY without describing its data")
        if usage is not None:
            check_usage(usage, job.spec.num_shards, bool(job.spec.dataset))
        if job.local:
            return self._take_local(job, peer, data, list(label_counts or []), now_ms, usage)
        changes = Changes(jobs=(job_id,))
        if job.data is None:
            problem = planner.data_problem(job.spec, data.train_samples, data.has_labels) or cut_error
            batch = job.spec.batch_size or data.batch_size or DEFAULT_BATCH_SIZE
            if not problem and job.spec.local_steps * batch > MAX_SAMPLES_PER_ROUND:
                problem = (f"local_steps x batch_size ({job.spec.local_steps} x {batch}, the task's batch size) "
                           f"must be at most {MAX_SAMPLES_PER_ROUND:,} samples per round")
            if problem:
                log.error("job %s: cannot run on the data peer %s found: %s", job_id, peer_id, problem)
                return self._finish(job, FAILED, problem, now_ms)
            sizes = list(shard_sizes or [])
            if len(sizes) != job.spec.num_shards or sum(sizes) != data.train_samples or min(sizes) < 0:
                raise BadReport(f"{len(sizes)} shard sizes summing to {sum(sizes)} do not cut {data.train_samples} "
                                f"samples into {job.spec.num_shards} shards")
            job.data, job.shard_sizes = data, sizes
            if job.spec.batch_size != batch:
                job.spec = replace(job.spec, batch_size=batch)
            log.info("job %s: data fixed by peer %s: %d training samples%s, batch size %d", job_id, peer_id,
                     data.train_samples, f", {data.num_classes} classes" if data.has_labels else ", no labels", batch)
            changes = changes | Changes(data=(job_id,))
        elif data.digest != job.data.digest:
            return self._decline(job, peer_id, (
                f"its data differs from the job's: {data.train_samples} training samples (digest "
                f"{data.digest[:12]}) where the job has {job.data.train_samples} ({job.data.digest[:12]})"), now_ms)
        if usage is not None:
            self.note_usage(job, peer_id, usage)
        if peer_id not in job.ready:
            job.ready.append(peer_id)
        job.updated_ms = self.wall_ms(now_ms)
        return changes | self.schedule(now_ms)

    def _take_local(self, job: Job, peer: PeerRecord, data: JobData, label_counts: list[int],
                    now_ms: int, usage: DataUsage | None = None) -> Changes:
        """A READY take of a ``local`` job: the peer's own data becomes (or, for data the job saw
        from the same address before, is again) a shard of the job, indexed by that peer alone.
        The first fixes the job's batch size and parameter count; a later one must build a model
        of the same size, else it is refused the job. Its data joins at the next round boundary
        (the peer is admitted there)."""
        pid, changes = peer.peer_id, Changes(jobs=(job.job_id,))
        problem = planner.local_data_problem(data.train_samples, label_counts)
        if problem:
            return self._decline(job, pid, f"its local dataset {job.spec.local_data}: {problem}", now_ms)
        if job.data is None:
            batch = job.spec.batch_size or data.batch_size or DEFAULT_BATCH_SIZE
            if job.spec.local_steps * batch > MAX_SAMPLES_PER_ROUND:
                return self._finish(job, FAILED, (
                    f"local_steps x batch_size ({job.spec.local_steps} x {batch}, the task's batch size) must be at "
                    f"most {MAX_SAMPLES_PER_ROUND:,} samples per round"), now_ms)
            job.data = replace(data, has_labels=False, num_classes=len(label_counts))  # no labels are stored
            if job.spec.batch_size != batch:
                job.spec = replace(job.spec, batch_size=batch)
            changes = changes | Changes(data=(job.job_id,))
        elif data.num_params != job.data.num_params:
            return self._decline(job, pid, f"its model has {data.num_params} parameters where the job's has "
                                           f"{job.data.num_params}", now_ms)
        key = f"{peer.address}|{data.digest}"
        if key in job.local_sources:
            shard = job.local_sources.index(key)
            holder = next((m for m in job.members if shard in job.assignment.get(m, [])), "")
            if holder and holder != pid:
                return self._decline(job, pid, f"the same data (from {peer.address}) is in the job already, with "
                                               f"peer {holder}", now_ms)
        else:
            shard = len(job.local_sources)
            job.local_sources.append(key)
            job.shard_sizes.append(data.train_samples)
            job.local_label_counts.append(list(label_counts))
        job.local_shard[pid] = shard
        if usage is not None:
            self.note_usage(job, pid, usage)
        log.info("job %s: peer %s brings its local dataset %s: %d training samples (shard %d%s)", job.job_id, pid,
                 job.spec.local_data, data.train_samples, shard, ", seen before" if shard in job.cursors else "")
        if pid not in job.ready:
            job.ready.append(pid)
        job.updated_ms = self.wall_ms(now_ms)
        return changes | self.schedule(now_ms)

    def _decline(self, job: Job, peer_id: str, reason: str, now_ms: int) -> Changes:
        """Records that ``peer_id`` will not (or may not) run ``job``."""
        log.warning("job %s: peer %s declined it: %s", job.job_id, peer_id, reason)
        if peer_id in job.ready:
            job.ready.remove(peer_id)
        _keep_recent(job.declined, Exclusion(peer_id, job.round, reason, self.wall_ms(now_ms)))
        job.updated_ms = self.wall_ms(now_ms)
        return Changes(jobs=(job.job_id,)) | self.schedule(now_ms)

    def active(self, job: Job) -> bool:
        """Whether the job's current round is being run (enough members, and data to train on)."""
        return (job.state == RUNNING and bool(job.members) and len(job.members) >= job.spec.min_peers
                and self.holds_samples(job))

    def plan_for(self, peer_id: str) -> Job | None:
        """The running job the peer is a member of, if its round is active."""
        p = self._peer(peer_id)
        job = self.jobs.get(p.job_id)
        if job is None or not self.active(job) or peer_id not in job.members:
            return None
        return job

    def plan_key(self, job: Job, peer_id: str) -> tuple[str, int, int]:
        """(job, round, epoch) of the member's current plan; in the gossip phase the round is
        the member's own step."""
        if job.gossip.active:
            return job.job_id, job.gossip.step.get(peer_id, 0), job.epoch
        return job.job_id, job.round, job.epoch

    def check_member(self, job: Job, peer_id: str) -> None:
        """Raises Forbidden unless ``peer_id`` is, or was in one of its recorded epochs, a member
        of ``job``: a peer may report, fail or upload only for its own job (a late word from a
        past epoch is merely stale)."""
        peer = self.peers.get(peer_id)
        if peer_id in job.members or (peer is not None and peer.job_id == job.job_id):
            return
        if any(peer_id in e.peers for e in job.epochs):
            return
        raise Forbidden(f"peer {peer_id} is not a member of job {job.job_id}")

    def _check_current(self, job: Job, peer_id: str, rnd: int, epoch: int) -> None:
        if job.state != RUNNING:
            raise Stale(f"job {job.job_id} is {job.state}")
        if (rnd, epoch) != (job.round, job.epoch):
            raise Stale(f"round {rnd} epoch {epoch} is stale; current is round {job.round} epoch {job.epoch}")
        if peer_id not in job.members:
            raise Stale(f"peer {peer_id} is not a member of epoch {job.epoch}")

    def check_checkpoint(self, peer_id: str, job_id: str, rnd: int, epoch: int) -> None:
        """Raises NotFound, Forbidden or Stale unless a member may upload round ``rnd`` of epoch
        ``epoch`` now."""
        self._peer(peer_id)
        job = self.job(job_id)
        self.check_member(job, peer_id)
        self._check_current(job, peer_id, rnd, epoch)

    def checkpoint_uploaded(self, peer_id: str, job_id: str, rnd: int, epoch: int, digest: str, now_ms: int,
                            state_digest: str = "") -> None:
        """Records a checkpoint for the current round (it counts once the round commits), with the
        sha256 of its training-state file ("" when it came without one)."""
        self._peer(peer_id).last_seen_ms = now_ms
        job = self.job(job_id)
        self.check_member(job, peer_id)
        self._check_current(job, peer_id, rnd, epoch)
        job.pending_checkpoint = (rnd, digest)
        job.pending_checkpoint_peer = peer_id
        job.pending_checkpoint_state = state_digest

    def note_usage(self, job: Job, peer_id: str, usage: DataUsage) -> None:
        """Keeps ``usage`` as ``peer_id``'s last word on its data of ``job`` (checked already:
        :func:`check_usage`); placement reads it when peers leave and join."""
        job.data_usage[peer_id] = usage

    def report(self, peer_id: str, job_id: str, rnd: int, epoch: int, rep: Report, now_ms: int,
               usage: DataUsage | None = None) -> Changes:
        """Records a member's round report; commits the round when every member agrees. ``usage``
        (its data so far) is checked (BadReport, nothing recorded) and kept, even from a stale report:
        it is the peer's cache as it is now."""
        peer = self._peer(peer_id)
        peer.last_seen_ms = now_ms
        check_report(rep)
        job = self.job(job_id)
        self.check_member(job, peer_id)
        if usage is not None:
            check_usage(usage, job.spec.num_shards, bool(job.spec.dataset))
            self.note_usage(job, peer_id, usage)
        if job.gossip.active:
            return self._gossip_report(job, peer, rnd, rep, now_ms)
        self._check_current(job, peer_id, rnd, epoch)
        if rep.samples != job.allocated(peer_id):
            raise BadReport(f"peer {peer_id} reports {rep.samples} samples for round {rnd}; "
                            f"{job.allocated(peer_id)} were allocated")
        _note_speed(peer, rep, job)
        self._note_activity(peer.peer_id, rep, now_ms)
        job.reports[peer_id] = rep
        if job.committed_round and peer_id not in job.holders:
            # It trained this round from the committed one, so it holds it: a member that joined
            # at the boundary and fetched it. Without this, a member left alone after the last
            # recorded holder fails was thought to hold nothing and the job rolled back.
            job.holders.append(peer_id)
        if set(job.reports) != set(job.members):
            return Changes(jobs=(job_id,))  # persisted, so a coordinator restart keeps the report
        digests = {r.digest for r in job.reports.values()}
        if len(digests) != 1:
            job.mismatches += 1
            log.error("job %s round %d: members disagree on parameters (%d digests)", job_id, rnd, len(digests))
            if job.mismatches >= MAX_DIGEST_MISMATCHES:
                return self._finish(job, FAILED, f"parameter digests disagreed {job.mismatches} times", now_ms)
            self._new_epoch(job, now_ms, "digest mismatch, re-running the round")
            return Changes(jobs=(job_id,))
        return self._commit(job, digests.pop(), now_ms)

    def _commit(self, job: Job, digest: str, now_ms: int) -> Changes:
        reps = list(job.reports.values())
        samples = sum(r.samples for r in reps)
        evals = [r for r in reps if r.test_accuracy is not None]
        prev = job.history[-1] if job.history else None
        rec = RoundRecord(
            round=job.round,
            epoch=job.epoch,
            samples=samples,
            train_loss=sum(r.train_loss * r.samples for r in reps) / max(samples, 1),
            test_accuracy=evals[0].test_accuracy if evals else prev.test_accuracy if prev else float("nan"),  # type: ignore[arg-type]
            test_loss=evals[0].test_loss if evals else prev.test_loss if prev else float("nan"),  # type: ignore[arg-type]
            digest=digest,
            duration_ms=now_ms - job.round_started_ms,
            members=list(job.members),
            committed_ms=self.wall_ms(now_ms),
            consumed={p: [list(r) for r in rs] for p, rs in job.allocation.items()},
            train_ms=max(r.train_ms for r in reps),
            exchange_ms=max(r.exchange_ms for r in reps),
            test_evaluated=bool(evals),
            eval_ms=max(r.eval_ms for r in reps),
            bytes_sent=sum(r.bytes_sent for r in reps),
            test_metrics=dict(evals[0].test_metrics) if evals else dict(prev.test_metrics) if prev else {},
        )
        # The uploaded checkpoint becomes the round's only if the round commits with its digest
        # and its uploader is a member that reported that digest: never on the uploader's word.
        up = job.reports.get(job.pending_checkpoint_peer)
        keep_checkpoint = job.pending_checkpoint == (rec.round, digest) and up is not None and up.digest == digest
        sizes = job.shard_sizes
        for ranges in job.allocation.values():
            planner.advance(job.cursors, [tuple(r) for r in ranges], sizes)  # type: ignore[misc]
        job.data_epoch = rec.data_epoch = data_epoch(job)
        job.history.append(rec)
        job.samples += samples
        job.committed_round = rec.round
        job.holders = list(job.members)
        job.reports = {}
        job.mismatches = 0
        job.reissues = 0
        if keep_checkpoint:
            job.checkpoint_round, job.checkpoint_digest = rec.round, digest
            job.checkpoint_state_digest = job.pending_checkpoint_state
        changes = Changes(jobs=(job.job_id,), committed=((job.job_id, rec.round),))
        if job.committed_round >= job.spec.rounds:
            return changes | self._finish(job, SUCCEEDED, f"{job.spec.rounds} rounds committed", now_ms)
        if self._admit(job, now_ms):
            self._new_epoch(job, now_ms, "peers joined at a round boundary")
            changes = changes | Changes(peers=tuple(job.members))
        else:
            self._issue(job, now_ms)
        return changes


def offers(peer: PeerRecord, name: str) -> bool:
    """Whether ``peer`` offers a local dataset ``name`` (``dml-peer --data NAME=PATH``, kept in
    its capability at registration)."""
    names = peer.capability.get("local_datasets", [])
    return isinstance(names, list) and name in names


def data_epoch(job: Job) -> int:
    """The pass every shard has reached; for a ``local`` job, every shard present (a member's
    own data: a departed peer's pass stops where it left, and does not hold the others back)."""
    if not job.local:
        return planner.data_epoch(job.cursors, len(job.shard_sizes))
    here = sorted({s for m in job.members for s in job.assignment.get(m, [])})
    return min((job.cursors.get(s, (1, 0))[0] for s in here), default=job.data_epoch)


def local_presence(job: Job) -> str:
    """What of a ``local`` job's data is present now ("" when all of it is): the samples of its
    live members against all it has seen. The rest left with its peers; nothing moves."""
    present, seen, here, sources = job.data_present()
    if present >= seen or not job.members:
        return ""
    return (f"data present: {present} of {seen} samples ({100 * present / seen:.0f}%), {here} of {sources} peers' "
            "local data; the rest left with its peers")


def task_error_reason(peer_id: str, detail: str) -> str:
    """A failed job's reason for its task's error on ``peer_id`` (bounded in length)."""
    detail = detail.strip() or "(no message)"
    if len(detail) > MAX_TASK_ERROR_CHARS:
        detail = detail[: MAX_TASK_ERROR_CHARS - 3] + "..."
    return f"task error on peer {peer_id}: {detail}"


def _keep_recent(events: list[T], event: T) -> None:
    """Appends ``event``, keeping the most recent ``MAX_JOB_EVENTS``."""
    events.append(event)
    del events[:-MAX_JOB_EVENTS]


def _note_speed(peer: PeerRecord, rep: Report, job: Job) -> None:
    """Folds a report's measured training throughput into the peer's moving average (shown by
    ``dml peers``) and into its average on this job (which places the job's shards)."""
    if rep.samples_per_s > 0:
        old = peer.samples_per_s
        peer.samples_per_s = rep.samples_per_s if old <= 0 else 0.7 * old + 0.3 * rep.samples_per_s
        mine = job.speeds.get(peer.peer_id, 0.0)
        job.speeds[peer.peer_id] = rep.samples_per_s if mine <= 0 else 0.7 * mine + 0.3 * rep.samples_per_s


def shard_bytes(job: Job) -> list[int] | None:
    """Each shard's bytes for a job on a store dataset, estimated as the dataset's bytes times the
    shard's share of the training samples; None for a job whose data is not on the store (or not
    described yet): local data has no cache to fill."""
    total = sum(job.shard_sizes)
    if not job.spec.dataset or job.dataset_bytes <= 0 or total <= 0:
        return None
    return [job.dataset_bytes * n // total for n in job.shard_sizes]


def cache_free(peer: PeerRecord) -> int | None:
    """The free bytes of a peer's dataset cache as it registered (``dml-peer --cache-max-gb``
    minus what it held); None when its cache has no limit (or it said nothing)."""
    v = peer.capability.get("cache_free_bytes")
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None
