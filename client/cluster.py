"""A coordinator and peers as child processes on one host: the helper behind ``dml local``, the
e2e tests and the benchmarks.

:class:`LocalCluster` starts ``python -m dml.coordinator.cli`` on a port (0: any free one, read
back from its port file; a restart reuses the port and the state dir) and ``python -m
dml.peer.cli`` processes in numbered slots, each writing its own log file. It kills, pauses,
resumes and restarts them by slot, and :meth:`LocalCluster.close` reaps every process it ever
started (SIGCONT to paused ones, SIGTERM, then SIGKILL after a grace period). Children also stop
when their parent dies, even by SIGKILL: each holds the read end of a pipe whose write end only
this process has (:class:`dml.common.lifeline.Lifeline`).

Authentication is on: the coordinator makes its join and operator tokens once in
``STATE_DIR/secrets/`` (:attr:`LocalCluster.join_token_file`, :attr:`LocalCluster.operator_token_file`),
peers register with the join token, and :meth:`LocalCluster.client` talks with the operator token.

Every process runs with TLS on (mutual, from a private CA): the cluster makes its certificates
in ``state_dir/tls`` (kept there, so a restart or a second cluster on the state dir reuses them)
unless it is given a :class:`~dml.common.tls.TlsConfig`; ``plaintext=True`` runs it all in plain
text on loopback instead. :meth:`LocalCluster.client` and :meth:`LocalCluster.client_env` give
job clients the same credentials.

It only spawns processes: it imports nothing of the coordinator or the peer.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dml.common import tls as tlsmod
from dml.common.lifeline import Lifeline
from dml.common.tls import TlsConfig

if TYPE_CHECKING:
    from dml.client.api import JobClient

log = logging.getLogger(__name__)

GRACE_S = 5.0


def join_token_file(state_dir: pathlib.Path) -> pathlib.Path:
    """Where a coordinator with ``state_dir`` keeps the join token it made."""
    return state_dir / "secrets" / "join.token"


def operator_token_file(state_dir: pathlib.Path) -> pathlib.Path:
    """Where a coordinator with ``state_dir`` keeps the operator token it made."""
    return state_dir / "secrets" / "operator.token"


class ClusterError(Exception):
    """A process of the cluster did not start (it exited, or a deadline passed)."""


def reap(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = GRACE_S) -> None:
    """SIGTERM every child, wait up to ``grace_s``, SIGKILL the rest."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def wait_for_port_file(path: pathlib.Path, proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """Waits until a child writes its bound port to ``path`` (it writes the file atomically)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return int(path.read_text())
        if proc.poll() is not None:
            raise ClusterError(f"coordinator exited with code {proc.returncode} before listening")
        time.sleep(0.05)
    raise ClusterError(f"coordinator did not start within {timeout_s:.0f}s")


LOCAL_HOST = "localhost"  # the one certificate a local cluster's processes share


def local_tls(directory: pathlib.Path) -> TlsConfig:
    """The TLS config of a cluster on this host: a CA and one certificate in ``directory``,
    made there the first time (keys 0600) and reused after."""
    from dml.common import certs

    cert, key, ca = directory / f"{LOCAL_HOST}.pem", directory / f"{LOCAL_HOST}-key.pem", directory / certs.CA_CERT
    if not (cert.exists() and key.exists() and ca.exists()):
        certs.make_certs(directory, [LOCAL_HOST])
    loaded = tlsmod.load(cert, key, ca)
    assert loaded is not None
    return loaded


@dataclass
class Proc:
    """One child process of the cluster: its name ("coordinator", "peer-SLOT"), which start of
    that name it is (0 first), its log, and when it was started (``time.time()``)."""

    name: str
    generation: int
    popen: subprocess.Popen[bytes]
    log: pathlib.Path
    started: float
    args: tuple[str, ...] = ()  # the peer's own extra flags, reused by a restart
    paused: bool = False

    @property
    def alive(self) -> bool:
        """Not exited yet (a paused process is alive)."""
        return self.popen.poll() is None


def default_log_name(name: str, generation: int) -> str:
    """``coordinator.log`` and ``peer-SLOT.log``; a restart writes ``NAME.GEN.log``."""
    return f"{name}.log" if generation == 0 else f"{name}.{generation}.log"


@dataclass
class Registration:
    """A peer process registering with the coordinator, from its own log."""

    wall: float  # its log's timestamp, Unix seconds
    peer_id: str
    address: str


