"""The peer's client for the coordinator's PeerControl service: every call with a deadline, and
retries with capped exponential backoff on UNAVAILABLE / DEADLINE_EXCEEDED / CANCELLED.

Cluster: the client belongs to one cluster, pinned (``--cluster-id``) or the one of the first
coordinator that registered it (kept in memory: a restarted peer joins afresh unless pinned).
Every call carries the id as ``dml-cluster-id`` metadata and registration sends it, so a
coordinator of another cluster (one started on another state dir) refuses the call; a refusal,
or an answer naming another cluster, is never acted on: the client logs it and keeps retrying the
address as it does while the coordinator is unreachable, until the right coordinator answers."""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

import grpc
import numpy as np
from dml.v1 import control_pb2, control_pb2_grpc, data_pb2, data_pb2_grpc

from dml.common import auth, rpc, version
from dml.peer.auth import PeerCredentials
from dml.common.tls import TlsConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
# CANCELLED, while this peer is not stopping (its own calls are never cancelled otherwise): a
# coordinator that stopped with the call in flight (its server cancels what its grace leaves),
# or whose call guard cut it. Either way the call did not fail on its merits: a report that met
# a coordinator restart is sent again, rather than taken for a local failure.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
CALL_TIMEOUT_S = 10.0
LOG_EVERY_S = 20.0  # while the coordinator is unreachable, one log line this often (retries are faster)


def evicted_code(code: grpc.StatusCode | None) -> bool:
    """Whether a peer call's status says the coordinator no longer knows this peer, so it must
    register again: NOT_FOUND (its id), or UNAUTHENTICATED (its credential: the coordinator
    forgets an evicted peer's token at the next registration, after which the peer's calls never
    reach the state machine that would answer NOT_FOUND). Not for RegisterPeer itself, where
    UNAUTHENTICATED means a wrong join token."""
    return code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED)


CLUSTER_METADATA = "dml-cluster-id"


class Evicted(Exception):
    """The coordinator no longer knows this peer (NOT_FOUND): re-register."""


class TaskCodeMissing(Exception):
    """The coordinator keeps no task code of that digest for the job (FetchTaskCode's NOT_FOUND)."""


class DatasetMissing(Exception):
    """The coordinator's store holds no such dataset or chunk (GetDataset's or GetChunk's NOT_FOUND)."""


class VersionMismatch(Exception):
    """The coordinator speaks another dml protocol version than this peer (common.version)."""


class WrongCluster(grpc.RpcError):
    """The coordinator at the address belongs to another cluster than this peer's."""

    def __init__(self, other: str) -> None:
        super().__init__(f"coordinator of cluster {other}")
        self.other = other


def refusing_cluster(e: grpc.RpcError) -> str | None:
    """The cluster id of a coordinator that refused a call for naming another cluster, else None."""
    if isinstance(e, WrongCluster):
        return e.other
    if not isinstance(e, grpc.Call) or e.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    for k, v in e.trailing_metadata() or ():
        if k == CLUSTER_METADATA:
            return str(v)
    return None


