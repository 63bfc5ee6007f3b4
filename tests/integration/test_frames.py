"""The raw-frame exchange method: what it accepts and what it refuses, over real gRPC."""
from __future__ import annotations


import grpc
import numpy as np
import pytest
from dml.common import rpc
from dml.v1 import exchange_pb2, exchange_pb2_grpc

from dml.aggregation.transport import Header
from dml.peer.exchange import FRAMES_METHOD, ExchangeServicer, add_exchange_to_server


@pytest.fixture
def served():
    """An exchange server on 127.0.0.1:0 and a channel to it: (servicer, channel)."""
    servicer = ExchangeServicer(lambda job, rnd: None, recv_timeout_s=5)
    server = rpc.server(workers=4, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
    add_exchange_to_server(servicer, server)
    port = rpc.bind(server, "127.0.0.1", 0)
    server.start()
    channel = rpc.channel(f"127.0.0.1:{port}")
    try:
        yield servicer, channel
    finally:
        channel.close()
        server.stop(0).wait(5)


@pytest.fixture
def target(served):
    """(servicer, the raw-frame method's callable)."""
    servicer, channel = served
    return servicer, channel.stream_unary(FRAMES_METHOD, request_serializer=None,
                                          response_deserializer=exchange_pb2.PushChunksResponse.FromString)


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


def test_a_frame_names_its_collective_on_the_raw_method_and_on_push_chunks(served, target):
    """--sync grads runs several all-reduces on one stream: each frame carries which."""
    servicer, push = target
    data = np.arange(4, dtype=np.float32)
    assert push(iter([Header(1, 1, 0, 0, 4, 7).pack() + data.tobytes()]), metadata=MD, timeout=5).chunks == 1
    header, _ = servicer.inbox(("j", 3, 2)).q.get(timeout=1)
    assert header.collective == 7
    stub = exchange_pb2_grpc.PeerExchangeStub(served[1])
    chunk = exchange_pb2.TensorChunk(job_id="j", round=4, epoch=2, sender_id="p1", phase=1, step=0, offset_elems=0,
                                     data=data.tobytes(), collective=9)
    assert stub.PushChunks(iter([chunk]), timeout=5).chunks == 1
    header, _ = servicer.inbox(("j", 4, 2)).q.get(timeout=1)
    assert header.collective == 9 and header.count == 4


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
