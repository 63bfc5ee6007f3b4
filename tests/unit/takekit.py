"""Takes for tests that drive a Coordinator by hand: what a peer taking a built-in task's job
would tell the coordinator of its data (peer.take computes it from the loaded task)."""
from __future__ import annotations

import numpy as np

from dml.common.sampling import labels_digest
from dml.common.tasks import builtin_data
from dml.coordinator.records import JobData
from dml.coordinator.state import READY


def builtin_take(task: str = "digits") -> tuple[JobData, bytes]:
    """(the data description, the labels as int32 bytes) of a built-in task's training set."""
    y = builtin_data(task).y_train
    blob = np.ascontiguousarray(y, dtype="<i4").tobytes()
    return JobData(train_samples=int(y.size), num_classes=int(y.max()) + 1, batch_size=32,
                   digest=labels_digest(int(y.size), blob), has_labels=True), blob


def take_all(coord: object, job_id: str, peers: list[str]) -> None:
    """Every one of ``peers`` takes the job READY, finding its built-in task's data."""
    data, labels = builtin_take(coord.state.job(job_id).spec.task)  # type: ignore[attr-defined]
    for p in peers:
        coord.take(p, job_id, READY, data=data, labels=labels)  # type: ignore[attr-defined]
