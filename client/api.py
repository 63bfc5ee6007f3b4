"""The job API as a small library over ``dml.v1`` JobService: submit, status, list, watch,
download, cancel, health. No argument parsing and no printing: the ``dml`` CLI, ``dml local`` and
the benchmarks sit on top of it.

Every failure is an :class:`ApiError` carrying the exit code a command line tool should leave
with: :data:`BAD_INPUT` (2) for what the caller got wrong (a malformed address, an invalid job
spec, an unknown job id), :data:`FAILED` (1) for an unreachable coordinator or a server error.

Loads no server code, no SQLite and no torch.
"""
from __future__ import annotations

import hashlib
import logging
import math
import pathlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import grpc

from dml.common import rpc, taskcode
from dml.common.spec import JobSpec, spec_to_pb
from dml.common.tls import TlsConfig
from dml.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")

BAD_INPUT = 2
FAILED = 1
DEFAULT_TIMEOUT_S = 15.0
STATE_NAMES = {v: types_pb2.JobState.Name(v).removeprefix("JOB_STATE_") for v in types_pb2.JobState.values()}
FINISHED = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class ApiError(Exception):
    """A one-line error for the user, with the exit code to leave with (2 bad input, 1 otherwise)."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


def _tls_reason(details: str) -> str:
    """Why a TLS handshake failed, in a few words, from gRPC's connection error ("" if it was not TLS)."""
    if "Hostname Verification" in details:
        return "the coordinator's certificate does not carry the name checked (--tls-server-name)"
    if "handshake" not in details.lower():
        return ""
    tail = details.split("OPENSSL_internal:", 1)[-1] if "OPENSSL_internal:" in details else details
    return tail.removesuffix(": OK").strip()


def api_error(e: grpc.RpcError, address: str, tls: bool | None = None) -> ApiError:
    """The user-facing error for a failed call to the coordinator at ``address`` (``tls``: whether
    the call was made over TLS, for the hint when the connection itself was refused)."""
    code = e.code() if isinstance(e, grpc.Call) else None
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    if code == grpc.StatusCode.UNAVAILABLE and (why := _tls_reason(details or "")):
        return ApiError(f"cannot reach coordinator at {address}: TLS handshake failed ({why}); "
                        f"check --tls-ca, --tls-cert and --tls-key", FAILED)
    if code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in (details or ""):
        hint = ("it refused our certificate, or serves no TLS" if tls
                else "if it serves TLS, pass --tls-ca, --tls-cert and --tls-key")
        return ApiError(f"cannot reach coordinator at {address} (it closed the connection: {hint})", FAILED)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError(f"invalid job: {details}", BAD_INPUT)
    if code == grpc.StatusCode.NOT_FOUND:
        return ApiError(details, BAD_INPUT)  # an unknown job id, or a job with no checkpoint yet
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ApiError(f"the coordinator at {address} wants the operator token: give --token-file "
                        f"(env DML_TOKEN_FILE; the coordinator's STATE_DIR/secrets/operator.token) ({details})", BAD_INPUT)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ApiError(f"the coordinator at {address} refused this token: {details}", BAD_INPUT)
    if code in _TRANSIENT:
        return ApiError(f"cannot reach coordinator at {address} ({code.name.lower()})", FAILED)
    return ApiError(f"coordinator error: {code.name if code else '?'}: {details}", FAILED)


def read_token(path: pathlib.Path) -> str:
    """The operator token in ``path``; an ApiError (bad input) naming the file when it cannot be read."""
    from dml.common.auth import AuthError, read_token_file

    try:
        return read_token_file(path)
    except OSError as e:
        raise ApiError(f"cannot read the token file {path}: {e.strerror or e}", BAD_INPUT) from None
    except AuthError as e:
        raise ApiError(str(e), BAD_INPUT) from None


def pack_task(spec: JobSpec) -> tuple[JobSpec, bytes]:
    """``spec`` and the task code to send with it: for a ``--task`` that names a file or package
    (and no digest yet), its bundle, with ``task`` set to what the peers import (``mytask.py``,
    ``mypkg/``) and ``task_digest`` to the bundle's sha256; else ``spec`` unchanged and no code.
    An ApiError (bad input) says what is wrong with the code: a missing file, a syntax error and
    its line, no Task in the module, over a size limit."""
    if spec.task_digest or not taskcode.is_path(spec.task):
        return spec, b""
    try:
        b = taskcode.pack_path(spec.task)
    except taskcode.BundleError as e:
        raise ApiError(str(e), BAD_INPUT) from None
    return replace(spec, task=str(b.ref), task_digest=b.digest), b.data


