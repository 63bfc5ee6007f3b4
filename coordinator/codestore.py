"""The coordinator's task code: bundles kept by sha256 under ``STATE_DIR/code/<sha256>``.

A bundle is checked (size, digest, zip shape: :func:`dml.common.taskcode.check`) but never
unpacked or imported here. Files are written once, atomically (a synced temp file renamed into
place, then the folder synced), so a repeat submit of the same code writes nothing and a crash
leaves either the whole bundle or none of it. Bundles are kept for as long as the state dir:
jobs, finished ones included, are too.
"""
from __future__ import annotations

import logging
import pathlib
import re
import threading

from dml.common import taskcode
from dml.common.files import write_atomic
from dml.common.spec import InvalidSpec

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class OverLimit(Exception):
    """Task code over this coordinator's size limit (RESOURCE_EXHAUSTED)."""


class CodeStore:
    """Task code bundles in ``folder``, each at most ``max_bytes``."""

    def __init__(self, folder: pathlib.Path, max_bytes: int = taskcode.MAX_BUNDLE_BYTES) -> None:
        if not 1 <= max_bytes <= taskcode.MAX_CONFIGURABLE_BYTES:
            raise ValueError(f"the task code limit must be 1..{taskcode.MAX_CONFIGURABLE_BYTES} bytes, got {max_bytes}")
        self.folder = folder
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # two submits of the same new code write it once

    def path(self, digest: str) -> pathlib.Path:
        """Where the bundle of ``digest`` is kept (ValueError for a malformed digest)."""
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"malformed task code digest {digest[:80]!r}")
        return self.folder / digest

    def has(self, digest: str) -> bool:
        """Whether the bundle of ``digest`` is kept here."""
        return self.path(digest).is_file()

    def check(self, data: bytes, digest: str, task: str) -> None:
        """Raises OverLimit (over ``max_bytes``) or InvalidSpec (its sha256 is not ``digest``, or
        it is no bundle of the task ``task`` names) unless ``data`` may be kept."""
        if len(data) > self.max_bytes:
            raise OverLimit(f"task code is {len(data)} bytes, over this coordinator's limit of {self.max_bytes} "
                            f"bytes (dml-coordinator --max-task-code-bytes)")
        got = taskcode.digest_of(data)
        if got != digest:
            raise InvalidSpec(f"task code's sha256 is {got}, but the job's task_digest is {digest[:64]!r}")
        try:
            taskcode.check(data, self.max_bytes, taskcode.parse_ref(task))
        except taskcode.BundleTooLarge as e:
            raise OverLimit(str(e)) from None
        except taskcode.BundleError as e:
            raise InvalidSpec(str(e)) from None

    def put(self, data: bytes, digest: str) -> bool:
        """Keeps ``data`` (already :meth:`check`-ed) under ``digest``; False when it was kept
        already, intact (nothing is written). OSError when it cannot be written."""
        path = self.path(digest)
        with self._lock:
            try:
                if taskcode.digest_of(path.read_bytes()) == digest:
                    return False
                log.warning("task code %s in %s does not match its digest; writing it again", digest[:12], path)
            except FileNotFoundError:
                pass
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data, sync_folder=True)
        log.info("stored task code %s (%d bytes)", digest[:12], len(data))
        return True

    def get(self, digest: str) -> bytes:
        """The bundle of ``digest``, checked against it; KeyError when none is kept (or the kept
        file no longer matches its digest: it is then logged and never served)."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyError(digest) from None
        if taskcode.digest_of(data) != digest:
            log.error("task code %s in %s does not match its digest; not serving it", digest[:12], path)
            raise KeyError(digest)
        return data
