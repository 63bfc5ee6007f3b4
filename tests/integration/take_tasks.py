"""Test-only tasks (``tests.integration.take_tasks:NAME``, imported from the peers' own
environment): one that trains, and the bad inputs of issue 12's must-show 5 that a take or a
round meets: a model or dataset that raises, an empty dataset, labels out of range, a dataset
item that raises, and data that differs from peer to peer."""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

import dml
from dml.common.task import ArrayDataset, Context

N, FEATURES, CLASSES = 120, 6, 4


def _data(n: int = N, classes: int = CLASSES) -> ArrayDataset:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    return ArrayDataset(x, (np.arange(n) % classes).astype(np.int64))


def _model() -> torch.nn.Module:
    return torch.nn.Linear(FEATURES, CLASSES)


good = dml.Task(model=_model, train=lambda ctx: _data(), test=lambda ctx: _data(40), batch_size=12)


def _no_file(ctx: Context) -> ArrayDataset:
    raise FileNotFoundError(f"no such file: {ctx.path('train.csv')}")


def _broken_model() -> torch.nn.Module:
    raise RuntimeError("the model would not build: 3 layers configured, 2 given")


raising_data = dml.Task(model=_model, train=_no_file)
raising_model = dml.Task(model=_broken_model, train=lambda ctx: _data())
empty = dml.Task(model=_model, train=lambda ctx: ArrayDataset(np.zeros((0, FEATURES), np.float32), np.zeros(0, np.int64)))
# 12 classes of targets for a model of 4 outputs: cross entropy raises on the first step.
labels_out_of_range = dml.Task(model=_model, train=lambda ctx: _data(classes=12))


class _Items:
    """A dataset read item by item, whose item 5 cannot be read."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == 5:
            raise ValueError("row 5 of the file is malformed")
        return torch.zeros(FEATURES), i % CLASSES


raising_item = dml.Task(model=_model, train=lambda ctx: _Items(), batch_size=N)

_sizes: Iterator[int] = iter(())


def reset_shifting(alike: int) -> None:
    """The next ``alike`` loads of ``shifting`` in this process find N samples, later ones 10 fewer."""
    global _sizes
    _sizes = itertools.chain(itertools.repeat(N, alike), itertools.repeat(N - 10))


def _shifting(ctx: Context) -> ArrayDataset:
    return _data(next(_sizes))


shifting = dml.Task(model=_model, train=_shifting)
