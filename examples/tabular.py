"""A tabular classifier read from a CSV file: is a breast tumour malignant or benign?

    dml local --task examples/tabular.py --rounds 30

569 rows of 30 measurements (scikit-learn's bundled Wisconsin breast-cancer data), a small MLP,
Adam. The CSV is read from the peer's data directory (``dml-peer --data-dir DIR``; by default its
working directory). When it is missing, this file writes it there from scikit-learn's copy, so
the example runs from a fresh clone with nothing to download. To train on your own table, put
your CSV there instead: a header line, one row per sample, numbers only, the class (0, 1, ...)
in the last column; then change CSV_NAME and the model's sizes.
"""
from __future__ import annotations

import functools
import os
import pathlib
import tempfile

import numpy as np
import torch
from torch import nn

import dml

CSV_NAME = "breast_cancer.csv"
TEST_FRACTION = 0.2  # rows held out for the test metrics
SPLIT_SEED = 0  # fixed, so every peer holds out the same rows (whatever the job's seed)


def write_csv(path: pathlib.Path) -> None:
    """Writes scikit-learn's breast-cancer data as a CSV (30 features, then the class: 0
    malignant, 1 benign). Several peers may start at once on one data directory: each writes a
    temporary file and renames it into place, so a reader never sees half a file."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    table = np.column_stack([data.data, data.target])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            np.savetxt(f, table, delimiter=",", fmt="%.10g", header=",".join([*data.feature_names, "target"]),
                       comments="")
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=4)
def splits(data_dir: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The CSV's train and test rows as (float32 features, int64 classes), each feature
    standardised with the mean and spread of the *training* rows only (the test rows must not
    leak into what the model sees). Read once per data directory."""
    path = data_dir / CSV_NAME
    if not path.exists():
        write_csv(path)
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_test = int(round(TEST_FRACTION * len(y)))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    x = ((x - mean) / std).astype(np.float32)
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}


def dataset(ctx: dml.Context) -> dml.ArrayDataset:
    """The rows of ``ctx.split`` ("train" or "test") from the CSV under ``ctx.data_dir``."""
    return dml.ArrayDataset(*splits(ctx.data_dir)[ctx.split])


def model() -> nn.Module:
    """30 features -> 32 hidden units -> 2 classes. dml seeds torch before calling this, so
    every peer starts from the same weights."""
    return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))


MALIGNANT = 0  # the class a screening test must not miss


def metrics(output: torch.Tensor, target: torch.Tensor) -> dict[str, object]:
    """The test metrics beside accuracy and loss. dml evaluates the test set in batches: a
    number is taken as the batch's mean and averaged over batches by their size; a pair
    (numerator, denominator) is summed over all batches before dividing, which is how a ratio
    like recall or F1 comes out exact for the whole test set."""
    pred = output.argmax(1)
    hit, sick, flagged = pred == target, target == MALIGNANT, pred == MALIGNANT
    tp = (hit & sick).sum().item()
    fp = (flagged & ~sick).sum().item()
    fn = (~flagged & sick).sum().item()
    return {
        "recall": (tp, tp + fn),  # the share of malignant tumours found
        "f1": (2 * tp, 2 * tp + fp + fn),  # F1 of the malignant class: 2TP / (2TP + FP + FN)
    }


task = dml.Task(
    model=model,
    train=dataset,
    test=dataset,
    loss=nn.functional.cross_entropy,
    optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
    metrics=metrics,
    batch_size=16,
    name="tabular",
)
