"""gRPC servicers of the coordinator. They only translate: proto to a Coordinator call, domain
error to a status code (InvalidSpec: INVALID_ARGUMENT, NotFound: NOT_FOUND, Forbidden:
PERMISSION_DENIED, OverLimit (task code over the size limit): RESOURCE_EXHAUSTED, Stale: FAILED_PRECONDITION, Unavailable (shutting down, or paused by a failed write): UNAVAILABLE).

Every PeerControl call is checked against the cluster id: a caller that names another cluster
(``RegisterPeerRequest.cluster_id``, or the ``dml-cluster-id`` metadata the peer sends on every
call) gets FAILED_PRECONDITION with this coordinator's id in the ``dml-cluster-id`` trailing
metadata, before anything else is looked at, so a peer never takes a wrong coordinator's
NOT_FOUND for an eviction. Who may call them at all: :mod:`coordinator.auth`."""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import pathlib
import re
import threading
from collections.abc import Iterator

import grpc
from dml.v1 import control_pb2, control_pb2_grpc, data_pb2, data_pb2_grpc, jobs_pb2, jobs_pb2_grpc, types_pb2

from dml.common import limits, version
from dml.common.limits import MAX_WORKERS
from dml.common.auth import KEY_BYTES
from dml.coordinator.checkpoint import MAX_STATE_RATIO, STATE_SLACK_BYTES, max_training_state_bytes
from dml.common.datasets import FileEntry, name_error
from dml.coordinator import datastore
from dml.coordinator.codestore import OverLimit
from dml.coordinator.datastore import Dataset
from dml.coordinator.planner import MAX_TRAIN_SAMPLES
from dml.coordinator.service import Coordinator, PeerShardView, Unavailable
from dml.common.spec import DEFAULT_POOL, InvalidSpec, pool_error, spec_from_pb, spec_to_pb
from dml.coordinator.records import (
    LOCAL_DATA,
    MAX_USAGE_COUNT,
    STORE_DATA,
    BadReport,
    DataUsage,
    Forbidden,
    Job,
    JobData,
    NotFound,
    Report,
    RoundRecord,
    Stale,
)
from dml.coordinator.planner import MAX_LABEL_COUNTS
from dml.coordinator.state import DECLINED, MAX_TASK_ERROR_CHARS, READY, TASK, TASK_ERROR

log = logging.getLogger(__name__)
_WORKER_DEVICE = re.compile(r"cuda:[0-9]{1,3}")  # a registration's worker devices

CHUNK_BYTES = 1 << 20
MAX_PLAN_WAIT_S = 30.0
MAX_WATCH_S = 24 * 3600.0
FINISHED_PB = (types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED)
MAX_WATCHERS = 64  # WatchJob streams hold a server thread each; past this they are refused
CLUSTER_METADATA = "dml-cluster-id"  # the caller's cluster on requests, the coordinator's on refusals

TAKE_OUTCOMES = {control_pb2.TAKE_OUTCOME_READY: READY, control_pb2.TAKE_OUTCOME_DECLINED: DECLINED,
                 control_pb2.TAKE_OUTCOME_TASK_ERROR: TASK_ERROR}
MAX_LOCAL_DATASETS = 64  # local datasets one peer may offer (dml-peer --data NAME=PATH)
MAX_FAILURE_DETAIL = 500  # of a failure report's detail, kept (a task's error: MAX_TASK_ERROR_CHARS)

STATE_TO_PB = {
    "PENDING": types_pb2.JOB_STATE_PENDING,
    "RUNNING": types_pb2.JOB_STATE_RUNNING,
    "SUCCEEDED": types_pb2.JOB_STATE_SUCCEEDED,
    "FAILED": types_pb2.JOB_STATE_FAILED,
    "CANCELLED": types_pb2.JOB_STATE_CANCELLED,
}


@contextlib.contextmanager
def _status(context: grpc.ServicerContext) -> Iterator[None]:
    """Maps domain errors to gRPC status codes with their messages."""
    try:
        yield
    except (InvalidSpec, BadReport) as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except NotFound as e:
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    except Forbidden as e:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
    except Stale as e:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except Unavailable as e:
        context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    except OverLimit as e:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))


