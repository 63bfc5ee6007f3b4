"""Writing a file so that a crash leaves either the old one or the whole new one."""
from __future__ import annotations

import os
import pathlib
import secrets


def write_atomic(path: pathlib.Path, data: bytes, mode: int = 0o644, sync_folder: bool = False) -> None:
    """Writes ``data`` to ``path`` through a synced temp file in the same folder renamed over it
    (created with ``mode``); with ``sync_folder`` the rename is synced too, so it survives a
    power cut. The temp file never outlives a failure."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_folder:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
