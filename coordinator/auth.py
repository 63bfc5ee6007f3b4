"""Who may call what on the coordinator: a server interceptor that checks the bearer token of
every call before a pool thread runs it, and binds peer calls to the peer the token was issued to.

- JobService: the operator token (DownloadModel and DownloadCheckpoint also take a peer token,
  for a job that peer is a member of: a joiner fetches the committed checkpoint and its training
  state).
- PeerControl.RegisterPeer: the join token, or a client certificate the server verified (mTLS).
- Every other PeerControl call: a peer token; the request's ``peer_id`` must be that peer.
- DataService: the operator token; GetDataset and GetChunk (the read side) also take a
  registered peer's token.
- Health and reflection: open.

No token (or an unknown one): UNAUTHENTICATED. A valid token used for another peer or outside
its scope: PERMISSION_DENIED. Secrets are compared with ``hmac.compare_digest``; peer tokens are
known only by their sha256 (:class:`PeerTokens`).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from dml.common.auth import bearer, same_secret, token_hash
from dml.common.auth import deny as _deny
from dml.common.auth import shaped as _shaped

log = logging.getLogger(__name__)

JOB_SERVICE = "dml.v1.JobService"
PEER_CONTROL = "dml.v1.PeerControl"
DATA_SERVICE = "dml.v1.DataService"
DATA_READS = (f"/{DATA_SERVICE}/GetDataset", f"/{DATA_SERVICE}/GetChunk")  # what any peer's token may call
REGISTER = f"/{PEER_CONTROL}/RegisterPeer"
DOWNLOAD = f"/{JOB_SERVICE}/DownloadModel"
DOWNLOADS = (DOWNLOAD, f"/{JOB_SERVICE}/DownloadCheckpoint")  # what a member's peer token may call
CLUSTER_METADATA = "dml-cluster-id"  # as coordinator.servicer names it


@dataclass(frozen=True)
class Secrets:
    """The coordinator's two shared secrets: peers join with the first, operators hold the second."""

    join_token: str
    operator_token: str


class PeerTokens:
    """sha256(token) -> peer id, for the tokens the coordinator issued. Read without the
    coordinator's lock (one dict lookup); an entry of an evicted peer answers until pruned, and
    the call then gets NOT_FOUND from the state machine, as an evicted peer must."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_hash: dict[str, str] = {}

    def add(self, digest: str, peer_id: str) -> None:
        """Records a token hash for ``peer_id``."""
        if digest:
            with self._lock:
                self._by_hash[digest] = peer_id

    def keep_only(self, live: set[str]) -> None:
        """Forgets the tokens of peers not in ``live``."""
        with self._lock:
            self._by_hash = {h: p for h, p in self._by_hash.items() if p in live}

    def peer_of(self, token: str) -> str:
        """The peer a token was issued to ("" for none)."""
        return self._by_hash.get(token_hash(token), "") if token else ""


def _bound_to(handler: grpc.RpcMethodHandler, peer_id: str) -> grpc.RpcMethodHandler:
    """``handler`` refusing (PERMISSION_DENIED) a request whose ``peer_id`` is not ``peer_id``;
    for a client stream, its first message's (CheckpointChunk sets it there only)."""
    def refuse(claimed: str, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.PERMISSION_DENIED,
                      f"this credential belongs to peer {peer_id}; the call names peer {claimed!r}")

    if handler.request_streaming:
        inner = handler.stream_stream if handler.response_streaming else handler.stream_unary

        def stream_behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            def checked() -> Iterator[Any]:
                first = True
                for msg in requests:
                    if first and msg.peer_id != peer_id:
                        refuse(msg.peer_id, context)
                    first = False
                    yield msg
            return inner(checked(), context)

        return _shaped(handler, stream_behavior)
    inner = handler.unary_stream if handler.response_streaming else handler.unary_unary

    def unary_behavior(request: Any, context: grpc.ServicerContext) -> Any:
        if request.peer_id != peer_id:
            refuse(request.peer_id, context)
        return inner(request, context)

    return _shaped(handler, unary_behavior)


class AuthInterceptor(grpc.ServerInterceptor):
    """The coordinator's authentication and identity binding (see the module docstring).
    ``member_of(peer_id, job_id)`` says whether a peer may download a job's checkpoint."""

    def __init__(self, secrets: Secrets, tokens: PeerTokens, member_of: Callable[[str, str], bool],
                 cluster_id: str = "") -> None:
        self._secrets = secrets
        self._tokens = tokens
        self._member_of = member_of
        self._cluster_id = cluster_id

    def intercept_service(self, continuation: Callable[[Any], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method = details.method
        service = method.split("/")[1] if method.count("/") == 2 else ""
        if handler is None or service not in (JOB_SERVICE, PEER_CONTROL, DATA_SERVICE):
            return handler  # health, reflection, unknown methods (UNIMPLEMENTED)
        token = bearer(details.invocation_metadata)
        if service in (JOB_SERVICE, DATA_SERVICE):
            if same_secret(token, self._secrets.operator_token):
                return handler
            pid = self._tokens.peer_of(token)
            if pid and method in DOWNLOADS:
                return self._member_download(handler, pid)
            if pid and method in DATA_READS:
                return handler
            if pid:
                return _deny(handler, grpc.StatusCode.PERMISSION_DENIED,
                             f"{method} needs the operator token; a peer's credential does not do")
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                         f"{method} needs the operator token (authorization: Bearer <token>; dml --token-file)")
        claimed = {v for k, v in details.invocation_metadata or () if k == CLUSTER_METADATA}
        if self._cluster_id and claimed and claimed != {self._cluster_id}:
            # A peer of another cluster (a coordinator on the wrong state dir): its credentials
            # cannot be ours; the servicer refuses it by cluster id (FAILED_PRECONDITION naming this
            # cluster) before it looks at anything else, so the peer says so instead of retrying.
            return handler
        if method == REGISTER:
            if same_secret(token, self._secrets.join_token):
                return handler
            return self._register_by_certificate(handler, bool(token))
        pid = self._tokens.peer_of(token)
        if not pid:
            why = "an unknown or revoked peer credential" if token else "no peer credential"
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                         f"{method} with {why}; register with the join token first")
        return _bound_to(handler, pid)

    def _member_download(self, handler: grpc.RpcMethodHandler, peer_id: str) -> grpc.RpcMethodHandler:
        inner = handler.unary_stream

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            if not self._member_of(peer_id, request.job_id):
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"peer {peer_id} is not a member of job {request.job_id!r}")
            return inner(request, context)

        return _shaped(handler, behavior)

    @staticmethod
    def _register_by_certificate(handler: grpc.RpcMethodHandler, had_token: bool) -> grpc.RpcMethodHandler:
        """RegisterPeer without the join token: allowed when TLS verified the caller's client
        certificate (the cluster CA's), else UNAUTHENTICATED. The context is needed for that,
        so the check runs as the call starts."""
        inner = handler.unary_unary

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            if not context.peer_identities():
                what = "a wrong join token" if had_token else "no join token"
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"RegisterPeer with {what}: give dml-peer --join-token-file (or a client certificate)")
            return inner(request, context)

        return _shaped(handler, behavior)
