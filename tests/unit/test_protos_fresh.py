"""The generated Python checked in under protos/ matches what scripts/gen_protos.py emits now."""
from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.py*") if p.suffix in (".py", ".pyi")}
    assert fresh, "protoc generated nothing"
    for rel, text in fresh.items():
        checked_in = ROOT / "protos" / rel
        assert checked_in.exists(), f"{rel} is not checked in: run python scripts/gen_protos.py"
        assert checked_in.read_text() == text, f"{rel} is stale: run python scripts/gen_protos.py"
    generated = [p for p in (ROOT / "protos").rglob("*_pb2*.py*") if p.suffix in (".py", ".pyi")]
    stale = {p.relative_to(ROOT / "protos") for p in generated} - set(fresh)
    assert not stale, f"generated files without a .proto: {stale}"


def test_every_proto_element_is_commented():
    """buf style: each service, rpc, message and enum carries a comment."""
    import re

    for proto in (ROOT / "protos").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^\s*(service|rpc|enum)\s", line) or (re.match(r"^\s*message\s", line) and not re.search(r"(Request|Response)\s*\{", line)):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} lacks a comment: {line.strip()}"