def _check(context: grpc.ServicerContext, request: object) -> None:
    """INVALID_ARGUMENT when a string in ``request`` is over its length limit (common.limits)."""
    err = limits.message_error(request)  # type: ignore[arg-type]
    if err:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)


def check_cluster(coord: Coordinator, context: grpc.ServicerContext, claimed: str = "") -> None:
    """Aborts with FAILED_PRECONDITION when the caller belongs to another cluster: ``claimed``
    (a request field) or its ``dml-cluster-id`` metadata names an id other than this one's."""
    ids = {v for k, v in (context.invocation_metadata() or ()) if k == CLUSTER_METADATA and isinstance(v, str)}
    ids |= {claimed} if claimed else set()
    other = sorted(i for i in ids if i != coord.cluster_id)
    if other:
        context.set_trailing_metadata(((CLUSTER_METADATA, coord.cluster_id),))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"wrong cluster: this coordinator serves cluster {coord.cluster_id}, the caller belongs to "
                      f"cluster {other[0][:64]} (a coordinator started on another state dir?)")


def _shown(x: float) -> float:
    """A metric as users see it: NaN stays NaN (a NaN loss is news, never 0); the infinities
    validation lets through nowhere would read as NaN too."""
    return x if math.isfinite(x) else math.nan


def ranges_to_pb(ranges: list[list[int]]) -> list[types_pb2.SampleRange]:
    """[shard, pass, start, stop] ranges as protos."""
    return [types_pb2.SampleRange(shard_id=s, data_epoch=e, start=a, stop=b) for s, e, a, b in ranges]


def round_to_pb(r: RoundRecord, ledger: bool = False) -> types_pb2.RoundMetrics:
    """A committed round as proto metrics (with the samples each member consumed if ``ledger``)."""
    m = types_pb2.RoundMetrics(
        round=r.round, epoch=r.epoch, train_loss=_shown(r.train_loss), test_accuracy=_shown(r.test_accuracy),
        test_loss=_shown(r.test_loss), samples=r.samples, digest=r.digest, duration_ms=r.duration_ms,
        members=len(r.members), data_epoch=r.data_epoch, train_ms=r.train_ms, exchange_ms=r.exchange_ms,
        committed_unix_ms=r.committed_ms, test_evaluated=r.test_evaluated, eval_ms=r.eval_ms,
        consensus_distance=_shown(r.consensus_distance), bytes_sent=r.bytes_sent,
        test_metrics={k: _shown(v) for k, v in r.test_metrics.items()},
    )
    if ledger:
        m.consumed.extend(types_pb2.MemberSamples(peer_id=p, ranges=ranges_to_pb(rs)) for p, rs in r.consumed.items())
    return m