# peer/runner.py logs this line when the coordinator has given the process its id.
_REGISTERED_RE = re.compile(r"peer (peer-[\w-]+): registered at (\S+)")
_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(line: str) -> float | None:
    """The Unix time of a log line's ``asctime`` prefix (local time, as logging writes it)."""
    m = _TS_RE.match(line)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def log_lines(path: pathlib.Path) -> list[str]:
    """A log's lines ([] while it does not exist)."""
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def registrations(path: pathlib.Path) -> list[Registration]:
    """Each registration a peer process logged, oldest first: the id the coordinator gave it and
    the exchange address it registered (a peer evicted while alive registers again, with a new id)."""
    out = []
    for line in log_lines(path):
        m = _REGISTERED_RE.search(line)
        if m:
            out.append(Registration(log_time(line) or 0.0, m.group(1), m.group(2)))
    return out


@dataclass
class LocalCluster:
    """A coordinator and peers as processes on ``host``; every process it starts is reaped by
    :meth:`close` (also on leaving a ``with`` block).

    ``coordinator_args`` go to every coordinator start, ``peer_args`` to every peer (after
    ``--coordinator``, ``--host``, ``--port 0`` and the TLS flags), ``env`` is the children's
    environment (default: this one's) with PYTHONUNBUFFERED=1, ``log_name(name, generation)``
    names each log file in ``log_dir`` (opened for appending). ``tls``: the certificates every
    process uses (default: made in ``state_dir/tls``); ``plaintext``: none at all (loopback only);
    ``auth=False``: the coordinator runs with ``--no-auth`` (loopback only) and no process is
    given a token. Peers run the task code jobs send (``--allow-job-code``) unless
    ``allow_job_code=False``."""

    state_dir: pathlib.Path
    log_dir: pathlib.Path
    port: int = 0
    host: str = "127.0.0.1"
    coordinator_args: Sequence[str] = ()
    peer_args: Sequence[str] = ("--device", "cpu")
    env: Mapping[str, str] | None = None
    cwd: pathlib.Path | None = None
    log_name: Callable[[str, int], str] = default_log_name
    grace_s: float = GRACE_S
    tls: TlsConfig | None = None
    plaintext: bool = False
    auth: bool = True
    allow_job_code: bool = True  # peers run the task code jobs send (dml-peer --allow-job-code)
    coordinator: Proc | None = field(default=None, init=False)
    peers: dict[int, Proc] = field(default_factory=dict, init=False)  # slot -> its latest process
    everything: list[Proc] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port_file = self.state_dir / "coordinator.port"
        self._env = dict(os.environ if self.env is None else self.env, PYTHONUNBUFFERED="1")
        self._generations: dict[str, int] = {}
        self._lifeline = Lifeline()  # every child stops when this process dies, however it dies
        if self.plaintext:
            self.tls = None
        elif self.tls is None:
            self.tls = local_tls(self.state_dir / "tls")
        self._tls_args = self.tls.args() if self.tls is not None else []

    def client_env(self) -> dict[str, str]:
        """The children's environment plus what a `dml` command needs to reach this cluster:
        DML_TLS_* (its certificates) and DML_TOKEN_FILE (the operator token)."""
        env = dict(self._env)
        if self.tls is not None:
            for name, path in (("DML_TLS_CERT", self.tls.cert), ("DML_TLS_KEY", self.tls.key), ("DML_TLS_CA", self.tls.ca)):
                if path is not None:
                    env[name] = str(path)
            env["DML_TLS_SERVER_NAME"] = self.tls.server_name
        if self.auth:
            env["DML_TOKEN_FILE"] = str(self.operator_token_file)
        return env

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def join_token_file(self) -> pathlib.Path:
        """The join token the coordinator made (exists once it has started)."""
        return join_token_file(self.state_dir)

    @property
    def operator_token_file(self) -> pathlib.Path:
        """The operator token the coordinator made (exists once it has started)."""
        return operator_token_file(self.state_dir)

    def operator_token(self) -> str:
        """The operator token (the coordinator must have started); "" when auth is off."""
        return self.operator_token_file.read_text().strip() if self.auth else ""

    def client(self, timeout_s: float = 30.0) -> JobClient:
        """A :class:`dml.client.api.JobClient` to the coordinator with the operator token and
        the cluster's certificates."""
        from dml.client.api import JobClient

        return JobClient(self.address, timeout_s, token=self.operator_token(), tls=self.tls)

    @property
    def address(self) -> str:
        """The coordinator's host:port (once started)."""
        if not self.port:
            raise ClusterError("the coordinator has not been started")
        return f"{self.host}:{self.port}"

    def _spawn(self, name: str, cmd: list[str], args: tuple[str, ...] = ()) -> Proc:
        gen = self._generations.get(name, -1) + 1
        self._generations[name] = gen
        path = self.log_dir / self.log_name(name, gen)
        with open(path, "ab") as f:  # no preexec_fn: the lifeline needs none, so subprocess may vfork
            popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     **self._lifeline.child(self._env))  # type: ignore[call-overload]
        proc = Proc(name, gen, popen, path, time.time(), args)
        self.everything.append(proc)
        log.debug("started %s (pid %d), log %s", name, popen.pid, path)
        return proc

    def start_coordinator(self, timeout_s: float = 60.0) -> str:
        """Starts the coordinator, or starts it again on the same port and state dir after it
        died or was killed; returns its address once it listens."""
        if self.coordinator is not None and self.coordinator.alive:
            raise ClusterError(f"the coordinator is still running (pid {self.coordinator.popen.pid})")
        self.port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "dml.coordinator.cli", "--host", self.host, "--port", str(self.port),
               "--state-dir", str(self.state_dir), "--port-file", str(self.port_file), *self._tls_args,
               *([] if self.auth else ["--no-auth"]), *self.coordinator_args]
        self.coordinator = self._spawn("coordinator", cmd)
        self.port = wait_for_port_file(self.port_file, self.coordinator.popen, timeout_s)
        return self.address

    def start_peer(self, slot: int | None = None, args: Sequence[str] = ()) -> Proc:
        """Starts a peer process in ``slot`` (default: the next unused one) with ``args`` added to
        ``peer_args``; a slot whose process has exited gets a fresh one."""
        if slot is None:
            slot = max(self.peers, default=-1) + 1
        old = self.peers.get(slot)
        if old is not None and old.alive:
            raise ClusterError(f"peer slot {slot} still runs pid {old.popen.pid}")
        cmd = [sys.executable, "-m", "dml.peer.cli", "--coordinator", self.address, "--host", self.host,
               "--port", "0", *(["--join-token-file", str(self.join_token_file)] if self.auth else []),
               *self._tls_args, *(["--allow-job-code"] if self.allow_job_code else []), *self.peer_args, *args]
        self.peers[slot] = self._spawn(f"peer-{slot}", cmd, tuple(args))
        return self.peers[slot]

    def kill(self, proc: Proc) -> None:
        """SIGKILL one process and reap it."""
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(10)
        proc.paused = False

    def kill_peer(self, slot: int) -> Proc:
        """SIGKILL the slot's process; returns it."""
        proc = self.peers[slot]
        self.kill(proc)
        return proc

    def kill_coordinator(self) -> Proc:
        """SIGKILL the coordinator; returns it (start it again with :meth:`start_coordinator`)."""
        if self.coordinator is None:
            raise ClusterError("the coordinator has not been started")
        self.kill(self.coordinator)
        return self.coordinator

    def restart_peer(self, slot: int) -> Proc:
        """SIGKILL the slot's process (if alive) and start a fresh one with the same flags."""
        old = self.peers[slot]
        if old.alive:
            self.kill(old)
        return self.start_peer(slot, old.args)

    def stop_peer(self, slot: int) -> Proc:
        """SIGTERM the slot's process (it leaves cleanly) and reap it, SIGKILL after the grace period."""
        proc = self.peers[slot]
        self.resume(proc)
        reap([proc.popen], self.grace_s)
        return proc

    def pause(self, proc: Proc) -> None:
        """SIGSTOP: the process hangs, alive, until :meth:`resume`."""
        proc.popen.send_signal(signal.SIGSTOP)
        proc.paused = True

    def resume(self, proc: Proc) -> None:
        """SIGCONT a paused process (a no-op on one that is not paused or has exited)."""
        if proc.paused and proc.alive:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGCONT)
        proc.paused = False

    def close(self) -> None:
        """Resumes paused children, then SIGTERM / SIGKILL every process ever started."""
        for p in self.everything:
            self.resume(p)
        reap([p.popen for p in self.everything], self.grace_s)
        self._lifeline.close()  # a process started after this gets a new line