def check_address(address: str) -> str:
    """``address`` if it is a dialable HOST:PORT, else an ApiError (bad input) saying so."""
    try:
        rpc.parse_address(address)
    except ValueError as e:
        raise ApiError(f"coordinator {e}", BAD_INPUT) from None
    return address


def _tested(x: float, last: types_pb2.RoundMetrics) -> float | None:
    """A test metric of the last round, None when no round has been evaluated yet (NaN then
    means "not measured"; after an evaluation a NaN is what was measured, and shows)."""
    return None if math.isnan(x) and not last.test_evaluated else x


def status_dict(job: jobs_pb2.JobStatus) -> dict[str, Any]:
    """A job status as the JSON object `dml status --json` prints. A NaN metric stays NaN
    (JSON ``NaN``): a NaN loss must not read as a good one."""
    last = job.last
    has = job.HasField("last")
    return {
        "job_id": job.job_id,
        "state": STATE_NAMES[job.state],
        "round": job.round,
        "rounds": job.spec.rounds,
        "epoch": job.epoch,
        "peers": list(job.peers),
        "samples": job.samples,
        "data_epoch": job.data_epoch,
        "reason": job.reason,
        "checkpoint_round": job.checkpoint_round,
        "task": job.spec.task,
        "aggregation": job.spec.aggregation or "ring",
        "sync": job.spec.sync or "params",
        "pool": job.spec.pool,
        "max_peers": job.spec.max_peers,
        "placement": job.spec.placement or "shared",
        # --placement local: how much of the peers' own data is present now (the live members')
        # against all the job has seen; None for other jobs.
        "data_present": {"samples": job.data_present_samples, "seen_samples": job.data_seen_samples,
                         "peers": job.data_sources_present, "seen_peers": job.data_sources_seen,
                         "fraction": job.data_present_samples / job.data_seen_samples if job.data_seen_samples
                         else None} if job.spec.placement == "local" else None,
        "held_out": [{"peer_id": x.peer_id, "round": x.round, "reason": x.reason, "unix_ms": x.unix_ms,
                      "reporters": [r for r in x.reporters.split(",") if r]} for x in job.held_out],
        "metrics": {
            "train_loss": last.train_loss if has else None,
            "test_accuracy": _tested(last.test_accuracy, last) if has else None,
            "test_loss": _tested(last.test_loss, last) if has else None,
            # The task's own test metrics, by name ({} until a round has been evaluated).
            "test_metrics": dict(sorted(last.test_metrics.items())) if has else {},
            "round_ms": last.duration_ms if has else None,
            "digest": last.digest if has else None,
            "consensus_distance": last.consensus_distance if has else None,
            "bytes_sent": last.bytes_sent if has else None,
        },
        "quarantined": [{"peer_id": q.peer_id, "round": q.round, "reason": q.reason, "reporters": q.reporters,
                         "unix_ms": q.unix_ms} for q in job.quarantined],
        "declined": [{"peer_id": x.peer_id, "reason": x.reason, "unix_ms": x.unix_ms} for x in job.declined],
    }


def peer_dict(p: jobs_pb2.PeerInfo) -> dict[str, Any]:
    """A registered peer as the JSON object ``dml peers --json`` prints (memory None when
    unknown, samples/s None before its first report; the utilisation shares are of the last
    minute and sum to 1)."""
    return {
        "peer_id": p.peer_id,
        "address": p.address,
        "pool": p.pool,
        "device": p.device,
        "memory_bytes": p.memory_bytes or None,
        "samples_per_s": p.samples_per_s or None,
        "max_samples": p.max_samples or None,
        "state": p.state,
        "job_id": p.job_id,
        "utilisation": {"training": p.training_share, "exchanging": p.exchange_share, "idle": p.idle_share},
        "registered_unix_ms": p.registered_unix_ms,
        "local_datasets": list(p.local_datasets),
        "workers": p.workers or 1,
        "worker_devices": list(p.worker_devices),
    }


def shards_dict(resp: jobs_pb2.GetShardsResponse) -> dict[str, Any]:
    """A job's shard placement as plain data (``dml shards --json``): per member its shard ids,
    samples, label counts (index = label; None when the coordinator knows no labels) and its data
    usage (:func:`data_usage_dict`)."""
    known = resp.num_classes > 0
    return {
        "job_id": resp.job_id,
        "train_samples": resp.train_samples,
        "num_classes": resp.num_classes if known else None,
        "unassigned": list(resp.unassigned),
        "peers": [{"peer_id": p.peer_id, "shards": list(p.shard_ids), "samples": p.samples,
                   "label_counts": list(p.label_counts) if known else None, "data": data_usage_dict(p)}
                  for p in resp.peers],
    }


