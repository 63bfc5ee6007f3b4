"""The benchmark scripts are run by hand, not by CI: at least they must compile and refuse bad
flags with exit code 2 (a syntax error once slipped into one)."""
from __future__ import annotations

import importlib.util
import pathlib
import py_compile
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_benchmark_compiles(script: str, tmp_path: pathlib.Path) -> None:
    py_compile.compile(str(BENCH / script), cfile=str(tmp_path / "x.pyc"), doraise=True)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_allreduce_flags() -> None:
    mod = _load("allreduce")
    a = mod.parse_args([])
    assert a.world_sizes == [2, 3, 4] and a.sizes_mb == [1.0, 64.0, 256.0] and a.codecs == ["fp32"]
    a = mod.parse_args(["--codecs", "fp32,bf16,int8", "--data-planes", "tcp,grpc", "--verify", "first"])
    assert a.codecs == ["fp32", "bf16", "int8"] and a.data_planes == ["tcp", "grpc"]
    for bad in (["--codecs", "fp64"], ["--data-planes", "udp"], ["--world-sizes", "1"], ["--repeats", "0"],
                ["--chunk-elems", str(2 << 20)]):
        with pytest.raises(SystemExit) as e:
            mod.parse_args(bad)
        assert e.value.code == 2, bad
