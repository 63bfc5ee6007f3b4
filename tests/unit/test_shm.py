"""Shared-memory slots (peer/shm.py): creation, mapping by another party, and refusals."""
from __future__ import annotations

import os

import pytest

from dml.peer import shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")


@pytest.fixture
def slots():
    made = shm.SharedSlots.create(4096)
    yield made
    made.close()


def test_a_second_mapping_sees_the_same_bytes_in_every_slot(slots) -> None:
    other = shm.SharedSlots.attach(str(slots.path), slots.nonce, 4096)
    for frame in range(2 * shm.SLOTS):
        data = bytes([frame]) * (100 + frame)
        slots.slot(frame, len(data))[:] = data
        assert bytes(other.slot(frame, len(data))) == data
    assert slots.path.stat().st_mode & 0o777 == 0o600  # private to this user


def test_attach_refuses_another_file_the_wrong_size_or_a_foreign_path(slots) -> None:
    with pytest.raises(ValueError, match="not the file"):
        shm.SharedSlots.attach(str(slots.path), bytes(shm.NONCE_BYTES), 4096)
    with pytest.raises(ValueError, match="wrong size"):
        shm.SharedSlots.attach(str(slots.path), slots.nonce, 8192)
    with pytest.raises(ValueError, match="not a dml"):
        shm.SharedSlots.attach("/etc/passwd", slots.nonce, 4096)
    with pytest.raises(FileNotFoundError):
        shm.SharedSlots.attach(str(shm.SHM_DIR / "dml-0-nothing"), slots.nonce, 4096)


def test_a_payload_larger_than_a_slot_is_refused(slots) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        slots.slot(0, 4097)
    with pytest.raises(ValueError):
        shm.SharedSlots.create(0)
    with pytest.raises(ValueError):
        shm.SharedSlots.create(shm.MAX_SLOT_BYTES + 1)


def test_unlink_leaves_both_mappings_working_and_no_file(slots) -> None:
    other = shm.SharedSlots.attach(str(slots.path), slots.nonce, 4096)
    slots.unlink()
    assert not slots.path.exists()
    other.slot(3, 5)[:] = b"hello"
    assert bytes(slots.slot(3, 5)) == b"hello"
    other.close()  # not the creator: removes nothing, raises nothing
    assert not any(p.name.startswith(f"dml-{os.getpid()}-") for p in shm.SHM_DIR.iterdir())
