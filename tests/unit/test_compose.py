"""docker-compose.yml and the Dockerfile: the topology of `dml local` (a coordinator, peers, a
submitter) as one scalable `peer` service, each service running a command this package provides,
with a named state volume and a gRPC health check. A real `docker compose up --scale peer=4` needs a
Docker daemon and an image (scripts/docker_base.sh builds both offline), so here the structure is
what is checked."""
from __future__ import annotations

import pathlib
import re
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def test_services_and_commands_are_the_packages_own():
    services = _compose()["services"]
    assert set(services) == {"coordinator", "peer", "submit"}, "one peer service, scaled with --scale peer=N"
    scripts = _scripts()
    for name, svc in services.items():
        cmd = svc["command"]
        assert isinstance(cmd, list) and cmd[0] in scripts, f"{name} runs {cmd[0]!r}, not a dml entry point"
    assert services["coordinator"]["command"][0] == "dml-coordinator"
    assert services["peer"]["command"][0] == "dml-peer"
    assert services["submit"]["command"][:2] == ["dml", "submit"]


def test_commands_parse_with_the_real_parsers():
    from dml.coordinator import cli as coord_cli
    from dml.client import cli as jobctl
    from dml.peer import cli as peer_cli

    services = _compose()["services"]
    cfg = coord_cli.build_config(services["coordinator"]["command"][1:])
    assert cfg.state_dir is not None and cfg.host == "0.0.0.0"
    pc, _ = peer_cli.build_config(services["peer"]["command"][1:] + ["--device", "cpu"])
    assert pc.coordinator == "coordinator:50051"
    jobctl.build_parser().parse_args(services["submit"]["command"][1:])
    jobctl.build_parser().parse_args(services["coordinator"]["healthcheck"]["test"][2:])


def test_peer_replicas_each_advertise_their_own_address(monkeypatch):
    """Every replica runs the same command, so nothing in it may name one replica: it binds every
    interface and leaves the advertised host to auto (the container's own address)."""
    from dml.peer import advertise
    from dml.peer import cli as peer_cli

    peer = _compose()["services"]["peer"]
    cmd = peer["command"]
    assert "--advertise-host" not in cmd and "DML_ADVERTISE_HOST" not in peer.get("environment", {})
    monkeypatch.delenv("DML_ADVERTISE_HOST", raising=False)
    pc, _ = peer_cli.build_config(cmd[1:] + ["--device", "cpu"])
    assert pc.host == "0.0.0.0" and pc.advertise_host == advertise.AUTO
    monkeypatch.setattr(advertise, "route_address", lambda coordinator, family: "172.18.0.5")
    assert advertise.advertise_host(pc.host, pc.advertise_host, pc.coordinator) == "172.18.0.5"
    # What would stop `--scale`: a fixed container name, or a host port each replica would claim.
    assert "container_name" not in peer and "ports" not in peer and "hostname" not in peer


def test_default_scale_trains_the_default_job():
    """`docker compose up` alone starts as many peers as the submitted job waits for."""
    services = _compose()["services"]
    submit = services["submit"]["command"]
    assert services["peer"]["deploy"]["replicas"] >= int(submit[submit.index("--min-peers") + 1])


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


def test_dockerfile_takes_its_base_image_as_a_build_argument():
    text = (ROOT / "Dockerfile").read_text()
    first_from = text.index("\nFROM ")
    assert re.search(r"^ARG BASE_IMAGE=python:3\.12-slim$", text[:first_from], re.M), \
        "BASE_IMAGE is declared, with its default, before the first FROM"
    # Every stage starts from the base image or from a stage built before it from that image.
    froms = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)
    assert froms and froms[0][0] == "${BASE_IMAGE}" and froms[-1][0] == "${BASE_IMAGE}", froms
    stages: set[str] = set()
    for base, name in froms:
        assert base == "${BASE_IMAGE}" or base in stages, f"FROM {base}: neither the base image nor an earlier stage"
        stages.add(name)
    for name, svc in _compose()["services"].items():
        assert svc["build"]["args"]["BASE_IMAGE"].startswith("${DML_BASE_IMAGE:-"), name
        assert svc["image"] == "${DML_IMAGE:-dml:latest}", name


