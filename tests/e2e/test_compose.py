"""The repository's docker-compose.yml as a user runs it: the image built from the Dockerfile (on
the debootstrap base image, offline, from the wheelhouse: tests/e2e/compose_prep.py), a
coordinator and three peer containers, the job driven from the host through the published
coordinator port with the certificates and the operator token copied out of the coordinator's
container. Mid-job one peer container is killed (``docker kill``) and the coordinator container
is killed and started again; the job must still succeed, every round committed once, every
sample once per pass, and the model downloaded on the host must carry the final digest.

Skips, saying why, where this machine cannot run Docker (compose_prep's reasons; the session's
summary repeats it). Its preparation starts when the session collects it and it runs last
(tests/e2e/conftest.py), so the minutes a fresh machine spends on it overlap the other tests.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from typing import Any, Callable

import pytest
import torch

from dml.client.api import ApiError, JobClient, history_dict, read_token, status_dict
from dml.common.spec import JobSpec
from dml.common.tasks import get_task
from dml.common.tls import load as load_tls
from dml.coordinator.checkpoint import verify_checkpoint
from dml.peer.trainer import Trainer
from tests.e2e.compose_prep import DEFAULT_DEADLINE_S
from tests.e2e.conftest import ROOT, compose_background, compose_note
from tests.integration.helpers import ledger_problems

# pytest-timeout counts fixture setup: the wait for the preparation (a fresh machine's minutes of
# apt-get, debootstrap and docker build, bounded by its own deadline) plus the test itself.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(DEFAULT_DEADLINE_S + 60 + 600)]

PROJECT_PREFIX = "dmltest"
_PROJECT_RE = re.compile(rf"^{PROJECT_PREFIX}(\d+)x[0-9a-f]+$")
PORT = 50051  # the coordinator's port inside its container
ROUNDS = 20
# Three peers needed: a killed one holds the job mid-way until its container starts again.
SPEC = JobSpec(rounds=ROUNDS, min_peers=3, local_steps=20, checkpoint_every_rounds=5)
UP_TIMEOUT_S = 240
JOB_TIMEOUT_S = 240
PROJECT_LABEL = "com.docker.compose.project"
FINISHED = ("SUCCEEDED", "FAILED", "CANCELLED")


def docker(*args: str, timeout: float = 60, check: bool = True) -> str:
    """A docker command's stdout; with ``check``, an AssertionError carrying its stderr on failure."""
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def project_leftovers(project: str) -> dict[str, list[str]]:
    """The containers, volumes and networks Docker still holds for a compose project."""
    f = f"label={PROJECT_LABEL}={project}"
    return {"containers": docker("ps", "-aq", "--filter", f, check=False).split(),
            "volumes": docker("volume", "ls", "-q", "--filter", f, check=False).split(),
            "networks": docker("network", "ls", "-q", "--filter", f, check=False).split()}


def remove_project(project: str) -> None:
    """Removes whatever a compose project left, by its label (what `down -v` would have done)."""
    left = project_leftovers(project)
    if left["containers"]:
        docker("rm", "-f", "-v", *left["containers"], timeout=120, check=False)
    if left["volumes"]:
        docker("volume", "rm", "-f", *left["volumes"], check=False)
    if left["networks"]:
        docker("network", "rm", *left["networks"], check=False)


def remove_dead_projects() -> None:
    """Removes the projects of test sessions that died without tearing down (their name carries
    the session's pid, as netem's names do)."""
    names = set(docker("ps", "-a", "--format", f'{{{{.Label "{PROJECT_LABEL}"}}}}', check=False).split())
    names |= set(docker("volume", "ls", "--format", f'{{{{.Label "{PROJECT_LABEL}"}}}}', check=False).split())
    for name in names:
        m = _PROJECT_RE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            remove_project(name)