def data_source_label(source: str, bytes_fetched: int) -> str:
    """Where a peer's data comes from, for people: ``local`` (its own files or a shared volume),
    ``store: fetched`` (it fetched bytes from the coordinator's store for this job), ``store:
    cache`` (it had it all in its cache already)."""
    if source == "store":
        return "store: fetched" if bytes_fetched else "store: cache"
    return source


def data_usage_dict(p: jobs_pb2.PeerShards) -> dict[str, Any] | None:
    """What a member's data of the job cost it, as it last reported (None when it has not
    reported since the coordinator started): source, the label ``dml shards`` prints, bytes and
    chunks fetched from the store, cache hits, damaged cache files fetched again, the shards it
    caches whole, and its cache's free bytes (None: no limit)."""
    if not p.data_source:
        return None
    return {"source": p.data_source, "label": data_source_label(p.data_source, p.bytes_fetched),
            "bytes_fetched": p.bytes_fetched, "chunks_fetched": p.chunks_fetched, "cache_hits": p.cache_hits,
            "damaged_refetched": p.damaged_refetched, "cached_shards": list(p.cached_shard_ids),
            "cache_free_bytes": p.cache_free_bytes if p.has_cache_free else None}


def history_dict(r: types_pb2.RoundMetrics) -> dict[str, Any]:
    """One committed round, with its sample ledger, as JSON-friendly data."""
    return {"round": r.round, "epoch": r.epoch, "train_loss": r.train_loss, "test_accuracy": r.test_accuracy,
            "samples": r.samples, "members": r.members, "duration_ms": r.duration_ms, "digest": r.digest,
            "train_ms": r.train_ms, "exchange_ms": r.exchange_ms, "committed_unix_ms": r.committed_unix_ms,
            "test_evaluated": r.test_evaluated, "eval_ms": r.eval_ms, "test_metrics": dict(sorted(r.test_metrics.items())),
            "data_epoch": r.data_epoch, "consensus_distance": r.consensus_distance, "bytes_sent": r.bytes_sent,
            "consumed": {m.peer_id: [[x.shard_id, x.data_epoch, x.start, x.stop] for x in m.ranges]
                         for m in r.consumed}}


