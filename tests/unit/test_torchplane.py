"""The torch data plane's pure parts: who declines it, the store prefix of each group, the
bounds of the rendezvous store its host keeps (an in-process c10d HashStore, no sockets), the
probe's answer and the hold-collective fault."""
from __future__ import annotations

import pytest
from dml.v1 import exchange_pb2

from dml.common.spec import JobSpec
from dml.peer import faults, torchplane
from dml.peer.torchplane import Progress, StoreHost, prefix, probe_answer


def test_a_tls_peer_declines_unless_allowed():
    tls = object()
    assert torchplane.decline_reason(JobSpec(data_plane="torch"), None, False) == ""
    assert "--allow-torch-plane" in torchplane.decline_reason(JobSpec(data_plane="torch"), tls, False)  # type: ignore[arg-type]
    assert torchplane.decline_reason(JobSpec(data_plane="torch"), tls, True) == ""  # type: ignore[arg-type]
    assert torchplane.decline_reason(JobSpec(data_plane="tcp"), tls, False) == ""  # type: ignore[arg-type]


def test_every_group_has_a_prefix_of_its_own():
    keys = [("job", 3, 7), ("job", 4, 7), ("job", 3, 8), ("job2", 3, 7)]
    assert len({prefix(k) for k in keys}) == len(keys)


def test_the_store_host_bounds_what_members_put():
    host = StoreHost()
    req = exchange_pb2.TorchStoreRequest(job_id="j", epoch=1, group_round=1, sender_id="a",
                                         op=exchange_pb2.TORCH_STORE_OP_SET, keys=["k"], value=b"v")
    host.op(req)
    got = host.op(exchange_pb2.TorchStoreRequest(job_id="j", epoch=1, group_round=1, sender_id="b",
                                                 op=exchange_pb2.TORCH_STORE_OP_GET, keys=["k"], wait_ms=10))
    assert got.found and got.value == b"v"
    missing = host.op(exchange_pb2.TorchStoreRequest(job_id="j", epoch=1, group_round=1, sender_id="b",
                                                     op=exchange_pb2.TORCH_STORE_OP_GET, keys=["x"], wait_ms=10))
    assert not missing.found
    with pytest.raises(ValueError, match="at most"):
        host.op(exchange_pb2.TorchStoreRequest(
            job_id="j", epoch=1, group_round=1, op=exchange_pb2.TORCH_STORE_OP_SET, keys=["big"],
            value=b"x" * (torchplane.MAX_VALUE_BYTES + 1)))
    with pytest.raises(ValueError, match="keys"):
        host.op(exchange_pb2.TorchStoreRequest(job_id="j", epoch=1, group_round=1, op=exchange_pb2.TORCH_STORE_OP_SET))
    # A newer epoch of the job drops the older group's store; at most MAX_GROUPS are held.
    host.store(("j", 2, 5))
    assert ("j", 1, 1) not in host.groups()
    for e in range(10):
        host.store((f"other{e}", 1, 1))
    assert len(host.groups()) == torchplane.MAX_GROUPS


class _Plane:
    def __init__(self, got):
        self.got = got

    def progress(self, key):  # noqa: ANN001, ANN201
        return self.got.get(key)


def test_the_probe_answers_this_members_progress_in_the_group_asked_about():
    req = exchange_pb2.TorchProbeRequest(job_id="j", epoch=2, group_round=5, sender_id="x")
    assert not probe_answer(None, req).in_group
    assert not probe_answer(_Plane({}), req).in_group  # type: ignore[arg-type]
    got = probe_answer(_Plane({("j", 2, 5): Progress(entered=3, done=2)}), req)  # type: ignore[arg-type]
    assert got.in_group and (got.entered, got.done, got.broken) == (3, 2, False)


def test_the_hold_collective_fault_holds_one_round_and_touches_no_parameter():
    import numpy as np

    f = faults.parse_fault("hold-collective:4")
    assert f is not None and faults.holds(f, 4) and not faults.holds(f, 5) and not faults.holds(f, 3)
    params = np.ones(4, dtype=np.float32)
    assert not faults.inject(f, 4, params) and (params == 1).all()
    with pytest.raises(ValueError, match="hold-collective"):
        faults.parse_fault("hold:4")


def test_nccl_only_when_every_member_has_a_gpu_of_its_own():
    from dml.peer.torchplane import device_tag, nccl_possible

    assert device_tag("cpu") == "cpu"
    assert nccl_possible(["cuda:GPU-a", "cuda:GPU-b"])
    assert not nccl_possible(["cuda:GPU-a", "cuda:GPU-a"]), "two ranks on one GPU: NCCL refuses them, gloo it is"
    assert not nccl_possible(["cuda:GPU-a", "cpu"])
    assert not nccl_possible(["cpu", "cpu"])
