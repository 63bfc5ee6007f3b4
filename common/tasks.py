"""Built-in tasks: a dataset, a model and a loss. Importing this module does not import torch.

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), a fixed stratified
  held-out test split of 20 percent, and an MLP.
- ``synthetic:SIZE``: generated 256-feature, 10-class data from a random teacher and an MLP whose
  parameter count is about SIZE (``500k``, ``10M``, ``50000000``); for benchmarks.
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Dataset:
    """A task's data as float32 features and int64 labels, split into train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Task:
    """A named dataset and model builder."""

    name: str
    load: Callable[[], Dataset]
    layers: tuple[int, ...]  # MLP widths, input first, classes last

    def build_model(self) -> "torch.nn.Module":
        """A freshly initialised model (seed torch first for a reproducible init)."""
        import torch.nn as nn

        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(self.layers, self.layers[1:])):
            if i:
                mods.append(nn.ReLU())
            mods.append(nn.Linear(a, b))
        return nn.Sequential(*mods)

    @property
    def num_params(self) -> int:
        """Number of trainable parameters of the model."""
        return sum(a * b + b for a, b in zip(self.layers, self.layers[1:]))


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


@functools.lru_cache(maxsize=None)
def _synthetic(features: int = 256, classes: int = 10, n_train: int = 8192, n_test: int = 2048) -> Dataset:
    rng = np.random.default_rng(1234)
    teacher = rng.standard_normal((features, classes)).astype(np.float32)
    x = rng.standard_normal((n_train + n_test, features)).astype(np.float32)
    y = (x @ teacher + 0.5 * rng.standard_normal((n_train + n_test, classes))).argmax(1).astype(np.int64)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kKmM]?)$")


def parse_size(text: str) -> int:
    """Parses ``500k``, ``10M`` or ``1234`` into a count."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r}: expected a number with an optional k or M suffix")
    mult = {"": 1, "k": 1_000, "K": 1_000, "m": 1_000_000, "M": 1_000_000}[m.group(2)]
    return round(float(m.group(1)) * mult)


def get_task(name: str) -> Task:
    """Looks a task up by name. Raises ValueError with a message for an unknown one."""
    if name == "digits":
        return Task("digits", _digits, (64, 128, 64, 10))
    if name.startswith("synthetic:"):
        params = parse_size(name.split(":", 1)[1])
        if not 3_000 <= params <= 2_000_000_000:
            raise ValueError(f"task {name!r}: synthetic model size must be between 3k and 2000M parameters, got {params}")
        hidden = max(1, round((params - 10) / (256 + 1 + 10)))
        return Task(name, _synthetic, (256, hidden, 10))
    raise ValueError(f"unknown task {name!r}: choose 'digits' or 'synthetic:SIZE' (e.g. synthetic:10M)")


def task_names() -> list[str]:
    """Names of the built-in tasks, for help texts."""
    return ["digits", "synthetic:SIZE"]
