"""The coordinator's records: peers, jobs, rounds, reports, and the errors of its state machine.

Plain data, stored as JSON by ``dml.coordinator.store``; the rules that change them are in
``dml.coordinator.state``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dml.common.limits import MAX_WORKERS
from dml.common.spec import DEFAULT_POOL, JobSpec
from dml.common.task import MAX_METRIC_NAME, MAX_METRICS

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)

# Why a peer left a job's membership: the names of dml.v1.EvictionCause without their prefix.
HEARTBEAT_TIMEOUT = "HEARTBEAT_TIMEOUT"  # no heartbeat for the peer timeout
NEIGHBOUR_REPORT = "NEIGHBOUR_REPORT"  # a ring neighbour or gossip partner reported it failed
SELF_REPORT = "SELF_REPORT"  # it reported a local failure and gave up its place
ROUND_DEADLINE = "ROUND_DEADLINE"  # it had not reported when the round (or its gossip step) passed its deadline
REPLACED = "REPLACED"  # a peer registered at its address (it restarted)
UNREACHABLE = "UNREACHABLE"  # members could not reach it, or it them (judged from several reports): held out
QUARANTINED = "QUARANTINED"  # it sent non-finite or absurd values: out of the job for good
PROTOCOL_MISMATCH = "PROTOCOL_MISMATCH"  # registered with another release's protocol (found at a restart)
EVICTION_CAUSES = (HEARTBEAT_TIMEOUT, NEIGHBOUR_REPORT, SELF_REPORT, ROUND_DEADLINE, REPLACED, UNREACHABLE, QUARANTINED,
                   PROTOCOL_MISMATCH)
MAX_JOB_EVENTS = 256  # a job keeps its most recent evictions and epochs, this many of each


class NotFound(Exception):
    """Unknown or evicted peer, unknown job."""


class Stale(Exception):
    """A report or upload for a round or epoch that is no longer current."""


class Forbidden(Exception):
    """A peer acting outside its membership: for a job it never belonged to, or naming a suspect
    outside the epoch (PERMISSION_DENIED)."""


class BadReport(ValueError):
    """A report that contradicts the plan (e.g. a sample count other than allocated)."""


@dataclass
class PeerRecord:
    """A registered peer."""

    peer_id: str
    address: str
    capability: dict[str, Any]
    registered_ms: int
    last_seen_ms: int
    job_id: str = ""
    samples_per_s: float = 0.0  # measured training throughput (moving average)
    held_out_job: str = ""  # the running job that holds this peer out of its rings ("" none)
    held_out_reason: str = ""  # why, as its heartbeats tell it
    token_hash: str = ""  # sha256 hex of the credential issued at registration ("" before auth)
    public_key: str = ""  # the peer's Ed25519 public key, hex (its exchange calls are signed with it)
    protocol_version: int = 0  # what it registered with (dml.common.version; 0 in records from before 3)


def max_samples(peer: PeerRecord) -> int:
    """The most training samples a peer takes (``dml-peer --max-samples``, kept in its
    capability at registration); 0 for no cap."""
    v = peer.capability.get("max_samples", 0)
    return v if isinstance(v, int) and v > 0 else 0


def peer_workers(peer: PeerRecord) -> int:
    """The training workers of a peer (``dml-peer --workers`` / ``--gpus``, kept in its
    capability at registration): its allocation is that many members' samples; 1 for a
    single-process peer."""
    v = peer.capability.get("workers", 1)
    return v if isinstance(v, int) and 1 <= v <= MAX_WORKERS else 1


def peer_pool(peer: PeerRecord) -> str:
    """The pool a peer serves (``dml-peer --pool``, kept in its capability at registration);
    ``DEFAULT_POOL`` for a peer that named none."""
    v = peer.capability.get("pool", "")
    return v if isinstance(v, str) and v else DEFAULT_POOL


def job_pool(job: Job) -> str:
    """The pool a job runs on (``dml submit --pool``); ``DEFAULT_POOL`` for a job that named
    none, like a Slurm job without a partition: it never takes a named pool's peers."""
    return job.spec.pool or DEFAULT_POOL


