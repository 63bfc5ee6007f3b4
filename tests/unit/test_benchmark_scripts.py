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


def test_allreduce_link_mbit_flag(capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("allreduce")
    assert mod.parse_args([]).link_mbit == 0  # loopback unless asked
    a = mod.parse_args(["--link-mbit", "1000", "--egress-only", "--link-probe-s", "0"])
    assert a.link_mbit == 1000 and a.egress_only and a.link_probe_s == 0
    for bad in (["--link-mbit", "-1"], ["--link-mbit", "nan"], ["--link-mbit", "fast"], ["--link-probe-s", "-1"]):
        with pytest.raises(SystemExit) as e:
            mod.parse_args(bad)
        assert e.value.code == 2, bad
    assert "--link-mbit must be 0 (loopback) or a positive rate" in capsys.readouterr().err


def test_allreduce_link_mbit_refused_without_root(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("allreduce")
    monkeypatch.setattr(mod.os, "geteuid", lambda: 1000)
    assert mod.main(["--link-mbit", "1000", "--world-sizes", "2", "--sizes-mb", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs root" in err and "Traceback" not in err
    monkeypatch.setattr(mod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(mod.netem.shutil, "which", lambda name: None if name == "tc" else "/usr/sbin/ip")
    assert mod.main(["--link-mbit", "1000", "--world-sizes", "2", "--sizes-mb", "1"]) == 2
    assert "tc not found" in capsys.readouterr().err


def test_netem_ring_floor() -> None:
    netem = _load("netem")
    size = 64 << 20
    # N=4: every rank sends 2(N-1)/N = 1.5 x the buffer; 1 Gbit/s = 1.25e8 bytes/s
    assert netem.ring_floor_s(4, size, 1000) == pytest.approx(1.5 * size / 1.25e8)
    assert netem.ring_floor_s(2, size, 10000) == pytest.approx(size / 1.25e9)
    # bf16 halves the wire bytes and the floor, int8 quarters them
    assert netem.ring_floor_s(4, size // 2, 1000) == pytest.approx(netem.ring_floor_s(4, size, 1000) / 2)
    assert netem.ring_floor_s(4, size // 4, 1000) == pytest.approx(netem.ring_floor_s(4, size, 1000) / 4)
    with pytest.raises(ValueError):
        netem.ring_floor_s(4, size, 0)


def test_netem_commands() -> None:
    netem = _load("netem")
    assert netem.tbf_burst_bytes(1000) == 125000 and netem.tbf_burst_bytes(10) == 64 * 1024
    tbf = ["tbf", "rate", "1000mbit", "burst", "125000", "latency", "50ms"]
    cmds = netem.setup_commands(4242, 2, 1000)
    assert cmds == [
        ["ip", "link", "add", "dmlb4242", "type", "bridge"],
        ["ip", "link", "set", "dmlb4242", "up"],
        ["ip", "netns", "add", "dmlb-4242-0"],
        ["ip", "link", "add", "dmlb4242r0", "type", "veth", "peer", "name", "eth0", "netns", "dmlb-4242-0"],
        ["ip", "link", "set", "dmlb4242r0", "master", "dmlb4242"],
        ["ip", "link", "set", "dmlb4242r0", "up"],
        ["ip", "-n", "dmlb-4242-0", "link", "set", "lo", "up"],
        ["ip", "-n", "dmlb-4242-0", "addr", "add", "10.213.0.1/24", "dev", "eth0"],
        ["ip", "-n", "dmlb-4242-0", "link", "set", "eth0", "up"],
        ["tc", "-n", "dmlb-4242-0", "qdisc", "add", "dev", "eth0", "root", *tbf],
        ["tc", "qdisc", "add", "dev", "dmlb4242r0", "root", *tbf],
        ["ip", "netns", "add", "dmlb-4242-1"],
        ["ip", "link", "add", "dmlb4242r1", "type", "veth", "peer", "name", "eth0", "netns", "dmlb-4242-1"],
        ["ip", "link", "set", "dmlb4242r1", "master", "dmlb4242"],
        ["ip", "link", "set", "dmlb4242r1", "up"],
        ["ip", "-n", "dmlb-4242-1", "link", "set", "lo", "up"],
        ["ip", "-n", "dmlb-4242-1", "addr", "add", "10.213.0.2/24", "dev", "eth0"],
        ["ip", "-n", "dmlb-4242-1", "link", "set", "eth0", "up"],
        ["tc", "-n", "dmlb-4242-1", "qdisc", "add", "dev", "eth0", "root", *tbf],
        ["tc", "qdisc", "add", "dev", "dmlb4242r1", "root", *tbf],
    ]
    # N ranks: one namespace, one veth into the bridge, one address and one shaper per direction each
    cmds = netem.setup_commands(4194304, 4, 10000)
    assert [c[3] for c in cmds if c[:3] == ["ip", "netns", "add"]] == [f"dmlb-4194304-{r}" for r in range(4)]
    assert [c[5] for c in cmds if c[3:5] == ["addr", "add"]] == [f"10.213.0.{r + 1}/24" for r in range(4)]
    shaped = [c for c in cmds if c[0] == "tc"]
    assert len(shaped) == 8
    assert all(c[-7:] == ["tbf", "rate", "10000mbit", "burst", "1250000", "latency", "50ms"] for c in shaped)
    assert all(len(c[3]) <= 15 for c in cmds if c[1:3] == ["link", "add"])  # interface names
    egress = netem.setup_commands(4242, 3, 100, egress_only=True)
    assert [c for c in egress if c[0] == "tc"] == [
        ["tc", "-n", f"dmlb-4242-{r}", "qdisc", "add", "dev", "eth0", "root",
         "tbf", "rate", "100mbit", "burst", "65536", "latency", "50ms"] for r in range(3)]
    for bad in (0, netem.MAX_RANKS + 1):
        with pytest.raises(ValueError):
            netem.setup_commands(4242, bad, 1000)
    assert netem.teardown_commands(4242, 2) == [
        ["ip", "netns", "del", "dmlb-4242-0"], ["ip", "netns", "del", "dmlb-4242-1"],
        ["ip", "link", "del", "dmlb4242r0"], ["ip", "link", "del", "dmlb4242r1"],
        ["ip", "link", "del", "dmlb4242"]]


def test_netem_leftovers_only_of_dead_runs() -> None:
    netem = _load("netem")
    netns = ["dmlb-11-0", "dmlb-11-1", "dmlb-22-0", "other-11-0", "dmlb-x-0"]
    links = ["lo", "eth0", "dmlb11", "dmlb11r0", "dmlb11r1", "dmlb22", "dmlb22r0", "dmlbx"]
    cmds = netem.leftover_commands(netns, links, alive=lambda pid: pid == 22)
    assert cmds == [["ip", "netns", "del", "dmlb-11-0"], ["ip", "netns", "del", "dmlb-11-1"],
                    ["ip", "link", "del", "dmlb11r0"], ["ip", "link", "del", "dmlb11r1"],
                    ["ip", "link", "del", "dmlb11"]]