def job_to_pb(j: Job, pause_reason: str = "") -> jobs_pb2.JobStatus:
    """A job's user-facing status; ``pause_reason`` (why the coordinator refuses changes) leads
    the reason of a job that has not finished."""
    st = jobs_pb2.JobStatus(
        job_id=j.job_id, spec=spec_to_pb(j.spec), state=STATE_TO_PB[j.state], round=j.committed_round,
        epoch=j.epoch, peers=list(j.members), reason=j.reason, created_unix_ms=j.created_ms,
        updated_unix_ms=j.updated_ms, checkpoint_round=j.checkpoint_round, samples=j.samples,
        data_epoch=j.data_epoch, rolled_back_rounds=j.rolled_back_rounds, evictions_total=j.evictions_total,
        evictions=[jobs_pb2.Eviction(peer_id=e.peer_id, cause=jobs_pb2.EvictionCause.Value(f"EVICTION_CAUSE_{e.cause}"),
                                     reporter=e.reporter, unix_ms=e.unix_ms, epoch=e.epoch, round=e.round,
                                     detail=e.detail) for e in j.evictions],
        epochs=[jobs_pb2.MembershipEpoch(epoch=e.epoch, peers=e.peers, started_unix_ms=e.started_ms, round=e.round)
                for e in j.epochs],
        held_out=[jobs_pb2.PeerExclusion(peer_id=x.peer_id, round=x.round, reason=x.reason, unix_ms=x.unix_ms,
                                         reporters=",".join(x.reporters)) for x in j.held_out],
        quarantined=[jobs_pb2.PeerExclusion(peer_id=q.peer_id, round=q.round, reason=q.reason, unix_ms=q.unix_ms,
                                            reporters=q.reporters) for q in j.quarantined],
        declined=[jobs_pb2.PeerExclusion(peer_id=x.peer_id, round=x.round, reason=x.reason, unix_ms=x.unix_ms)
                  for x in j.declined],
    )
    (st.data_present_samples, st.data_seen_samples, st.data_sources_present,
     st.data_sources_seen) = j.data_present()
    if j.history:
        st.last.CopyFrom(round_to_pb(j.history[-1]))
    if pause_reason and st.state not in FINISHED_PB:
        st.reason = f"{pause_reason}; {j.reason}" if j.reason else pause_reason
    return st


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    """Users' API."""

    def __init__(self, coord: Coordinator) -> None:
        self._c = coord
        self._watchers = threading.BoundedSemaphore(MAX_WATCHERS)

    def SubmitJob(self, request: jobs_pb2.SubmitJobRequest, context: grpc.ServicerContext) -> jobs_pb2.SubmitJobResponse:
        _check(context, request)
        with _status(context):
            return jobs_pb2.SubmitJobResponse(job_id=self._c.submit(spec_from_pb(request.spec), bytes(request.task_code)))
        raise AssertionError("unreachable")

    def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext) -> jobs_pb2.GetJobResponse:
        _check(context, request)
        with _status(context):
            def build(st: object) -> jobs_pb2.GetJobResponse:
                j = self._c.state.job(request.job_id)
                hist = [round_to_pb(r, ledger=True) for r in j.history] if request.include_history else []
                return jobs_pb2.GetJobResponse(job=job_to_pb(j, self._c.pause_reason), history=hist)
            return self._c.view(build)
        raise AssertionError("unreachable")

    def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext) -> jobs_pb2.ListJobsResponse:
        with _status(context):
            return self._c.view(lambda st: jobs_pb2.ListJobsResponse(
                jobs=[job_to_pb(j, self._c.pause_reason) for j in self._c.jobs()]))
        raise AssertionError("unreachable")

    def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: grpc.ServicerContext) -> jobs_pb2.CancelJobResponse:
        _check(context, request)
        with _status(context):
            return jobs_pb2.CancelJobResponse(state=STATE_TO_PB[self._c.cancel(request.job_id)])
        raise AssertionError("unreachable")

    def WatchJob(self, request: jobs_pb2.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[jobs_pb2.JobStatus]:
        _check(context, request)
        if not self._watchers.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"more than {MAX_WATCHERS} watchers; poll GetJob instead")
        try:
            with _status(context):
                left = context.time_remaining()
                budget = min(MAX_WATCH_S, left if left is not None else MAX_WATCH_S)
                seen: tuple[int, int, str, str] | None = None
                while context.is_active() and budget > 0:
                    key, st = self._c.wait_job_change(request.job_id, seen, min(5.0, budget),
                                                      lambda j: job_to_pb(j, self._c.pause_reason))
                    budget -= 5.0
                    if key != seen:
                        seen = key
                        yield st
                    if st.state in FINISHED_PB:
                        return
        finally:
            self._watchers.release()

    def GetShards(self, request: jobs_pb2.GetShardsRequest, context: grpc.ServicerContext) -> jobs_pb2.GetShardsResponse:
        _check(context, request)
        with _status(context):
            v = self._c.shards(request.job_id)
            return jobs_pb2.GetShardsResponse(
                job_id=v.job_id, num_classes=v.num_classes, train_samples=v.train_samples, unassigned=v.unassigned,
                peers=[peer_shards_pb(p) for p in v.peers])
        raise AssertionError("unreachable")

    def ListPeers(self, request: jobs_pb2.ListPeersRequest, context: grpc.ServicerContext) -> jobs_pb2.ListPeersResponse:
        with _status(context):
            return jobs_pb2.ListPeersResponse(peers=[jobs_pb2.PeerInfo(
                peer_id=v.peer_id, address=v.address, pool=v.pool, device=v.device, memory_bytes=v.memory_bytes,
                samples_per_s=v.samples_per_s, state=v.state, job_id=v.job_id, training_share=v.shares.training,
                exchange_share=v.shares.exchanging, idle_share=v.shares.idle, registered_unix_ms=v.registered_ms,
                max_samples=v.max_samples, local_datasets=v.local_datasets, workers=v.workers,
                worker_devices=v.worker_devices) for v in self._c.peers()])
        raise AssertionError("unreachable")

    def DownloadModel(self, request: jobs_pb2.DownloadModelRequest, context: grpc.ServicerContext) -> Iterator[jobs_pb2.ModelChunk]:
        _check(context, request)
        with _status(context):
            rnd, digest, path = self._c.checkpoint(request.job_id)
            yield from _file_chunks(path, rnd, digest)


    def DownloadCheckpoint(self, request: jobs_pb2.DownloadModelRequest, context: grpc.ServicerContext) -> Iterator[jobs_pb2.ModelChunk]:
        _check(context, request)
        with _status(context):
            rnd, sha, path = self._c.training_state(request.job_id)
            yield from _file_chunks(path, rnd, sha)