@dataclass
class Report:
    """One member's report of a round."""

    samples: int
    train_loss: float
    digest: str
    test_accuracy: float | None = None
    test_loss: float | None = None
    samples_per_s: float = 0.0
    train_ms: int = 0
    exchange_ms: int = 0
    eval_ms: int = 0
    pair_distance: float | None = None  # gossip: distance to the partner before averaging
    bytes_sent: int = 0
    update_norm: float = 0.0  # ||parameters after local training - the round's start||
    test_metrics: dict[str, float] = field(default_factory=dict)  # the task's own, by name (with test_accuracy)


# What a report may say (check_report): beyond these it is nonsense, not a measurement.
MAX_REPORT_MS = 7 * 24 * 3600 * 1000  # a week
MAX_REPORT_BYTES = 1 << 50  # a petabyte sent in one round


def check_report(rep: Report) -> None:
    """Raises BadReport unless every metric of ``rep`` is in range: test accuracy in [0, 1] (or
    NaN, nothing to test on), rates finite or NaN and not negative, losses and the task's own
    test metrics finite or NaN (a user's loss may be negative), at most MAX_METRICS of those
    with names of 1 to MAX_METRIC_NAME characters, the update's norm finite and not negative,
    times and byte counts sane."""
    def real(name: str, x: float | None, nan_ok: bool = True, hi: float = math.inf, lo: float = 0.0) -> None:
        if x is None or (nan_ok and math.isnan(x)):
            return
        if not (math.isfinite(x) and lo <= x <= hi):
            raise BadReport(f"{name} must be {'NaN or ' if nan_ok else ''}in [{lo:g}, {hi:g}], got {x}")

    real("test_accuracy", rep.test_accuracy, hi=1.0)
    real("train_loss", rep.train_loss, lo=-math.inf)
    real("test_loss", rep.test_loss, lo=-math.inf)
    if len(rep.test_metrics) > MAX_METRICS:
        raise BadReport(f"at most {MAX_METRICS} test metrics, got {len(rep.test_metrics)}")
    for k, v in rep.test_metrics.items():
        if not isinstance(k, str) or not 0 < len(k) <= MAX_METRIC_NAME:
            raise BadReport(f"a test metric's name must have 1 to {MAX_METRIC_NAME} characters, got {k!r:.80}")
        real(f"test metric {k!r}", v, lo=-math.inf)
    real("train_samples_per_s", rep.samples_per_s)
    real("pair_distance", rep.pair_distance)
    real("update_norm", rep.update_norm, nan_ok=False)
    for name in ("train_ms", "exchange_ms", "eval_ms"):
        real(name, getattr(rep, name), nan_ok=False, hi=MAX_REPORT_MS)
    real("bytes_sent", rep.bytes_sent, nan_ok=False, hi=MAX_REPORT_BYTES)


# Where a peer's data of a job comes from (DataUsage.source): dml.v1.DataSource without its prefix, lower case.
LOCAL_DATA, STORE_DATA = "local", "store"
DATA_SOURCES = (LOCAL_DATA, STORE_DATA)
MAX_USAGE_COUNT = 1 << 50  # a chunk or byte count a data usage report may carry (a petabyte)


@dataclass(frozen=True)
class DataUsage:
    """What one job's data cost a peer (its last TakeJob or ReportRound said so): totals since it
    took the job, the shards it holds whole in its cache, and its cache's free bytes (None: no
    limit). Kept in memory only (``Job.data_usage``)."""

    source: str  # LOCAL_DATA or STORE_DATA
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    cache_hits: int = 0
    damaged: int = 0  # damaged cache files fetched again
    cached_shards: tuple[int, ...] = ()
    cache_free: int | None = None


