"""Shared test settings: one torch thread per process (several peers share 2 cores)."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: object) -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # the proto and compose tests need no torch
        pass
