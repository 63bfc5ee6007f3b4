"""deploy/kubernetes: every manifest and both trees users apply (`kubectl apply -k
deploy/kubernetes`, and `.../gpu`) valid against the Kubernetes schemas (kubernetes-validate
ships them: offline), and what dml needs of them: one coordinator on a claim at its state dir,
every mounted Secret generated from the files the README makes, every flag one the real parsers
accept, the ports agreeing, TLS that the coordinator and peers load, writable paths on volumes.

The trees are rendered by :mod:`tests.unit.kubekit`; where kubectl is installed, one test checks
that ``kubectl kustomize`` renders the same."""
from __future__ import annotations

import argparse
import base64
import copy
import os
import pathlib
import re
import shutil
import subprocess

import kubernetes_validate
import pytest

from tests.unit import kubekit
from tests.unit.kubekit import KUBE, Pod

OLDEST_K8S = "1.25"  # the oldest schemas kubernetes-validate ships; the README promises nothing older
SOURCES = {"dml-coordinator": "coordinator/cli.py", "dml-peer": "peer/cli.py", "dml": "client/cli.py"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A copy of deploy/kubernetes with its Secrets' files made as the README says."""
    return kubekit.copy_with_secrets(tmp_path_factory.mktemp("kube") / "kubernetes")


@pytest.fixture(scope="module")
def rendered(tree: pathlib.Path) -> dict[str, kubekit.Rendered]:
    """Both variants, rendered."""
    return {v: kubekit.render(tree / v) for v in kubekit.VARIANTS}


def _validate(resource: dict, where: str) -> None:
    """Checks ``resource`` against the oldest and the newest schemas, strictly (an unknown
    field is an error: a misspelt probe would otherwise be dropped by the API server)."""
    for version in (OLDEST_K8S, kubernetes_validate.latest_version()):
        problem = ""
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as e:  # failed outside: the schema dump is long
            problem = f"{'.'.join(str(p) for p in e.path)}: {e.message}"
        if problem:
            pytest.fail(f"{where}: {resource['kind']}/{resource['metadata']['name']} is not valid for "
                        f"Kubernetes {version}: {problem}")


def _manifest_files() -> list[pathlib.Path]:
    return sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    """``argv`` through the real parser of ``command`` (dml-coordinator, dml-peer, dml)."""
    from dml.client import cli as jobctl
    from dml.coordinator import cli as coord_cli
    from dml.peer import cli as peer_cli

    parser = {"dml-coordinator": coord_cli, "dml-peer": peer_cli, "dml": jobctl}[command].build_parser()
    try:
        return parser.parse_args(argv)
    except SystemExit as e:  # the parser printed why (captured by pytest)
        pytest.fail(f"{command} refuses {argv} (exit {e.code})")


def _clear_dml_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DML_* variable of this machine's: the parsers' defaults come from the pod's alone."""
    for var in [v for v in os.environ if v.startswith("DML_")]:
        monkeypatch.delenv(var)


def _flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} given {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def _service_port(service: dict, name: str) -> dict:
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == name]
    return port


def _container_port(pod: Pod, name: str) -> int:
    (port,) = [p["containerPort"] for p in pod.container["ports"] if p["name"] == name]
    return port


