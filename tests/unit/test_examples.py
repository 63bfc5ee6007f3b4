"""The task files in examples/: each builds its trainer from the file, writes its data when
it is missing, and trains (no cluster: the trainer alone, a few steps)."""
from __future__ import annotations

import importlib.util
import pathlib
import threading
import types

import numpy as np
import pytest
import torch

from dml.common.task import Context, Task
from dml.peer.trainer import Trainer

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> types.ModuleType:
    """Imports examples/NAME.py under a private module name (as a task file, not a package)."""
    spec = importlib.util.spec_from_file_location(f"dml_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def trainer(mod: types.ModuleType, data_dir: pathlib.Path, seed: int = 0) -> Trainer:
    assert isinstance(mod.task, Task)
    return Trainer(mod.task, seed, 0.0, ctx=Context(data_dir=data_dir, seed=seed))


def train_steps(tr: Trainer, steps: int, seed: int = 0) -> float:
    """``steps`` optimizer steps of the task's batch size over the whole training set; the loss."""
    batch = tr.task.default_batch_size
    order = np.random.default_rng(seed).permutation(tr.train_data.size)
    samples = np.resize(order, steps * batch)
    return tr.train_on(samples, batch).loss


def test_tabular_writes_its_csv_and_learns(tmp_path: pathlib.Path) -> None:
    mod = load("tabular")
    tr = trainer(mod, tmp_path)
    header = (tmp_path / mod.CSV_NAME).read_text().splitlines()[0].split(",")
    assert len(header) == 31 and header[-1] == "target"
    assert tr.train_data.size + tr.test_data.size == 569
    assert type(tr.optimizer) is torch.optim.Adam and not tr.fused_sgd
    before = tr.evaluate()
    train_steps(tr, 120)
    after = tr.evaluate()
    assert after.loss < before.loss
    assert after.accuracy > 0.9
    assert set(after.metrics) == {"recall", "f1"}
    # Standardised with the training rows' statistics: those are mean 0, spread 1.
    x_train = tr.train_data.arrays[0]
    assert np.allclose(x_train.mean(0), 0, atol=1e-5) and np.allclose(x_train.std(0), 1, atol=1e-4)


def test_tabular_metrics_are_the_whole_test_sets_not_a_mean_of_batches(tmp_path: pathlib.Path) -> None:
    """F1 and recall given as (numerator, denominator) pairs equal those of the whole test set,
    computed at once from the predictions: a mean of per-batch F1s would not."""
    mod = load("tabular")
    tr = trainer(mod, tmp_path)
    train_steps(tr, 10)  # not yet good: errors of every kind
    ev = tr.evaluate(batch_size=7)
    x, y = tr.test_data.get(np.arange(tr.test_data.size))
    with torch.no_grad():
        pred = tr.model(x).argmax(1)
    sick, flagged = y == mod.MALIGNANT, pred == mod.MALIGNANT
    tp, fp, fn = int((sick & flagged).sum()), int((~sick & flagged).sum()), int((sick & ~flagged).sum())
    assert ev.metrics["recall"] == pytest.approx(tp / (tp + fn))
    assert ev.metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert ev.accuracy == pytest.approx(float((pred == y).float().mean()))


def test_cnn_writes_an_image_folder_and_learns(tmp_path: pathlib.Path) -> None:
    mod = load("cnn")
    tr = trainer(mod, tmp_path)
    root = tmp_path / mod.FOLDER
    assert sorted(p.name for p in root.iterdir()) == [str(c) for c in range(10)]
    assert len(list(root.glob("*/*.pgm"))) == 1797
    assert tr.train_data.arrays is None  # read item by item from the files
    assert tr.train_data.size + tr.test_data.size == 1797
    x, y = tr.train_data.get(np.arange(5))
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    labels = mod.task.labels(Context(data_dir=tmp_path))
    assert len(labels) == tr.train_data.size and sorted(set(labels)) == list(range(10))
    assert [int(tr.train_data.get(np.array([i]))[1]) for i in range(0, len(labels), 97)] == labels[::97]
    train_steps(tr, 150)
    assert tr.evaluate().accuracy > 0.85


def test_pgm_round_trip(tmp_path: pathlib.Path) -> None:
    mod = load("cnn")
    img = np.arange(48, dtype=np.uint8).reshape(6, 8)
    mod.write_pgm(tmp_path / "a.pgm", img)
    assert np.array_equal(mod.read_pgm(tmp_path / "a.pgm"), img)
    (tmp_path / "b.pgm").write_bytes(b"P6\n1 1\n255\nabc")
    with pytest.raises(ValueError, match="not an 8-bit binary PGM"):
        mod.read_pgm(tmp_path / "b.pgm")


def test_memmap_keeps_its_data_on_disk_and_learns(tmp_path: pathlib.Path) -> None:
    mod = load("memmap")
    tr = trainer(mod, tmp_path)
    assert sorted(p.name for p in (tmp_path / mod.FOLDER).iterdir()) == [
        "test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    x, y = tr.train_data.arrays
    assert isinstance(x, np.memmap) and isinstance(y, np.memmap)  # not read into memory
    assert tr.train_data.size == mod.TRAIN and tr.test_data.size == mod.TEST
    assert type(tr.optimizer) is torch.optim.SGD and tr.optimizer.param_groups[0]["momentum"] == 0.9
    assert not tr.fused_sgd  # momentum: the optimizer's own steps, never the fused plain-SGD path
    before = tr.evaluate().accuracy
    train_steps(tr, 300)
    after = tr.evaluate().accuracy
    assert after > before + 0.2 and after > 0.6


def test_memmap_data_is_the_same_wherever_it_is_generated(tmp_path: pathlib.Path) -> None:
    """Peers that generate the files each on their own disk must hold the same samples."""
    mod = load("memmap")
    mod.generate(tmp_path / "a")
    mod.generate(tmp_path / "b")
    for name in ("train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("name", ["tabular", "cnn", "memmap"])
def test_peers_racing_to_write_the_data_all_see_it_whole(tmp_path: pathlib.Path, name: str) -> None:
    """Several peers on one data directory build their datasets at once: each writes under a
    temporary name and renames, so every one reads complete data and no temporary is left."""
    mod = load(name)
    errors: list[BaseException] = []
    sizes: list[int] = []

    def build() -> None:
        try:
            sizes.append(len(mod.task.train(Context(data_dir=tmp_path, split="train"))))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    if name in ("tabular", "cnn"):
        mod.splits.cache_clear() if name == "tabular" else mod.files.cache_clear()
    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(set(sizes)) == 1 and len(sizes) == 3
    assert not [p for p in tmp_path.rglob(".*")], "a temporary file or folder was left behind"


def test_digits_csv_writes_a_label_skewed_split_and_learns_from_a_folder_or_a_file(tmp_path: pathlib.Path) -> None:
    from dml.common.tasks import builtin_data

    mod = load("digits_csv")
    folders = mod.write_split(tmp_path, 4)
    d = builtin_data("digits")
    ys = [np.loadtxt(f / "train.csv", delimiter=",", skiprows=1)[:, -1].astype(int) for f in folders]
    assert sum(y.size for y in ys) == d.y_train.size, "every training row is with exactly one peer"
    assert np.array_equal(np.sort(np.concatenate(ys)), np.sort(d.y_train))
    for i, y in enumerate(ys):
        home = np.isin(y, [c for c in range(10) if c % 4 == i])
        assert home.mean() > 0.5 and set(y.tolist()) == set(range(10)), "skewed to its home classes, none missing"
    assert (folders[0] / "test.csv").read_text() == (tmp_path / "all" / "test.csv").read_text()
    tr = trainer(mod, folders[1], seed=7)
    assert np.array_equal(tr.params(), trainer(mod, folders[2], seed=7).params()), "seeded like a peer"
    assert tr.train_data.size == ys[1].size and tr.test_data.size == d.y_test.size
    first = train_steps(tr, 5)
    assert train_steps(tr, 60) < first
    assert trainer(mod, folders[1] / "train.csv").train_data.size == ys[1].size  # PATH a file: test.csv beside it


def test_each_example_is_seeded_like_a_peer(tmp_path: pathlib.Path) -> None:
    """Two peers of one job (same seed) start from the same parameters."""
    for name in ("tabular", "cnn", "memmap"):
        mod = load(name)
        a, b = trainer(mod, tmp_path, seed=7), trainer(mod, tmp_path, seed=7)
        assert np.array_equal(a.params(), b.params())


@pytest.mark.parametrize("name", ["tabular", "cnn", "memmap", "digits_csv"])
def test_each_example_loads_the_way_a_peer_loads_a_task_file(tmp_path: pathlib.Path, name: str) -> None:
    """Packed as `dml submit --task examples/NAME.py` packs it, then imported from the bundle by
    a peer's code cache: the file needs nothing beside itself."""
    from dml.common import taskcode
    from dml.peer.taskload import CodeCache

    bundle = taskcode.pack_path(str(EXAMPLES / f"{name}.py"))
    cache = CodeCache(tmp_path / "cache")
    task = cache.task(bundle.ref, bundle.digest, lambda: bundle.data)
    assert isinstance(task, Task) and task.name == name
    assert isinstance(task.model(), torch.nn.Module)
