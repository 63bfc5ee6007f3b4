"""Tokens, membership tickets and signed exchange calls (dml.common.auth, dml.peer.auth), no sockets."""
from __future__ import annotations

import dataclasses
import stat

import grpc
import pytest

from dml.common import auth
from dml.common.auth import AuthError, CallClaims
from dml.peer.auth import PeerCredentials

METHOD = "/dml.v1.PeerExchange/OpenDataPlane"


# -- tokens ---------------------------------------------------------------------------------------


def test_token_files_are_made_once_owner_only_and_read_back(tmp_path):
    path = tmp_path / "secrets" / "join.token"
    token, made = auth.ensure_token_file(path)
    assert made and len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert auth.ensure_token_file(path) == (token, False)
    assert auth.read_token_file(path) == token
    assert auth.new_token() != token


@pytest.mark.parametrize("text", ["", "  \n", "two words", "x" * 300, "caf\u00e9"])
def test_a_token_file_that_holds_no_single_token_is_refused(tmp_path, text: str):
    path = tmp_path / "t"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AuthError):
        auth.read_token_file(path)


def test_secrets_compare_equal_only_to_themselves_and_never_when_empty():
    assert auth.same_secret("abc", "abc")
    assert not auth.same_secret("abc", "abd") and not auth.same_secret("", "") and not auth.same_secret("abc", "")
    assert auth.token_hash("abc") == auth.token_hash("abc") != auth.token_hash("abd")


def test_bearer_reads_only_the_authorization_entry():
    assert auth.bearer([("x", "y"), ("authorization", "Bearer tok")]) == "tok"
    assert auth.bearer([("authorization", "Basic tok")]) == "" and auth.bearer(None) == ""


def test_the_signing_key_is_kept_and_reloaded(tmp_path):
    key, made = auth.ensure_private_key(tmp_path / "coordinator.key")
    again, made_again = auth.ensure_private_key(tmp_path / "coordinator.key")
    assert made and not made_again and auth.public_bytes(key) == auth.public_bytes(again)
    assert stat.S_IMODE((tmp_path / "coordinator.key").stat().st_mode) == 0o600


# -- tickets ------------------------------------------------------------------------------------


def _ticket(coord, peer_key, job="job-1", epoch=3, peer="peer-a") -> bytes:
    return auth.issue_ticket(coord, job, epoch, peer, auth.public_bytes(peer_key))


def test_a_ticket_verifies_with_the_coordinators_key_only():
    coord, other, peer = auth.new_private_key(), auth.new_private_key(), auth.new_private_key()
    t = auth.verify_ticket(coord.public_key(), _ticket(coord, peer))
    assert (t.job_id, t.epoch, t.peer_id, t.public_key) == ("job-1", 3, "peer-a", auth.public_bytes(peer))
    with pytest.raises(AuthError, match="not signed"):
        auth.verify_ticket(coord.public_key(), _ticket(other, peer))


@pytest.mark.parametrize("field", ["job_id", "epoch", "peer_id", "public_key"])
def test_changing_any_field_of_a_ticket_breaks_it(field: str):
    coord, peer = auth.new_private_key(), auth.new_private_key()
    t = auth.decode_ticket(_ticket(coord, peer))
    changed = {"job_id": "job-2", "epoch": 4, "peer_id": "peer-b", "public_key": auth.public_bytes(auth.new_private_key())}
    forged = dataclasses.replace(t, **{field: changed[field]}).encode()
    with pytest.raises(AuthError):
        auth.verify_ticket(coord.public_key(), forged)


@pytest.mark.parametrize("blob", [b"", b"DMLT1", b"DMLT1\x00\x05ab", b"nope" * 20])
def test_malformed_tickets_are_refused_without_a_crash(blob: bytes):
    coord = auth.new_private_key()
    with pytest.raises(AuthError):
        auth.verify_ticket(coord.public_key(), blob)
    good = _ticket(coord, auth.new_private_key())
    for cut in (1, 10, len(good) - 1):
        with pytest.raises(AuthError):
            auth.verify_ticket(coord.public_key(), good[:cut])
    with pytest.raises(AuthError):
        auth.verify_ticket(coord.public_key(), good + b"x")


# -- signed calls ----------------------------------------------------------------------------------


def _signed(coord, sender_key, claims: CallClaims, ticket_peer: str | None = None, ticket_epoch: int | None = None):
    ticket = _ticket(coord, sender_key, job=claims.job_id, epoch=claims.epoch if ticket_epoch is None else ticket_epoch,
                     peer=claims.sender if ticket_peer is None else ticket_peer)
    return auth.sign_call(sender_key, ticket, claims)


def test_a_signed_call_verifies_and_any_change_of_its_claims_breaks_it():
    coord, key = auth.new_private_key(), auth.new_private_key()
    claims = CallClaims(METHOD, "job-1", 3, "7", "peer-a", "peer-b")
    md = _signed(coord, key, claims)
    got, ticket, sig = auth.call_claims(METHOD, md)
    assert got == claims
    assert auth.verify_call(coord.public_key(), got, ticket, sig).peer_id == "peer-a"
    for change in ({"method": "/dml.v1.PeerExchange/Gossip"}, {"ref": "8"}, {"receiver": "peer-c"}):
        with pytest.raises(AuthError, match="not signed"):
            auth.verify_call(coord.public_key(), dataclasses.replace(claims, **change), ticket, sig)
    for change in ({"sender": "peer-c"}, {"job_id": "job-2"}, {"epoch": 4}):  # not what the ticket says
        with pytest.raises(AuthError, match="the ticket is for"):
            auth.verify_call(coord.public_key(), dataclasses.replace(claims, **change), ticket, sig)


