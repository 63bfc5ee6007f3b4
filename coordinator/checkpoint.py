"""Checks an uploaded checkpoint's bytes against the parameter digest it claims, without torch.

A checkpoint is a torch ``state_dict`` file (``dml model`` hands it to users as is): a zip
archive whose float32 parameters are views of one flat storage, stored uncompressed as one
entry (``<archive>/data/<key>``). That entry's bytes are exactly the flat float32 buffer the
members' digest (:mod:`dml.aggregation.digests`: BLAKE3, or sha256 for one made before it) is of,
so the coordinator hashes it.
An upload passes when one storage entry hashes to the claimed digest and the archive says it is
little-endian; anything else (not a zip, no such entry, compressed storages) is refused.

What this does not prove: that the archive's pickle maps every tensor onto that storage as the
model's layout would. Peers never rely on that: one adopting a checkpoint recomputes the digest
of the parameters it loaded (``peer.params.ParamStore.adopt``) and refuses a mismatch.

The training state (``dml checkpoint``: model, optimizer and the other state parts, round; see
``peer.trainstate``) is uploaded in the same stream. Without torch the coordinator checks what it
can: its size (at most :func:`max_training_state_bytes`), that it hashes to the sha256 its
uploader declares, and that it is a torch archive of uncompressed little-endian storages. With
``--optimizer-state average`` the round's digest covers the averaged optimizer tensors too: the
parameters' bytes followed by those tensors', which the training state stores as one storage, so
the model's parameter storage followed by one of the state's storages must hash to the digest.
"""
from __future__ import annotations

import hashlib
import io
import re
import zipfile

from dml.aggregation.digests import Hasher, new_hash
from dml.coordinator.records import BadReport

HASH_BLOCK = 8 << 20  # bytes read from an archive entry at a time


# A training state holds the model, the optimizer's state (Adam: twice the parameters) and the
# other parts (an outer optimizer: about twice again): an upload larger than this many times the
# model's state_dict, plus some slack for small tensors, is refused before it is stored.
MAX_STATE_RATIO = 8
STATE_SLACK_BYTES = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BadCheckpoint(BadReport):
    """An uploaded checkpoint whose bytes do not hold the parameters it claims."""


def max_training_state_bytes(model_bytes: int) -> int:
    """The largest training state accepted with a model state_dict of ``model_bytes``."""
    return MAX_STATE_RATIO * model_bytes + STATE_SLACK_BYTES


def _storages(data: bytes, what: str, archive: str = "torch archive") -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The archive and its uncompressed storages, largest first; BadCheckpoint for anything
    that is not a little-endian torch archive."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        entries = z.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise BadCheckpoint(f"{what} is not a {archive}: {e}") from None
    if not any(i.filename.endswith("/data.pkl") for i in entries):
        raise BadCheckpoint(f"{what} is not a {archive}: it holds no data.pkl")
    storages = [i for i in entries if i.filename.rsplit("/", 2)[-2:-1] == ["data"]]
    order = [i for i in entries if i.filename.endswith("/byteorder")]
    if order and z.read(order[0]).strip() != b"little":
        raise BadCheckpoint(f"{what} is not little-endian: its storages are not the digest's bytes")
    stored = [i for i in storages if i.compress_type == zipfile.ZIP_STORED]
    return z, sorted(stored, key=lambda i: -i.file_size)  # the flat buffer is the largest


def _hash(z: zipfile.ZipFile, info: zipfile.ZipInfo, h: Hasher) -> Hasher:
    with z.open(info) as f:
        while block := f.read(HASH_BLOCK):  # large enough for BLAKE3's threads to share
            h.update(block)
    return h


def verify_checkpoint(data: bytes, digest: str, averaged_state: bytes | None = None) -> None:
    """Raises :class:`BadCheckpoint` unless ``data`` is a state_dict archive holding a storage
    whose digest (:mod:`dml.aggregation.digests`) is ``digest``; with ``averaged_state`` (the training state of an
    ``--optimizer-state average`` job), whose bytes followed by one of that archive's storages
    hash to ``digest``."""
    z, storages = _storages(data, "checkpoint", "torch state_dict archive")
    if averaged_state is None:
        for info in storages:
            if _hash(z, info, new_hash(like=digest)).hexdigest() == digest:
                return
        raise BadCheckpoint(f"no parameter storage in the checkpoint hashes to its claimed digest {digest[:16]}...")
    zs, state_storages = _storages(averaged_state, "training state")
    if storages:
        params = _hash(z, storages[0], new_hash(like=digest))
        for info in state_storages:  # the averaged tensors are the largest (Adam: twice the model)
            if _hash(zs, info, params.copy()).hexdigest() == digest:
                return
    raise BadCheckpoint(f"no parameter and optimizer-state storages in the checkpoint hash to its claimed "
                        f"digest {digest[:16]}...")


def verify_training_state(data: bytes, sha256: str, model_bytes: int) -> None:
    """Raises :class:`BadCheckpoint` unless ``data`` (a training state uploaded with a model
    state_dict of ``model_bytes``) is within the size bound, hashes to the declared ``sha256``
    and is a torch archive."""
    limit = max_training_state_bytes(model_bytes)
    if len(data) > limit:
        raise BadCheckpoint(f"training state of {len(data)} bytes is over the limit of {limit} "
                            f"({MAX_STATE_RATIO}x the model's state_dict + {STATE_SLACK_BYTES} bytes)")
    if not _SHA256.fullmatch(sha256):
        raise BadCheckpoint("the training state's first chunk declares no sha256 (64 lowercase hex digits)")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise BadCheckpoint(f"the training state does not hash to its declared sha256 {sha256[:16]}...")
    _storages(data, "training state")
