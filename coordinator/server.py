"""Wiring: a gRPC server with the coordinator's services, health and reflection, and the reaper
thread that evicts silent peers."""
from __future__ import annotations

import logging
import pathlib
import threading
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dml.common import guard, rpc
from dml.common import metrics as metricsmod
from dml.common import auth, taskcode
from dml.common.metrics import MetricsConfig, MetricsServer
from dml.coordinator.auth import AuthInterceptor, Secrets
from dml.coordinator.codestore import CodeStore
from dml.coordinator.datastore import DEFAULT_MAX_DATASET_BYTES, DEFAULT_MAX_STORE_BYTES, DataStore
from dml.common.tls import TlsConfig, check_listen
from dml.coordinator.lock import StateDirLock
from dml.coordinator.metrics import CoordinatorMetrics
from dml.coordinator.service import Coordinator, CoordinatorConfig
from dml.coordinator.servicer import DataServicer, JobServicer, PeerControlServicer
from dml.coordinator.store import MemoryStore, SqliteStore, Store
from dml.v1 import control_pb2, control_pb2_grpc, data_pb2, data_pb2_grpc, jobs_pb2, jobs_pb2_grpc

log = logging.getLogger(__name__)
HEALTH_NAMES = ("", "dml.v1.JobService", "dml.v1.PeerControl", "dml.v1.DataService")

UPLOAD_IDLE_S = 10.0  # between two checkpoint chunks (1 MiB each, sent back to back)
UPLOAD_MAX_S = 600.0
DOWNLOAD_IDLE_S = 30.0  # a client that takes no model chunk for this long has gone
DOWNLOAD_MAX_S = 3600.0
CHUNK_FIRST_S = 60.0  # a PutChunk's 4 MiB message: 70 KB/s is enough


def call_policies() -> dict[str, guard.Policy]:
    """The coordinator's long-lived calls and how long their clients may leave them waiting
    (every other call: its request within :data:`dml.common.guard.FIRST_MESSAGE_S`)."""
    ctl, jobs, data = "/dml.v1.PeerControl/", "/dml.v1.JobService/", "/dml.v1.DataService/"
    return {
        data + "PutChunk": guard.Policy(first_s=CHUNK_FIRST_S, max_s=2 * CHUNK_FIRST_S),
        data + "GetChunk": guard.Policy(max_s=2 * CHUNK_FIRST_S),
        ctl + "UploadCheckpoint": guard.Policy(idle_s=UPLOAD_IDLE_S, max_s=UPLOAD_MAX_S, long=True),
        jobs + "WatchJob": guard.Policy(long=True),  # holds until the job changes (its own cap: MAX_WATCHERS)
        jobs + "DownloadModel": guard.Policy(idle_s=DOWNLOAD_IDLE_S, max_s=DOWNLOAD_MAX_S, long=True,
                                             response_idle=True),
        jobs + "DownloadCheckpoint": guard.Policy(idle_s=DOWNLOAD_IDLE_S, max_s=DOWNLOAD_MAX_S, long=True,
                                                  response_idle=True),
        "/grpc.health.v1.Health/Watch": guard.Policy(long=True),
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": guard.Policy(idle_s=DOWNLOAD_IDLE_S,
                                                                                       long=True),
    }


@dataclass(frozen=True)
class ServerConfig:
    """Everything dml-coordinator is configured with."""

    host: str = "127.0.0.1"
    port: int = 0
    state_dir: pathlib.Path | None = None
    timing: CoordinatorConfig = CoordinatorConfig()
    workers: int = 256  # long polls and watch streams each hold one while they wait
    port_file: pathlib.Path | None = None  # where the CLI writes the bound port
    metrics: MetricsConfig | None = None  # the Prometheus endpoint (None: off)
    # Authentication (docs/security.md). Tokens: given, else read from their files, else made
    # once under STATE_DIR/secrets/ (0600), else (no state dir) made for this process only.
    auth: bool = True  # False (--no-auth): every call is accepted; loopback binds only
    join_token: str = ""
    operator_token: str = ""
    join_token_file: pathlib.Path | None = None
    operator_token_file: pathlib.Path | None = None
    tls: TlsConfig | None = None  # None: plain text, loopback only
    max_task_code_bytes: int = taskcode.MAX_BUNDLE_BYTES  # a job's task code bundle, compressed
    max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES  # one dataset of the store (dml data put)
    max_data_bytes: int = DEFAULT_MAX_STORE_BYTES  # every chunk the dataset store holds


SECRETS_DIR = "secrets"
JOIN_TOKEN_FILE = "join.token"
OPERATOR_TOKEN_FILE = "operator.token"
SIGNING_KEY_FILE = "coordinator.key"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine's loopback interface."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _token(given: str, path: pathlib.Path | None, made: pathlib.Path | None, what: str) -> tuple[str, str]:
    """A token and where it comes from (for the log): ``given``, else the one in ``path`` (made
    there, 0600, when the file does not exist yet: a compose file hands peers the join token that
    way), else the one in ``made`` (created there once), else a fresh one for this process."""
    if given:
        return given, "given"
    if path is not None:
        made = path
    if made is not None:
        try:
            token, new = auth.ensure_token_file(made)
        except OSError as e:
            raise auth.AuthError(f"cannot read or make the {what} token file {made}: {e.strerror or e}") from None
        return token, f"{'made in' if new else 'read from'} {made}"
    return auth.new_token(), "made for this process only"


