"""A peer's credentials and the guard of its exchange server.

The peer makes an Ed25519 key pair at start and sends the public half when it registers; the
coordinator answers with a bearer credential for its own calls and its public key, and every
plan carries this member's ticket for the plan's (job, epoch), signed by the coordinator. Every
exchange call a member makes to another is signed (:func:`dml.common.auth.sign_call`) over the
method, job, epoch, round or exchange id, sender and receiver, and carries the ticket.

The receiving side (:class:`ExchangeGuard`, a server interceptor, so it runs before a pool
thread is taken) checks: the ticket is the coordinator's, it names the sender in the claimed
(job, epoch), the sender's key signed the claims, the receiver is this peer and the epoch is not
older than the one this peer holds for the job. Before this peer has a plan of that epoch the
ticket alone proves membership (a successor may receive chunks first). Missing or malformed
metadata: UNAUTHENTICATED; anything that does not verify: PERMISSION_DENIED. The servicer then
checks that the request body names the same (job, round, epoch, sender) (:func:`check_body`).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dml.common import auth
from dml.common.auth import AuthError, CallClaims

log = logging.getLogger(__name__)

EXCHANGE = "/dml.v1.PeerExchange/"
PUSH_CHUNKS = EXCHANGE + "PushChunks"
OPEN_DATA_PLANE = EXCHANGE + "OpenDataPlane"
FETCH_PARAMETERS = EXCHANGE + "FetchParameters"
GOSSIP = EXCHANGE + "Gossip"
MAX_TICKETS = 16  # (job, epoch) tickets kept; a member needs its current one (and a recent one)
MAX_JOBS = 64  # jobs whose latest epoch is remembered


class PeerCredentials:
    """What a peer holds to authenticate itself: its key pair, the coordinator's key, its peer
    id and credential, and its tickets by (job, epoch); what it knows of each job's epoch."""

    def __init__(self, join_token: str = "") -> None:
        self.join_token = join_token
        self._key = auth.new_private_key()
        self.public_key = auth.public_bytes(self._key)
        self._lock = threading.Lock()
        self.peer_id = ""
        self.peer_token = ""
        self._coordinator: Ed25519PublicKey | None = None
        self._tickets: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._epochs: OrderedDict[str, int] = OrderedDict()

    # -- from the coordinator ----------------------------------------------------------------
    def registered(self, peer_id: str, peer_token: str, coordinator_public_key: bytes) -> None:
        """Takes the answer of a registration: the peer id, its credential, the coordinator's key."""
        coord = auth.load_public(coordinator_public_key) if coordinator_public_key else None
        with self._lock:
            if peer_id != self.peer_id:
                self._tickets.clear()  # tickets name the old id
            self.peer_id, self.peer_token, self._coordinator = peer_id, peer_token, coord

    def note_plan(self, job_id: str, epoch: int, ticket: bytes) -> None:
        """Keeps the plan's ticket and raises the epoch held for the job to the plan's."""
        with self._lock:
            if ticket:
                self._tickets[(job_id, epoch)] = ticket
                self._tickets.move_to_end((job_id, epoch))
                while len(self._tickets) > MAX_TICKETS:
                    self._tickets.popitem(last=False)
            if epoch > self._epochs.get(job_id, -1):
                self._epochs[job_id] = epoch
            self._epochs.move_to_end(job_id)
            while len(self._epochs) > MAX_JOBS:
                self._epochs.popitem(last=False)

    def held_epoch(self, job_id: str) -> int:
        """The newest epoch of ``job_id`` this peer has had a plan for (0 if none)."""
        return self._epochs.get(job_id, 0)

    def control_token(self, method: str) -> str:
        """The bearer token for a call to the coordinator: the join token to register, else the
        peer's credential."""
        return self.join_token if method.endswith("/RegisterPeer") else self.peer_token

    # -- signing our calls -----------------------------------------------------------------
    def sign(self, method: str, job_id: str, epoch: int, ref: str, receiver: str) -> list[tuple[str, str | bytes]]:
        """Metadata that authenticates one exchange call to ``receiver`` ([] when this peer holds
        no ticket for (job, epoch): the receiver then refuses it)."""
        with self._lock:
            ticket, me = self._tickets.get((job_id, epoch)), self.peer_id
        if not ticket:
            return []
        return auth.sign_call(self._key, ticket, CallClaims(method, job_id, epoch, ref, me, receiver))

    # -- checking theirs ---------------------------------------------------------------------
    def verify(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None if the call's metadata authenticates a member for this peer; else the status
        code and message to refuse it with."""
        try:
            got = auth.call_claims(method, metadata)
        except AuthError as e:
            return grpc.StatusCode.UNAUTHENTICATED, str(e)
        if got is None:
            return grpc.StatusCode.UNAUTHENTICATED, f"{method} needs a member's ticket and signature (dml-auth-* metadata)"
        claims, ticket, signature = got
        with self._lock:
            coord, me = self._coordinator, self.peer_id
        if coord is None:
            return grpc.StatusCode.UNAVAILABLE, "this peer has not registered yet"
        if claims.receiver != me:
            return grpc.StatusCode.PERMISSION_DENIED, f"the call is signed for {claims.receiver!r}, not for {me}"
        held = self.held_epoch(claims.job_id)
        if claims.epoch < held:
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"epoch {claims.epoch} of job {claims.job_id} is older than the one this peer holds ({held})")
        try:
            auth.verify_call(coord, claims, ticket, signature)
        except AuthError as e:
            return grpc.StatusCode.PERMISSION_DENIED, f"not a member: {e}"
        return None


def claims_of(context: grpc.ServicerContext, method: str) -> CallClaims | None:
    """The (already verified) claims of the call being served, None when it carries none."""
    try:
        got = auth.call_claims(method, context.invocation_metadata())
    except AuthError:
        return None
    return got[0] if got else None


def check_body(context: grpc.ServicerContext, method: str, job_id: str, sender: str | None,
               epoch: int | None = None, ref: str | None = None) -> None:
    """Aborts with PERMISSION_DENIED unless the request body names what the call was signed
    for (job, and sender, epoch and round or exchange id where given). Only on a guarded server."""
    c = claims_of(context, method)
    if (c is None or c.job_id != job_id or (sender is not None and c.sender != sender)
            or (epoch is not None and c.epoch != epoch)
            or (ref is not None and c.ref != ref)):
        context.abort(grpc.StatusCode.PERMISSION_DENIED,
                      f"the request (job {job_id!r}, sender {sender!r}, epoch {epoch}, ref {ref}) is not what "
                      f"the call was signed for")


class ExchangeGuard(grpc.ServerInterceptor):
    """Refuses exchange calls that do not come from a member (see the module docstring).
    ``guarded(method)`` says which methods need it; the others (health) pass."""

    def __init__(self, credentials: PeerCredentials, guarded: Callable[[str], bool]) -> None:
        self._creds = credentials
        self._guarded = guarded

    def intercept_service(self, continuation: Callable[[Any], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not self._guarded(details.method):
            return handler
        refused = self._creds.verify(details.method, details.invocation_metadata)
        if refused is None:
            return handler
        code, message = refused
        log.info("peer %s: refused %s: %s", self._creds.peer_id, details.method, message)
        return auth.deny(handler, code, message)
