from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TorchStoreOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TORCH_STORE_OP_UNSPECIFIED: _ClassVar[TorchStoreOp]
    TORCH_STORE_OP_SET: _ClassVar[TorchStoreOp]
    TORCH_STORE_OP_GET: _ClassVar[TorchStoreOp]
    TORCH_STORE_OP_ADD: _ClassVar[TorchStoreOp]
    TORCH_STORE_OP_CHECK: _ClassVar[TorchStoreOp]
    TORCH_STORE_OP_WAIT: _ClassVar[TorchStoreOp]

class RingPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RING_PHASE_UNSPECIFIED: _ClassVar[RingPhase]
    RING_PHASE_REDUCE_SCATTER: _ClassVar[RingPhase]
    RING_PHASE_ALL_GATHER: _ClassVar[RingPhase]
TORCH_STORE_OP_UNSPECIFIED: TorchStoreOp
TORCH_STORE_OP_SET: TorchStoreOp
TORCH_STORE_OP_GET: TorchStoreOp
TORCH_STORE_OP_ADD: TorchStoreOp
TORCH_STORE_OP_CHECK: TorchStoreOp
TORCH_STORE_OP_WAIT: TorchStoreOp
RING_PHASE_UNSPECIFIED: RingPhase
RING_PHASE_REDUCE_SCATTER: RingPhase
RING_PHASE_ALL_GATHER: RingPhase

class TorchStoreRequest(_message.Message):
    __slots__ = ("job_id", "epoch", "group_round", "sender_id", "op", "keys", "value", "amount", "wait_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    GROUP_ROUND_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    group_round: int
    sender_id: str
    op: TorchStoreOp
    keys: _containers.RepeatedScalarFieldContainer[str]
    value: bytes
    amount: int
    wait_ms: int
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ..., group_round: _Optional[int] = ..., sender_id: _Optional[str] = ..., op: _Optional[_Union[TorchStoreOp, str]] = ..., keys: _Optional[_Iterable[str]] = ..., value: _Optional[bytes] = ..., amount: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class TorchStoreResponse(_message.Message):
    __slots__ = ("found", "value", "amount")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: bytes
    amount: int
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[bytes] = ..., amount: _Optional[int] = ...) -> None: ...

class TorchProbeRequest(_message.Message):
    __slots__ = ("job_id", "epoch", "group_round", "sender_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    GROUP_ROUND_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    group_round: int
    sender_id: str
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ..., group_round: _Optional[int] = ..., sender_id: _Optional[str] = ...) -> None: ...

class TorchProbeResponse(_message.Message):
    __slots__ = ("in_group", "entered", "done", "broken")
    IN_GROUP_FIELD_NUMBER: _ClassVar[int]
    ENTERED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    BROKEN_FIELD_NUMBER: _ClassVar[int]
    in_group: bool
    entered: int
    done: int
    broken: bool
    def __init__(self, in_group: _Optional[bool] = ..., entered: _Optional[int] = ..., done: _Optional[int] = ..., broken: _Optional[bool] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("job_id", "round", "epoch", "sender_id", "phase", "step", "offset_elems", "data", "codec", "count", "collective")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OFFSET_ELEMS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    epoch: int
    sender_id: str
    phase: RingPhase
    step: int
    offset_elems: int
    data: bytes
    codec: int
    count: int
    collective: int
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., epoch: _Optional[int] = ..., sender_id: _Optional[str] = ..., phase: _Optional[_Union[RingPhase, str]] = ..., step: _Optional[int] = ..., offset_elems: _Optional[int] = ..., data: _Optional[bytes] = ..., codec: _Optional[int] = ..., count: _Optional[int] = ..., collective: _Optional[int] = ...) -> None: ...

class PushChunksResponse(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    def __init__(self, chunks: _Optional[int] = ...) -> None: ...

class OpenDataPlaneRequest(_message.Message):
    __slots__ = ("job_id", "round", "epoch", "sender_id", "shm_slot_bytes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    epoch: int
    sender_id: str
    shm_slot_bytes: int
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., epoch: _Optional[int] = ..., sender_id: _Optional[str] = ..., shm_slot_bytes: _Optional[int] = ...) -> None: ...

class OpenDataPlaneResponse(_message.Message):
    __slots__ = ("port", "token", "shm_path", "shm_nonce", "shm_slot_bytes")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHM_PATH_FIELD_NUMBER: _ClassVar[int]
    SHM_NONCE_FIELD_NUMBER: _ClassVar[int]
    SHM_SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    port: int
    token: bytes
    shm_path: str
    shm_nonce: bytes
    shm_slot_bytes: int
    def __init__(self, port: _Optional[int] = ..., token: _Optional[bytes] = ..., shm_path: _Optional[str] = ..., shm_nonce: _Optional[bytes] = ..., shm_slot_bytes: _Optional[int] = ...) -> None: ...

class FetchParametersRequest(_message.Message):
    __slots__ = ("job_id", "round", "training_state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TRAINING_STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    training_state: bool
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., training_state: _Optional[bool] = ...) -> None: ...

class ParameterChunk(_message.Message):
    __slots__ = ("round", "digest", "data", "part")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    round: int
    digest: str
    data: bytes
    part: int
    def __init__(self, round: _Optional[int] = ..., digest: _Optional[str] = ..., data: _Optional[bytes] = ..., part: _Optional[int] = ...) -> None: ...

class GossipMessage(_message.Message):
    __slots__ = ("job_id", "sender_id", "exchange_id", "elems", "weight", "data", "commit")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    ELEMS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sender_id: str
    exchange_id: str
    elems: int
    weight: float
    data: bytes
    commit: bool
    def __init__(self, job_id: _Optional[str] = ..., sender_id: _Optional[str] = ..., exchange_id: _Optional[str] = ..., elems: _Optional[int] = ..., weight: _Optional[float] = ..., data: _Optional[bytes] = ..., commit: _Optional[bool] = ...) -> None: ...