def check_usage(u: DataUsage, num_shards: int, on_store: bool) -> None:
    """Raises BadReport unless ``u`` can be true of a job of ``num_shards`` shards whose data
    is (``on_store``) or is not on the coordinator's store: a known source matching the job's,
    counts in range, at most ``num_shards`` distinct cached shard ids, each below ``num_shards``,
    none for local data. The count is checked before anything is built from the ids."""
    if u.source not in DATA_SOURCES:
        raise BadReport(f"data usage: unknown source {u.source!r:.40}; one of {', '.join(DATA_SOURCES)}")
    want = STORE_DATA if on_store else LOCAL_DATA
    if u.source != want:
        raise BadReport(f"data usage: source {u.source}, but the job's data is {want} "
                        f"({'a dataset of the store' if on_store else 'not on the store'})")
    for name in ("chunks_fetched", "bytes_fetched", "cache_hits", "damaged"):
        v = getattr(u, name)
        if not 0 <= v <= MAX_USAGE_COUNT:
            raise BadReport(f"data usage: {name} must be in [0, {MAX_USAGE_COUNT}], got {v}")
    if u.cache_free is not None and not 0 <= u.cache_free <= MAX_USAGE_COUNT:
        raise BadReport(f"data usage: cache free bytes must be in [0, {MAX_USAGE_COUNT}], got {u.cache_free}")
    ids = u.cached_shards
    if ids and u.source == LOCAL_DATA:
        raise BadReport(f"data usage: {len(ids)} cached shards reported for local data (a local job caches none)")
    if len(ids) > num_shards:
        raise BadReport(f"data usage: {len(ids)} cached shard ids for a job of {num_shards} shards")
    bad = [s for s in ids if not 0 <= s < num_shards]
    if bad:
        raise BadReport(f"data usage: unknown shard id {bad[0]} (the job has shards 0..{num_shards - 1})")
    if len(set(ids)) != len(ids):
        raise BadReport("data usage: a cached shard id is listed twice")


@dataclass
class RoundRecord:
    """A committed round."""

    round: int
    epoch: int
    samples: int
    train_loss: float
    test_accuracy: float
    test_loss: float
    digest: str
    duration_ms: int
    members: list[str]
    committed_ms: int
    data_epoch: int = 1  # the pass every shard had reached when the round committed
    consumed: dict[str, list[list[int]]] = field(default_factory=dict)  # peer -> [shard, pass, start, stop]
    train_ms: int = 0  # the slowest member's preparation plus training
    exchange_ms: int = 0  # the slowest member's all-reduce
    test_evaluated: bool = True  # False: test metrics carried from the last evaluated round
    eval_ms: int = 0
    consensus_distance: float = 0.0  # gossip: estimated spread of the members' parameters
    bytes_sent: int = 0  # parameters sent between members in the round, all together
    test_metrics: dict[str, float] = field(default_factory=dict)  # the task's own (carried like test_accuracy)


@dataclass
class GossipWindow:
    """The virtual round the gossip phase is gathering: what its steps reported so far."""

    start_ms: int = 0
    samples: int = 0
    loss_sum: float = 0.0  # train loss times samples, summed over the steps
    bytes_sent: int = 0
    train_ms: int = 0  # the slowest step's
    exchange_ms: int = 0  # the slowest step's
    eval_ms: int = 0  # the slowest step's
    evaluations: int = 0  # steps that reported test metrics
    accuracy_sum: float = 0.0  # over those steps
    test_loss_sum: float = 0.0  # over those steps
    metric_sums: dict[str, list[float]] = field(default_factory=dict)  # task metric -> [sum, steps reporting it]
    consumed: dict[str, list[list[int]]] = field(default_factory=dict)  # member -> [shard, pass, start, stop]


@dataclass
class GossipPhase:
    """A gossip job's state before its last round (see ``dml.coordinator.state``)."""

    active: bool = False
    peers: int = 0  # members when the phase started: steps per virtual round
    steps: int = 0  # steps reported, by departed members too
    step: dict[str, int] = field(default_factory=dict)  # member -> the step it runs now
    issued_ms: dict[str, int] = field(default_factory=dict)  # member -> when that step was issued
    eval_step: dict[str, int] = field(default_factory=dict)  # member -> its step that evaluates
    distance: dict[str, float] = field(default_factory=dict)  # member -> last distance to a partner
    window: GossipWindow = field(default_factory=GossipWindow)


@dataclass
class Eviction:
    """One removal of a peer from a job's membership."""

    peer_id: str
    cause: str  # one of EVICTION_CAUSES
    reporter: str  # the peer that reported it (NEIGHBOUR_REPORT), else ""
    unix_ms: int
    epoch: int  # the membership epoch it ended (the next one starts without the peer)
    round: int  # the round under way (re-issued under the next epoch)
    detail: str = ""  # what the coordinator saw, for people


