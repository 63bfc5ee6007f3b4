"""The coordinator's Kubernetes probe, for real: a coordinator started here from the manifest's
own flags, tokens and certificates (made as the README makes them), and the probe's `dml health`
command run against it with the pod's environment. Only the address changes: 127.0.0.1 and a
port the OS picks instead of 0.0.0.0:50051."""
from __future__ import annotations

import os

import pytest

from dml.client import cli as jobctl
from dml.coordinator import cli as coord_cli
from dml.coordinator.server import CoordinatorServer
from tests.unit import kubekit


def _pod_env(monkeypatch: pytest.MonkeyPatch, pod: kubekit.Pod, scratch) -> None:
    """This process's DML_* variables replaced by the pod's, paths mapped to the files behind them."""
    for var in [v for v in os.environ if v.startswith("DML_")]:
        monkeypatch.delenv(var)
    for var, value in pod.env().items():
        if var.startswith("DML_"):
            monkeypatch.setenv(var, str(pod.local(value, scratch)) if value.startswith("/") else value)


def _set(argv: list[str], flag: str, value: str) -> None:
    argv[argv.index(flag) + 1] = value


def test_the_probe_finds_the_coordinator_serving_over_mutual_tls(tmp_path, monkeypatch, capsys):
    tree = kubekit.copy_with_secrets(tmp_path / "kubernetes")
    pods = kubekit.pods(kubekit.render(tree))
    coord = pods["dml-coordinator"]
    _pod_env(monkeypatch, coord, tmp_path / "pod")
    argv = [str(coord.local(a, tmp_path / "pod")) if a.startswith("/") else a for a in coord.argv()[1:]]
    _set(argv, "--host", "127.0.0.1")
    _set(argv, "--port", "0")
    _set(argv, "--metrics-port", "off")
    srv = CoordinatorServer(coord_cli.build_config(argv)).start()
    try:
        probe = list(coord.container["readinessProbe"]["exec"]["command"])
        assert probe[:2] == ["dml", "health"]
        _set(probe, "--coordinator", f"127.0.0.1:{srv.port}")
        capsys.readouterr()
        assert jobctl.run(probe[1:]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        # A peer's certificate is as good a client's: peers dial the coordinator with it.
        _pod_env(monkeypatch, pods["dml-peer"], tmp_path / "peer")
        assert jobctl.run(probe[1:]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        # Plain text, all a Kubernetes grpc probe speaks, is refused: hence the exec probe.
        for var in ("DML_TLS_CERT", "DML_TLS_KEY", "DML_TLS_CA"):
            monkeypatch.delenv(var)
        _set(probe, "--timeout", "2")
        assert jobctl.run(probe[1:]) != 0
    finally:
        srv.stop(0.2)
