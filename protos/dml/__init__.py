"""dml: decentralized training for PyTorch over gRPC.

One import root over the project's folders: ``dml.v1`` (generated protos), ``dml.common`` (job
spec, tasks, sampling order), ``dml.aggregation`` (pure algorithms), ``dml.coordinator``,
``dml.peer`` and ``dml.client``. docs/architecture.md has the map and the dependency rules.
"""
from __future__ import annotations

__version__ = "0.1.0"
