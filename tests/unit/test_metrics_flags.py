"""``--metrics-port`` and ``--metrics-host`` on the coordinator, the peer and ``dml local``:
off by default, 0 for a free port, the environment's default, bad ports refused in one line,
and the TLS flags (when a command has them) reaching the endpoint."""
from __future__ import annotations

import argparse

import pytest

from dml.client import cli as jobcli
from dml.client import local
from dml.common import args as cliargs
from dml.common.metrics import MetricsConfig
from dml.coordinator import cli as coord_cli
from dml.peer import cli as peer_cli

PEER = ["--coordinator", "127.0.0.1:1", "--device", "cpu"]


def test_off_by_default() -> None:
    assert coord_cli.build_config([]).metrics is None
    assert peer_cli.build_config(PEER)[0].metrics is None


def test_a_port_and_a_host() -> None:
    assert coord_cli.build_config(["--metrics-port", "0"]).metrics == MetricsConfig("127.0.0.1", 0)
    cfg, _ = peer_cli.build_config([*PEER, "--metrics-port", "9101", "--metrics-host", "0.0.0.0"])
    assert cfg.metrics == MetricsConfig("0.0.0.0", 9101)
    assert coord_cli.build_config(["--metrics-port", "off"]).metrics is None


def test_the_environment_gives_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DML_METRICS_PORT", "9102")
    monkeypatch.setenv("DML_METRICS_HOST", "0.0.0.0")
    assert coord_cli.build_config([]).metrics == MetricsConfig("0.0.0.0", 9102)
    assert coord_cli.build_config(["--metrics-port", "off"]).metrics is None  # a flag overrides it
    monkeypatch.setenv("DML_METRICS_PORT", "70000")
    with pytest.raises(SystemExit) as e:
        coord_cli.build_config([])
    assert e.value.code == 2


@pytest.mark.parametrize("value", ["70000", "-1", "http", "9100.5"])
def test_a_bad_port_is_one_line_and_exit_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        coord_cli.build_config(["--metrics-port", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--metrics-port" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_tls_flags_serve_https_with_the_same_certificate() -> None:
    p = argparse.ArgumentParser()
    cliargs.add_metrics_flag(p)
    for flag in ("--tls-cert", "--tls-key", "--tls-ca"):  # as the TLS helper adds them
        p.add_argument(flag, default=None)
    a = p.parse_args(["--metrics-port", "0", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"])
    cfg = cliargs.metrics_config(a)
    assert cfg == MetricsConfig("127.0.0.1", 0, "c.pem", "k.pem", "ca.pem") and cfg.tls
    assert not cliargs.metrics_config(p.parse_args(["--metrics-port", "0"])).tls  # type: ignore[union-attr]


def _local(*argv: str) -> argparse.Namespace:
    return jobcli.build_parser().parse_args(["local", *argv])


def test_dml_local_gives_the_coordinator_its_port_and_each_peer_a_free_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DML_METRICS_PORT", raising=False)
    assert local.metrics_args(_local("--metrics-port", "9103")) == (
        ("--metrics-port", "9103", "--metrics-host", "127.0.0.1"), ("--metrics-port", "0", "--metrics-host", "127.0.0.1"))
    # Off: said explicitly, so a DML_METRICS_PORT the children inherit cannot make them collide.
    assert local.metrics_args(_local()) == (("--metrics-port", "off"), ("--metrics-port", "off"))
