"""Federated digits: each peer trains on its own CSV, which never leaves it.

    python examples/digits_csv.py split DIR --peers 4     # a label-skewed split into DIR/peer-*/
    dml-peer --allow-job-code --data digits-csv=DIR/peer-0 ...   # one per folder
    dml submit --task examples/digits_csv.py --placement local --local-data digits-csv

scikit-learn's 8x8 digits (the built-in ``digits`` task's rows and its fixed train/test split)
as CSV files: a header line, 64 pixel values in 0..1, the class in the last column. A job with
``--placement local`` reads ``train.csv`` in the folder its peer offers (``ctx.data_dir`` is the
PATH of ``dml-peer --data NAME=PATH``; a PATH that is a file is read as the training rows, with
``test.csv`` beside it) and evaluates on ``test.csv``, the held-out rows every site shares, so
the accuracy the first member reports is comparable between placements. The same task trains
with shared storage on ``DIR/all`` (every training row): ``--data-dir DIR/all``.

:func:`write_split` gives peer ``i`` most of the samples of its "home" classes (``c % peers ==
i``) and an even share of the rest: each site sees every class, but few of most.
"""
from __future__ import annotations

import os
import pathlib
import sys
import tempfile

import numpy as np
import torch
from torch import nn

import dml

HEADER = ",".join([f"p{i}" for i in range(64)] + ["label"])
HOME_SHARE = 0.7  # of each class, the share its home peer holds


def _write(path: pathlib.Path, x: np.ndarray, y: np.ndarray) -> None:
    """One CSV, written to a temporary file and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            np.savetxt(f, np.column_stack([x, y]), delimiter=",", fmt="%.6g", header=HEADER, comments="")
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_split(folder: pathlib.Path, peers: int, seed: int = 0,
                home_share: float = HOME_SHARE) -> list[pathlib.Path]:
    """Writes ``folder/peer-<i>/train.csv`` for ``peers`` peers (a label-skewed split of the
    digits training rows: class c's home is peer ``c % peers``, which gets ``home_share`` of
    them, the others an even share of the rest), ``test.csv`` beside each (the same held-out
    rows), and ``folder/all/`` with every training row, for the shared-storage run. Returns
    the peers' folders."""
    from dml.common.tasks import builtin_data

    d = builtin_data("digits")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(peers)]
    for c in np.unique(d.y_train):
        idx = rng.permutation(np.flatnonzero(d.y_train == c))
        home = int(c) % peers
        cut = int(round(home_share * idx.size))
        parts[home].append(idx[:cut])
        others = [p for p in range(peers) if p != home] or [home]
        for p, share in zip(others, np.array_split(idx[cut:], len(others))):
            parts[p].append(share)
    out = []
    for i, chunks in enumerate(parts):
        rows = np.sort(np.concatenate(chunks))
        where = folder / f"peer-{i}"
        _write(where / "train.csv", d.x_train[rows], d.y_train[rows])
        _write(where / "test.csv", d.x_test, d.y_test)
        out.append(where)
    _write(folder / "all" / "train.csv", d.x_train, d.y_train)
    _write(folder / "all" / "test.csv", d.x_test, d.y_test)
    return out


def _read(path: pathlib.Path) -> dml.ArrayDataset:
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    return dml.ArrayDataset(table[:, :-1].copy(), table[:, -1].astype(np.int64))


def dataset(ctx: dml.Context) -> dml.ArrayDataset:
    """The rows of ``ctx.split`` from ``ctx.data_dir`` (a folder with train.csv and test.csv,
    or a training CSV with test.csv beside it)."""
    where = ctx.data_dir
    if where.is_file():
        return _read(where if ctx.split == "train" else where.with_name("test.csv"))
    return _read(where / f"{ctx.split}.csv")


def model() -> nn.Module:
    """The built-in ``digits`` task's MLP: 64 -> 128 -> 64 -> 10."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


task = dml.Task(
    model=model,
    train=dataset,
    test=dataset,
    loss=nn.functional.cross_entropy,
    optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
    batch_size=32,
    name="digits_csv",
)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "split":
        print("usage: python examples/digits_csv.py split DIR [--peers N]", file=sys.stderr)
        sys.exit(2)
    n = int(sys.argv[sys.argv.index("--peers") + 1]) if "--peers" in sys.argv else 4
    for p in write_split(pathlib.Path(sys.argv[2]), n):
        print(p)
