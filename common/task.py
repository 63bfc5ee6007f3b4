"""``dml.Task``: what a user hands dml to train, as plain Python. Importing this module loads
neither torch nor numpy; the fields are called on the peers only.

A task module holds one ``Task`` (by default under the name ``task``)::

    import dml, torch

    task = dml.Task(
        model=lambda: Net(),                               # a fresh torch.nn.Module
        train=lambda ctx: dataset,                         # map-style Dataset of (input, target)
        test=lambda ctx: dataset,                          # optional held-out data
        loss=torch.nn.functional.cross_entropy,            # (output, target) -> scalar
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
    )

``ctx`` (:class:`Context`) says where the peer keeps its data (``dml-peer --data-dir``), so a
dataset on a shared volume is read from each peer's own mount path. Read through it
(``ctx.path``, ``ctx.array``, ``ctx.files``) and the same task file also runs on a dataset of
the coordinator's store (``dml submit --dataset``), whose files each peer fetches only as far as
it reads them.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

DEFAULT_BATCH_SIZE = 32
MAX_METRICS = 16  # a task's own test metrics, at most this many (the coordinator holds them per round)
MAX_METRIC_NAME = 64  # characters in a metric's name


class DataSource(Protocol):
    """Where a :class:`Context` reads data that is not simply on the peer's disk (a dataset of
    the coordinator's store: ``dml.peer.datacache.StoreSource``). Paths are relative, parts
    joined by ``/``."""

    def path(self, rel: str) -> pathlib.Path:
        """The local path of ``rel`` once the file, or every file under the folder, is present."""
        ...

    def array(self, rel: str, train: bool = False) -> Any:
        """The ``.npy`` file ``rel`` as a read-only array of rows, fetched as rows are read."""
        ...

    def files(self, prefix: str = "") -> list[str]:
        """The relative paths of the files starting with ``prefix``, sorted."""
        ...


@dataclass(frozen=True)
class Context:
    """Where a task finds its data on this peer, and what it is asked for.

    Read the data through it and one task file works wherever the data is: under
    ``dml-peer --data-dir`` (a local disk, a shared volume) or in the coordinator's store
    (``dml submit --dataset NAME``, ``source`` set by dml), where each peer fetches only what it
    reads: ``ctx.array`` fetches just the rows a batch indexes, ``ctx.path`` whole files.
    """

    data_dir: pathlib.Path = field(default_factory=pathlib.Path.cwd)  # dml-peer --data-dir, or the dataset's folder
    split: str = "train"  # "train" or "test"
    job_id: str = ""
    peer_id: str = ""
    seed: int = 0  # the job's seed
    source: DataSource | None = field(default=None, compare=False, repr=False)  # None: the files under data_dir

    def path(self, *parts: str) -> pathlib.Path:
        """A path under the data directory. On a store dataset the file, or every file under
        the folder (the whole dataset for no parts), is fetched first, so whatever reads it
        (pandas, PIL, ``open``) finds it whole."""
        if self.source is None:
            return self.data_dir.joinpath(*parts)
        return self.source.path("/".join(str(p) for p in parts))

    def array(self, *parts: str) -> Any:
        """The ``.npy`` file at ``parts`` as a read-only array indexed by rows: on local data
        exactly ``np.load(path, mmap_mode="r")`` (nothing read until indexed); on a store
        dataset an array-like that fetches the rows a batch asks for (``len``, ``shape``,
        ``dtype``, ``x[i]``, ``x[a:b]``, ``x[int_array]``, ``np.asarray(x)``). Hand it to
        :class:`ArrayDataset` and a peer reads only the rows it trains on."""
        if self.source is None:
            import numpy as np

            return np.load(self.data_dir.joinpath(*parts), mmap_mode="r")
        return self.source.array("/".join(str(p) for p in parts), train=self.split == "train")

    def files(self, prefix: str = "") -> list[str]:
        """The data's files whose path relative to the data directory (``/``-separated) starts
        with ``prefix``, sorted: a folder of images indexed once, each then read through
        ``ctx.path(name)``. Local data is walked (only the folders ``prefix`` can match)."""
        if self.source is not None:
            return self.source.files(prefix)
        return _walk(self.data_dir, prefix)


def _walk(root: pathlib.Path, prefix: str) -> list[str]:
    """The files under ``root`` whose relative POSIX path starts with ``prefix``, sorted."""
    base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
    start = root.joinpath(*base.split("/")) if base else root
    out = []
    for folder, dirs, names in os.walk(start):
        rel_dir = pathlib.Path(folder).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirs[:] = sorted(d for d in dirs if (rel_dir + d + "/").startswith(prefix) or prefix.startswith(rel_dir + d + "/"))
        out.extend(rel_dir + n for n in names if (rel_dir + n).startswith(prefix))
    return sorted(out)


@dataclass(frozen=True)
class Task:
    """A model, its data, its loss and its optimizer. Only ``model`` and ``train`` are required.

    - ``model()``: a freshly initialised ``torch.nn.Module`` (dml seeds torch before calling it,
      so every peer starts from the same parameters).
    - ``train(ctx)`` / ``test(ctx)``: map-style datasets whose items are ``(input, target)``;
      ``len()`` must be the sample count. An :class:`ArrayDataset` (or a
      ``torch.utils.data.TensorDataset``) is batched by indexing its arrays at once, any other
      dataset item by item through ``collate``.
    - ``loss(output, target)``: a scalar tensor, the batch mean (default: cross entropy).
    - ``optimizer(params)``: any ``torch.optim.Optimizer`` over the given parameters (default:
      plain SGD at the job's ``--lr``). The job's ``--lr`` overrides every param group's lr.
    - ``metrics(output, target)``: one test batch's metrics as ``{name: value}``: a number is
      the batch's mean (dml averages it over batches by their size); a pair ``(numerator,
      denominator)`` is summed over all batches before dividing, so ratios such as recall or F1
      are exact for the whole test set. At most MAX_METRICS names of MAX_METRIC_NAME characters.
      ``accuracy`` is always reported (one score per class: the argmax); a metric of that name
      replaces it.
    - ``batch_size``: used when the job gives no ``--batch-size``.
    - ``labels(ctx)``: the training labels (one int per sample), for label-skewed sharding
      (``classes:K``, ``dirichlet:ALPHA``) and ``dml shards``; by default read from the dataset's
      targets when they are integers.
    - ``collate(items)``: batches a list of items (default ``torch.utils.data.default_collate``).
    """

    model: Callable[[], Any]
    train: Callable[[Context], Any]
    loss: Callable[[Any, Any], Any] | None = None
    optimizer: Callable[[Iterable[Any]], Any] | None = None
    test: Callable[[Context], Any] | None = None
    metrics: Callable[[Any, Any], Mapping[str, float]] | None = None
    batch_size: int | None = None
    labels: Callable[[Context], Sequence[int]] | None = None
    collate: Callable[[list[Any]], Any] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        for f in ("model", "train"):
            if not callable(getattr(self, f)):
                raise TypeError(f"dml.Task: {f} must be callable (got {type(getattr(self, f)).__name__})")
        for f in ("loss", "optimizer", "test", "metrics", "labels", "collate"):
            v = getattr(self, f)
            if v is not None and not callable(v):
                raise TypeError(f"dml.Task: {f} must be callable or None (got {type(v).__name__})")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise TypeError(f"dml.Task: batch_size must be a positive int, got {self.batch_size!r}")

    @property
    def default_batch_size(self) -> int:
        """The task's batch size, else dml's default."""
        return self.batch_size or DEFAULT_BATCH_SIZE


class ArrayDataset:
    """A dataset held as two arrays of equal length (numpy arrays, torch tensors or numpy
    memory maps): item ``i`` is ``(x[i], y[i])``. dml batches it by indexing both at once, so a
    memory-mapped array is read only at the rows a peer trains on."""

    def __init__(self, x: Any, y: Any) -> None:
        if len(x) != len(y):
            raise ValueError(f"ArrayDataset: {len(x)} inputs but {len(y)} targets")
        self.x, self.y = x, y

    @property
    def arrays(self) -> tuple[Any, Any]:
        """(inputs, targets)."""
        return self.x, self.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self.x[i], self.y[i]
