"""The package map's dependency rules (docs/architecture.md), read from every module's imports.

- ``dml.aggregation`` imports nothing of ours but ``dml.v1`` types;
- ``dml.common`` imports neither ``dml.coordinator``, ``dml.peer`` nor ``dml.client``;
- ``dml.coordinator`` and ``dml.peer`` never import each other;
- ``dml.client`` imports neither of them (``dml status`` loads no server code);
- nothing imports the old top-level names (``coordinator``, ``peer``, ``aggregation``).

Imports inside functions and under ``if TYPE_CHECKING:`` count too: a lazy import is still a
dependency.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Folder -> the dml subpackage it installs as (pyproject.toml's package-dir).
PACKAGES = {"aggregation": "aggregation", "common": "common", "coordinator": "coordinator", "peer": "peer",
            "client": "client"}
# Which of our subpackages each may import (besides itself). dml.v1 is open to all but aggregation
# may use it for types only, which an import cannot tell apart: it may import dml.v1.
ALLOWED = {
    "aggregation": {"v1"},
    "common": {"v1", "aggregation"},
    "coordinator": {"v1", "common", "aggregation"},
    "peer": {"v1", "common", "aggregation"},
    "client": {"v1", "common", "aggregation"},
}
OLD_NAMES = {"coordinator", "peer", "aggregation", "common", "client"}


def imported_modules(source: str) -> set[str]:
    """Every absolute module name a module's source imports (at any depth of the tree)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            # `from dml import coordinator` imports dml.coordinator.
            if node.module == "dml":
                out.update(f"dml.{a.name}" for a in node.names)
    return out


def violations(package: str, source: str) -> list[str]:
    """The imports in ``source`` (a module of ``package``) that break the rules."""
    bad = []
    for mod in sorted(imported_modules(source)):
        parts = mod.split(".")
        if parts[0] in OLD_NAMES:
            bad.append(f"{mod} (old top-level name; use dml.{mod})")
        elif parts[0] == "dml" and len(parts) > 1 and parts[1] != package and parts[1] not in ALLOWED[package]:
            bad.append(mod)
    return bad


def modules() -> list[tuple[str, pathlib.Path]]:
    return [(pkg, p) for folder, pkg in PACKAGES.items() for p in sorted((ROOT / folder).rglob("*.py"))]


@pytest.mark.parametrize("package,path", modules(), ids=lambda x: str(x.relative_to(ROOT)) if isinstance(x, pathlib.Path) else x)
def test_module_follows_the_dependency_rules(package: str, path: pathlib.Path) -> None:
    assert violations(package, path.read_text()) == [], f"{path.relative_to(ROOT)} imports across the rules"


def test_every_package_folder_is_checked() -> None:
    assert len(modules()) > 30
    for folder in PACKAGES:
        assert (ROOT / folder / "__init__.py").is_file()


@pytest.mark.parametrize("package,line", [
    ("aggregation", "from dml.peer import exchange"),
    ("aggregation", "import dml.common.spec"),
    ("common", "from dml.coordinator.planner import make_shards"),
    ("common", "def f():\n    from dml.client import api"),
    ("coordinator", "from dml.peer.tasks import get_task"),
    ("peer", "import dml.coordinator.planner"),
    ("client", "from dml.coordinator.servicer import spec_to_pb"),
    ("client", "from dml import peer"),
    ("client", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dml.coordinator.state import Job"),
    ("peer", "from coordinator.planner import shard_order"),
])
def test_a_forbidden_import_is_caught(package: str, line: str) -> None:
    assert violations(package, line), f"{package}: {line!r} should break the rules"


@pytest.mark.parametrize("package,line", [
    ("aggregation", "from dml.v1 import types_pb2"),
    ("peer", "from dml.aggregation.codecs import get_codec"),
    ("client", "from dml.common.spec import JobSpec"),
    ("coordinator", "from dml.coordinator import planner"),
    ("common", "import numpy as np"),
])
def test_an_allowed_import_passes(package: str, line: str) -> None:
    assert violations(package, line) == []