class CoordinatorServer:
    """A running coordinator: call :meth:`stop` to end it."""

    def __init__(self, config: ServerConfig) -> None:
        """Locks the state dir (if any), opens the store and binds; raises
        :class:`~dml.coordinator.lock.StateDirLocked` or :class:`~dml.common.rpc.BindError`
        (holding nothing then) when another coordinator has the state dir or the port, and
        :class:`~dml.common.tls.TlsError` for plain text on a non-loopback host."""
        self.config = config
        check_listen(config.host, config.tls)  # refused before the state dir is touched
        # Lock, then open the store, then bind, then record the address: a second coordinator
        # never opens a held store, and one that fails to bind lets the lock go.
        self._state_lock = StateDirLock(config.state_dir).acquire() if config.state_dir is not None else None
        try:
            self._open(config)
        except BaseException:
            if self._state_lock is not None:
                self._state_lock.release()
            raise
        if self._state_lock is not None:
            self._state_lock.record(self.address)

    def _open(self, config: ServerConfig) -> None:
        if not config.auth and not is_loopback(config.host):
            raise ValueError(f"--no-auth is allowed only on a loopback bind, not on {config.host}")
        secrets_dir = config.state_dir / SECRETS_DIR if config.state_dir is not None else None
        self.secrets: Secrets | None = None
        self._token_origins: tuple[str, str] = ("", "")
        if config.auth:
            join, join_from = _token(config.join_token, config.join_token_file,
                                     secrets_dir / JOIN_TOKEN_FILE if secrets_dir else None, "join")
            operator, operator_from = _token(config.operator_token, config.operator_token_file,
                                             secrets_dir / OPERATOR_TOKEN_FILE if secrets_dir else None, "operator")
            self.secrets = Secrets(join_token=join, operator_token=operator)
            self._token_origins = (join_from, operator_from)
        signing_key = auth.ensure_private_key(secrets_dir / SIGNING_KEY_FILE)[0] if secrets_dir else None
        store: Store
        if config.state_dir is not None:
            store = SqliteStore(config.state_dir)
            ckpt = config.state_dir / "checkpoints"
            code_dir = config.state_dir / "code"
            data_dir = config.state_dir / "data"
        else:
            import tempfile

            store = MemoryStore()
            ckpt = pathlib.Path(tempfile.mkdtemp(prefix="dml-ckpt-"))
            code_dir = ckpt / "task-code"
            data_dir = ckpt / "data"
        code = CodeStore(code_dir, config.max_task_code_bytes)
        data = DataStore(data_dir, config.max_dataset_bytes, config.max_data_bytes)
        self.metrics = CoordinatorMetrics()
        self.coordinator = Coordinator(config.timing, store, ckpt, metrics=self.metrics, signing_key=signing_key,
                                       code=code, data=data)
        self.coordinator.on_health = self._set_health
        interceptors: list[grpc.ServerInterceptor] = [self.metrics.rpcs]
        if self.secrets is not None:
            interceptors.append(AuthInterceptor(self.secrets, self.coordinator.tokens, self.coordinator.member_of,
                                                self.coordinator.cluster_id))
        self._server = rpc.server(workers=config.workers, interceptors=interceptors,
                                  limits=guard.Limits.for_pool(config.workers, call_policies()))
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.coordinator), self._server)
        control_pb2_grpc.add_PeerControlServicer_to_server(PeerControlServicer(self.coordinator), self._server)
        data_pb2_grpc.add_DataServiceServicer_to_server(DataServicer(self.coordinator), self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = (
            jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
            control_pb2.DESCRIPTOR.services_by_name["PeerControl"].full_name,
            data_pb2.DESCRIPTOR.services_by_name["DataService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self._server)
        try:
            self.port = rpc.bind(self._server, config.host, config.port, tls=config.tls)
            self.metrics_server: MetricsServer | None = metricsmod.serve(self.metrics.registry, config.metrics,
                                                                         "coordinator")
        except BaseException:
            self._server.stop(None)
            self.coordinator.close()
            raise
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="reaper", daemon=True)

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics endpoint listens on (None when it is off)."""
        return self.metrics_server.port if self.metrics_server is not None else None

    @property
    def address(self) -> str:
        """host:port clients dial."""
        return f"{self.config.host}:{self.port}"

    def start(self) -> "CoordinatorServer":
        """Starts serving and reaping."""
        self._server.start()
        self._reaper.start()
        reason = self.coordinator.pause_reason
        self._set_health(not reason, reason)
        log.info("coordinator listening on %s (cluster %s)", self.address, self.coordinator.cluster_id)
        if self.secrets is not None:
            log.info("authentication on: join token %s, operator token %s", *self._token_origins)
        else:
            log.warning("authentication is off (--no-auth): anyone who reaches %s can submit, cancel and join",
                        self.address)
        rpc.log_transport("the coordinator", self.address, self.config.tls)
        return self

    def _set_health(self, serving: bool, reason: str) -> None:
        """The health service follows the coordinator: NOT_SERVING while a failed write pauses it
        (the reason is in the log and in every unfinished job's status)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in HEALTH_NAMES:
            self._health.set(name, status)

    def _reap(self) -> None:
        while not self._stop.wait(self.config.timing.tick_ms / 1000.0):
            try:
                self.coordinator.tick(self.config.timing.tick_ms)
            except Exception:  # the reaper must survive a bad tick; the error is logged
                log.exception("reaper tick failed")

    def wait(self) -> None:
        """Blocks until the server stops."""
        self._server.wait_for_termination()

    def stop(self, grace_s: float = 1.0) -> None:
        """Stops serving (in-flight calls get ``grace_s``) and closes the store."""
        self._stop.set()
        self._health.enter_graceful_shutdown()
        self.coordinator.begin_shutdown()  # long polls answer now, not at their timeout
        self._server.stop(grace_s).wait(grace_s + 1)
        if self._reaper.is_alive():
            self._reaper.join(2)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.coordinator.close()
        if self._state_lock is not None:
            self._state_lock.release()
