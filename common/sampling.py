"""What the coordinator and every peer must agree on about samples: the sharding scheme's name
and the order in which a shard's samples are visited in each pass. Pure, numpy only."""
from __future__ import annotations

import re

import numpy as np

_DIRICHLET = re.compile(r"^dirichlet:(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)$")
_CLASSES = re.compile(r"^classes:([1-9]\d{0,5})$")
SHARDINGS = "'iid', 'contiguous', 'classes:K' (K >= 1 labels per shard) or 'dirichlet:ALPHA' (ALPHA > 0)"


def parse_sharding(text: str) -> tuple[str, float]:
    """Parses a sharding scheme: ``iid``, ``contiguous``, ``classes:K`` or ``dirichlet:ALPHA``.
    Returns (kind, parameter): 0 for the first two, K for ``classes``, ALPHA for ``dirichlet``.
    Raises ValueError with a message."""
    if text in ("iid", "contiguous"):
        return text, 0.0
    m = _DIRICHLET.match(text)
    if m and float(m.group(1)) > 0:
        return "dirichlet", float(m.group(1))
    m = _CLASSES.match(text)
    if m:
        return "classes", float(int(m.group(1)))
    raise ValueError(f"bad sharding {text!r}: expected {SHARDINGS}")


def shard_order(indices: np.ndarray, seed: int, data_epoch: int, shard_id: int) -> np.ndarray:
    """The order a shard's samples are visited in during one pass (same on every peer)."""
    return np.random.default_rng([seed, data_epoch, shard_id]).permutation(indices)
