"""A CNN on an image folder: handwritten digits, one folder per class.

    dml local --task examples/cnn.py --rounds 30

The images live under the peer's data directory (``dml-peer --data-dir DIR``; by default its
working directory) as ``digits-images/<class>/<n>.pgm``, the layout most image datasets come in.
When the folder is missing, this file writes it from scikit-learn's bundled 8x8 digits (1,797
images), so the example runs from a fresh clone with nothing to download. Images are read one
at a time when a batch needs them, so a peer reads only the files of its own shards.

PGM (greyscale netpbm) is read here with numpy alone; for PNG or JPEG files use Pillow instead:
``np.asarray(PIL.Image.open(path).convert("L"))``.
"""
from __future__ import annotations

import functools
import os
import pathlib
import shutil
import tempfile

import numpy as np
import torch
from torch import nn

import dml

FOLDER = "digits-images"
TEST_EVERY = 5  # every 5th image of each class is held out for the test metrics


def write_pgm(path: pathlib.Path, image: np.ndarray) -> None:
    """Writes an 8-bit greyscale image as binary PGM."""
    h, w = image.shape
    path.write_bytes(b"P5\n%d %d\n255\n" % (w, h) + image.astype(np.uint8).tobytes())


def read_pgm(path: pathlib.Path) -> np.ndarray:
    """Reads a binary PGM as written by :func:`write_pgm` (uint8, height x width)."""
    raw = path.read_bytes()
    magic, w, h, maxval, pixels = raw.split(maxsplit=4)
    if magic != b"P5" or maxval != b"255":
        raise ValueError(f"{path}: not an 8-bit binary PGM")
    return np.frombuffer(pixels, dtype=np.uint8, count=int(w) * int(h)).reshape(int(h), int(w))


def write_folder(root: pathlib.Path) -> None:
    """Writes the digits as ``root/<class>/<n>.pgm``. Peers sharing a data directory may race
    here: each builds the folder under a temporary name and renames it into place; the first
    rename wins and the others throw theirs away."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        for n, (image, label) in enumerate(zip(digits.images, digits.target)):
            (tmp / str(label)).mkdir(exist_ok=True)
            write_pgm(tmp / str(label) / f"{n:04d}.pgm", image * 255 / 16)  # pixel values 0..16
        tmp.chmod(0o755)  # mkdtemp makes it private to this user
        try:
            os.replace(tmp, root)
        except OSError:
            if not root.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=4)
def files(data_dir: pathlib.Path) -> dict[str, list[tuple[pathlib.Path, int]]]:
    """(path, class) of every image, split into train and test. The listing is sorted, so every
    peer numbers the samples the same way: dml's shards are lists of these sample numbers."""
    root = data_dir / FOLDER
    if not root.is_dir():
        write_folder(root)
    out: dict[str, list[tuple[pathlib.Path, int]]] = {"train": [], "test": []}
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for i, path in enumerate(sorted(label_dir.glob("*.pgm"))):
            out["test" if i % TEST_EVERY == 0 else "train"].append((path, int(label_dir.name)))
    return out


class ImageFolder(torch.utils.data.Dataset):
    """A map-style dataset of (1x8x8 float tensor in [0, 1], class) read from image files.
    dml calls ``len()`` and ``[i]``, and batches the items with torch's default collate."""

    def __init__(self, items: list[tuple[pathlib.Path, int]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        image = torch.from_numpy(read_pgm(path).astype(np.float32) / 255.0)
        return image.unsqueeze(0), label  # channels first: 1 x H x W


def dataset(ctx: dml.Context) -> ImageFolder:
    """The images of ``ctx.split`` ("train" or "test") under ``ctx.data_dir``."""
    return ImageFolder(files(ctx.data_dir)[ctx.split])


def labels(ctx: dml.Context) -> list[int]:
    """Each training sample's class, from the folder names alone (no image is opened): what
    label-skewed sharding (``--sharding classes:2``, ``dirichlet:0.5``) and ``dml shards`` use."""
    return [label for _, label in files(ctx.data_dir)["train"]]


def model() -> nn.Module:
    """Two 3x3 convolutions, a 2x2 max pool, two linear layers: 1x8x8 -> 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


task = dml.Task(
    model=model,
    train=dataset,
    test=dataset,
    labels=labels,
    loss=nn.functional.cross_entropy,
    optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
    batch_size=32,
    name="cnn",
)
