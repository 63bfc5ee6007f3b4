"""The raw-frame exchange method: what it accepts and what it refuses, over real gRPC."""
from __future__ import annotations


import grpc
import numpy as np
import pytest
from dml.common import rpc
from dml.v1 import exchange_pb2

from dml.aggregation.transport import Header
from dml.peer.exchange import FRAMES_METHOD, ExchangeServicer, add_exchange_to_server


@pytest.fixture
def target():
    servicer = ExchangeServicer(lambda job, rnd: None, recv_timeout_s=5)
    server = rpc.server(workers=4, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
    add_exchange_to_server(servicer, server)
    port = rpc.bind(server, "127.0.0.1", 0)
    server.start()
    channel = rpc.channel(f"127.0.0.1:{port}")
    push = channel.stream_unary(FRAMES_METHOD, request_serializer=None,
                                response_deserializer=exchange_pb2.PushChunksResponse.FromString)
    try:
        yield servicer, push
    finally:
        channel.close()
        server.stop(0).wait(5)


MD = (("dml-job", "j"), ("dml-round", "3"), ("dml-epoch", "2"), ("dml-sender", "p1"))


def test_frames_land_in_the_inbox_of_their_key_unchanged(target):
    servicer, push = target
    data = np.arange(10, dtype=np.float32)
    frames = [Header(1, 1, 0, 0, 6).pack() + data[:6].tobytes(), Header(1, 1, 0, 6, 4).pack() + data[6:].tobytes()]
    assert push(iter(frames), metadata=MD, timeout=5).chunks == 2
    box = servicer.inbox(("j", 3, 2))
    (a, pa), (b, pb) = box.q.get(timeout=1), box.q.get(timeout=1)
    assert (a.phase, a.step, a.offset, b.offset, a.count, b.count) == (1, 0, 0, 6, 6, 4)
    assert np.array_equal(np.concatenate([np.frombuffer(pa, np.float32), np.frombuffer(pb, np.float32)]), data)
    assert box.sender == "p1"


@pytest.mark.parametrize("frame,md", [
    (b"\x01\x00", MD),  # shorter than the header
    (Header(1, 1, 0, 0, 2).pack() + b"\x00" * 6, MD),  # 6 bytes are not 2 float32s
    (Header(1, 4, 0, 0, 2).pack() + b"\x00" * 2, MD),  # int8 needs its 4-byte scale too
    (Header(1, 9, 0, 0, 2).pack() + b"\x00" * 8, MD),  # no such codec
    (Header(1, 1, 0, 0, 2).pack() + b"\x00" * 8, MD[:2]),  # no epoch or sender
])
def test_malformed_frames_are_invalid_argument(target, frame, md):
    _, push = target
    with pytest.raises(grpc.RpcError) as e:
        push(iter([frame]), metadata=md, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
