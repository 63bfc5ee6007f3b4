"""Length limits on requests' strings, dialable addresses, the guard's sizing and expiry rules,
and the start-up cleanup of shared-memory files whose owner is gone (no sockets)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from dml.common import guard, limits
from dml.peer import shm
from dml.v1 import control_pb2, jobs_pb2, types_pb2


def test_message_error_names_the_field_over_its_limit() -> None:
    assert limits.message_error(control_pb2.ReportFailureRequest(peer_id="p", detail="d" * 4096)) == ""
    assert "detail is 4097 bytes" in limits.message_error(control_pb2.ReportFailureRequest(detail="d" * 4097))
    assert "peer_id is 257 bytes" in limits.message_error(control_pb2.HeartbeatRequest(peer_id="p" * 257))
    assert limits.message_error(control_pb2.HeartbeatRequest(peer_id="p" * 256)) == ""
    # nested messages and multi-byte characters count in bytes
    spec = jobs_pb2.SubmitJobRequest(spec=types_pb2.JobSpec(task="é" * 129))
    assert "spec.task is 258 bytes" in limits.message_error(spec)
    assert "public_key is 300 bytes" in limits.message_error(control_pb2.RegisterPeerRequest(public_key=b"k" * 300))
    # payloads are bounded by the message size limit, not here
    assert limits.message_error(control_pb2.CheckpointChunk(data=b"x" * 100_000)) == ""


@pytest.mark.parametrize("address,host", [("127.0.0.1:1", "127.0.0.1"), ("[::1]:50051", "[::1]"),
                                          ("peer-1.example.com:8080", "peer-1.example.com"), ("h:65535", "h")])
def test_dialable_addresses(address: str, host: str) -> None:
    assert limits.dialable_address(address)[0] == host


@pytest.mark.parametrize("address,why", [
    ("0.0.0.0:1", "wildcard"), ("[::]:1", "wildcard"), ("224.0.0.1:1", "multicast"), ("h:0", "port"),
    ("h:99999", "port"), ("under_score:1", "neither"), ("-x:1", "neither"), ("a" * 64 + ":1", "neither"),
    ("x" * 260 + ":1", "longer"), ("1.2.3.4.5:1", "neither"), ("[nothex]:1", "address must be"), (":1", "address must be"),
])
def test_undialable_addresses(address: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        limits.dialable_address(address)


def test_limits_are_sized_from_the_pool() -> None:
    lim = guard.Limits.for_pool(256)
    assert (lim.per_key, lim.long_total, lim.long_per_key) == (192, 192, 128)
    lim = guard.Limits.for_pool(64, {"/a/B": guard.Policy(long=True)})
    assert (lim.per_key, lim.long_total, lim.long_per_key) == (48, 48, 32)
    assert lim.policy("/a/B").long and not lim.policy("/a/C").long
    assert lim.policy("/a/C").first_s == guard.FIRST_MESSAGE_S
    lim = guard.Limits.for_pool(1)
    assert (lim.per_key, lim.long_total, lim.long_per_key) == (1, 1, 1)
    with pytest.raises(ValueError):
        guard.Limits.for_pool(0)


class FakeContext:
    def __init__(self, metadata: tuple = (), peer: str = "ipv4:10.1.2.3:5555") -> None:
        self._md, self._peer = metadata, peer

    def invocation_metadata(self) -> tuple:
        return self._md

    def peer(self) -> str:
        return self._peer


def test_client_key_is_the_credential_else_the_ip() -> None:
    a = guard.client_key(FakeContext((("authorization", "Bearer a"),)))
    assert a.startswith("auth:") and "Bearer" not in a
    assert a != guard.client_key(FakeContext((("authorization", "Bearer b"),)))
    assert guard.client_key(FakeContext()) == guard.client_key(FakeContext(peer="ipv4:10.1.2.3:6666")) == "ip:10.1.2.3"
    assert guard.client_key(FakeContext(peer="ipv6:[::1]:5555")) == "ip:[::1]"


def test_a_call_expires_only_while_it_waits_on_its_client() -> None:
    w = guard._Watch(FakeContext(), "/a/B", guard.Policy(first_s=5, idle_s=2, max_s=100), now=0.0)
    assert w.expired(50.0) == ""  # the handler is working, not waiting
    w.waiting_since, w.wait_limit, w.wait_what = 50.0, 2.0, "message"
    assert w.expired(51.9) == ""
    assert "no message from the client for 2.0s" in w.expired(52.1)
    w.waiting_since = None
    assert "cap of 100s" in w.expired(100.5)


def test_remove_orphans_removes_files_of_dead_owners_only(tmp_path: pathlib.Path) -> None:
    dead, alive = tmp_path / "dml-111-ab12", tmp_path / "dml-222-cd34"
    mine, other = tmp_path / f"dml-{os.getpid()}-ef56", tmp_path / "dml-notapid-00"
    for p in (dead, alive, mine, other):
        p.write_bytes(b"x")
    removed = shm.remove_orphans(tmp_path, alive=lambda pid: pid == 222)
    assert removed == [dead]
    assert not dead.exists() and alive.exists() and mine.exists() and other.exists()


@pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")
def test_a_dead_processs_file_in_dev_shm_is_removed_at_start_up() -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    pid = int(child.stdout)  # exited: its pid is gone (reuse within this test is vanishingly unlikely)
    left = shm.SHM_DIR / f"dml-{pid}-0123abcd"
    left.write_bytes(b"\0" * 64)
    try:
        assert not shm.pid_alive(pid)
        assert left in shm.remove_orphans()
        assert not left.exists()
    finally:
        left.unlink(missing_ok=True)


def test_shared_slots_are_named_after_their_owner() -> None:
    if not shm.available():
        pytest.skip("no writable /dev/shm")
    slots = shm.SharedSlots.create(4096)
    try:
        assert shm.owner_pid(slots.path.name) == os.getpid()
        assert slots.path not in shm.remove_orphans()  # its owner (this process) is alive
    finally:
        slots.close()
