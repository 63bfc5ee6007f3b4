"""What the coordinator and every peer must agree on about samples: the sharding scheme's name
and the order in which a shard's samples are visited in each pass. Pure, numpy only."""
from __future__ import annotations

import hashlib
import re

import numpy as np

MAX_LABELS = 1 << 20  # the most training labels a take sends (4 MiB as int32, within a control message)

_DIRICHLET = re.compile(r"^dirichlet:(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)$")
_CLASSES = re.compile(r"^classes:([1-9]\d{0,5})$")
SHARDINGS = "'iid', 'contiguous', 'classes:K' (K >= 1 labels per shard) or 'dirichlet:ALPHA' (ALPHA > 0)"


def parse_sharding(text: str) -> tuple[str, float]:
    """Parses a sharding scheme: ``iid``, ``contiguous``, ``classes:K`` or ``dirichlet:ALPHA``.
    Returns (kind, parameter): 0 for the first two, K for ``classes``, ALPHA for ``dirichlet``.
    Raises ValueError with a message."""
    if text in ("iid", "contiguous"):
        return text, 0.0
    m = _DIRICHLET.fullmatch(text)
    if m and float(m.group(1)) > 0:
        return "dirichlet", float(m.group(1))
    m = _CLASSES.fullmatch(text)
    if m:
        return "classes", float(int(m.group(1)))
    raise ValueError(f"bad sharding {text!r}: expected {SHARDINGS}")


def shard_order(indices: np.ndarray, seed: int, data_epoch: int, shard_id: int) -> np.ndarray:
    """The order a shard's samples are visited in during one pass (same on every peer)."""
    return np.random.default_rng([seed, data_epoch, shard_id]).permutation(indices)


def labels_digest(train_samples: int, labels: bytes) -> str:
    """sha256 (hex) over a training set's sample count and its labels (int32 little-endian
    bytes, b"" when it has none or sends none): what every peer taking a job must find alike."""
    h = hashlib.sha256()
    h.update(int(train_samples).to_bytes(8, "little"))
    h.update(labels)
    return h.hexdigest()
