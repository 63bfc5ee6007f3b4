"""Checks an uploaded checkpoint's bytes against the parameter digest it claims, without torch.

A checkpoint is a torch ``state_dict`` file (``dml model`` hands it to users as is): a zip
archive whose float32 parameters are views of one flat storage, stored uncompressed as one
entry (``<archive>/data/<key>``). That entry's bytes are exactly the flat float32 buffer the
members' digest (``aggregation.averaging.digest``, sha256) is of, so the coordinator hashes it.
An upload passes when one storage entry hashes to the claimed digest and the archive says it is
little-endian; anything else (not a zip, no such entry, compressed storages) is refused.

What this does not prove: that the archive's pickle maps every tensor onto that storage as the
model's layout would. Peers never rely on that: one adopting a checkpoint recomputes the digest
of the parameters it loaded (``peer.params.ParamStore.adopt``) and refuses a mismatch.
"""
from __future__ import annotations

import hashlib
import io
import zipfile

from dml.coordinator.records import BadReport


class BadCheckpoint(BadReport):
    """An uploaded checkpoint whose bytes do not hold the parameters it claims."""


def verify_checkpoint(data: bytes, digest: str) -> None:
    """Raises :class:`BadCheckpoint` unless ``data`` is a state_dict archive holding a storage
    whose sha256 is ``digest``."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        entries = z.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise BadCheckpoint(f"checkpoint is not a torch state_dict archive: {e}") from None
    storages = [i for i in entries if i.filename.rsplit("/", 2)[-2:-1] == ["data"]]
    order = [i for i in entries if i.filename.endswith("/byteorder")]
    if order and z.read(order[0]).strip() != b"little":
        raise BadCheckpoint("checkpoint is not little-endian: its storages are not the digest's bytes")
    for info in sorted(storages, key=lambda i: -i.file_size):  # the flat buffer is the largest
        if info.compress_type != zipfile.ZIP_STORED:
            continue
        h = hashlib.sha256()
        with z.open(info) as f:
            while block := f.read(1 << 20):
                h.update(block)
        if h.hexdigest() == digest:
            return
    raise BadCheckpoint(f"no parameter storage in the checkpoint hashes to its claimed digest {digest[:16]}...")
