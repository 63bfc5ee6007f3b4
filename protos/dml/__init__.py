"""dml: decentralized training for PyTorch over gRPC.

One import root over the project's folders: ``dml.v1`` (generated protos), ``dml.common`` (job
spec, tasks, sampling order), ``dml.aggregation`` (pure algorithms), ``dml.coordinator``,
``dml.peer`` and ``dml.client``. docs/architecture.md has the map and the dependency rules.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["ArrayDataset", "Context", "Task", "__version__"]


def __getattr__(name: str) -> object:
    """``dml.Task``, ``dml.Context`` and ``dml.ArrayDataset`` (:mod:`dml.common.task`), loaded on
    first use so that ``import dml.v1`` stays as light as it was."""
    if name in ("Task", "Context", "ArrayDataset"):
        from dml.common import task

        return getattr(task, name)
    raise AttributeError(f"module 'dml' has no attribute {name!r}")