def _quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", q)
    assert m, f"unexpected quantity {q!r}"
    return int(m.group(1)) << {None: 0, "Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40}[m.group(2)]


# -- schemas ----------------------------------------------------------------------------------
def test_every_manifest_file_is_valid_kubernetes():
    files = _manifest_files()
    assert {p.name for p in files} >= {"namespace.yaml", "coordinator.yaml", "peer.yaml"}
    for path in files:
        docs = kubekit.load_documents(path)
        assert docs, f"{path} holds no resource"
        for doc in docs:
            _validate(doc, str(path.relative_to(KUBE)))


@pytest.mark.parametrize("variant", kubekit.VARIANTS)
def test_the_rendered_trees_are_valid_kubernetes(rendered, variant):
    out = rendered[variant]
    kinds = sorted(r["kind"] for r in out.resources)
    assert kinds == ["Deployment", "Namespace", "Secret", "Secret", "Secret", "Secret", "Service", "StatefulSet"]
    for r in out.resources:
        _validate(r, f"deploy/kubernetes/{variant}")
        assert r["kind"] == "Namespace" or r["metadata"]["namespace"] == "dml"


def test_no_secret_is_shipped():
    """Secrets exist only as generated from files the user makes, which git ignores."""
    for path in _manifest_files():
        assert all(d["kind"] != "Secret" for d in kubekit.load_documents(path)), f"{path} ships a Secret"
    secrets = KUBE / kubekit.SECRETS_DIR
    tracked = subprocess.run(["git", "ls-files", str(secrets)], cwd=KUBE, capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    assert [pathlib.Path(t).name for t in tracked] == [".gitignore"], tracked
    probe = secrets / "join.token"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=KUBE, timeout=30)
    assert ignored.returncode == 0, "git would commit a token made in base/secrets/"
    dockerignore = (kubekit.ROOT / ".dockerignore").read_text().splitlines()
    assert f"deploy/kubernetes/{kubekit.SECRETS_DIR}" in dockerignore, "`docker build` would copy the keys into /src"


# -- what dml needs of them -------------------------------------------------------------------
@pytest.mark.parametrize("variant", kubekit.VARIANTS)
def test_one_coordinator_with_a_claim_at_its_state_dir(rendered, variant):
    out = rendered[variant]
    sts = out.one("StatefulSet", "dml-coordinator")
    assert sts["spec"]["replicas"] == 1, "one coordinator per state dir: a second one is refused"
    runs = [w["kind"] for w in out.workloads()
            if any(c["name"] == "dml-coordinator" for c in w["spec"]["template"]["spec"]["containers"])]
    assert runs == ["StatefulSet"], f"the coordinator runs in {runs}"
    pod = Pod(sts, out.secret_files)
    state_dir = _flag(pod.argv(), "--state-dir")
    mount, rel = pod.mount_of(state_dir)
    assert rel == "", f"--state-dir {state_dir} is below the mount {mount['mountPath']}, not at it"
    claim = pod.volume(mount["name"])
    assert "pvc" in claim, f"--state-dir is on {claim}, not a PersistentVolumeClaim"
    assert claim["pvc"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    size = _quantity_bytes(claim["pvc"]["spec"]["resources"]["requests"]["storage"])
    store_cap = int(_flag(pod.argv(), "--max-data-bytes"))
    assert store_cap < size * 0.9, "the dataset store's cap leaves the database and checkpoints no room"


@pytest.mark.parametrize("variant", kubekit.VARIANTS)
def test_every_mounted_secret_is_generated_and_every_file_path_resolves(rendered, variant, tmp_path):
    out = rendered[variant]
    generated = {r["metadata"]["name"] for r in out.resources if r["kind"] == "Secret"}
    assert generated == set(out.secret_files)
    for name, pod in kubekit.pods(out).items():
        for v in pod.spec.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] in generated, f"{name} mounts {v['secret']['secretName']}"
                assert v["secret"]["defaultMode"] & 0o040, "the fsGroup must read the Secret's files (uid 10001)"
        paths = [a for a in pod.argv()[1:] if a.startswith("/")]
        paths += [v for k, v in pod.env().items() if k.startswith("DML_") and v.startswith("/")]
        for path in paths:
            local = pod.local(path, tmp_path / name)
            found = pod.mount_of(path)
            assert found is not None
            if "secret" in pod.volume(found[0]["name"]):
                assert local.is_file(), f"{name}: {path} is made from {local}, which the README does not make"
    # No pod sees the CA's key; each sees only its own certificate's key.
    for files in out.secret_files.values():
        assert "ca-key.pem" not in files
    keys = {name: pod.local(pod.env()["DML_TLS_KEY"], tmp_path).name for name, pod in kubekit.pods(out).items()}
    assert keys == {"dml-coordinator": "coordinator-key.pem", "dml-peer": "peer-key.pem"}


@pytest.mark.parametrize("variant", kubekit.VARIANTS)
def test_every_flag_and_variable_is_one_the_real_commands_take(rendered, variant, monkeypatch):
    scripts = {"dml", "dml-coordinator", "dml-peer"}
    for name, pod in kubekit.pods(rendered[variant]).items():
        _clear_dml_env(monkeypatch)
        argv = pod.argv()
        assert argv[0] == name and name in scripts
        src = (kubekit.ROOT / SOURCES[name]).read_text() + (kubekit.ROOT / "common/args.py").read_text()
        for var, value in pod.env().items():
            if var.startswith("DML_"):
                assert f'"{var}"' in src, f"{name} reads no {var}"
                monkeypatch.setenv(var, value)
        _parse(name, argv[1:])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = pod.container[probe].get("exec", {}).get("command")
            if cmd:
                assert cmd[0] in scripts, f"{name}'s {probe} runs {cmd[0]}, not a dml command"
                _parse(cmd[0], cmd[1:])


@pytest.mark.parametrize("variant", kubekit.VARIANTS)
def test_the_configs_the_commands_build_from_the_manifests(rendered, variant, monkeypatch, tmp_path):
    """build_config as in the pod: the real token files and certificates at the mounted paths,
    TLS on (dml serves plain text on loopback only, and both bind 0.0.0.0)."""
    from dml.common import auth, tls
    from dml.coordinator import cli as coord_cli
    from dml.peer import cli as peer_cli

    pods = kubekit.pods(rendered[variant])

    def local_argv(pod: Pod) -> list[str]:
        for var, value in pod.env().items():
            if var.startswith("DML_"):
                monkeypatch.setenv(var, str(pod.local(value, tmp_path)) if value.startswith("/") else value)
        return [str(pod.local(a, tmp_path)) if a.startswith("/") else a for a in pod.argv()[1:]]

    _clear_dml_env(monkeypatch)
    coord = pods["dml-coordinator"]
    cfg = coord_cli.build_config(local_argv(coord))
    assert cfg.host == "0.0.0.0" and cfg.auth and cfg.tls is not None and cfg.tls.mutual
    tls.check_listen(cfg.host, cfg.tls)
    assert auth.read_token_file(cfg.operator_token_file)
    coordinator_join = cfg.join_token_file.read_text()

    _clear_dml_env(monkeypatch)
    peer = pods["dml-peer"]
    argv = local_argv(peer)
    if variant == "gpu":
        assert _flag(argv, "--device") == "cuda"
        import torch

        if not torch.cuda.is_available():  # a CUDA peer without a GPU says so and exits 2
            with pytest.raises(SystemExit) as e:
                peer_cli.build_config(argv)
            assert e.value.code == 2
            argv[argv.index("--device") + 1] = "cpu"  # the rest of its flags, checked on the CPU
    pc, a = peer_cli.build_config(argv)
    assert pc.host == "0.0.0.0" and pc.advertise_host == kubekit.POD_IP
    assert pc.tls is not None and pc.tls.mutual
    tls.check_listen(pc.host, pc.tls)
    assert a.join_token_file.read_text() == coordinator_join, "peers must hold the coordinator's join token"
    assert pc.tls.ca_pem == cfg.tls.ca_pem, "one CA for the cluster"
    assert pc.allow_job_code and pc.data_dir.is_dir()
    # Every path either process writes is writable in the pod (the root file system is read-only).
    for pod, flags in ((coord, ["--state-dir"]), (peer, ["--data-dir", "--cache-dir", "--code-cache-dir"])):
        for f in flags:
            assert pod.writable(_flag(pod.argv(), f)), f"{f} is not writable in {pod.container['name']}"
        assert pod.writable("/tmp/x")
    cache = peer.volume(peer.mount_of(_flag(peer.argv(), "--cache-dir"))[0]["name"])
    assert pc.cache_max_bytes < _quantity_bytes(cache["emptyDir"]["sizeLimit"]), "--cache-max-gb past its volume"


@pytest.mark.parametrize("variant", kubekit.VARIANTS)
def test_ports_agree_between_flags_containers_services_and_probes(rendered, variant):
    out = rendered[variant]
    svc = out.one("Service", "dml-coordinator")
    pods = kubekit.pods(out)
    coord, peer = pods["dml-coordinator"], pods["dml-peer"]
    assert out.one("StatefulSet", "dml-coordinator")["spec"]["serviceName"] == svc["metadata"]["name"]
    labels = coord.workload["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert not all(peer.workload["spec"]["template"]["metadata"]["labels"].get(k) == v
                   for k, v in svc["spec"]["selector"].items()), "the Service must not select peers"
    port = int(_flag(coord.argv(), "--port"))
    grpc_port = _service_port(svc, "grpc")
    assert grpc_port["port"] == port and grpc_port["targetPort"] == "grpc" and _container_port(coord, "grpc") == port
    metrics = int(_flag(coord.argv(), "--metrics-port"))
    assert _flag(coord.argv(), "--metrics-host") == "0.0.0.0", "a metrics port the Service cannot reach"
    assert _service_port(svc, "metrics")["targetPort"] == "metrics" and _container_port(coord, "metrics") == metrics
    # Peers dial the Service at the coordinator's port.
    assert _flag(peer.argv(), "--coordinator") == f"{svc['metadata']['name']}:{grpc_port['port']}"
    assert _container_port(peer, "exchange") == int(_flag(peer.argv(), "--port"))
    assert _container_port(peer, "metrics") == int(_flag(peer.argv(), "--metrics-port"))
    # Probes: the health service through `dml health` on the coordinator's own port; the peers'
    # exchange port (it serves no health service).
    for probe in ("startupProbe", "readinessProbe"):
        cmd = coord.container[probe]["exec"]["command"]
        assert cmd[:2] == ["dml", "health"] and _flag(cmd, "--coordinator") == f"127.0.0.1:{port}"
        timeout = float(_flag(cmd, "--timeout"))
        assert timeout < coord.container[probe]["timeoutSeconds"], "the probe's deadline must end before the kubelet's"
    assert coord.container["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert peer.container[probe]["tcpSocket"]["port"] == "exchange"


@pytest.mark.parametrize("variant", kubekit.VARIANTS)
def test_pods_are_unprivileged_and_bounded(rendered, variant):
    for name, pod in kubekit.pods(rendered[variant]).items():
        psc, csc = pod.spec["securityContext"], pod.container["securityContext"]
        assert psc["runAsNonRoot"] and psc["runAsUser"] != 0 and psc["fsGroup"] != 0, name
        assert csc["readOnlyRootFilesystem"] and not csc["allowPrivilegeEscalation"], name
        assert csc["capabilities"]["drop"] == ["ALL"], name
        assert pod.spec["automountServiceAccountToken"] is False, name
        res = pod.container["resources"]
        for what in ("cpu", "memory"):
            assert what in res["requests"] and what in res["limits"], f"{name}: no {what} request and limit"
        assert "HOME" in pod.env() and pod.writable(pod.env()["HOME"]), f"{name}: HOME on the read-only root"


def test_the_gpu_variant_asks_for_a_gpu_and_changes_nothing_else(rendered):
    base, gpu = rendered["."], rendered["gpu"]
    for r in base.resources:
        if r["kind"] != "Deployment":
            assert r == gpu.one(r["kind"], r["metadata"]["name"]), f"gpu/ changes {r['kind']}/{r['metadata']['name']}"
    peer = kubekit.pods(gpu)["dml-peer"]
    res = peer.container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 1
    assert _flag(peer.argv(), "--device") == "cuda"
    assert peer.container["image"] == "dml:cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in peer.spec["tolerations"]
    base_peer = kubekit.pods(base)["dml-peer"]
    assert "--device" not in base_peer.argv() and "nvidia.com/gpu" not in str(base_peer.container["resources"])
    assert base_peer.container["image"] == "dml:latest"
    assert peer.argv()[:len(base_peer.argv())] == base_peer.argv(), "the GPU peer runs the CPU peer's command and more"


def test_the_readme_shows_how_to_apply_scale_and_use_the_gpu_variant():
    readme = (kubekit.ROOT / "README.md").read_text()
    section = readme[readme.index("## Kubernetes\n"):]
    section = section[:section.index("\n## ", 1)]
    for line in ("kubectl apply -k deploy/kubernetes", "kubectl -n dml scale deployment dml-peer --replicas",
                 "kubectl apply -k deploy/kubernetes/gpu", "operator.token", "join.token"):
        assert line in section, f"README's Kubernetes section lacks {line!r}"
    assert kubekit.readme_certs_hosts() == ["coordinator", "peer", "client"]


# -- the renderer against kubectl -------------------------------------------------------------
def test_the_renderer_applies_json_patches_as_rfc_6902_says():
    doc = {"a": {"list": [1, 2], "x": 1}}
    for op in ({"op": "add", "path": "/a/list/-", "value": 3}, {"op": "add", "path": "/a/list/0", "value": 0},
               {"op": "replace", "path": "/a/x", "value": {"k~/": 2}}, {"op": "add", "path": "/a/x/k~0~1", "value": 5},
               {"op": "remove", "path": "/a/list/1"}, {"op": "test", "path": "/a/list/0", "value": 0}):
        kubekit.apply_op(doc, op)
    assert doc == {"a": {"list": [0, 2, 3], "x": {"k~/": 5}}}
    with pytest.raises(AssertionError):
        kubekit.apply_op(doc, {"op": "test", "path": "/a/list/0", "value": 9})
    with pytest.raises(AssertionError):
        kubekit.apply_op(doc, {"op": "replace", "path": "/a/nope", "value": 1})


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: kubekit's rendering alone")
@pytest.mark.parametrize("variant", kubekit.VARIANTS)
def test_kubectl_kustomize_renders_what_kubekit_renders(tree, rendered, variant):
    import yaml

    run = subprocess.run(["kubectl", "kustomize", str(tree / variant)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    theirs = [d for d in yaml.safe_load_all(run.stdout) if d]
    # kustomize names each generated Secret with a hash of its content, and rewrites references.
    renames = {}
    for r in theirs:
        if r["kind"] == "Secret":
            base_name = re.sub(r"-[a-z0-9]{10}$", "", r["metadata"]["name"])
            renames[r["metadata"]["name"]] = base_name
            r["metadata"]["name"] = base_name
    for r in theirs:
        for v in r.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "secret" in v:
                v["secret"]["secretName"] = renames[v["secret"]["secretName"]]
    mine = copy.deepcopy(rendered[variant].resources)
    for r in theirs + mine:  # kubectl folds long base64 lines
        if r["kind"] == "Secret":
            r["data"] = {k: base64.b64decode(v) for k, v in r["data"].items()}
    key = lambda r: (r["kind"], r["metadata"]["name"])  # noqa: E731
    assert sorted(theirs, key=key) == sorted(mine, key=key)