def peer_shards_pb(p: PeerShardView) -> jobs_pb2.PeerShards:
    """One member's part of a job's data, with its data usage when it reported one."""
    out = jobs_pb2.PeerShards(peer_id=p.peer_id, shard_ids=p.shard_ids, samples=p.samples,
                              label_counts=p.label_counts or [])
    u = p.usage
    if u is not None:
        out.data_source, out.bytes_fetched, out.chunks_fetched = u.source, u.bytes_fetched, u.chunks_fetched
        out.cache_hits, out.damaged_refetched = u.cache_hits, u.damaged
        out.cached_shard_ids.extend(sorted(u.cached_shards))
        if u.cache_free is not None:
            out.has_cache_free, out.cache_free_bytes = True, u.cache_free
    return out


SOURCES = {control_pb2.DATA_SOURCE_LOCAL: LOCAL_DATA, control_pb2.DATA_SOURCE_STORE: STORE_DATA}


def usage_from_pb(request: control_pb2.ReportRoundRequest | control_pb2.TakeJobRequest) -> DataUsage | None:
    """The data usage a report or take carries (None when it carries none: nothing is recorded).
    BadReport for an unknown source, or more cached shard ids than any job has (MAX_TRAIN_SAMPLES:
    counted before a tuple is built; the job's own bound is checked by the state,
    ``check_usage``)."""
    if not request.HasField("data_usage"):
        return None
    u = request.data_usage
    source = SOURCES.get(u.source)
    if source is None:
        raise BadReport(f"data usage: source must be LOCAL or STORE, got {u.source}")
    if len(u.cached_shard_ids) > MAX_TRAIN_SAMPLES:
        raise BadReport(f"data usage: {len(u.cached_shard_ids)} cached shard ids; a job has at most "
                        f"{MAX_TRAIN_SAMPLES} shards")
    return DataUsage(source, u.chunks_fetched, u.bytes_fetched, u.cache_hits, u.damaged_refetched,
                     tuple(u.cached_shard_ids), request.cache_free_bytes if request.has_cache_free else None)


def _file_chunks(path: pathlib.Path, rnd: int, digest: str) -> Iterator[jobs_pb2.ModelChunk]:
    """A stored file as ModelChunks, the first carrying ``rnd`` and ``digest``."""
    with open(path, "rb") as f:
        first = True
        while True:
            data = f.read(CHUNK_BYTES)
            if not data and not first:
                return
            yield jobs_pb2.ModelChunk(round=rnd if first else 0, digest=digest if first else "", data=data)
            first = False


