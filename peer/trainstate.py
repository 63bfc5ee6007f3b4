"""The training state beside the parameters: each of a trainer's ``state_parts`` (the optimizer,
and whatever else holds state) as a copy of its ``state_dict()``; its serialised form (sent to
joiners, checkpointed, ``dml checkpoint``); and, for ``--optimizer-state average``, the
optimizer's floating tensors that are averaged with the parameters. Torch only, no gRPC.

A captured state is ``{part name: state_dict copy}``. Copies are made into the tensors of an
older capture where shapes match (:func:`capture`), so a round allocates nothing new once the
state exists; plain SGD has an empty state and copies nothing.

The training-state file (:func:`to_bytes`) is a ``torch.save``'d dict ``{"format": 1, "job_id",
"round", "model": state_dict, <part name>: state_dict, ..., "spec": dict}``; a joiner receiving
it from a live member gets the same dict without "model" (the parameters travel first, as the
model's state_dict). Loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import collections
import hashlib
import io
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from dml.aggregation import digests

FORMAT = 1
RESERVED = ("format", "job_id", "round", "model", "spec")  # keys of the file that are not state parts
OPTIMIZER = "optimizer"  # the part whose floating tensors --optimizer-state average averages


def _copy(v: Any, old: Any) -> Any:
    """A copy of ``v`` (tensors detached, into ``old``'s tensor where it fits)."""
    if isinstance(v, torch.Tensor):
        if isinstance(old, torch.Tensor) and old.shape == v.shape and old.dtype == v.dtype and old.device == v.device:
            return old.copy_(v.detach())
        return v.detach().clone()
    if isinstance(v, Mapping):
        prev = old if isinstance(old, Mapping) else {}
        out = collections.OrderedDict() if isinstance(v, collections.OrderedDict) else {}
        for k, x in v.items():
            out[k] = _copy(x, prev.get(k))
        return out
    if isinstance(v, (list, tuple)):
        prev = old if isinstance(old, (list, tuple)) and len(old) == len(v) else [None] * len(v)
        items = [_copy(x, y) for x, y in zip(v, prev)]
        return items if isinstance(v, list) else tuple(items)
    return v  # numbers, strings, None, bools: immutable


def capture(parts: Mapping[str, Any], into: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of every part's ``state_dict()``, made into ``into`` (an older capture that is no
    longer needed) where its tensors fit."""
    prev = into or {}
    return {name: _copy(part.state_dict(), prev.get(name)) for name, part in parts.items()}


def restore(parts: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Loads a captured (or downloaded) state into the parts. The parts get copies: an optimizer's
    ``load_state_dict`` keeps the tensors it is given, which must not be the snapshot's own.
    ValueError when a part is missing or does not load."""
    missing = [n for n in parts if n not in state]
    if missing:
        raise ValueError(f"the training state has no {missing[0]!r}")
    for name, part in parts.items():
        try:
            part.load_state_dict(_copy(state[name], None))
        except Exception as e:  # noqa: BLE001 - whatever the state is, it does not fit this part
            raise ValueError(f"the training state's {name!r} does not load: {type(e).__name__}: {e}") from e


def equal(a: Any, b: Any) -> bool:
    """Whether two states are the same, tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, Mapping):
        return {k: _cpu(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_cpu(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_cpu(x) for x in v)
    return v


def _flatten_averaged(opt_sd: dict[str, Any], shapes: list[tuple[int, ...]]) -> None:
    """Re-points the averaged tensors of a (CPU copy of an) optimizer state_dict at views of one
    flat float32 tensor, in :func:`averaged`'s order, so the file stores them as one storage
    whose bytes follow the parameters' in the round's digest (coordinator.checkpoint checks it
    without torch)."""
    state = opt_sd.get("state", {})
    keys = []
    for i, shape in enumerate(shapes):
        st = state.get(i, {})
        for k in sorted(st, key=str):
            v = st[k]
            if isinstance(v, torch.Tensor) and v.is_floating_point() and tuple(v.shape) == shape:
                keys.append((i, k))
    if not keys:
        return
    flat = torch.cat([state[i][k].detach().float().reshape(-1) for i, k in keys])
    off = 0
    for i, k in keys:
        t = state[i][k]
        n = t.numel()
        state[i][k] = flat[off : off + n].view(t.shape)
        off += n


def _document(state: Mapping[str, Any], shapes: list[tuple[int, ...]] | None, meta: dict[str, Any]) -> dict[str, Any]:
    doc = {"format": FORMAT, **meta}
    for name, sd in state.items():
        if name in RESERVED:
            raise ValueError(f"a state part may not be called {name!r}")
        doc[name] = _cpu(sd)
        if shapes is not None and name == OPTIMIZER:
            doc[name] = {**doc[name], "state": {i: dict(st) for i, st in doc[name].get("state", {}).items()}}
            _flatten_averaged(doc[name], shapes)
    return doc


def to_bytes(state: Mapping[str, Any], shapes: list[tuple[int, ...]] | None = None, **meta: Any) -> bytes:
    """The serialised state (a torch.save'd dict of ``meta`` and the parts, on CPU). With
    ``shapes`` (the parameters' shapes: ``--optimizer-state average``) the optimizer's averaged
    tensors are stored as one flat storage."""
    out = io.BytesIO()
    torch.save(_document(state, shapes, meta), out)
    return out.getvalue()


def save(f: Any, state: Mapping[str, Any], shapes: list[tuple[int, ...]] | None = None, **meta: Any) -> str:
    """Writes the serialised state (:func:`to_bytes`) to the seekable binary file ``f`` straight
    from the tensors (a model in ``meta`` is not copied into memory again); returns its sha256."""
    torch.save(_document(state, shapes, meta), f)
    f.flush()
    f.seek(0)
    h = hashlib.sha256()
    while block := f.read(1 << 20):
        h.update(block)
    return h.hexdigest()


def load(data: bytes, names: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parts, the whole document) of a serialised state, checking it is one (format 1, a dict
    holding every one of ``names``). ValueError otherwise; never unpickles code."""
    try:
        doc = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the bytes are, they are not a training state
        raise ValueError(f"not a training state: {type(e).__name__}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("not a training state of format 1")
    missing = [n for n in names if n not in doc]
    if missing:
        raise ValueError(f"the training state has no {missing[0]!r}")
    return {n: doc[n] for n in names}, doc


# -- --optimizer-state average -----------------------------------------------------------------
def averaged(opt_state: Mapping[str, Any], shapes: list[tuple[int, ...]]) -> Iterator[torch.Tensor]:
    """The tensors of an optimizer's ``state_dict()`` that ``--optimizer-state average``
    averages, in a fixed order: for each parameter (by index, the order of ``shapes``, which
    are the parameters' shapes), its floating state tensors of the parameter's own shape (Adam's
    moments, SGD's momentum buffer), by key; step counters and other scalars stay local."""
    state = opt_state.get("state", {})
    for i, shape in enumerate(shapes):
        st = state.get(i, {})
        for k in sorted(st, key=str):
            v = st[k]
            if isinstance(v, torch.Tensor) and v.is_floating_point() and tuple(v.shape) == shape:
                yield v


def averaged_numel(opt_state: Mapping[str, Any], shapes: list[tuple[int, ...]]) -> int:
    """Elements of the averaged tensors."""
    return sum(t.numel() for t in averaged(opt_state, shapes))


def hash_with(params: np.ndarray, tensors: Iterator[torch.Tensor], like: str = "") -> str:
    """The digest of the parameters' bytes followed by each tensor's float32 bytes: the digest of
    a round whose optimizer state is averaged (equal to ``digest`` of the buffer the all-reduce
    averaged, parameters then state). ``like``: as for :func:`dml.aggregation.digests.new_hash`."""
    h = digests.new_hash(like)
    h.update(params)
    for t in tensors:
        h.update(t.detach().float().cpu().numpy())
    return h.hexdigest()
