"""The outer optimizer of ``--sync params`` jobs (DiLoCo, arXiv 2311.08105): instead of taking
the ring's average as the next round's parameters, every member treats ``committed - average``
as a gradient (the pseudo-gradient) and applies it to the committed parameters with a
``torch.optim.SGD`` (momentum; Nesterov for ``nesterov``; lr ``outer_lr``).

Every member computes it on the CPU from the same inputs (the bit-identical average and the
committed parameters, whose digest the plan carries) with the same state, so the results stay
bit-identical. Its state (the momentum buffer) is part of the training state: the trainer lists
it in ``state_parts["outer"]``. Imports no gRPC.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dml.common.spec import OUTER_OPTIMIZERS

PART = "outer"  # its name in Trainer.state_parts


class OuterOptimizer:
    """The outer step over ``numel`` parameters: ``kind`` ``sgd`` (heavy-ball momentum) or
    ``nesterov``, learning rate ``lr``, momentum ``momentum``."""

    def __init__(self, kind: str, lr: float, momentum: float, numel: int) -> None:
        if kind not in OUTER_OPTIMIZERS or kind == "none":
            raise ValueError(f"unknown outer optimizer {kind!r}: choose sgd or nesterov")
        if numel < 1:
            raise ValueError(f"an outer optimizer needs parameters, got {numel}")
        self.kind, self.numel = kind, numel
        # The parameter the torch optimizer steps: re-pointed at the caller's array for each step
        # (so no copy of the model is kept), its gradient a buffer of our own.
        self._param = torch.zeros(numel, dtype=torch.float32)
        self._grad = torch.zeros(numel, dtype=torch.float32)
        self._idle = self._param.data
        # foreach=False: the same single-tensor kernels on every machine, whatever torch picks by default.
        self._opt = torch.optim.SGD([self._param], lr=lr, momentum=momentum, nesterov=kind == "nesterov",
                                    foreach=False)

    def step(self, committed: np.ndarray, average: np.ndarray) -> None:
        """Replaces ``average`` (the ring's result, a writable float32 array) in place with
        ``committed - outer_step(committed - average)`` and advances the momentum.

        ``committed`` is the round's starting point, which must not share memory with ``average``."""
        if committed.shape != (self.numel,) or average.shape != (self.numel,):
            raise ValueError(f"outer step over {self.numel} parameters got {committed.shape} and {average.shape}")
        if average.dtype != np.float32 or not average.flags.c_contiguous or not average.flags.writeable:
            raise ValueError("the average must be a writable contiguous float32 array")
        if np.shares_memory(committed, average):
            raise ValueError("the committed parameters and the average share memory")
        g = self._grad.numpy()
        np.subtract(committed, average, out=g)  # the pseudo-gradient
        np.copyto(average, committed)
        self._param.data = torch.from_numpy(average)
        self._param.grad = self._grad
        try:
            self._opt.step()  # average -= outer_lr * (nesterov) momentum step of g
        finally:
            self._param.grad = None
            self._param.data = self._idle  # hold no reference to the caller's buffer

    def momentum(self) -> np.ndarray | None:
        """A copy of the momentum buffer (None before the first step)."""
        buf = self._opt.state.get(self._param, {}).get("momentum_buffer")
        return None if buf is None else buf.numpy().copy()

    def reset(self) -> None:
        """Forgets the momentum: the state of a job that has not started (a rollback to round 0)."""
        self._opt.state.clear()

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer's state_dict (its momentum buffer and hyper-parameters)."""
        return self._opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` (an empty state: no momentum yet). ValueError when it
        is not one of this optimizer over this many parameters."""
        try:
            buf = state["state"].get(0, {}).get("momentum_buffer")
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not an outer optimizer state: {e!r}") from None
        if buf is not None and (not isinstance(buf, torch.Tensor) or tuple(buf.shape) != (self.numel,)):
            raise ValueError(f"outer momentum buffer must be a tensor of shape ({self.numel},)")
        self._opt.load_state_dict(state)