class PeerControlServicer(control_pb2_grpc.PeerControlServicer):
    """Peers' API."""

    def __init__(self, coord: Coordinator) -> None:
        self._c = coord

    def RegisterPeer(self, request: control_pb2.RegisterPeerRequest, context: grpc.ServicerContext) -> control_pb2.RegisterPeerResponse:
        _check(context, request)
        check_cluster(self._c, context, request.cluster_id)
        if why := version.mismatch(version.PROTOCOL_VERSION, request.protocol_version, "this coordinator", "the peer"):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot register: {why}")
        try:
            limits.dialable_address(request.address)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot register address {request.address!r}: {e}")
        if request.public_key and len(request.public_key) != KEY_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"public_key must be a raw Ed25519 key of {KEY_BYTES} bytes, got {len(request.public_key)}")
        if request.capability.pool and (err := pool_error(request.capability.pool)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot register: {err}")
        c = request.capability
        if c.has_cache_free and c.cache_free_bytes > MAX_USAGE_COUNT:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"cannot register: cache_free_bytes must be at most {MAX_USAGE_COUNT}, got {c.cache_free_bytes}")
        names = list(c.local_datasets)
        if len(names) > MAX_LOCAL_DATASETS or len(set(names)) != len(names):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot register: at most {MAX_LOCAL_DATASETS} local "
                                                            f"datasets, each named once (got {len(names)})")
        for name in names:
            if err := name_error(name):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot register local dataset: {err}")
        if c.workers > MAX_WORKERS or len(c.worker_devices) > MAX_WORKERS or (
                c.worker_devices and len(c.worker_devices) != c.workers):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot register: at most {MAX_WORKERS} workers, and one "
                                                            f"device per worker when devices are listed (got "
                                                            f"{c.workers} workers, {len(c.worker_devices)} devices)")
        for dev in c.worker_devices:
            if not _WORKER_DEVICE.fullmatch(dev):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"cannot register: a worker device must be cuda:N, got {dev[:40]!r}")
        cap = {"device": c.device, "memory_bytes": c.memory_bytes, "pool": c.pool or DEFAULT_POOL,
               "max_samples": c.max_samples, "cache_free_bytes": c.cache_free_bytes if c.has_cache_free else None,
               "local_datasets": names, "workers": max(1, c.workers), "worker_devices": list(c.worker_devices)}
        with _status(context):
            pid, token = self._c.register(request.address, cap, bytes(request.public_key), request.protocol_version)
            cfg = self._c.config
            return control_pb2.RegisterPeerResponse(
                peer_id=pid, heartbeat_interval_ms=cfg.heartbeat_interval_ms, peer_timeout_ms=cfg.peer_timeout_ms,
                round_deadline_ms=cfg.round_deadline_ms, cluster_id=self._c.cluster_id, peer_token=token,
                coordinator_public_key=self._c.public_key, protocol_version=version.PROTOCOL_VERSION,
            )
        raise AssertionError("unreachable")

    def Heartbeat(self, request: control_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> control_pb2.HeartbeatResponse:
        _check(context, request)
        check_cluster(self._c, context)
        with _status(context):
            job_id, epoch, held_out = self._c.heartbeat(request.peer_id)
            return control_pb2.HeartbeatResponse(job_id=job_id, epoch=epoch, held_out_reason=held_out,
                                                 cluster_id=self._c.cluster_id,
                                                 protocol_version=version.PROTOCOL_VERSION)
        raise AssertionError("unreachable")

    def GetPlan(self, request: control_pb2.GetPlanRequest, context: grpc.ServicerContext) -> control_pb2.GetPlanResponse:
        _check(context, request)
        check_cluster(self._c, context)
        with _status(context):
            wait = min(request.wait_ms / 1000.0, MAX_PLAN_WAIT_S)
            left = context.time_remaining()
            if left is not None:
                wait = max(0.0, min(wait, left - 0.2))
            last = (request.last_job_id, request.last_round, request.last_epoch)
            plan = self._c.wait_plan(request.peer_id, last, wait, lambda job: self._plan_pb(job, request.peer_id),
                                     build_take=self._take_pb)
            if plan is None:
                return control_pb2.GetPlanResponse(has_plan=False)
            return control_pb2.GetPlanResponse(has_plan=True, plan=plan)
        raise AssertionError("unreachable")

    @staticmethod
    def _take_pb(job: Job) -> types_pb2.Plan:
        """A take plan: the job and its spec only (the peer answers with TakeJob)."""
        return types_pb2.Plan(job_id=job.job_id, take=True, spec=spec_to_pb(job.spec))

    def _plan_pb(self, job: Job, peer_id: str) -> types_pb2.Plan:
        """The plan proto; called under the coordinator's lock."""
        shards = self._c.shard_indices(job)
        st = self._c.state
        gossip = job.gossip.active  # a gossip step is this member's alone: the others' samples are not sent
        members = [
            types_pb2.Member(peer_id=m, address=st.peers[m].address if m in st.peers else "",
                             shard_ids=job.assignment.get(m, []),
                             samples=ranges_to_pb(job.allocation.get(m, []) if m == peer_id or not gossip else []),
                             public_key=bytes.fromhex(st.peers[m].public_key) if m in st.peers else b"")
            for m in job.members
        ]
        mine = {r[0] for r in job.allocation.get(peer_id, [])}
        _, rnd, epoch = st.plan_key(job, peer_id)
        return types_pb2.Plan(
            job_id=job.job_id, round=rnd, epoch=epoch, members=members, spec=spec_to_pb(job.spec),
            checkpoint=not gossip and job.wants_checkpoint(rnd), data_epoch=job.data_epoch,
            start_digest="" if gossip else job.start_digest, gossip=gossip,
            evaluate=gossip and job.gossip.eval_step.get(peer_id) == rnd,
            shard_indices={s: types_pb2.ShardIndices(indices=shards[s].tolist()) for s in mine} if shards else {},
            member_ticket=self._c.ticket(job.job_id, epoch, peer_id),
        )

    def ReportRound(self, request: control_pb2.ReportRoundRequest, context: grpc.ServicerContext) -> control_pb2.ReportRoundResponse:
        _check(context, request)
        check_cluster(self._c, context)
        with _status(context):
            rep = Report(
                samples=request.samples, train_loss=request.train_loss, digest=request.digest,
                test_accuracy=request.test_accuracy if request.has_test_metrics else None,
                test_loss=request.test_loss if request.has_test_metrics else None,
                samples_per_s=request.train_samples_per_s, train_ms=request.train_ms,
                exchange_ms=request.exchange_ms, eval_ms=request.eval_ms,
                pair_distance=request.pair_distance if request.has_pair_distance else None,
                bytes_sent=request.bytes_sent, update_norm=request.update_norm,
                test_metrics=dict(request.test_metrics) if request.has_test_metrics else {},
            )
            committed, nxt = self._c.report(request.peer_id, request.job_id, request.round, request.epoch, rep,
                                            lambda job: self._plan_pb(job, request.peer_id),
                                            usage=usage_from_pb(request))
            if nxt is None:
                return control_pb2.ReportRoundResponse(committed=committed)
            return control_pb2.ReportRoundResponse(committed=committed, has_next=True, next=nxt)
        raise AssertionError("unreachable")

    def ReportFailure(self, request: control_pb2.ReportFailureRequest, context: grpc.ServicerContext) -> control_pb2.ReportFailureResponse:
        _check(context, request)
        check_cluster(self._c, context)
        with _status(context):
            if request.kind not in control_pb2.FailureKind.values():
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown failure kind {request.kind}")
            kind = "" if request.kind == control_pb2.FAILURE_KIND_UNSPECIFIED else \
                control_pb2.FailureKind.Name(request.kind).removeprefix("FAILURE_KIND_")
            keep = MAX_TASK_ERROR_CHARS if kind == TASK else MAX_FAILURE_DETAIL
            self._c.report_failure(request.peer_id, request.job_id, request.round, request.epoch,
                                   request.suspect_peer_id, request.detail[:keep], kind)
            return control_pb2.ReportFailureResponse()
        raise AssertionError("unreachable")

    def TakeJob(self, request: control_pb2.TakeJobRequest, context: grpc.ServicerContext) -> control_pb2.TakeJobResponse:
        _check(context, request)
        check_cluster(self._c, context)
        with _status(context):
            outcome = TAKE_OUTCOMES.get(request.outcome)
            if outcome is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"take outcome must be READY, DECLINED or TASK_ERROR, got {request.outcome}")
            data, labels, counts = None, b"", None
            if outcome == READY:
                if not request.HasField("data"):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a READY take must describe the data (data)")
                d = request.data
                data = JobData(train_samples=d.train_samples, test_samples=d.test_samples, num_classes=d.num_classes,
                               batch_size=d.batch_size, num_params=d.num_params, digest=d.data_digest,
                               has_labels=bool(d.labels))
                labels = bytes(d.labels)
                if len(d.label_counts) > MAX_LABEL_COUNTS:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"at most {MAX_LABEL_COUNTS} label counts, got {len(d.label_counts)}")
                counts = list(d.label_counts)
            self._c.take(request.peer_id, request.job_id, str(outcome), request.detail[:MAX_TASK_ERROR_CHARS], data,
                         labels, usage=usage_from_pb(request) if outcome == READY else None, label_counts=counts)
            return control_pb2.TakeJobResponse()

    def FetchTaskCode(self, request: control_pb2.FetchTaskCodeRequest, context: grpc.ServicerContext) -> control_pb2.FetchTaskCodeResponse:
        _check(context, request)
        check_cluster(self._c, context)
        if not request.digest or len(request.digest) != 64 or request.digest.strip("0123456789abcdef"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"digest must be 64 lowercase hex digits, got {request.digest[:80]!r}")
        with _status(context):
            return control_pb2.FetchTaskCodeResponse(bundle=self._c.task_code(request.peer_id, request.job_id, request.digest))
        raise AssertionError("unreachable")

    def GetShardIndices(self, request: control_pb2.GetShardIndicesRequest,
                        context: grpc.ServicerContext) -> control_pb2.GetShardIndicesResponse:
        _check(context, request)
        check_cluster(self._c, context)
        with _status(context):
            got = self._c.assigned_indices(request.peer_id, request.job_id, list(request.shard_ids))
            return control_pb2.GetShardIndicesResponse(
                shard_indices={s: types_pb2.ShardIndices(indices=idx.tolist()) for s, idx in got.items()})
        raise AssertionError("unreachable")

    def UploadCheckpoint(self, request_iterator: Iterator[control_pb2.CheckpointChunk], context: grpc.ServicerContext) -> control_pb2.UploadCheckpointResponse:
        check_cluster(self._c, context)
        with _status(context):
            first = next(request_iterator, None)
            if first is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty checkpoint upload")
            assert first is not None
            _check(context, first)
            # Refuse a stale upload before receiving (and writing) the rest of it.
            self._c.check_checkpoint(first.peer_id, first.job_id, first.round, first.epoch)
            if first.kind != control_pb2.CHECKPOINT_KIND_MODEL:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a checkpoint upload starts with the model's state_dict")
            model, state, state_sha = [first.data], None, ""
            model_size = state_size = 0
            limit = 0
            for chunk in itertools.chain([first], request_iterator):
                if chunk.kind == control_pb2.CHECKPOINT_KIND_MODEL:
                    if state is not None:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model chunks after the training state")
                    if chunk is not first:
                        model.append(chunk.data)
                    model_size += len(chunk.data)
                elif chunk.kind == control_pb2.CHECKPOINT_KIND_TRAINING_STATE:
                    if state is None:  # its first chunk declares the state's sha256
                        state, state_sha, limit = [], chunk.digest, max_training_state_bytes(model_size)
                    state_size += len(chunk.data)
                    if state_size > limit:  # refused before the rest arrives, nothing stored
                        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"training state upload over {limit} bytes ({MAX_STATE_RATIO}x the model's "
                                      f"state_dict of {model_size} bytes + {STATE_SLACK_BYTES})")
                    state.append(chunk.data)
                else:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown checkpoint chunk kind {chunk.kind}")
            data = b"".join(model)
            self._c.store_checkpoint(first.peer_id, first.job_id, first.round, first.epoch, first.digest, data,
                                     b"".join(state) if state is not None else None, state_sha)
            return control_pb2.UploadCheckpointResponse(size_bytes=len(data))
        raise AssertionError("unreachable")