class JobClient:
    """A connection to one coordinator's JobService; every call has a deadline of ``timeout_s``
    and carries ``token`` (the operator token; "" for a coordinator run with --no-auth).

    Use it as a context manager, or call :meth:`close`. Raises :class:`ApiError` (bad input) at
    once for a malformed address. With ``tls`` the channel is TLS (the coordinator verified
    against its CA, our certificate presented); without, plain text."""

    def __init__(self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, token: str = "",
                 tls: TlsConfig | None = None) -> None:
        from dml.common.auth import with_token

        self.address = check_address(address)
        self.timeout_s = timeout_s
        self.tls = tls
        self._raw = rpc.channel(address, tls=tls)
        self._channel = with_token(self._raw, token) if token else self._raw
        self.stub = jobs_pb2_grpc.JobServiceStub(self._channel)

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self._raw.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Runs one RPC, turning a gRPC error into an ApiError."""
        try:
            return fn()
        except grpc.RpcError as e:
            raise api_error(e, self.address, self.tls is not None) from None

    def submit(self, spec: JobSpec, task_code: bytes | None = None) -> str:
        """Submits a job; returns its id. A ``spec.task`` that names a task file or package
        (``mytask.py``, ``path/to/pkg``, either with ``:NAME``) is packed here (:func:`pack_task`)
        and sent with the job; ``task_code`` sends a bundle as it is instead (``spec`` then
        carries its reference and digest)."""
        if task_code is None:
            spec, task_code = pack_task(spec)
        req = jobs_pb2.SubmitJobRequest(spec=spec_to_pb(spec), task_code=task_code)
        try:
            return self.stub.SubmitJob(req, timeout=self.timeout_s + len(task_code) / 10e6).job_id
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and task_code:
                raise ApiError(f"the coordinator refused the job: {e.details()}", BAD_INPUT) from None
            raise api_error(e, self.address, self.tls is not None) from None

    def status(self, job_id: str, history: bool = False) -> jobs_pb2.GetJobResponse:
        """The job's status (``.job``) and, with ``history``, every committed round with its
        sample ledger, oldest first (``.history``), read as one snapshot."""
        req = jobs_pb2.GetJobRequest(job_id=job_id, include_history=history)
        return self.call(lambda: self.stub.GetJob(req, timeout=self.timeout_s))

    def history(self, job_id: str) -> list[types_pb2.RoundMetrics]:
        """Every committed round of a job, oldest first."""
        return list(self.status(job_id, history=True).history)

    def list(self) -> list[jobs_pb2.JobStatus]:
        """Every job, newest first."""
        return list(self.call(lambda: self.stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=self.timeout_s)).jobs)

    def latest(self) -> str:
        """The newest job's id; an ApiError when there is none."""
        jobs = self.list()
        if not jobs:
            raise ApiError(f"no jobs on {self.address}", FAILED)
        return jobs[0].job_id

    def peers(self) -> list[jobs_pb2.PeerInfo]:
        """Every registered peer, registration order (see :func:`peer_dict`)."""
        return list(self.call(lambda: self.stub.ListPeers(jobs_pb2.ListPeersRequest(), timeout=self.timeout_s)).peers)

    def shards(self, job_id: str) -> jobs_pb2.GetShardsResponse:
        """Where a job's data is: each member's shards, samples and label counts, and the
        shards no member holds (see :func:`shards_dict`)."""
        req = jobs_pb2.GetShardsRequest(job_id=job_id)
        return self.call(lambda: self.stub.GetShards(req, timeout=self.timeout_s))

    def cancel(self, job_id: str) -> str:
        """Cancels a job; returns the state it is in afterwards (CANCELLED, or how it had ended)."""
        req = jobs_pb2.CancelJobRequest(job_id=job_id)
        return STATE_NAMES[self.call(lambda: self.stub.CancelJob(req, timeout=self.timeout_s)).state]

    def watch(self, job_id: str, on_update: Callable[[jobs_pb2.JobStatus], None],
              max_s: float = 24 * 3600) -> jobs_pb2.JobStatus:
        """Calls ``on_update`` with each change of the job until it finishes, and returns the
        final status. Reconnects if the coordinator restarts once the job has been seen; an
        ApiError after ``max_s`` seconds."""
        deadline = time.monotonic() + max_s
        seen = False
        req = jobs_pb2.WatchJobRequest(job_id=job_id)
        while time.monotonic() < deadline:
            call = self.stub.WatchJob(req, timeout=min(300.0, deadline - time.monotonic()))
            try:
                for st in call:
                    seen = True
                    on_update(st)
                    if STATE_NAMES[st.state] in FINISHED:
                        return st
            except KeyboardInterrupt:
                # Ended here, not left open: closing the channel later waits for every call on it.
                call.cancel()
                raise
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if code not in _TRANSIENT or not seen:
                    raise api_error(e, self.address, self.tls is not None) from None
                log.debug("watch %s: %s; reconnecting", job_id, code)
                time.sleep(0.5)  # the coordinator is restarting: reconnect after a pause
        raise ApiError(f"gave up watching {job_id} after {max_s:.0f}s", FAILED)

    def download(self, job_id: str, path: pathlib.Path, timeout_s: float | None = None) -> tuple[int, str]:
        """Saves the job's last checkpoint (a torch state_dict file) to ``path``, atomically;
        returns (round, parameter digest). ``timeout_s`` defaults to the client's, at least 60 s."""
        limit = timeout_s if timeout_s is not None else max(self.timeout_s, 60.0)
        req = jobs_pb2.DownloadModelRequest(job_id=job_id)
        parts = self.call(lambda: list(self.stub.DownloadModel(req, timeout=limit)))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(b"".join(p.data for p in parts))
        tmp.replace(path)
        return parts[0].round, parts[0].digest

    def download_checkpoint(self, job_id: str, path: pathlib.Path, timeout_s: float | None = None) -> tuple[int, str]:
        """Saves the whole training state of the job's last checkpoint (a torch.save'd dict:
        format, job_id, round, model, optimizer and the other state parts, spec) to ``path``,
        atomically, once its bytes hash to the sha256 the coordinator names; returns (round,
        sha256). ``timeout_s`` defaults to the client's, at least 60 s."""
        limit = timeout_s if timeout_s is not None else max(self.timeout_s, 60.0)
        req = jobs_pb2.DownloadModelRequest(job_id=job_id)
        parts = self.call(lambda: list(self.stub.DownloadCheckpoint(req, timeout=limit)))
        data = b"".join(p.data for p in parts)
        if hashlib.sha256(data).hexdigest() != parts[0].digest:
            raise ApiError(f"the training state of {job_id} from {self.address} does not hash to its sha256 "
                           f"{parts[0].digest[:16]}: not saved", FAILED)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
        return parts[0].round, parts[0].digest

    def health(self, service: str = "") -> str:
        """The coordinator's standard gRPC health answer for ``service`` ('' for the whole
        server): SERVING, NOT_SERVING, ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        req = health_pb2.HealthCheckRequest(service=service)
        resp = self.call(lambda: stub.Check(req, timeout=self.timeout_s))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
