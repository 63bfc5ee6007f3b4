"""Shared test settings: one torch thread per process (several peers share 2 cores)."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The e2e tests start coordinators and peers (client/cluster.py; other tests run subprocesses
# too) from this process, which also runs gRPC servers and clients (the integration tests, the e2e
# status polls). With gRPC's fork handlers on, a child forked while another thread is inside
# gRPC dies before its exec now and then (SIGSEGV or SIGABRT: 5 to 8 of 200 forks here), and a
# peer that never starts fails whichever test it belonged to. The children exec at once and use
# nothing of this process's gRPC, so the handlers have nothing to do. Set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def pytest_configure(config: object) -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # the proto and compose tests need no torch
        pass
