"""What a ring round's gRPC set-up to its successor costs: a new channel per round, against the
channel kept for the membership epoch (``peer/kept.py``).

    python benchmarks/channel_setup.py [--rounds 200] [--repeats 2] [--tls] [--json]

One process holds both ends: a peer-style exchange server (``common.rpc.server``) serving the
successor watch (``peer/watch.py``), and a client doing what a link does each round, ``--rounds``
times per mode, the modes alternating ``--repeats`` times:

- ``new``: a new channel (``common.rpc.channel``, with TLS a full mutual handshake), the watch
  call on it, waited for until the server's handler has it (connected, handshake done),
  then the watch cancelled and the channel closed, as a link did before channels were kept
  (gRPC may hand a new channel the connection of one just closed whose teardown has not
  finished: the distinct client ports the calls came from are printed, ``connections``);
- ``kept``: the watch call alone on one channel opened before the timing, cancelled the same way.

Prints per mode the wall time and the CPU time (``time.process_time``: both ends together, gRPC's
threads included) per round. Loopback only; the server listens on 127.0.0.1 (``localhost`` with
``--tls``, certificates made in a temporary directory with ``common.certs``) on a port it picks.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import threading
import time

import grpc

from dml.common import certs, rpc, tls
from dml.peer import watch

WAIT_S = 10.0  # every call and connect below is bounded by this


def _round(ch: grpc.Channel, entered: threading.Semaphore, left: threading.Semaphore) -> None:
    call = ch.unary_stream(watch.WATCH_METHOD, request_serializer=None, response_deserializer=None)(
        b"", timeout=WAIT_S)
    # The server's handler has the call (connected, handshake done; it sends nothing back).
    if not entered.acquire(timeout=WAIT_S):
        call.cancel()
        raise RuntimeError(f"the watch call did not reach the server in {WAIT_S:.0f}s")
    call.cancel()
    # ... and has let it go: no round leaves a call behind (the server bounds open ones).
    if not left.acquire(timeout=WAIT_S):
        raise RuntimeError(f"the server's watch handler did not end in {WAIT_S:.0f}s after the cancel")


def run(cfg: tls.TlsConfig | None, host: str, rounds: int, repeats: int) -> dict[str, list[tuple[float, float, int]]]:
    entered, left = threading.Semaphore(0), threading.Semaphore(0)
    clients: set[str] = set()  # the client ends (address:port) the calls came from

    def serve(request: bytes, context: grpc.ServicerContext):  # the peer's handler, counted in
        clients.add(context.peer())
        entered.release()
        try:
            return watch._serve(request, context)  # noqa: SLF001 - the very handler a peer serves
        finally:
            left.release()

    srv = rpc.server(workers=8)
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(watch.WATCH_SERVICE, {
        "Watch": grpc.unary_stream_rpc_method_handler(serve, request_deserializer=None, response_serializer=None)}),))
    port = rpc.bind(srv, host, 0, tls=cfg)
    srv.start()
    address = f"{host}:{port}"
    out: dict[str, list[tuple[float, float, int]]] = {"new": [], "kept": []}
    try:
        for _ in range(repeats):
            for mode in ("new", "kept"):
                # Only "kept" holds a channel across rounds: an open one would let gRPC share
                # its connection with each "new" channel (one subchannel pool per process).
                kept = rpc.channel(address, tls=cfg) if mode == "kept" else None
                clients.clear()
                try:
                    if kept is not None:
                        _round(kept, entered, left)  # connected before the timing
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(rounds):
                        if kept is None:
                            ch = rpc.channel(address, tls=cfg)
                            try:
                                _round(ch, entered, left)
                            finally:
                                ch.close()
                        else:
                            _round(kept, entered, left)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                finally:
                    if kept is not None:
                        kept.close()
                out[mode].append((wall / rounds, cpu / rounds, len(clients)))
    finally:
        srv.stop(0).wait(WAIT_S)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200, help="rounds per mode and repeat (default 200)")
    ap.add_argument("--repeats", type=int, default=2, help="times each mode runs, alternating (default 2)")
    ap.add_argument("--tls", action="store_true", help="also measure over mutual TLS")
    ap.add_argument("--json", action="store_true", help="one JSON object per transport and mode on stdout")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        ap.error("--rounds and --repeats must be at least 1")
    transports: list[tuple[str, tls.TlsConfig | None, str]] = [("plain", None, "127.0.0.1")]
    with tempfile.TemporaryDirectory() as d:
        if args.tls:
            host = certs.make_certs(pathlib.Path(d), ["localhost"])[0]
            transports.append(("tls", tls.load(host.cert, host.key, host.ca), "localhost"))
        if not args.json:
            print(f"# per round, {args.rounds} rounds x {args.repeats} repeats per mode; CPU = both ends, one process")
            print(f"{'transport':>9} {'mode':>5} | {'wall ms (median)':>16} | {'CPU ms (median)':>15} | each repeat: CPU ms")
        for name, cfg, host_name in transports:
            got = run(cfg, host_name, args.rounds, args.repeats)
            for mode, rows in got.items():
                wall = statistics.median(r[0] for r in rows) * 1e3
                cpu = statistics.median(r[1] for r in rows) * 1e3
                conns = [r[2] for r in rows]
                if args.json:
                    print(json.dumps({"transport": name, "mode": mode, "rounds": args.rounds, "repeats": args.repeats,
                                      "wall_ms": wall, "cpu_ms": cpu, "cpu_ms_each": [r[1] * 1e3 for r in rows],
                                      "connections": conns}))
                else:
                    each = " ".join(f"{r[1] * 1e3:.2f}" for r in rows)
                    print(f"{name:>9} {mode:>5} | {wall:16.2f} | {cpu:15.2f} | {each}  (connections {conns})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
