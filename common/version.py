"""The dml protocol version peers and the coordinator exchange at registration.

The members of one ring must agree byte for byte: the same parameter digests (a round commits
only when every member reports the same one), the same wire frames and codecs. Two releases that
differ there cannot commit a round together, and without a check they would fail every round's
commit and take the blame for each other (quarantine, re-issued rounds), with nothing saying why.
So a peer sends its version with RegisterPeer; the coordinator refuses another version with
FAILED_PRECONDITION and a message naming both, and a peer refuses a coordinator that answers with
another (0: a release from before versions were sent). A coordinator's state dir keeps its peers'
registrations across a restart, with the version each registered with: a coordinator restarted on
another release evicts those of another version (they register again and are refused), and every
heartbeat's answer carries the coordinator's version, which a peer checks as at registration. An
upgrade restarts the coordinator and its peers on the same release; the coordinator's state dir
and checkpoints carry over.

Bump :data:`PROTOCOL_VERSION` with any change that makes members of one ring, or a peer and the
coordinator, disagree: a digest, a frame, a codec, a field whose absence means something else.

1: every release before versions were sent (sha256 parameter digests), never sent itself.
2: BLAKE3 parameter digests (``b3:``), the commit's report answering with the next plan.
3: the heartbeat's answer carries the coordinator's version too, and a coordinator evicts the
   peers it restored whose recorded version is not its own: a coordinator restarted on another
   release under running peers (its state dir keeps their registrations, so they would never
   register again) is refused by them, and refuses them, as at registration."""
from __future__ import annotations

PROTOCOL_VERSION = 3


def describe(version: int) -> str:
    """A version as a message names it."""
    return f"protocol {version}" if version else "a protocol from before versions were sent"


def mismatch(ours: int, theirs: int, us: str, them: str) -> str:
    """Why ``us`` (speaking ``ours``) will not work with ``them`` (speaking ``theirs``), or "" if it will."""
    if theirs == ours:
        return ""
    return (f"{them} speaks {describe(theirs)} and {us} speaks {describe(ours)}: members of one ring must run "
            f"the same dml release (their digests and frames must agree); upgrade the coordinator and its "
            f"peers together")