@dataclass
class BrokenLink:
    """A member's report that it could not reach another (``dml.coordinator.partitions``)."""

    reporter: str
    suspect: str
    sender: str  # the link that failed, in the direction data flows over it
    receiver: str
    round: int
    unix_ms: int
    detail: str = ""


@dataclass
class Exclusion:
    """A peer held out of a job's rings, and why (JobStatus.held_out)."""

    peer_id: str
    round: int  # the round under way
    reason: str
    unix_ms: int
    reporters: list[str] = field(default_factory=list)  # whose reports led to it
    retry_ms: int = 0  # from when it may be tried again, should the job run short of peers


@dataclass
class Quarantine:
    """A peer quarantined for a job: never a member of it again (matched by id and by address,
    which a restarted peer keeps when it registers under a new id)."""

    peer_id: str
    address: str
    round: int  # the round under way when it was quarantined
    reason: str  # what the coordinator saw, for people
    unix_ms: int
    reporters: str  # the member(s) whose reports led to it, comma-separated


@dataclass
class JobData:
    """What the first peer to take a job found of its data (``TakeJob(READY)``): enough to cut
    and check shards without importing the task. The labels themselves (one per training
    sample, when the task has them) are stored beside the job, not in it: this record is saved
    with every change of the job, the labels once."""

    train_samples: int
    test_samples: int = 0
    num_classes: int = 0  # 0: the task gave no labels
    batch_size: int = 0  # the task's default batch size (0: none)
    num_params: int = 0
    digest: str = ""  # sha256 over the sample count and the labels: every peer must find the same
    has_labels: bool = False


@dataclass
class MembershipEpoch:
    """One membership epoch of a job: its members in ring order, from when and which round."""

    epoch: int
    peers: list[str]
    started_ms: int
    round: int  # the first round planned under it


