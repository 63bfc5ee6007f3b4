"""The whole test suite, as ``./dev test`` runs it: the unit and integration tests on
``DML_TEST_WORKERS`` processes (default 2: CI's cores), then the e2e tests one at a time (their
real peer processes already load every core). Both parts always run; the exit status is the
first failure's.

The compose test's preparation (tests/e2e/compose_prep.py: Docker, the base image, the
wheelhouse, the dml image: minutes on a fresh machine, mostly waiting on downloads and disks)
starts here, before the unit tests, at the lowest CPU and I/O priority, so that it overlaps the
whole suite rather than the e2e part alone; the e2e session takes it over (``Adopted``) and this
process stops it, and the dockerd it started, at the end. ``DML_COMPOSE_TEST=0`` starts none.

Usage: python scripts/run_suite.py   (from ./dev, inside the project's virtualenv)
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]


def parts(workers: str) -> list[list[str]]:
    """The suite's pytest runs, in order."""
    return [[*PYTEST, "-n", workers, "tests/unit", "tests/integration"], [*PYTEST, "tests/e2e"]]


def main() -> int:
    workers = os.environ.get("DML_TEST_WORKERS", "2")
    env = dict(os.environ)
    prep = None
    if env.get("DML_COMPOSE_TEST", "1") != "0":
        sys.path.insert(0, str(ROOT))
        from tests.e2e.compose_prep import Background

        prep = Background()
        env.update(prep.env())
    rc = 0
    try:
        for argv in parts(workers):
            r = subprocess.call([sys.executable, *argv], cwd=ROOT, env=env)
            rc = rc or r
    except KeyboardInterrupt:
        rc = rc or 130
    finally:
        if prep is not None:
            note = prep.close()
            if note:
                print(f"compose: {note}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
