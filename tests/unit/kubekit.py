"""deploy/kubernetes as the tests see it: the kustomizations rendered here in Python (the
features they use, nothing more: resources, namespace, secretGenerator, JSON 6902 patches), the
Secrets' files made as the README makes them, and a pod's paths mapped to what backs them.

``kubectl kustomize`` renders the same trees where kubectl is installed (a test compares the
two); this renderer is what lets every other check run without it. A kustomization key it does
not know is an error, so a manifest change that needs more of kustomize fails loudly here
rather than being checked against a wrong rendering."""
from __future__ import annotations

import base64
import copy
import pathlib
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
BASE = "base"  # the folder every variant builds on, under KUBE
VARIANTS = (".", "gpu")  # the trees a user applies: `kubectl apply -k deploy/kubernetes[/gpu]`
SECRETS_DIR = "base/secrets"  # where the README has the user make the Secrets' files

KNOWN_KEYS = {"apiVersion", "kind", "namespace", "resources", "secretGenerator", "patches"}
CLUSTER_SCOPED = {"Namespace"}
POD_IP = "10.244.1.7"  # what the downward API's status.podIP stands for in these checks


@dataclass
class Rendered:
    """One kustomization's output: the resources, and for each generated Secret (by the name
    its pods mount) the local file behind each key."""

    resources: list[dict[str, Any]]
    secret_files: dict[str, dict[str, pathlib.Path]] = field(default_factory=dict)

    def one(self, kind: str, name: str) -> dict[str, Any]:
        """The resource of ``kind`` named ``name`` (exactly one must exist)."""
        found = [r for r in self.resources if r["kind"] == kind and r["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} named {name}"
        return found[0]

    def workloads(self) -> list[dict[str, Any]]:
        """Every resource that runs pods."""
        return [r for r in self.resources if r["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job")]


def load_documents(path: pathlib.Path) -> list[dict[str, Any]]:
    """The YAML documents of one manifest file (empty ones dropped)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(folder: pathlib.Path) -> Rendered:
    """Builds the kustomization in ``folder`` as ``kubectl kustomize`` does, for the features
    the trees here use."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(k) - KNOWN_KEYS
    if unknown:
        raise NotImplementedError(f"{folder}: kustomization keys {sorted(unknown)} are not rendered by kubekit")
    out = Rendered([])
    for entry in k.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            sub = render(path)
            out.resources += sub.resources
            out.secret_files.update(sub.secret_files)
        else:
            out.resources += load_documents(path)
    for gen in k.get("secretGenerator", []):
        if set(gen) - {"name", "files"}:
            raise NotImplementedError(f"{folder}: secretGenerator fields {sorted(set(gen) - {'name', 'files'})}")
        files: dict[str, pathlib.Path] = {}
        for spec in gen["files"]:
            key, rel = spec.split("=", 1) if "=" in spec else (pathlib.PurePosixPath(spec).name, spec)
            files[key] = folder / rel
        out.secret_files[gen["name"]] = files
        out.resources.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                              "metadata": {"name": gen["name"]},
                              "data": {key: base64.b64encode(p.read_bytes()).decode() for key, p in files.items()}})
    for patch in k.get("patches", []):
        ops = yaml.safe_load(patch["patch"])
        if not isinstance(ops, list):
            raise NotImplementedError(f"{folder}: only JSON 6902 patches (a list of operations) are rendered")
        targets = [r for r in out.resources if _matches(r, patch["target"])]
        assert targets, f"{folder}: a patch matches no resource: {patch['target']}"
        for r in targets:
            for op in ops:
                apply_op(r, op)
    if "namespace" in k:
        for r in out.resources:
            if r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["namespace"] = k["namespace"]
    return out


