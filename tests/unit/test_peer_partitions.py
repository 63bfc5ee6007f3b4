"""The peer's side of partitions: the held-out reason logged once, the test-only fault flag."""
from __future__ import annotations

import logging

from dml.peer import cli as peer_cli
from dml.peer.runner import Peer, PeerConfig


def test_fault_unreachable_is_off_by_default_and_takes_addresses_from_the_flag_or_env(monkeypatch):
    monkeypatch.delenv("DML_FAULT_UNREACHABLE", raising=False)
    cfg, _ = peer_cli.build_config(["--coordinator", "127.0.0.1:1", "--device", "cpu"])
    assert cfg.unreachable == () and cfg.injected_fault("127.0.0.1:5000") == ""
    cfg, _ = peer_cli.build_config(["--coordinator", "127.0.0.1:1", "--device", "cpu",
                                    "--fault-unreachable", "127.0.0.1:5000, 10.0.0.2:7"])
    assert cfg.unreachable == ("127.0.0.1:5000", "10.0.0.2:7")
    assert "injected fault" in cfg.injected_fault("10.0.0.2:7") and cfg.injected_fault("10.0.0.2:8") == ""
    monkeypatch.setenv("DML_FAULT_UNREACHABLE", "127.0.0.1:6000")
    cfg, _ = peer_cli.build_config(["--coordinator", "127.0.0.1:1", "--device", "cpu"])
    assert cfg.unreachable == ("127.0.0.1:6000",)


def test_a_held_out_peer_logs_why_once_and_again_only_when_it_changes(caplog):
    caplog.set_level(logging.INFO, logger="dml.peer.runner")
    peer = Peer.__new__(Peer)  # only the note's state: no server, no coordinator
    peer.held_out = ""
    peer.config = PeerConfig(coordinator="127.0.0.1:1")
    for _ in range(3):
        peer._note_held_out("peer-1", "held out of job j: unreachable: a, b could not reach it")
    assert caplog.text.count("holds this peer out of rings") == 1
    peer._note_held_out("peer-1", "")
    peer._note_held_out("peer-1", "")
    assert caplog.text.count("no longer held out") == 1