def dataset_to_pb(ds: Dataset) -> data_pb2.DatasetInfo:
    """A committed dataset as `dml data ls` shows it."""
    return data_pb2.DatasetInfo(name=ds.name, digest=ds.digest, files=len(ds.files), bytes=ds.bytes,
                                chunks=len(ds.chunks), created_unix_ms=ds.created_ms)


def files_to_pb(files: tuple[FileEntry, ...]) -> list[data_pb2.DatasetFile]:
    """A manifest's files as protos."""
    return [data_pb2.DatasetFile(path=f.path, size=f.size, chunks=list(f.chunks)) for f in files]


@contextlib.contextmanager
def _data_status(context: grpc.ServicerContext) -> Iterator[None]:
    """Maps the dataset store's errors (and the coordinator's) to status codes."""
    try:
        with _status(context):
            yield
    except datastore.BadData as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except datastore.Missing as e:
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    except datastore.Conflict as e:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except datastore.OverLimit as e:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except OSError as e:
        log.error("dataset store I/O failed: %s", e)
        context.abort(grpc.StatusCode.UNAVAILABLE, f"the coordinator cannot read or write its dataset store: "
                                                   f"{e.strerror or e}")


class DataServicer(data_pb2_grpc.DataServiceServicer):
    """DataService over the coordinator's :class:`~dml.coordinator.datastore.DataStore` (who
    may call what: :mod:`coordinator.auth`)."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.store = coord.data

    def HaveChunks(self, request: data_pb2.HaveChunksRequest, context: grpc.ServicerContext) -> data_pb2.HaveChunksResponse:
        _check(context, request)
        with _data_status(context):
            return data_pb2.HaveChunksResponse(missing=self.store.missing(list(request.digests), request.dataset_bytes))

    def PutChunk(self, request: data_pb2.PutChunkRequest, context: grpc.ServicerContext) -> data_pb2.PutChunkResponse:
        _check(context, request)
        with _data_status(context):
            return data_pb2.PutChunkResponse(stored=self.store.put_chunk(request.digest, request.data))

    def CommitDataset(self, request: data_pb2.CommitDatasetRequest,
                      context: grpc.ServicerContext) -> data_pb2.CommitDatasetResponse:
        _check(context, request)
        files = [FileEntry(f.path, f.size, tuple(f.chunks)) for f in request.files]
        with _data_status(context):
            ds, created = self.store.commit(request.name, files)
            return data_pb2.CommitDatasetResponse(dataset=dataset_to_pb(ds), created=created)

    def ListDatasets(self, request: data_pb2.ListDatasetsRequest,
                     context: grpc.ServicerContext) -> data_pb2.ListDatasetsResponse:
        return data_pb2.ListDatasetsResponse(datasets=[dataset_to_pb(d) for d in self.store.list()])

    def RemoveDataset(self, request: data_pb2.RemoveDatasetRequest,
                      context: grpc.ServicerContext) -> data_pb2.RemoveDatasetResponse:
        _check(context, request)
        with _data_status(context):
            ds, gone = self.coord.remove_dataset(request.name)
            return data_pb2.RemoveDatasetResponse(dataset=dataset_to_pb(ds), chunks_deleted=gone)

    def GetDataset(self, request: data_pb2.GetDatasetRequest, context: grpc.ServicerContext) -> data_pb2.GetDatasetResponse:
        _check(context, request)
        with _data_status(context):
            ds = self.store.get(request.name)
            return data_pb2.GetDatasetResponse(dataset=dataset_to_pb(ds), files=files_to_pb(ds.files))

    def GetChunk(self, request: data_pb2.GetChunkRequest, context: grpc.ServicerContext) -> data_pb2.GetChunkResponse:
        _check(context, request)
        with _data_status(context):
            return data_pb2.GetChunkResponse(digest=request.digest, data=self.store.get_chunk(request.digest))
