"""The built-in tasks, defined through the same :class:`dml.Task` API as a user's. Importing this
module does not import torch (the models are built on the peers).

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), a fixed stratified
  held-out test split of 20 percent, and an MLP trained with plain SGD.
- ``digits-cnn``: the same images as 1x8x8 tensors and a small CNN trained with Adam.
- ``synthetic:SIZE``: generated 256-feature, 10-class data from a random teacher and an MLP whose
  parameter count is about SIZE (``500k``, ``10M``, ``50000000``); for benchmarks.

Task references (``--task``): a built-in name, ``package.module:NAME`` (imported from each peer's
own environment) or a path to a ``.py`` file or a directory (sent with the job).
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dml.common.task import ArrayDataset, Context, Task

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Dataset:
    """A built-in task's data as float32 features and int64 labels, split into train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def mlp(layers: tuple[int, ...]) -> "torch.nn.Module":
    """An MLP of the given widths (input first, classes last) with ReLU between layers."""
    import torch.nn as nn

    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(layers, layers[1:])):
        if i:
            mods.append(nn.ReLU())
        mods.append(nn.Linear(a, b))
    return nn.Sequential(*mods)


def mlp_params(layers: tuple[int, ...]) -> int:
    """Trainable parameters of :func:`mlp`."""
    return sum(a * b + b for a, b in zip(layers, layers[1:]))


def digits_cnn() -> "torch.nn.Module":
    """A small CNN for 1x8x8 images: two 3x3 convolutions, a 2x2 max pool, two linear layers."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def _digits_file() -> pathlib.Path | None:
    """scikit-learn's bundled digits.csv.gz, found without importing scikit-learn (which costs
    a second or more of start-up: it matters when a coordinator or peer restarts)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, each class split in the same proportion (deterministic)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * idx.size))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@functools.lru_cache(maxsize=None)
def _digits() -> Dataset:
    path = _digits_file()
    if path is not None:
        raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = raw[:, :-1], raw[:, -1].astype(np.int64)
    else:  # an unusual install: let scikit-learn find its data
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        y = y.astype(np.int64)
    x = (x / 16.0).astype(np.float32)
    tr, te = stratified_split(y, 0.2, seed=0)
    return Dataset(x[tr], y[tr], x[te], y[te])


_ROWS = 256  # rows per product in _synthetic


@functools.lru_cache(maxsize=None)
def _synthetic(features: int = 256, classes: int = 10, n_train: int = 8192, n_test: int = 2048) -> Dataset:
    rng = np.random.default_rng(1234)
    teacher = rng.standard_normal((features, classes)).astype(np.float32)
    x = rng.standard_normal((n_train + n_test, features)).astype(np.float32)
    # The teacher's products 256 rows at a time: one GEMM over all rows made the BLAS keep a
    # packing buffer the size of ``x`` (10.5 MB, resident for the life of the process, measured
    # per peer); row blocks give the same bits (tests/unit/test_spec_tasks.py).
    logits = np.concatenate([x[i : i + _ROWS] @ teacher for i in range(0, x.shape[0], _ROWS)])
    y = (logits + 0.5 * rng.standard_normal((n_train + n_test, classes))).argmax(1).astype(np.int64)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kKmM]?)$")


def parse_size(text: str) -> int:
    """Parses ``500k``, ``10M`` or ``1234`` into a count."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r}: expected a number with an optional k or M suffix")
    mult = {"": 1, "k": 1_000, "K": 1_000, "m": 1_000_000, "M": 1_000_000}[m.group(2)]
    return round(float(m.group(1)) * mult)


def _arrays_task(name: str, data: Any, model: Any, *, images: bool = False, optimizer: Any = None) -> Task:
    def split(which: str) -> Any:
        def make(ctx: Context) -> ArrayDataset:
            d = data()
            x, y = (d.x_train, d.y_train) if which == "train" else (d.x_test, d.y_test)
            return ArrayDataset(x.reshape(-1, 1, 8, 8) if images else x, y)
        return make

    return Task(model=model, train=split("train"), test=split("test"), optimizer=optimizer,
                labels=lambda ctx: data().y_train, batch_size=32, name=name)


def _adam(params: Any) -> Any:
    import torch

    return torch.optim.Adam(params, lr=3e-3)


BUILTIN = ("digits", "digits-cnn", "synthetic:SIZE")
_DIGITS_LAYERS = (64, 128, 64, 10)


def synthetic_layers(name: str) -> tuple[int, ...]:
    """The MLP widths of ``synthetic:SIZE``. ValueError for a bad size."""
    params = parse_size(name.split(":", 1)[1])
    if not 3_000 <= params <= 2_000_000_000:
        raise ValueError(f"task {name!r}: synthetic model size must be between 3k and 2000M parameters, got {params}")
    hidden = max(1, round((params - 10) / (256 + 1 + 10)))
    return (256, hidden, 10)


def is_builtin(name: str) -> bool:
    """Whether ``name`` names a built-in task (a synthetic size is not checked here)."""
    return name in ("digits", "digits-cnn") or name.startswith("synthetic:")


def get_task(name: str) -> Task:
    """A built-in task by name. Raises ValueError with a message for an unknown one."""
    if name == "digits":
        return _arrays_task(name, _digits, lambda: mlp(_DIGITS_LAYERS))
    if name == "digits-cnn":
        return _arrays_task(name, _digits, digits_cnn, images=True, optimizer=_adam)
    if name.startswith("synthetic:"):
        layers = synthetic_layers(name)
        return _arrays_task(name, _synthetic, lambda: mlp(layers))
    raise ValueError(f"unknown task {name!r}: choose one of {', '.join(BUILTIN)}, a task file "
                     "(PATH.py or a directory) or package.module:NAME")


def builtin_data(name: str) -> Dataset:
    """A built-in task's arrays (numpy only: the coordinator may call this). ValueError for an
    unknown name."""
    if name in ("digits", "digits-cnn"):
        return _digits()
    if name.startswith("synthetic:"):
        synthetic_layers(name)
        return _synthetic()
    raise ValueError(f"unknown built-in task {name!r}")


def builtin_params(name: str) -> int:
    """Parameter count of a built-in MLP task (``digits``, ``synthetic:SIZE``)."""
    return mlp_params(_DIGITS_LAYERS if name == "digits" else synthetic_layers(name))


def task_names() -> list[str]:
    """Names of the built-in tasks, for help texts."""
    return list(BUILTIN)
