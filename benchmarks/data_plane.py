"""One peer reading its shard's batches four ways: plain numpy, shared-storage memory map, store
fetch (cold cache) and store cache hit (warm cache), each timed to its first batch and over the
shard's batches (samples/s).

    .venv/bin/python benchmarks/data_plane.py                 # ~200 MB, about a minute
    .venv/bin/python benchmarks/data_plane.py --rows 50000 --features 64 --json

The data (``x.npy`` float32 rows x features, ``y.npy`` int64) is generated deterministically in a
temp dir. The shard is a quarter of the rows (a contiguous range, as ``--sharding contiguous``
cuts them), read in a shuffled order in batches of ``--batch``, as a peer's round reads it:

- ``numpy``: ``np.load`` of both files into memory, then indexing: the plain one-process baseline;
- ``memmap``: ``ctx.array`` on a local folder (shared storage): ``np.load(mmap_mode="r")``;
- ``store fetch``: ``ctx.array`` on a dataset put into an in-process coordinator's store
  (``dml data put``'s client), read through the real GetChunk path into an empty cache;
- ``store hit``: the same on a new cache object over the cache folder the fetch left (as a
  restarted peer: every present chunk hashed again when the dataset is opened).

The OS page cache is warm for the local files (they were just written); the times are one run's,
printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dml.client.data import DataClient, scan  # noqa: E402
from dml.common.task import Context  # noqa: E402
from dml.coordinator.server import CoordinatorServer, ServerConfig  # noqa: E402
from dml.peer.datacache import ChunkCache, Counters, StoreSource, manifest_of  # noqa: E402
from dml.v1 import data_pb2  # noqa: E402


def generate(folder: pathlib.Path, rows: int, features: int) -> None:
    """x.npy (float32) and y.npy (int64 labels), the same bytes for the same sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(13)
    x = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.float32, shape=(rows, features))
    step = max(1, (64 << 20) // (4 * features))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        x[start:stop] = rng.standard_normal((stop - start, features), dtype=np.float32)
    x.flush()
    del x
    np.save(folder / "y.npy", rng.integers(0, 10, rows))


def batches_of(rows: int, batch: int) -> list[np.ndarray]:
    """The shard (the first quarter of the rows) in a shuffled order, cut into batches."""
    shard = np.random.default_rng(7).permutation(np.arange(rows // 4))
    return [shard[i : i + batch] for i in range(0, shard.size, batch)]


def run(name: str, open_arrays: Callable[[], tuple[Any, Any]], batches: list[np.ndarray]) -> dict[str, Any]:
    """Times opening plus the first batch, then the rest of the shard's batches."""
    t0 = time.perf_counter()
    x, y = open_arrays()
    bx, by = np.ascontiguousarray(x[batches[0]]), np.ascontiguousarray(y[batches[0]])
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    samples = 0
    checksum = float(bx.sum()) + float(by.sum())
    for b in batches[1:]:
        bx, by = np.ascontiguousarray(x[b]), np.ascontiguousarray(y[b])
        samples += len(b)
        checksum += float(bx[0, 0]) + float(by[0])
    rest = time.perf_counter() - t1
    return {"mode": name, "first_batch_s": first, "samples_per_s": samples / rest if rest > 0 else float("inf"),
            "samples": samples + len(batches[0]), "checksum": checksum}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.rows < 4 or args.features < 1 or args.batch < 1:
        ap.error("--rows must be at least 4, --features and --batch at least 1")
    with tempfile.TemporaryDirectory(prefix="dml-bench-data-") as tmp:
        root = pathlib.Path(tmp)
        data = root / "data"
        generate(data, args.rows, args.features)
        size = sum(p.stat().st_size for p in data.iterdir())
        batches = batches_of(args.rows, args.batch)
        results = [
            run("numpy", lambda: (np.load(data / "x.npy"), np.load(data / "y.npy")), batches),
            run("memmap", lambda: (Context(data_dir=data).array("x.npy"), Context(data_dir=data).array("y.npy")),
                batches),
        ]
        srv = CoordinatorServer(ServerConfig(host="127.0.0.1", port=0, state_dir=root / "state")).start()
        try:
            token = srv.secrets.operator_token
            with DataClient(srv.address, 60.0, token) as client:
                client.put("bench", scan([data]))
                manifest = manifest_of(client.manifest("bench"))

                def fetch(digest: str) -> bytes:
                    resp = client.call(client.stub.GetChunk, data_pb2.GetChunkRequest(digest=digest), size=4 << 20)
                    return bytes(resp.data)

                fetched: list[Counters] = []
                caches: list[ChunkCache] = []

                def store() -> tuple[Any, Any]:
                    if caches:
                        caches[-1].close()  # the peer stops (releasing its cache folder), then starts again
                    counters = Counters()
                    fetched.append(counters)
                    cache = ChunkCache(root / "cache")
                    caches.append(cache)
                    ctx = Context(data_dir=cache.dataset_dir(manifest.digest),
                                  source=StoreSource(cache.open(manifest, fetch, counters), counters))
                    return ctx.array("x.npy"), ctx.array("y.npy")

                results.append(run("store fetch", store, batches))
                results.append(run("store hit", store, batches))
                caches[-1].close()
        finally:
            srv.stop(0.5)
        for r, c in zip(results[2:], fetched):
            r["bytes_fetched"], r["chunks_fetched"], r["hits"] = c.bytes_fetched, c.chunks_fetched, c.hits
        base = results[0]["samples_per_s"]
        for r in results:
            r["vs_numpy"] = r["samples_per_s"] / base if base else 0.0
        if args.json:
            print(json.dumps({"rows": args.rows, "features": args.features, "batch": args.batch,
                              "dataset_bytes": size, "shard_rows": args.rows // 4, "results": results}, indent=2))
            return 0
        print(f"{args.rows} rows x {args.features} float32 features ({size / 1e6:.0f} MB), one peer's shard of "
              f"{args.rows // 4} rows in batches of {args.batch}")
        print(f"{'mode':<12} {'first batch':>12} {'samples/s':>12} {'vs numpy':>9} {'fetched':>12}")
        for r in results:
            got = f"{r['bytes_fetched'] / 1e6:.1f} MB" if "bytes_fetched" in r else "-"
            print(f"{r['mode']:<12} {r['first_batch_s'] * 1000:>10.1f}ms {r['samples_per_s']:>12,.0f} "
                  f"{r['vs_numpy']:>8.2f}x {got:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