class _ClusterMetadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds the client's cluster id (once known) to every call's metadata."""

    def __init__(self, client: "ControlClient") -> None:
        self._client = client

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        cid = self._client.cluster_id
        if not cid:
            return details
        md = list(details.metadata or ()) + [(CLUSTER_METADATA, cid)]
        return _CallDetails(details.method, details.timeout, md, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: float | None, metadata: list[tuple[str, str]], credentials: object,
                 wait_for_ready: bool | None, compression: object) -> None:
        self.method, self.timeout, self.metadata, self.credentials = method, timeout, metadata, credentials
        self.wait_for_ready, self.compression = wait_for_ready, compression


class ControlClient:
    """Thin, retrying wrapper over PeerControlStub."""

    def __init__(self, address: str, stop: threading.Event, cluster_id: str = "",
                 credentials: PeerCredentials | None = None, tls: TlsConfig | None = None) -> None:
        self.address = address
        self.cluster_id = cluster_id  # pinned, or learnt from the first registration
        self.peer_id = ""  # the peer this client calls for, once registered (named in its log lines)
        self.credentials = credentials if credentials is not None else PeerCredentials()
        # The join token on RegisterPeer, this peer's credential on every other call.
        self._raw = rpc.channel(address, tls=tls, fast_reconnect=True)
        self.channel = auth.with_token(self._raw, self.credentials.control_token)
        self.stub = control_pb2_grpc.PeerControlStub(grpc.intercept_channel(self.channel, _ClusterMetadata(self)))
        # The dataset store's read side (GetDataset, GetChunk), with this peer's credential.
        self.data_stub = data_pb2_grpc.DataServiceStub(grpc.intercept_channel(self.channel, _ClusterMetadata(self)))
        self._stop = stop
        self._log_lock = threading.Lock()
        self._failing_since: float | None = None  # monotonic time the coordinator became unreachable
        self._next_log = 0.0  # no "unreachable" line before this (monotonic)
        self._refused: str = ""  # the other cluster last refused, while refusing it
        self._next_refusal_log = 0.0

    def call(self, fn: Callable[[], T], what: str, give_up_s: float = 3600.0,
             also_retry: tuple[grpc.StatusCode, ...] = (), registered: bool = True) -> T:
        """Runs ``fn`` until it succeeds, retrying transient errors with backoff up to ``give_up_s``.

        Retries stay frequent (at most 0.5 s apart, so a restarted coordinator is found at once),
        but while the coordinator stays unreachable the log says so only every
        ``LOG_EVERY_S``, asking to check the address. NOT_FOUND raises Evicted, and so does
        UNAUTHENTICATED for a call with this peer's credential (``registered``: every call but
        RegisterPeer, see :func:`evicted_code`); codes in
        ``also_retry`` are retried too; other errors propagate. A coordinator of another cluster
        is retried as an unreachable one is (its refusals and answers are never acted on)."""
        delay, start = 0.1, time.monotonic()
        deadline, attempts = start + give_up_s, 0
        while True:
            try:
                out = fn()
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                other = refusing_cluster(e)
                if other is None and (code == grpc.StatusCode.NOT_FOUND or (registered and evicted_code(code))):
                    raise Evicted(e.details() if isinstance(e, grpc.Call) else str(e)) from None
                if ((other is None and code not in RETRYABLE and code not in also_retry)
                        or time.monotonic() + delay > deadline or self._stop.is_set()):
                    raise
                attempts += 1
                if other is not None:
                    self.note_wrong_cluster(what, other)
                else:
                    self._note_unreachable(what, code, attempts, start)
                if self._stop.wait(delay):
                    raise
                delay = min(delay * 2, 0.5) * (0.8 + 0.4 * random.random())
                continue
            self._note_reachable(what)
            return out

    def note_wrong_cluster(self, what: str, other: str) -> None:
        """Logs a coordinator of another cluster: one line when it starts answering, then one
        every LOG_EVERY_S while it goes on."""
        now = time.monotonic()
        with self._log_lock:
            first, due = other != self._refused, now >= self._next_refusal_log
            if first or due:
                self._refused, self._next_refusal_log = other, now + LOG_EVERY_S
        if first or due:
            log.error("%s: refusing the coordinator at %s: it belongs to cluster %s, this peer to cluster %s "
                      "(a coordinator started on another state dir?); retrying %s until this cluster's "
                      "coordinator answers", self._named(what), self.address, other, self.cluster_id, self.address)

    def answer_ok(self, cluster_id: str, what: str) -> bool:
        """Whether an answer naming ``cluster_id`` is from this peer's cluster (logs it if not).
        An answer without an id (a coordinator that predates cluster ids) is accepted."""
        if not cluster_id or not self.cluster_id or cluster_id == self.cluster_id:
            if self._refused:
                log.info("%s: the coordinator at %s is of cluster %s again", self._named(what), self.address,
                         self.cluster_id)
                self._refused = ""
            return True
        self.note_wrong_cluster(what, cluster_id)
        return False

    def _named(self, what: str) -> str:
        """``what`` (a call) with the peer it is for: the client's lines are rate-limited across
        all its calls (the line naming one call stands for the others), and one process may run
        several peers, so each line says whose it is."""
        return f"peer {self.peer_id}: {what}" if self.peer_id else what

    def _note_unreachable(self, what: str, code: grpc.StatusCode | None, attempts: int, start: float) -> None:
        """Logs an unreachable coordinator: once when it starts, then every LOG_EVERY_S (DEBUG between)."""
        what = self._named(what)
        now = time.monotonic()
        with self._log_lock:
            first = self._failing_since is None
            since = self._failing_since = start if self._failing_since is None else self._failing_since
            due = first or now >= self._next_log
            if due:
                self._next_log = now + LOG_EVERY_S
        name = code.name if code is not None else "?"
        if first:
            log.warning("%s: cannot reach the coordinator at %s (%s); retrying. If this persists, check that a "
                        "coordinator runs there and that --coordinator is its address", what, self.address, name)
        elif due:
            log.warning("%s: still cannot reach the coordinator at %s after %.0fs (%s, %d attempts); check "
                        "--coordinator and that the coordinator is running", what, self.address, now - since,
                        name, attempts)
        else:
            log.debug("%s: coordinator %s unavailable (%s); retrying", what, self.address, name)

    def _note_reachable(self, what: str) -> None:
        if self._failing_since is None:  # the common case, without the lock
            return
        with self._log_lock:
            since, self._failing_since = self._failing_since, None
        if since is not None:
            log.info("%s: the coordinator at %s answers again after %.1fs", self._named(what), self.address,
                     time.monotonic() - since)

    def register(self, address: str, device: str, memory_bytes: int,
                 max_samples: int = 0, pool: str = "", cache_free: int | None = None,
                 local_datasets: list[str] | None = None, workers: int = 1,
                 worker_devices: list[str] | None = None) -> control_pb2.RegisterPeerResponse:
        """Registers this peer (``max_samples``: the most training samples it takes, 0 for no cap;
        ``pool``: the resource pool it serves, "" for the default; ``cache_free``: the bytes its
        dataset cache can still take in, None for no limit; ``local_datasets``: the names of the
        local datasets it offers, never their paths; ``workers``, ``worker_devices``: its training
        workers, dml-peer --workers / --gpus)."""
        def attempt() -> control_pb2.RegisterPeerResponse:
            req = control_pb2.RegisterPeerRequest(
                address=address, capability=control_pb2.PeerCapability(
                    device=device, memory_bytes=memory_bytes, max_samples=max_samples, pool=pool,
                    has_cache_free=cache_free is not None, cache_free_bytes=cache_free or 0,
                    local_datasets=local_datasets or [], workers=workers,
                    worker_devices=worker_devices or []),
                cluster_id=self.cluster_id, public_key=self.credentials.public_key,
                protocol_version=version.PROTOCOL_VERSION)
            try:
                resp: control_pb2.RegisterPeerResponse = self.stub.RegisterPeer(req, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as e:
                # RegisterPeer's FAILED_PRECONDITION is another cluster (its id in the metadata,
                # retried by call()) or another protocol version, which no retry mends.
                if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.FAILED_PRECONDITION \
                        and refusing_cluster(e) is None:
                    raise VersionMismatch(e.details() or "the coordinator refused this peer's protocol version") from None
                raise
            if not self.answer_ok(resp.cluster_id, "register"):
                raise WrongCluster(resp.cluster_id)
            if why := version.mismatch(version.PROTOCOL_VERSION, resp.protocol_version, "this peer", "the coordinator"):
                raise VersionMismatch(why)
            return resp

        resp = self.call(attempt, "register", registered=False)
        self.peer_id = resp.peer_id
        if resp.cluster_id and not self.cluster_id:
            self.cluster_id = resp.cluster_id
            log.info("joined cluster %s (coordinator %s)", resp.cluster_id, self.address)
        return resp

    def upload_checkpoint(self, peer_id: str, job_id: str, rnd: int, epoch: int, digest: str, f: BinaryIO,
                          state_file: BinaryIO | None = None, state_sha256: str = "") -> None:
        """Streams a checkpoint from the file object ``f`` in 1 MiB chunks, read as they go (so
        a checkpoint spilled to disk is never held in memory whole), then, in the same stream, the
        training state from ``state_file`` (``CHECKPOINT_KIND_TRAINING_STATE`` chunks, the first
        carrying ``state_sha256``). Each attempt reads them anew."""
        step = 1 << 20
        files = [(f, control_pb2.CHECKPOINT_KIND_MODEL, digest)]
        if state_file is not None:
            files.append((state_file, control_pb2.CHECKPOINT_KIND_TRAINING_STATE, state_sha256))
        sizes = [src.seek(0, 2) for src, _, _ in files]

        def chunks() -> Iterator[control_pb2.CheckpointChunk]:
            for (src, kind, dig), size in zip(files, sizes):
                for i in range(0, max(size, 1), step):
                    src.seek(i)
                    yield control_pb2.CheckpointChunk(peer_id=peer_id, job_id=job_id, round=rnd, epoch=epoch,
                                                      digest=dig if i == 0 else "", data=src.read(step), kind=kind)
        timeout = CALL_TIMEOUT_S + sum(sizes) / 50e6
        # RESOURCE_EXHAUSTED: the coordinator's long-lived calls are all taken for now (see
        # dml.common.guard); the upload goes through once some end, within the minute.
        self.call(lambda: self.stub.UploadCheckpoint(chunks(), timeout=timeout), "upload checkpoint", give_up_s=60,
                  also_retry=(grpc.StatusCode.RESOURCE_EXHAUSTED,))

    def fetch_task_code(self, peer_id: str, job_id: str, digest: str) -> bytes:
        """Job ``job_id``'s task code bundle ``digest``, retried while the coordinator is
        unreachable (up to a minute). NOT_FOUND (the coordinator keeps no such code for the job)
        raises :class:`TaskCodeMissing` rather than :class:`Evicted`."""
        def attempt() -> bytes:
            req = control_pb2.FetchTaskCodeRequest(peer_id=peer_id, job_id=job_id, digest=digest)
            try:
                resp: control_pb2.FetchTaskCodeResponse = self.stub.FetchTaskCode(req, timeout=CALL_TIMEOUT_S * 3)
            except grpc.RpcError as e:
                if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.NOT_FOUND:
                    raise TaskCodeMissing(e.details() or f"no task code {digest[:12]} for job {job_id}") from None
                raise
            return bytes(resp.bundle)

        return self.call(attempt, "fetch task code", give_up_s=60)

    def shard_indices(self, peer_id: str, job_id: str, shard_ids: list[int]) -> dict[int, np.ndarray]:
        """The sample indices of shards ``shard_ids`` of job ``job_id`` that the job assigns to
        this peer, asked for in as many calls as the coordinator's answers need (each holds whole
        shards up to its size limit); shards no longer assigned are left out. Retried while the
        coordinator is unreachable (up to 30 s): a prefetch that cannot have them is only late."""
        out: dict[int, np.ndarray] = {}
        rest = list(shard_ids)
        while rest:
            req = control_pb2.GetShardIndicesRequest(peer_id=peer_id, job_id=job_id, shard_ids=rest)
            resp: control_pb2.GetShardIndicesResponse = self.call(
                lambda: self.stub.GetShardIndices(req, timeout=CALL_TIMEOUT_S * 3), "get shard indices", give_up_s=30)
            got = {s: np.asarray(v.indices, dtype=np.int64) for s, v in resp.shard_indices.items() if s in rest}
            if not got:
                break  # the others are no longer this peer's
            out.update(got)
            rest = [s for s in rest if s not in got]
        return out

    def _data_call(self, fn: Callable[[], T], what: str) -> T:
        """A DataService read, retried while the coordinator is unreachable (up to a minute);
        NOT_FOUND raises :class:`DatasetMissing` rather than :class:`Evicted`."""
        def attempt() -> T:
            try:
                return fn()
            except grpc.RpcError as e:
                if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.NOT_FOUND:
                    raise DatasetMissing(e.details() or what) from None
                raise

        return self.call(attempt, what, give_up_s=60)

    def fetch_manifest(self, name: str) -> data_pb2.GetDatasetResponse:
        """Dataset ``name``'s manifest from the coordinator's store (GetDataset)."""
        req = data_pb2.GetDatasetRequest(name=name)
        return self._data_call(lambda: self.data_stub.GetDataset(req, timeout=CALL_TIMEOUT_S), f"get dataset {name}")

    def fetch_chunk(self, digest: str) -> bytes:
        """One chunk's bytes from the coordinator's store (GetChunk), unchecked: the caller
        verifies them (:class:`dml.peer.datacache.ChunkCache`)."""
        req = data_pb2.GetChunkRequest(digest=digest)
        resp: data_pb2.GetChunkResponse = self._data_call(
            lambda: self.data_stub.GetChunk(req, timeout=CALL_TIMEOUT_S * 3), f"get chunk {digest[:12]}")
        return bytes(resp.data)

    def close(self) -> None:
        """Closes the channel."""
        self._raw.close()
