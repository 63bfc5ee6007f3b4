"""The local-cluster helper itself: processes by slot, restarts on the same port, one log each,
everything reaped."""
from __future__ import annotations

import signal

import pytest

from dml.client.cluster import ClusterError, LocalCluster, registrations
from tests.e2e.conftest import FAST_FAILURES, ROOT
from tests.integration.helpers import wait_for

pytestmark = pytest.mark.e2e


def test_local_cluster_starts_kills_restarts_and_reaps_by_slot(tmp_path):
    # A long grace period: a peer told to stop (SIGTERM) is given time to leave on its own.
    c = LocalCluster(tmp_path / "state", tmp_path / "logs", coordinator_args=FAST_FAILURES, cwd=ROOT, grace_s=60)
    with c:
        address = c.start_coordinator()
        assert c.port > 0 and address == f"127.0.0.1:{c.port}"
        p0 = c.start_peer(0, ("--torch-threads", "1"))
        p1 = c.start_peer()  # the next free slot
        assert sorted(c.peers) == [0, 1] and c.peers[1] is p1
        wait_for(lambda: bool(registrations(p0.log) and registrations(p1.log)), 120, "both peers to register")
        with pytest.raises(ClusterError, match="slot 0"):
            c.start_peer(0)

        c.pause(p1)
        assert p1.alive and p1.paused
        c.resume(p1)
        assert p1.alive and not p1.paused

        new0 = c.restart_peer(0)
        assert p0.popen.returncode == -signal.SIGKILL
        assert c.peers[0] is new0 and new0.args == ("--torch-threads", "1") and new0.generation == 1
        assert c.stop_peer(1).popen.returncode == 0, "SIGTERM lets a peer leave cleanly"

        old = c.kill_coordinator()
        assert old.popen.returncode == -signal.SIGKILL
        assert c.start_coordinator() == address, "a restart listens on the same port"
        with pytest.raises(ClusterError, match="still running"):
            c.start_coordinator()
        wait_for(lambda: bool(registrations(new0.log)), 120, "the restarted peer to register")
    assert len(c.everything) == 5 and not any(p.alive for p in c.everything)
    assert sorted(p.name for p in (tmp_path / "logs").glob("*.log")) == [
        "coordinator.1.log", "coordinator.log", "peer-0.1.log", "peer-0.log", "peer-1.log"]
    assert [p.log.name for p in c.everything] == [
        "coordinator.log", "peer-0.log", "peer-1.log", "peer-0.1.log", "coordinator.1.log"]