def test_the_image_installs_every_package_of_the_tree():
    """The Dockerfile copies the whole tree (so a new package folder cannot be left out) and the
    .dockerignore keeps every package folder, and the wheelhouse, in the build context."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY \. /src$", text, re.M)
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    tops = {d.split("/")[0] for d in package_dirs.values()} | {"pyproject.toml", "README.md", "wheels"}
    assert not tops & ignored, tops & ignored
    assert ".venv" in ignored, "a local virtualenv would make the build context gigabytes"


def test_peers_join_with_the_token_the_coordinator_makes_and_only_the_operator_holds_its_token():
    """The coordinator makes the join token in the `join-token` volume, which the peers mount
    read-only and read; the operator token stays in the coordinator's state volume, which only the
    submitter (the operator) mounts."""
    from dml.coordinator import cli as coord_cli
    from dml.client import cli as jobctl
    from dml.peer import cli as peer_cli

    c = _compose()
    services = c["services"]
    coord, peer, submit = services["coordinator"], services["peer"], services["submit"]
    cfg = coord_cli.build_config(coord["command"][1:])
    assert cfg.auth and cfg.join_token_file is not None
    _, pa = peer_cli.build_config(peer["command"][1:] + ["--device", "cpu"])
    assert pa.join_token_file == cfg.join_token_file

    def mounts(svc: dict) -> dict[str, tuple[str, str]]:
        out = {}
        for v in svc.get("volumes", []):
            name, path, *mode = v.split(":")
            out[path] = (name, mode[0] if mode else "rw")
        return out

    join_dir = str(cfg.join_token_file.parent)
    assert mounts(coord)[join_dir][0] == mounts(peer)[join_dir][0] in c["volumes"]
    assert mounts(peer)[join_dir][1] == "ro"
    assert str(cfg.state_dir) not in mounts(peer), "peers never see the operator token or the coordinator's key"
    sa = jobctl.build_parser().parse_args(submit["command"][1:])
    assert str(sa.token_file).startswith(str(cfg.state_dir)) and mounts(submit)[str(cfg.state_dir)][1] == "ro"


def _tls_env(svc: dict) -> dict[str, str]:
    return {k: v for k, v in svc.get("environment", {}).items() if k.startswith("DML_TLS_")}


def test_every_service_runs_with_mutual_tls_from_the_certs_the_coordinator_makes(tmp_path, monkeypatch):
    """The coordinator's entrypoint writes the CA and one certificate per role into the `certs`
    volume before its command; every service (its health check too) names its certificate, its
    key and the CA through DML_TLS_*, files that `dml certs` writes; with them the real parsers
    build mutual-TLS configs (so the servers on 0.0.0.0 are allowed to start)."""
    from dml.client import cli as jobctl
    from dml.common import certs
    from dml.coordinator import cli as coord_cli
    from dml.peer import cli as peer_cli

    c = _compose()
    services = c["services"]
    assert "certs" in c["volumes"]
    entry = services["coordinator"]["entrypoint"]
    script = entry[entry.index("-c") + 1]
    assert script.startswith("dml certs ") and "--if-missing" in script and 'exec "$$@"' in script
    state = services["coordinator"]["command"][services["coordinator"]["command"].index("--state-dir") + 1]
    assert f"mv /certs/{certs.CA_KEY} {state}/" in script, "the CA's key leaves the volume every service mounts"
    made = jobctl.build_parser().parse_args(script.split("&&")[0].split()[1:])
    assert str(made.out) == "/certs" and made.if_missing
    hosts = made.hosts.split(",")
    certs.make_certs(tmp_path, hosts)  # what the entrypoint writes, here in tmp_path
    for name, svc in services.items():
        env = _tls_env(svc)
        assert set(env) == {"DML_TLS_CERT", "DML_TLS_KEY", "DML_TLS_CA"}, f"{name} does not run with mutual TLS"
        mount = [v for v in svc["volumes"] if v.split(":")[0] == "certs"]
        assert mount and mount[0].split(":")[1] == "/certs", name
        assert env["DML_TLS_CA"] == f"/certs/{certs.CA_CERT}"
        role = pathlib.PurePath(env["DML_TLS_CERT"]).stem
        assert role in hosts and env["DML_TLS_KEY"] == f"/certs/{role}-key.pem", name
        for k, v in env.items():
            monkeypatch.setenv(k, str(tmp_path / pathlib.PurePath(v).name))
        if name == "coordinator":
            cfg = coord_cli.build_config(svc["command"][1:])
            assert cfg.tls is not None and cfg.tls.mutual and cfg.host == "0.0.0.0"
            health = jobctl.build_parser().parse_args(svc["healthcheck"]["test"][2:])
            assert jobctl.cliargs.tls_config(jobctl.build_parser(), health) is not None
        elif name == "peer":
            pc, _ = peer_cli.build_config(svc["command"][1:] + ["--device", "cpu"])
            assert pc.tls is not None and pc.tls.mutual and pc.host == "0.0.0.0"
        else:
            a = jobctl.build_parser().parse_args(svc["command"][1:])
            assert jobctl.cliargs.tls_config(jobctl.build_parser(), a) is not None
        for k in env:
            monkeypatch.delenv(k)