def _matches(resource: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    have = {"group": group, "version": version, "kind": resource["kind"], "name": resource["metadata"]["name"]}
    return all(have[k] == v for k, v in target.items())


def apply_op(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """Applies one RFC 6902 operation (add, replace, remove, test) to ``doc`` in place."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    kind = op["op"]
    if isinstance(node, list):
        if kind == "add":
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            return
        index = int(last)
        assert 0 <= index < len(node), f"{op['path']}: no element {index}"
    else:
        index = last  # type: ignore[assignment]
        if kind in ("replace", "remove", "test"):
            assert last in node, f"{op['path']}: no such member"
    if kind in ("add", "replace"):
        node[index] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[index]
    elif kind == "test":
        assert node[index] == op["value"], f"test {op['path']}: {node[index]!r} != {op['value']!r}"
    else:
        raise NotImplementedError(f"JSON patch op {kind!r}")


def readme_certs_hosts() -> list[str]:
    """The hosts the README's `dml certs` line for Kubernetes names."""
    m = re.search(r"^dml certs --out \. --hosts (\S+)$", (ROOT / "README.md").read_text(), re.M)
    assert m, "README: no `dml certs --out . --hosts ...` line for the Kubernetes secrets"
    return m.group(1).split(",")


def copy_with_secrets(dest: pathlib.Path) -> pathlib.Path:
    """A copy of deploy/kubernetes at ``dest`` with the Secrets' files made as the README makes
    them (`dml certs`, then two tokens); returns the copy's root."""
    from dml.client import cli as jobctl
    from dml.common import auth

    shutil.copytree(KUBE, dest)
    secrets = dest / SECRETS_DIR
    assert jobctl.run(["certs", "--out", str(secrets), "--hosts", ",".join(readme_certs_hosts())]) == 0
    for name in ("join.token", "operator.token"):
        (secrets / name).write_text(auth.new_token() + "\n")
    return dest


# -- pods ---------------------------------------------------------------------------------------
@dataclass
class Pod:
    """One workload's pod template and its one container, with the Secrets it can mount."""

    workload: dict[str, Any]
    secret_files: dict[str, dict[str, pathlib.Path]]

    @property
    def spec(self) -> dict[str, Any]:
        """The pod template's spec."""
        return self.workload["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        """The pod's one container (dml runs one process per pod)."""
        (c,) = self.spec["containers"]
        return c

    def env(self) -> dict[str, str]:
        """The container's environment as the process sees it (``status.podIP`` as :data:`POD_IP`)."""
        out = {}
        for e in self.container.get("env", []):
            if "value" in e:
                out[e["name"]] = str(e["value"])
            else:
                assert e["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, f"unexpected env source {e}"
                out[e["name"]] = POD_IP
        return out

    def argv(self) -> list[str]:
        """command + args with ``$(VAR)`` expanded as the kubelet does; every reference must
        name a variable the container defines (an undefined one stays literal there)."""
        env = self.env()

        def expand(arg: str) -> str:
            def one(m: re.Match[str]) -> str:
                assert m.group(1) in env, f"{arg!r} names $({m.group(1)}), which the container does not define"
                return env[m.group(1)]
            return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg)

        return [expand(str(a)) for a in self.container.get("command", []) + self.container.get("args", [])]

    def volume(self, name: str) -> dict[str, Any]:
        """The pod volume (or StatefulSet volume claim template, as ``{"pvc": ...}``) ``name``."""
        for v in self.spec.get("volumes", []):
            if v["name"] == name:
                return v
        for t in self.workload["spec"].get("volumeClaimTemplates", []):
            if t["metadata"]["name"] == name:
                return {"name": name, "pvc": t}
        raise AssertionError(f"no volume {name!r} in {self.workload['metadata']['name']}")

    def mount_of(self, path: str) -> tuple[dict[str, Any], str] | None:
        """The volume mount holding the container path ``path`` (the longest mount path that is
        a prefix) and the path below it, or None when it is on the image's own file system."""
        best = None
        for m in self.container.get("volumeMounts", []):
            mp = m["mountPath"].rstrip("/")
            if path == mp or path.startswith(mp + "/"):
                if best is None or len(mp) > len(best[0]["mountPath"].rstrip("/")):
                    best = (m, path[len(mp):].lstrip("/"))
        return best

    def local(self, path: str, scratch: pathlib.Path) -> pathlib.Path:
        """Where the container path ``path`` points on this machine: a generated Secret's key
        is the file it was made from; a path on an emptyDir or volume claim is under
        ``scratch/<volume>/`` (the volume's root created, as the kubelet mounts it)."""
        found = self.mount_of(path)
        assert found is not None, f"{path} is on no volume of {self.workload['metadata']['name']}"
        mount, rel = found
        vol = self.volume(mount["name"])
        if "secret" in vol:
            name = vol["secret"]["secretName"]
            assert "items" not in vol["secret"], "kubekit maps whole Secrets only"
            assert name in self.secret_files, f"{path}: Secret {name} is not generated by the kustomization"
            assert rel in self.secret_files[name], f"{path}: Secret {name} has no key {rel!r}"
            return self.secret_files[name][rel]
        assert "emptyDir" in vol or "pvc" in vol, f"{path}: volume {vol['name']} is neither a Secret, emptyDir nor claim"
        root = scratch / mount["name"]
        root.mkdir(parents=True, exist_ok=True)
        return root / rel if rel else root

    def writable(self, path: str) -> bool:
        """Whether the process can write at ``path``: on a mount that is not read-only and not a
        Secret, or anywhere when the root file system is writable."""
        found = self.mount_of(path)
        if found is None:
            return not self.container.get("securityContext", {}).get("readOnlyRootFilesystem", False)
        mount, _ = found
        return not mount.get("readOnly", False) and "secret" not in self.volume(mount["name"])


def pods(rendered: Rendered) -> dict[str, Pod]:
    """Every workload's pod, by the name of its one container."""
    out = {}
    for w in rendered.workloads():
        pod = Pod(w, rendered.secret_files)
        out[pod.container["name"]] = pod
    return out