class Compose:
    """The repository's docker-compose.yml under one project name, with the test's image and a
    coordinator published on an ephemeral loopback port."""

    def __init__(self, cmd: list[str], project: str, image: str, base_image: str) -> None:
        self.cmd = [*cmd, "--project-name", project, "--project-directory", str(ROOT),
                    "--file", str(ROOT / "docker-compose.yml")]
        self.project = project
        # "127.0.0.1:" + ":50051": Docker picks a free host port on loopback; read back with `port`.
        self.env = {**os.environ, "DML_IMAGE": image, "DML_BASE_IMAGE": base_image,
                    "DML_COORDINATOR_PORT": "127.0.0.1:"}
        self._address: str | None = None

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        res = subprocess.run([*self.cmd, *args], capture_output=True, text=True, timeout=timeout, env=self.env,
                             cwd=ROOT)
        if check and res.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        return res.stdout

    def containers(self, service: str) -> list[str]:
        """The ids of a service's containers (running or not)."""
        return self("ps", "-q", service).split()

    def address(self, fresh: bool = False) -> str:
        """The coordinator's published HOST:PORT, read again with ``fresh`` (a restarted container
        may get another port)."""
        if fresh or self._address is None:
            out = self("port", "coordinator", str(PORT)).strip().splitlines()
            assert out and re.fullmatch(r"127\.0\.0\.1:\d+", out[-1]), f"coordinator not published on loopback: {out}"
            self._address = out[-1]
        return self._address


def container_ip(cid: str) -> str:
    return docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", cid).strip()


def started_at(cid: str) -> str:
    return docker("inspect", "-f", "{{.State.StartedAt}}", cid).strip()


