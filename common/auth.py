"""Credentials every side shares: bearer tokens (made, stored, read, compared), the client
interceptor that sends them, and the Ed25519 membership tickets and call signatures peers
exchange. Who holds what and what each call needs: docs/security.md, "Authentication".

Pure functions and small classes over ``cryptography`` and ``grpc``; no coordinator or peer code.
"""
from __future__ import annotations

import hashlib
import hmac
import pathlib
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dml.common.files import write_atomic

AUTHORIZATION = "authorization"  # gRPC metadata key of the bearer token
BEARER = "Bearer "
TOKEN_BYTES = 32  # random bytes in a token (URL-safe base64: 43 characters)
MAX_TOKEN_CHARS = 256
KEY_BYTES = 32  # raw Ed25519 public key
SIGNATURE_BYTES = 64

# Metadata of a signed exchange call (PeerExchange): who sends, for which (job, epoch, round or
# exchange id), to whom, its ticket and its signature.
MD_SENDER = "dml-auth-sender"
MD_RECEIVER = "dml-auth-receiver"
MD_JOB = "dml-auth-job"
MD_EPOCH = "dml-auth-epoch"
MD_REF = "dml-auth-ref"
MD_TICKET = "dml-auth-ticket-bin"
MD_SIGNATURE = "dml-auth-sig-bin"

_TICKET_MAGIC = b"DMLT1"
_TICKET_DOMAIN = b"dml membership ticket v1\x00"
_CALL_DOMAIN = b"dml exchange call v1\x00"
MAX_ID_BYTES = 256  # job and peer ids inside a ticket


class AuthError(Exception):
    """A credential is missing, malformed or does not verify."""


# -- bearer tokens -------------------------------------------------------------------------------
def new_token() -> str:
    """A fresh random token (URL-safe, 43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    """The sha256 hex digest of a token: what the coordinator stores instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_secret(a: str, b: str) -> bool:
    """Constant-time equality of two secrets (False when either is empty)."""
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


def read_token_file(path: pathlib.Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped). OSError when it cannot be read,
    AuthError when it is empty or not one line of printable ASCII."""
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not text:
        raise AuthError(f"token file {path} is empty")
    if len(text) > MAX_TOKEN_CHARS or not all(33 <= ord(c) < 127 for c in text):
        raise AuthError(f"token file {path} does not hold one token (printable ASCII, at most {MAX_TOKEN_CHARS} characters)")
    return text


def write_secret(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to a new file readable by its owner only (0600), atomically; the folder is
    made 0700 if missing."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o600)


def ensure_token_file(path: pathlib.Path) -> tuple[str, bool]:
    """The token in ``path``, made (0600) if the file does not exist; returns (token, made)."""
    if path.exists():
        return read_token_file(path), False
    token = new_token()
    write_secret(path, (token + "\n").encode())
    return token, True


def bearer(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The token of an ``authorization: Bearer <token>`` metadata entry ("" when absent)."""
    for k, v in metadata or ():
        if k == AUTHORIZATION and isinstance(v, str) and v.startswith(BEARER):
            return v[len(BEARER):].strip()
    return ""


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, Any]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call; ``token(method)`` picks the token
    for a method at call time ("" sends none), so a credential issued later is used at once."""

    def __init__(self, token: Callable[[str], str]) -> None:
        self._token = token

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        token = self._token(d.method)
        if not token:
            return d
        md = [(k, v) for k, v in (d.metadata or ()) if k != AUTHORIZATION]
        md.append((AUTHORIZATION, BEARER + token))
        return _Details(d, md)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


def with_token(channel: grpc.Channel, token: str | Callable[[str], str]) -> grpc.Channel:
    """``channel`` sending a bearer token on every call (a fixed one, or one chosen per method)."""
    pick = token if callable(token) else (lambda _method: token)
    return grpc.intercept_channel(channel, BearerInterceptor(pick))


# -- server side --------------------------------------------------------------------------------
def shaped(handler: grpc.RpcMethodHandler, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> grpc.RpcMethodHandler:
    """A method handler of the same kind (unary or streaming each way) and serializers as
    ``handler``, running ``behavior``: what a server interceptor returns to wrap or replace one."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, **kw)
    return grpc.unary_unary_rpc_method_handler(behavior, **kw)


def deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler shaped as ``handler`` that only aborts with ``code`` and ``message``."""
    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return shaped(handler, abort)


# -- Ed25519 keys -------------------------------------------------------------------------------
def new_private_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a key's public half."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public(raw: bytes) -> Ed25519PublicKey:
    """A public key from its 32 raw bytes; AuthError if it is not one."""
    if len(raw) != KEY_BYTES:
        raise AuthError(f"an Ed25519 public key has {KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def ensure_private_key(path: pathlib.Path) -> tuple[Ed25519PrivateKey, bool]:
    """The Ed25519 key in ``path`` (PEM, PKCS8), made (0600) if missing; returns (key, made)."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise AuthError(f"{path} does not hold an Ed25519 private key")
        return key, False
    key = new_private_key()
    write_secret(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return key, True


# -- membership tickets -------------------------------------------------------------------------
@dataclass(frozen=True)
class Ticket:
    """The coordinator's word that ``peer_id``, holding ``public_key``, is a member of
    ``job_id``'s membership epoch ``epoch``."""

    job_id: str
    epoch: int
    peer_id: str
    public_key: bytes
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """What the coordinator signs: a domain tag, then each field length-prefixed."""
        return _TICKET_DOMAIN + _fields(self.job_id.encode(), struct.pack(">Q", self.epoch), self.peer_id.encode(),
                                        self.public_key)

    def encode(self) -> bytes:
        """The ticket as it travels (Plan.member_ticket, exchange call metadata)."""
        return _TICKET_MAGIC + _fields(self.job_id.encode(), struct.pack(">Q", self.epoch), self.peer_id.encode(),
                                       self.public_key, self.signature)


def _fields(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)


def _split(data: bytes, n: int) -> list[bytes]:
    out, pos = [], 0
    for _ in range(n):
        if pos + 2 > len(data):
            raise AuthError("truncated ticket")
        (size,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if pos + size > len(data):
            raise AuthError("truncated ticket")
        out.append(data[pos:pos + size])
        pos += size
    if pos != len(data):
        raise AuthError("trailing bytes after the ticket")
    return out


def issue_ticket(key: Ed25519PrivateKey, job_id: str, epoch: int, peer_id: str, public_key: bytes) -> bytes:
    """A ticket for ``peer_id`` in (``job_id``, ``epoch``), signed with the coordinator's ``key``, encoded."""
    t = Ticket(job_id, epoch, peer_id, public_key)
    return Ticket(job_id, epoch, peer_id, public_key, key.sign(t.signed_bytes())).encode()


def decode_ticket(data: bytes) -> Ticket:
    """Parses an encoded ticket (without verifying it); AuthError if malformed."""
    if not data.startswith(_TICKET_MAGIC):
        raise AuthError("not a dml membership ticket")
    job, epoch, peer, pub, sig = _split(data[len(_TICKET_MAGIC):], 5)
    if len(epoch) != 8 or len(pub) != KEY_BYTES or len(sig) != SIGNATURE_BYTES:
        raise AuthError("malformed ticket")
    if len(job) > MAX_ID_BYTES or len(peer) > MAX_ID_BYTES:
        raise AuthError("ticket ids too long")
    try:
        return Ticket(job.decode(), struct.unpack(">Q", epoch)[0], peer.decode(), pub, sig)
    except UnicodeDecodeError:
        raise AuthError("ticket ids are not UTF-8") from None


def verify_ticket(coordinator_key: Ed25519PublicKey, data: bytes) -> Ticket:
    """The ticket in ``data`` if the coordinator signed it; AuthError otherwise."""
    t = decode_ticket(data)
    try:
        coordinator_key.verify(t.signature, t.signed_bytes())
    except InvalidSignature:
        raise AuthError("the ticket is not signed by this cluster's coordinator") from None
    return t


# -- signed exchange calls ----------------------------------------------------------------------
@dataclass(frozen=True)
class CallClaims:
    """What a signed exchange call says about itself: the method, the (job, epoch) of the
    sender's ticket, the round or exchange id, the sender and the receiver."""

    method: str
    job_id: str
    epoch: int
    ref: str
    sender: str
    receiver: str

    def signed_bytes(self) -> bytes:
        """What the sender signs with its private key."""
        return _CALL_DOMAIN + _fields(self.method.encode(), self.job_id.encode(), struct.pack(">Q", self.epoch),
                                      self.ref.encode(), self.sender.encode(), self.receiver.encode())


def sign_call(key: Ed25519PrivateKey, ticket: bytes, claims: CallClaims) -> list[tuple[str, str | bytes]]:
    """The metadata of a signed exchange call: the claims, the sender's ticket, its signature."""
    return [(MD_SENDER, claims.sender), (MD_RECEIVER, claims.receiver), (MD_JOB, claims.job_id),
            (MD_EPOCH, str(claims.epoch)), (MD_REF, claims.ref), (MD_TICKET, ticket),
            (MD_SIGNATURE, key.sign(claims.signed_bytes()))]


def call_claims(method: str, metadata: Sequence[tuple[str, Any]] | None) -> tuple[CallClaims, bytes, bytes] | None:
    """(claims, ticket, signature) read from a call's metadata; None when it carries none of
    them; AuthError when some are missing or malformed."""
    md: dict[str, Any] = {}
    for k, v in metadata or ():
        if k.startswith("dml-auth-"):
            md.setdefault(k, v)
    if not md:
        return None
    try:
        sender, receiver, job, ref = (str(md[k]) for k in (MD_SENDER, MD_RECEIVER, MD_JOB, MD_REF))
        epoch_text = str(md[MD_EPOCH])
        ticket, sig = md[MD_TICKET], md[MD_SIGNATURE]
    except KeyError as e:
        raise AuthError(f"exchange call without {e.args[0]} metadata") from None
    if not epoch_text.isdigit() or len(epoch_text) > 20 or not isinstance(ticket, bytes) or not isinstance(sig, bytes):
        raise AuthError("malformed exchange call metadata")
    return CallClaims(method, job, int(epoch_text), ref, sender, receiver), ticket, sig


def verify_call(coordinator_key: Ed25519PublicKey, claims: CallClaims, ticket_data: bytes, signature: bytes) -> Ticket:
    """Checks a signed exchange call: the ticket is the coordinator's, it names the claimed
    sender, job and epoch, and the sender's key (the ticket's) signed the claims. Returns the
    ticket; AuthError naming what failed otherwise."""
    t = verify_ticket(coordinator_key, ticket_data)
    if (t.peer_id, t.job_id, t.epoch) != (claims.sender, claims.job_id, claims.epoch):
        raise AuthError(f"the ticket is for {t.peer_id} in job {t.job_id} epoch {t.epoch}, not for "
                        f"{claims.sender} in job {claims.job_id} epoch {claims.epoch}")
    try:
        load_public(t.public_key).verify(signature, claims.signed_bytes())
    except InvalidSignature:
        raise AuthError(f"the call is not signed by {claims.sender}'s key") from None
    return t
