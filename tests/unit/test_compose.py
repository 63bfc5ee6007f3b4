"""docker-compose.yml: the topology of `dml local` (a coordinator, three peers, a submitter), each
service running a command this package provides, with a named state volume and a gRPC health check.
Docker cannot run here, so the structure is what is checked."""
from __future__ import annotations

import pathlib
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def test_services_and_commands_are_the_packages_own():
    services = _compose()["services"]
    assert {"coordinator", "submit"} <= set(services)
    peers = [n for n in services if n.startswith("peer")]
    assert len(peers) == 3
    scripts = _scripts()
    for name, svc in services.items():
        cmd = svc["command"]
        assert isinstance(cmd, list) and cmd[0] in scripts, f"{name} runs {cmd[0]!r}, not a dml entry point"
    assert services["coordinator"]["command"][0] == "dml-coordinator"
    assert all(services[p]["command"][0] == "dml-peer" for p in peers)
    assert services["submit"]["command"][:2] == ["dml", "submit"]


def test_commands_parse_with_the_real_parsers():
    from dml.coordinator import cli as coord_cli
    from dml.client import cli as jobctl
    from dml.peer import cli as peer_cli

    services = _compose()["services"]
    cfg = coord_cli.build_config(services["coordinator"]["command"][1:])
    assert cfg.state_dir is not None and cfg.host == "0.0.0.0"
    for name in services:
        if name.startswith("peer"):
            pc, _ = peer_cli.build_config(services[name]["command"][1:] + ["--device", "cpu"])
            assert pc.coordinator == "coordinator:50051" and pc.advertise_host == name
    jobctl.build_parser().parse_args(services["submit"]["command"][1:])
    jobctl.build_parser().parse_args(services["coordinator"]["healthcheck"]["test"][2:])


def test_state_volume_health_check_and_ordering():
    c = _compose()
    coord = c["services"]["coordinator"]
    vol = coord["volumes"][0].split(":")
    assert vol[0] in c["volumes"], "the coordinator's state lives on a named volume"
    assert vol[1] == coord["command"][coord["command"].index("--state-dir") + 1]
    assert coord["healthcheck"]["test"][:3] == ["CMD", "dml", "health"]
    for name, svc in c["services"].items():
        if name != "coordinator":
            assert svc["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert (ROOT / "Dockerfile").exists()
