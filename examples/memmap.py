"""A dataset that stays on disk: ``.npy`` files read by memory map, so a peer touches only its rows.

    dml local --task examples/memmap.py --rounds 30

For data larger than a peer's memory, or on a shared volume (NFS, a mounted bucket) where each
peer should read only what it trains on. ``ctx.array(...)`` is ``np.load(..., mmap_mode="r")``
on local data: the file is mapped, not read; ``dml.ArrayDataset`` hands dml the arrays, and dml
indexes them with a whole batch of row numbers at once, so only those rows are ever read from
disk. The same file runs on a dataset of the coordinator's store (``dml data put sensors
sensors/`` then ``dml submit --task examples/memmap.py --dataset sensors``, the files then at
the dataset's top level or under ``sensors/``): there ``ctx.array`` fetches only the chunks
holding the rows of the peer's own shards.

The files live under the peer's data directory (``dml-peer --data-dir DIR``; by default its
working directory) in ``sensors/``: ``train_x.npy`` (float32, samples x features),
``train_y.npy`` (int64 classes) and the same for ``test_``. When they are missing, this file
generates them (60,000 synthetic sensor readings of 32 channels, 8 machine states), so the
example runs from a fresh clone. To use your own arrays, write them with ``np.save`` under
those names.
"""
from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np
import torch
from torch import nn

import dml

FOLDER = "sensors"
FEATURES, CLASSES = 32, 8
TRAIN, TEST = 50_000, 10_000


def save_atomically(path: pathlib.Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name, then a rename: peers sharing a data directory may
    write the same file at once, and a reader must never map half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def generate(folder: pathlib.Path) -> None:
    """Writes the synthetic readings: each machine state has its own mean pattern over the 32
    channels, and a reading is that pattern plus noise, squashed by the sensors' response
    (deterministic: every peer that generates them writes the same bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)
    patterns = 0.6 * rng.standard_normal((CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, TRAIN + TEST)
    x = np.tanh(patterns[y] + rng.standard_normal((TRAIN + TEST, FEATURES))).astype(np.float32)
    for split, rows in (("train", slice(0, TRAIN)), ("test", slice(TRAIN, None))):
        save_atomically(folder / f"{split}_y.npy", y[rows])
        save_atomically(folder / f"{split}_x.npy", x[rows])  # last: its presence means all are there


def dataset(ctx: dml.Context) -> dml.ArrayDataset:
    """The ``ctx.split`` arrays, read by rows (``ctx.array``): nothing is read yet. They are
    looked for in ``sensors/``, else at the top of the data (a store dataset put from that
    folder); missing everywhere, they are generated under ``ctx.data_dir / sensors``."""
    folder = FOLDER if ctx.files(f"{FOLDER}/test_x.npy") else "" if ctx.files("test_x.npy") else None
    if folder is None:
        generate(ctx.data_dir / FOLDER)
        folder = FOLDER
    parts = (folder,) if folder else ()
    x = ctx.array(*parts, f"{ctx.split}_x.npy")
    y = ctx.array(*parts, f"{ctx.split}_y.npy")
    return dml.ArrayDataset(x, y)


def model() -> nn.Module:
    """An MLP: 32 channels -> 128 -> 128 -> 8 states."""
    return nn.Sequential(
        nn.Linear(FEATURES, 128), nn.ReLU(),
        nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, CLASSES),
    )


task = dml.Task(
    model=model,
    train=dataset,
    test=dataset,
    loss=nn.functional.cross_entropy,
    # SGD with momentum and weight decay; the momentum buffers are part of the training state.
    optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
    batch_size=64,
    name="memmap",
)