def test_a_ticket_signed_for_someone_else_or_a_signature_by_another_key_does_not_verify():
    coord, key, thief = auth.new_private_key(), auth.new_private_key(), auth.new_private_key()
    claims = CallClaims(METHOD, "job-1", 3, "7", "peer-a", "peer-b")
    stolen = _ticket(coord, key)  # peer-a's real ticket, signed over by the thief
    md = auth.sign_call(thief, stolen, claims)
    got, ticket, sig = auth.call_claims(METHOD, md)
    with pytest.raises(AuthError, match="not signed by peer-a"):
        auth.verify_call(coord.public_key(), got, ticket, sig)


def test_call_metadata_missing_a_part_is_malformed():
    coord, key = auth.new_private_key(), auth.new_private_key()
    md = _signed(coord, key, CallClaims(METHOD, "job-1", 3, "7", "peer-a", "peer-b"))
    assert auth.call_claims(METHOD, []) is None
    for drop in range(len(md)):
        with pytest.raises(AuthError):
            auth.call_claims(METHOD, md[:drop] + md[drop + 1:])
    bad_epoch = [(k, "-1" if k == auth.MD_EPOCH else v) for k, v in md]
    with pytest.raises(AuthError):
        auth.call_claims(METHOD, bad_epoch)


# -- the receiving peer ------------------------------------------------------------------------------


def _member(coord, peer_id: str) -> PeerCredentials:
    c = PeerCredentials("join")
    c.registered(peer_id, "tok-" + peer_id, auth.public_bytes(coord))
    return c


def test_a_peer_admits_members_of_its_epoch_or_a_newer_one_and_only_calls_meant_for_it():
    coord = auth.new_private_key()
    a, b = _member(coord, "peer-a"), _member(coord, "peer-b")
    for c in (a, b):
        c.note_plan("job-1", 3, auth.issue_ticket(coord, "job-1", 3, c.peer_id, c.public_key))
    assert b.verify(METHOD, a.sign(METHOD, "job-1", 3, "7", "peer-b")) is None
    assert b.control_token("/dml.v1.PeerControl/RegisterPeer") == "join" and b.control_token("/x/Heartbeat") == "tok-peer-b"
    code, msg = b.verify(METHOD, a.sign(METHOD, "job-1", 3, "7", "peer-c"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "peer-c" in msg
    code, _ = b.verify("/dml.v1.PeerExchange/Gossip", a.sign(METHOD, "job-1", 3, "7", "peer-b"))
    assert code == grpc.StatusCode.PERMISSION_DENIED, "signed for another method"
    assert b.verify(METHOD, [])[0] == grpc.StatusCode.UNAUTHENTICATED
    assert a.sign(METHOD, "job-1", 4, "7", "peer-b") == [], "no ticket for epoch 4: nothing to sign with"
    # b moves to epoch 4 (a membership change): a's epoch-3 calls are now refused.
    b.note_plan("job-1", 4, b"")
    code, msg = b.verify(METHOD, a.sign(METHOD, "job-1", 3, "7", "peer-b"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "older" in msg
    # A newer epoch than b holds is fine: the ticket alone proves it (b's plan may come later).
    a.note_plan("job-1", 5, auth.issue_ticket(coord, "job-1", 5, "peer-a", a.public_key))
    assert b.verify(METHOD, a.sign(METHOD, "job-1", 5, "7", "peer-b")) is None


def test_a_peer_of_another_cluster_or_an_unregistered_peer_refuses():
    coord, other = auth.new_private_key(), auth.new_private_key()
    a, b = _member(coord, "peer-a"), _member(other, "peer-b")  # b trusts another coordinator
    a.note_plan("job-1", 3, auth.issue_ticket(coord, "job-1", 3, "peer-a", a.public_key))
    assert b.verify(METHOD, a.sign(METHOD, "job-1", 3, "7", "peer-b"))[0] == grpc.StatusCode.PERMISSION_DENIED
    fresh = PeerCredentials()
    assert fresh.verify(METHOD, a.sign(METHOD, "job-1", 3, "7", ""))[0] == grpc.StatusCode.UNAVAILABLE


def test_no_auth_is_refused_on_a_bind_other_than_loopback(capsys):
    from dml.coordinator import cli as coord_cli

    with pytest.raises(SystemExit) as e:
        coord_cli.build_config(["--no-auth", "--host", "0.0.0.0"])
    assert e.value.code == 2 and "loopback" in capsys.readouterr().err
    for host in ("127.0.0.1", "::1", "localhost"):
        assert not coord_cli.build_config(["--no-auth", "--host", host]).auth
    assert coord_cli.build_config(["--host", "0.0.0.0"]).auth
