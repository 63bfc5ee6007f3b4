"""How a multi-worker host (``dml-peer --workers N`` / ``--gpus``) cuts the samples its plan
allocates into what each worker trains at each step. Pure: no torch, no processes.

A single-worker peer takes one step per ``batch_size`` consecutive samples of its allocation
(:meth:`Trainer.train_on`). A host of ``W`` workers takes one DDP step per ``W x batch_size``
consecutive samples (its allocation is ``W`` times a member's, so it takes as many steps as a
member), worker ``w`` training the ``w``-th of ``W`` near-equal contiguous parts of the step's
samples. Every sample of the allocation is trained exactly once, by one worker, in one step, so
the coordinator's ledger (every sample once per pass, coordinator/ledger.py) holds for the host
as for any member. Each worker's loss is scaled by :func:`loss_scales` so that DDP's mean of the
workers' gradients is the mean over the step's samples even when the parts differ in size.
"""
from __future__ import annotations

import numpy as np

from dml.common.limits import MAX_WORKERS


def split_steps(samples: np.ndarray, batch_size: int, workers: int) -> list[list[np.ndarray]]:
    """``steps[s][w]``: the samples worker ``w`` trains at step ``s``, in order. Step ``s`` is
    ``samples[s*G:(s+1)*G]`` with ``G = workers x batch_size``, cut into ``workers`` contiguous
    parts whose sizes differ by at most one. A last step too short to give every worker a sample
    is merged into the step before it (so no part is ever empty); fewer samples than workers in
    all is refused (ValueError), as is a batch size or worker count below 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be between 1 and {MAX_WORKERS}, got {workers}")
    n = int(samples.size)
    if n == 0:
        return []
    if n < workers:
        raise ValueError(f"{n} samples cannot be split across {workers} workers")
    group = workers * batch_size
    bounds = list(range(0, n, group)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < workers:
        del bounds[-2]  # the short tail joins the step before it
    return [list(np.array_split(samples[a:b], workers)) for a, b in zip(bounds, bounds[1:])]


def loss_scales(step: list[np.ndarray]) -> list[float]:
    """The factor each worker's mean loss is multiplied by at one step, so that DDP's average of
    the workers' gradients (a plain mean over workers) equals the gradient of the mean loss over
    all of the step's samples: ``n_w x W / N``. Exactly 1.0 for parts of equal size."""
    total = sum(int(p.size) for p in step)
    if total == 0:
        raise ValueError("a step with no samples")
    w = len(step)
    return [int(p.size) * w / total for p in step]