def poll(fn: Callable[[], Any], pred: Callable[[Any], bool], timeout_s: float, what: str,
         on_error: Callable[[], None] = lambda: None) -> Any:
    """Calls ``fn`` every 0.2 s until ``pred`` holds for its value; an ApiError (the coordinator
    restarting) counts as not yet, and calls ``on_error``. Fails after ``timeout_s`` with the last
    value or error."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if pred(last):
                return last
        except ApiError as e:
            last = e
            on_error()
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {last}")


@pytest.fixture(scope="module")
def prepared() -> dict[str, Any]:
    """The preparation's result (Docker up, the dml image built): skips, saying why, where this
    machine cannot run Docker; fails where the image does not build."""
    bg = compose_background()
    result = bg.wait()
    print(f"\ncompose preparation: {json.dumps(result)}")
    if not result["ok"]:
        if "skip" in result:
            reason = f"cannot run Docker here: {result['skip']}"
            compose_note(f"test_compose skipped: {reason}")
            pytest.skip(reason)
        pytest.fail(f"the compose preparation failed: {result['error']}\n{bg.log_tail()}")
    compose_note(f"preparation {result['seconds']} (waited {result['waited_s']} s)")
    return result


@pytest.fixture
def compose(prepared, tmp_path) -> Compose:
    """A compose project of its own, always torn down (`down -v`, then whatever is left by label),
    its services' logs printed when the test fails."""
    remove_dead_projects()
    project = f"{PROJECT_PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
    c = Compose(prepared["compose"], project, prepared["image"], prepared["base_image"])
    try:
        yield c
    finally:
        try:
            print(c("logs", "--no-color", "--tail", "40", timeout=60, check=False)[-12000:])
            c("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=180, check=False)
        finally:
            remove_project(project)
        left = project_leftovers(project)
        assert not any(left.values()), f"compose project {project} left {left}"


def test_compose_cluster_survives_a_killed_peer_and_a_restarted_coordinator(compose, tmp_path):
    t0 = time.monotonic()
    compose("up", "--detach", "--no-build", "--scale", "peer=3", "coordinator", "peer", timeout=UP_TIMEOUT_S)
    (coord,) = compose.containers("coordinator")
    peers = compose.containers("peer")
    assert len(peers) == 3
    container_of = {container_ip(p): p for p in peers}
    # From the host: the certificates and the operator token, out of the coordinator's container.
    docker("cp", f"{coord}:/certs", str(tmp_path / "certs"))
    docker("cp", f"{coord}:/var/lib/dml/secrets/operator.token", str(tmp_path / "operator.token"))
    certs = tmp_path / "certs"
    assert not (certs / "ca-key.pem").exists(), "the CA's key must stay in the coordinator's state volume"
    tls = load_tls(certs / "client.pem", certs / "client-key.pem", certs / "ca.pem")
    token = read_token(tmp_path / "operator.token")

    def client() -> JobClient:
        return JobClient(compose.address(), 10, token=token, tls=tls)

    def job_status() -> dict:
        with client() as c:
            return status_dict(c.status(job).job)

    def registered() -> dict[str, str]:
        """peer id -> the container it runs in, for every registered peer."""
        with client() as c:
            return {p.peer_id: container_of.get(p.address.rsplit(":", 1)[0], "?") for p in c.peers()}

    poll(registered, lambda ps: len(ps) == 3, UP_TIMEOUT_S, "the 3 peer containers to register")
    with client() as c:
        job = c.submit(SPEC)
    t_up = time.monotonic()

    # Mid-job, all three members: kill one peer container outright. The job needs 3 peers, so it
    # waits, mid-job, until one comes back.
    killed = poll(job_status, lambda s: (s["round"] >= 2 and len(s["peers"]) == 3) or s["state"] in FINISHED,
                  JOB_TIMEOUT_S, "round 2 on 3 peers")
    assert killed["state"] == "RUNNING", killed
    victim_id = sorted(killed["peers"])[0]
    victim = registered()[victim_id]
    docker("kill", victim)
    waiting = poll(job_status, lambda s: victim_id not in s["peers"] or s["state"] != "RUNNING",
                   JOB_TIMEOUT_S, f"the killed peer {victim_id} to leave the job")
    assert waiting["state"] == "RUNNING" and waiting["round"] < ROUNDS, waiting
    # While it waits: kill the coordinator's container and start it again. Its state volume keeps
    # the job, its certificates volume the CA; its published port may change.
    before = started_at(coord)
    docker("kill", coord)
    docker("start", coord, timeout=120)
    assert started_at(coord) != before
    restarted_ms = time.time() * 1000
    compose.address(fresh=True)
    st = poll(job_status, lambda s: True, JOB_TIMEOUT_S, "the restarted coordinator to answer",
              on_error=lambda: compose.address(fresh=True))
    assert st["state"] == "RUNNING" and st["round"] >= waiting["round"] - 1, f"the job was not restored: {st}"
    # The killed container starts again: a new peer, which takes the job and lets it go on.
    docker("start", victim, timeout=120)
    end = poll(job_status, lambda s: s["state"] in FINISHED, JOB_TIMEOUT_S, "the job's end",
               on_error=lambda: compose.address(fresh=True))
    assert end["state"] == "SUCCEEDED", end
    assert end["round"] == ROUNDS, end
    assert victim in registered().values(), "the restarted container registered again"

    with client() as c:
        hist = [history_dict(r) for r in c.history(job)]
        rnd, digest = c.download(job, tmp_path / "model.pt")
    assert [r["round"] for r in hist] == list(range(1, ROUNDS + 1)), "a committed round was lost or repeated"
    assert any(r["committed_unix_ms"] > restarted_ms and r["members"] == 3 for r in hist), \
        "no round committed on 3 peers after the restarts"
    assert ledger_problems(hist, SPEC) == []
    assert sum(r["samples"] for r in hist) == end["samples"]
    # The model, downloaded on the host: the final round's, under the digest its members agreed on.
    assert rnd == ROUNDS and digest == hist[-1]["digest"] == end["metrics"]["digest"]
    data = (tmp_path / "model.pt").read_bytes()
    verify_checkpoint(data, digest)
    trainer = Trainer(get_task("digits"), 0, 0.1)
    trainer.model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert trainer.round_digest(trainer.params(), None) == digest
    acc = trainer.evaluate().accuracy
    assert acc == pytest.approx(end["metrics"]["test_accuracy"], abs=1e-6) and acc > 0.8
    print(f"compose job {job}: {ROUNDS} rounds, accuracy {acc:.3f}; peer {victim_id} killed at round "
          f"{killed['round']}, the job waited at round {waiting['round']} while the coordinator restarted; "
          f"cluster up in {t_up - t0:.1f} s, job {time.monotonic() - t_up:.1f} s")
