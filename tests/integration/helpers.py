"""In-process cluster for integration tests: a real coordinator and real peers over gRPC on
127.0.0.1 with ports picked by the OS."""
from __future__ import annotations

import contextlib
import io
import time
from typing import Callable, Iterator

import torch

from dml.common import rpc
from dml.coordinator.server import CoordinatorServer, ServerConfig
from dml.coordinator.service import CoordinatorConfig
from dml.v1 import exchange_pb2, exchange_pb2_grpc, jobs_pb2_grpc
from dml.peer.runner import Peer, PeerConfig

FAST = CoordinatorConfig(heartbeat_interval_ms=200, peer_timeout_ms=1500, tick_ms=100)


@contextlib.contextmanager
def coordinator(state_dir=None, timing: CoordinatorConfig = FAST) -> Iterator[CoordinatorServer]:
    """A started coordinator on 127.0.0.1:0, stopped on exit."""
    srv = CoordinatorServer(ServerConfig(host="127.0.0.1", port=0, state_dir=state_dir, timing=timing)).start()
    try:
        yield srv
    finally:
        srv.stop(0.2)


@contextlib.contextmanager
def peers(address: str, n: int, exchange_timeout_s: float = 10.0) -> Iterator[list[Peer]]:
    """``n`` started peers running their round loops in threads, stopped on exit."""
    started: list[Peer] = []
    try:
        for _ in range(n):
            p = Peer(PeerConfig(coordinator=address, exchange_timeout_s=exchange_timeout_s, plan_wait_s=1.0)).start()
            p.run_in_thread()
            started.append(p)
        yield started
    finally:
        for p in started:
            p.stop()


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Polls ``pred`` every 50 ms until true; fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def job_stub(address: str) -> jobs_pb2_grpc.JobServiceStub:
    """A JobService client."""
    return jobs_pb2_grpc.JobServiceStub(rpc.channel(address))


def fetch_state(address: str, job_id: str, rnd: int) -> tuple[str, dict[str, torch.Tensor], bytes]:
    """Downloads a peer's parameters of a round: (digest, state_dict, raw bytes)."""
    with rpc.channel(address) as ch:
        parts = list(exchange_pb2_grpc.PeerExchangeStub(ch).FetchParameters(
            exchange_pb2.FetchParametersRequest(job_id=job_id, round=rnd), timeout=10))
    raw = b"".join(p.data for p in parts)
    return parts[0].digest, torch.load(io.BytesIO(raw), weights_only=True), raw


def assert_state_dicts_identical(states: list[dict[str, torch.Tensor]]) -> None:
    """Every state dict has the same keys and bit-identical tensors."""
    first = states[0]
    for other in states[1:]:
        assert other.keys() == first.keys()
        for k in first:
            assert other[k].dtype == first[k].dtype and other[k].shape == first[k].shape
            assert other[k].numpy().tobytes() == first[k].numpy().tobytes(), f"tensor {k} differs"


def ledger_problems(history: list[dict], spec=None) -> list[str]:
    """Sample-ledger violations of a job's history (as `dml status --json --history` prints it)."""
    from dml.coordinator.ledger import violations
    from dml.coordinator.service import job_shards
    from dml.common.spec import JobSpec

    sizes = [int(s.size) for s in job_shards(spec or JobSpec())]
    rounds = [[tuple(x) for m in sorted(r["consumed"]) for x in r["consumed"][m]] for r in history]
    return violations(rounds, sizes)
