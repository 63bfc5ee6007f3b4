"""``dml-coordinator``: runs the coordinator until SIGINT or SIGTERM."""
from __future__ import annotations

from dml.common import lifeline

if __name__ == "__main__":  # `python -m` (as LocalCluster starts it): watch the parent from before the
    lifeline.watch_parent()  # imports below (the coordinator's modules: seconds, more on a loaded machine)

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
import tempfile
import threading

from dml.common import args as cliargs
from dml.common import portcheck, rpc, taskcode, tls
from dml.common.metrics import MetricsBindError
from dml.coordinator.datastore import DEFAULT_MAX_DATASET_BYTES, DEFAULT_MAX_STORE_BYTES
from dml.coordinator.lock import StateDirLocked
from dml.common.auth import AuthError
from dml.coordinator.server import CoordinatorServer, ServerConfig, is_loopback
from dml.coordinator.service import CoordinatorConfig
from dml.coordinator.store import StoreOpenError


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


def build_parser() -> argparse.ArgumentParser:
    """The ``dml-coordinator`` argument parser (defaults from DML_* environment variables)."""
    d = CoordinatorConfig()
    p = cliargs.Parser(prog="dml-coordinator", description="Run the dml coordinator (gRPC server).")
    cliargs.add_version(p)
    p.add_argument("--host", default=os.environ.get("DML_HOST", "127.0.0.1"), help="address to bind (0.0.0.0 for all)")
    p.add_argument("--port", type=cliargs.int_in(0, 65535), default=_env_int("DML_PORT", 50051),
                   help="port to bind; 0 picks a free one")
    p.add_argument("--state-dir", type=pathlib.Path, default=os.environ.get("DML_STATE_DIR"),
                   help="directory for the SQLite state and checkpoints (default: none, state in memory)")
    p.add_argument("--heartbeat-interval-ms", type=int, default=_env_int("DML_HEARTBEAT_INTERVAL_MS", d.heartbeat_interval_ms),
                   help="how often peers heartbeat")
    p.add_argument("--peer-timeout-ms", type=int, default=_env_int("DML_PEER_TIMEOUT_MS", d.peer_timeout_ms),
                   help="evict a peer silent this long")
    p.add_argument("--round-deadline-ms", type=int, default=_env_int("DML_ROUND_DEADLINE_MS", d.round_deadline_ms),
                   help="evict members that have not reported a round this long after it started")
    p.add_argument("--max-task-code-bytes", type=cliargs.int_in(1, taskcode.MAX_CONFIGURABLE_BYTES),
                   default=_env_int("DML_MAX_TASK_CODE_BYTES", taskcode.MAX_BUNDLE_BYTES),
                   help="largest task code bundle (compressed) a job may send; bigger ones are refused "
                        "(env DML_MAX_TASK_CODE_BYTES)")
    p.add_argument("--max-dataset-bytes", type=cliargs.int_in(1, 1 << 62),
                   default=_env_int("DML_MAX_DATASET_BYTES", DEFAULT_MAX_DATASET_BYTES),
                   help="largest dataset `dml data put` may commit, in bytes (env DML_MAX_DATASET_BYTES)")
    p.add_argument("--max-data-bytes", type=cliargs.int_in(1, 1 << 62),
                   default=_env_int("DML_MAX_DATA_BYTES", DEFAULT_MAX_STORE_BYTES),
                   help="most bytes the dataset store keeps in all, committed or still uploading "
                        "(env DML_MAX_DATA_BYTES)")
    p.add_argument("--port-file", type=pathlib.Path, help="write the bound port here once listening (default: none)")
    cliargs.add_auth_flags(p, "coordinator")
    p.add_argument("--log-level", default=os.environ.get("DML_LOG_LEVEL", "INFO"), help="logging level")
    cliargs.add_metrics_flag(p)
    cliargs.add_tls_flags(p)
    return p


def build_config(argv: list[str] | None = None) -> ServerConfig:
    """Flags, then environment variables (DML_*), then defaults."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.heartbeat_interval_ms < 10 or a.peer_timeout_ms <= a.heartbeat_interval_ms:
        p.error("need --heartbeat-interval-ms >= 10 and --peer-timeout-ms > --heartbeat-interval-ms")
    if a.round_deadline_ms <= a.peer_timeout_ms:
        p.error("--round-deadline-ms must exceed --peer-timeout-ms")
    if a.no_auth and not is_loopback(a.host):
        p.error(f"--no-auth is allowed only on a loopback --host (127.0.0.1, ::1), not {a.host}")
    tls_cfg = cliargs.tls_config(p, a, serve=True)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s coordinator %(name)s: %(message)s")
    cfg = ServerConfig(host=a.host, port=a.port, state_dir=a.state_dir,
                       timing=CoordinatorConfig(heartbeat_interval_ms=a.heartbeat_interval_ms, peer_timeout_ms=a.peer_timeout_ms,
                                                round_deadline_ms=a.round_deadline_ms), port_file=a.port_file,
                       metrics=cliargs.metrics_config(a), auth=not a.no_auth, join_token_file=a.join_token_file,
                       operator_token_file=a.operator_token_file, tls=tls_cfg,
                       max_task_code_bytes=a.max_task_code_bytes, max_dataset_bytes=a.max_dataset_bytes,
                       max_data_bytes=a.max_data_bytes)
    return cfg


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    lifeline.watch_parent()  # first (a no-op when done at import): a parent that died already is seen at once
    cfg = build_config(argv)
    if cfg.auth and cfg.state_dir is None and (cfg.join_token_file is None or cfg.operator_token_file is None):
        # No state dir to keep them in: make the tokens in a private folder and say where.
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="dml-secrets-"))
        cfg = dataclasses.replace(cfg, join_token_file=cfg.join_token_file or tmp / "join.token",
                                  operator_token_file=cfg.operator_token_file or tmp / "operator.token")
    try:
        server = CoordinatorServer(cfg).start()
    except tls.TlsError as e:  # plain text on a non-loopback address: bad input
        print(f"dml-coordinator: {e}", file=sys.stderr)
        sys.exit(2)
    except StateDirLocked as e:  # another coordinator holds the state dir
        print(f"dml-coordinator: {e}", file=sys.stderr)
        sys.exit(2)
    except MetricsBindError as e:  # --metrics-port taken, or --metrics-host not this machine's
        print(f"dml-coordinator: {e}", file=sys.stderr)
        sys.exit(2)
    except rpc.BindError:  # the port is taken, or the host is not this machine's
        print(f"dml-coordinator: {portcheck.bind_failure(cfg.host, cfg.port, tls=cfg.tls)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"dml-coordinator: {e}", file=sys.stderr)
        sys.exit(1)
    except StoreOpenError as e:  # a state dir of a newer dml, or an empty or corrupt database: bad input
        print(f"dml-coordinator: {e}", file=sys.stderr)
        sys.exit(2)
    except AuthError as e:  # an empty or malformed token file
        print(f"dml-coordinator: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.port_file is not None:
        tmp = cfg.port_file.with_suffix(".tmp")
        tmp.write_text(str(server.port))
        tmp.replace(cfg.port_file)
    print(f"dml-coordinator listening on {server.address}", flush=True)
    if server.metrics_server is not None:
        print(f"dml-coordinator metrics on {server.metrics_server.url}", flush=True)
    done = threading.Event()
    lifeline.on_stop_signals(lambda _signum: done.set())  # set on a thread, never in a signal handler
    done.wait()
    server.stop()


if __name__ == "__main__":
    main()