@dataclass
class Job:
    """A job and its round state."""

    job_id: str
    spec: JobSpec
    created_ms: int
    shard_sizes: list[int] = field(default_factory=list)  # samples per shard, fixed at submit time
    state: str = PENDING
    updated_ms: int = 0
    reason: str = ""
    committed_round: int = 0
    epoch: int = 0
    members: list[str] = field(default_factory=list)
    assignment: dict[str, list[int]] = field(default_factory=dict)
    round_started_ms: int = 0
    reports: dict[str, Report] = field(default_factory=dict)
    history: list[RoundRecord] = field(default_factory=list)
    samples: int = 0
    checkpoint_round: int = 0
    checkpoint_digest: str = ""
    pending_checkpoint: tuple[int, str] | None = None  # (round, digest) uploaded, not yet committed
    mismatches: int = 0
    data_epoch: int = 1  # the pass every shard has reached
    cursors: dict[int, tuple[int, int]] = field(default_factory=dict)  # shard -> committed (pass, position)
    allocation: dict[str, list[list[int]]] = field(default_factory=dict)  # this round: peer -> ranges
    waiting_since_ms: int = 0  # when the job fell below min_peers (0: not waiting)
    holders: list[str] = field(default_factory=list)  # live peers known to hold the committed round
    reissues: int = 0  # times the current round was re-issued
    rolled_back_rounds: int = 0  # committed rounds given up because no peer held them any more
    gossip: GossipPhase = field(default_factory=GossipPhase)
    evictions: list[Eviction] = field(default_factory=list)  # oldest first, the most recent MAX_JOB_EVENTS
    evictions_total: int = 0  # including those no longer listed
    epochs: list[MembershipEpoch] = field(default_factory=list)  # oldest first, the most recent MAX_JOB_EVENTS
    broken_links: list[BrokenLink] = field(default_factory=list)  # reported among the current members
    held_out: list[Exclusion] = field(default_factory=list)  # oldest first, the most recent MAX_JOB_EVENTS
    quarantined: list[Quarantine] = field(default_factory=list)  # oldest first; every one is kept
    pending_checkpoint_peer: str = ""  # who uploaded pending_checkpoint
    pending_checkpoint_state: str = ""  # sha256 of the training state uploaded with it ("" none)
    checkpoint_state_digest: str = ""  # sha256 of the checkpoint's training-state file ("" none)
    # Takes (docs/architecture.md, "Taking a job"): a job submitted without its shard sizes
    # (every job dml-coordinator accepts) admits only peers that took it and found its data.
    needs_take: bool = False
    data: JobData | None = None  # fixed by the first READY take (None until then)
    ready: list[str] = field(default_factory=list)  # peers that took the job and found its data
    declined: list[Exclusion] = field(default_factory=list)  # peers that declined it (or whose data differs)
    dataset_bytes: int = 0  # the store dataset's bytes (JobSpec.dataset), fixed at submit; 0: not on the store
    # peer -> its last DataUsage for this job (TakeJob, ReportRound). In memory only, never stored
    # (store.job_to_dict leaves it out): a restarted coordinator knows no cache until each peer's
    # next report, which places as if nothing were cached (a fetch too many, never a wrong claim).
    data_usage: dict[str, DataUsage] = field(default_factory=dict)
    # Measured training samples/s of each member on this job (a moving average), which places
    # its shards: another job's task may be far faster or slower. Memory only.
    speeds: dict[str, float] = field(default_factory=dict)
    # --placement local (docs/architecture.md, "Peer-local data"): shard s is one peer's own data,
    # indexed by that peer alone; the ledger's key (shard, index) is then (the peer's data, index).
    local_sources: list[str] = field(default_factory=list)  # shard id -> its data's key (address, data digest)
    local_shard: dict[str, int] = field(default_factory=dict)  # peer id -> the shard of its own data
    local_label_counts: list[list[int]] = field(default_factory=list)  # shard id -> samples per label ([]: none)

    @property
    def local(self) -> bool:
        """Whether each member trains on its own data (``--placement local``)."""
        return self.spec.placement == "local"

    def data_present(self) -> tuple[int, int, int, int]:
        """(samples present, samples seen, sources present, sources seen) of a ``local`` job:
        the data of its live members against all the peers' data it has seen (a source that
        came back, a restarted peer with the same data, counts once); a finished job's as it
        ended. (0, 0, 0, 0) for other jobs."""
        if not self.local:
            return 0, 0, 0, 0
        holders = self.members if self.state not in FINISHED else list(self.assignment)  # its last placement
        here = {s for m in holders for s in self.assignment.get(m, [])}
        return (sum(self.shard_sizes[s] for s in here), sum(self.shard_sizes), len(here), len(self.shard_sizes))

    def declined_by(self, peer_id: str) -> bool:
        """Whether ``peer_id`` declined the job (or was refused it): it is not offered it again."""
        return any(x.peer_id == peer_id for x in self.declined)

    def may_admit(self, peer_id: str) -> bool:
        """Whether the job may take ``peer_id`` into its rings: it took the job, if the job needs takes."""
        return not self.needs_take or peer_id in self.ready

    def excludes(self, peer: PeerRecord) -> bool:
        """Whether ``peer`` is quarantined for this job (by its id, or the address it joins from)."""
        return any(q.peer_id == peer.peer_id or (q.address and q.address == peer.address) for q in self.quarantined)

    @property
    def start_digest(self) -> str:
        """Digest of the parameters the current round starts from ("" for the seeded init)."""
        return self.history[-1].digest if self.committed_round else ""

    def allocated(self, peer_id: str) -> int:
        """Samples allocated to a member in the current round."""
        return sum(stop - start for _, _, start, stop in self.allocation.get(peer_id, []))

    @property
    def round(self) -> int:
        """The round being run (committed + 1)."""
        return self.committed_round + 1

    def wants_checkpoint(self, rnd: int) -> bool:
        """Whether round ``rnd``'s first member uploads a checkpoint before reporting."""
        return rnd == self.spec.rounds or rnd % self.spec.checkpoint_every_rounds == 0


@dataclass(frozen=True)
class Changes:
    """What a call changed, for the caller to persist and announce."""

    jobs: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    removed_peers: tuple[str, ...] = ()
    committed: tuple[tuple[str, int], ...] = ()
    data: tuple[str, ...] = ()  # jobs whose data (JobData, and labels) was fixed by this call

    def __or__(self, other: Changes) -> Changes:
        return Changes(
            tuple(dict.fromkeys(self.jobs + other.jobs)),
            tuple(dict.fromkeys(self.peers + other.peers)),
            tuple(dict.fromkeys(self.removed_peers + other.removed_peers)),
            self.committed + other.committed,
            tuple(dict.fromkeys(self.data + other.data)),
        )
