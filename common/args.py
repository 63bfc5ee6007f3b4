"""What the three command line tools (``dml``, ``dml-coordinator``, ``dml-peer``) share about
their flags: help that shows every default, ``--version``, range-checked argparse types whose
messages name the real bounds, an address type, and a quiet end when stdout is a closed pipe."""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import dml
from dml.common import tls
from dml.common.rpc import parse_address

if TYPE_CHECKING:
    from dml.common.metrics import MetricsConfig


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already says its default (or
    that it is required), the option is an on/off switch, or it has no default value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or "required" in text or action.default in (None, argparse.SUPPRESS)
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                or not action.option_strings):
            return text
        return super()._get_help_string(action) or text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line pointing at ``--help``, exit 2."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_version(p: argparse.ArgumentParser) -> None:
    """``--version``: prints ``PROG VERSION`` (the package's version) and exits 0."""
    p.add_argument("--version", action="version", version=f"%(prog)s {dml.__version__}")


U32 = 2**32 - 1  # the largest value of a uint32 proto field


def int_in(lo: int, hi: int | None = None, default_zero: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in lo..hi, else a usage error naming that range. Without ``hi``
    the only upper bound is a uint32 field's, and the message for a low value says "at least".

    With ``default_zero``, 0 is accepted too and read as that value (the job flags whose 0 has
    always meant "the default", as proto3's unset does in the job spec)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if default_zero is not None and v == 0:
            return default_zero
        if hi is None:
            if v < lo:
                raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
            if v > U32:
                raise argparse.ArgumentTypeError(f"must be at most {U32} (a 32-bit field), got {v}")
        elif not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {v}")
        return v
    parse.__name__ = "int"  # what argparse calls the type in its own messages
    return parse


def float_in(lo: float, hi: float, lo_open: bool = True, hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval from lo to hi (open or closed at each
    end), else a usage error naming the interval."""
    shown = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        if not (math.isfinite(v) and above and below):
            raise argparse.ArgumentTypeError(f"must be in {shown}, got {text}")
        return v
    parse.__name__ = "float"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def address(text: str) -> str:
    """An argparse type: a dialable HOST:PORT (port 1..65535), else a usage error."""
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def pool_name(text: str) -> str:
    """A peer pool's name (``--pool``), checked as the coordinator checks it; "" stays "" (a
    job's any pool, a peer's default one)."""
    from dml.common.spec import pool_error

    if text and (err := pool_error(text)):
        raise argparse.ArgumentTypeError(err)
    return text


def dataset_name(text: str) -> str:
    """A dataset's name (``dml submit --local-data``), checked as the coordinator checks it; ""
    stays "" (none)."""
    from dml.common.datasets import name_error

    if text and (err := name_error(text)):
        raise argparse.ArgumentTypeError(err)
    return text


def local_dataset(text: str) -> tuple[str, pathlib.Path]:
    """``dml-peer --data NAME=PATH``: a local dataset this peer offers to ``--placement local``
    jobs, as (name, absolute path). The name is checked as a store dataset's is, and PATH must
    be an existing folder or file (a job's ``ctx.data_dir`` on this peer)."""
    from dml.common.datasets import name_error

    name, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"want NAME=PATH, got {text[:200]!r}")
    if err := name_error(name):
        raise argparse.ArgumentTypeError(err)
    where = pathlib.Path(path).expanduser()
    if not (where.is_dir() or where.is_file()):
        raise argparse.ArgumentTypeError(f"{name}={path[:200]}: no such folder or file")
    return name, where.resolve()


def _metrics_port(text: str) -> int | None:
    """``--metrics-port``: a port 0..65535 (0 picks a free one); "" or "off" serves nothing."""
    if text.strip().lower() in ("", "off", "none"):
        return None
    return int_in(0, 65535)(text)


_metrics_port.__name__ = "port"


def add_metrics_flag(p: argparse.ArgumentParser) -> None:
    """``--metrics-port`` (env DML_METRICS_PORT) and ``--metrics-host`` (env DML_METRICS_HOST):
    where the process serves Prometheus metrics at /metrics. Off unless a port is given."""
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics-port", type=_metrics_port, default=os.environ.get("DML_METRICS_PORT") or None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (HTTPS when TLS is on); 0 picks a "
                        "free port and logs it (default: off, env DML_METRICS_PORT)")
    g.add_argument("--metrics-host", default=os.environ.get("DML_METRICS_HOST", "127.0.0.1"),
                   help="address the metrics endpoint binds (0.0.0.0 for all)")


def metrics_config(a: argparse.Namespace) -> MetricsConfig | None:
    """The metrics endpoint the parsed flags of :func:`add_metrics_flag` ask for (None: off).
    When the command also has TLS flags (``--tls-cert``, ``--tls-key``, ``--tls-ca``) the
    endpoint serves HTTPS with the same certificate and, with a CA, asks scrapers for one too."""
    from dml.common.metrics import MetricsConfig

    if getattr(a, "metrics_port", None) is None:
        return None
    return MetricsConfig(host=a.metrics_host, port=a.metrics_port, certfile=getattr(a, "tls_cert", None) or None,
                         keyfile=getattr(a, "tls_key", None) or None, cafile=getattr(a, "tls_ca", None) or None)
def _env_path(name: str) -> pathlib.Path | None:
    v = os.environ.get(name)
    return pathlib.Path(v) if v else None


def add_auth_flags(p: argparse.ArgumentParser, role: str) -> None:
    """The credential flags of one command (docs/security.md, "Authentication"), defaults from
    DML_* variables. ``role``: "coordinator" (--join-token-file, --operator-token-file,
    --no-auth), "peer" (--join-token-file) or "client" (--token-file)."""
    if role == "client":
        p.add_argument("--token-file", type=pathlib.Path, default=_env_path("DML_TOKEN_FILE"),
                       help="file holding the operator token (env DML_TOKEN_FILE; the coordinator makes it as "
                            "STATE_DIR/secrets/operator.token; default: none, for a coordinator run with --no-auth)")
        return
    if role not in ("coordinator", "peer"):
        raise ValueError(f"unknown role {role!r}")
    join_help = ("file holding the join token peers register with, made there (0600) if missing (env "
                 "DML_JOIN_TOKEN_FILE; default: STATE_DIR/secrets/join.token)" if role == "coordinator" else
                 "file holding the cluster's join token (env DML_JOIN_TOKEN_FILE; the coordinator makes it as "
                 "STATE_DIR/secrets/join.token; default: none, for a coordinator run with --no-auth)")
    p.add_argument("--join-token-file", type=pathlib.Path, default=_env_path("DML_JOIN_TOKEN_FILE"), help=join_help)
    if role == "coordinator":
        p.add_argument("--operator-token-file", type=pathlib.Path, default=_env_path("DML_OPERATOR_TOKEN_FILE"),
                       help="file holding the operator token job control needs, made there (0600) if missing "
                            "(env DML_OPERATOR_TOKEN_FILE; default: STATE_DIR/secrets/operator.token)")
        p.add_argument("--no-auth", action="store_true", default=os.environ.get("DML_NO_AUTH", "") not in ("", "0"),
                       help="accept every call without credentials (env DML_NO_AUTH=1); only on a loopback --host")
def add_tls_flags(p: argparse.ArgumentParser) -> None:
    """``--tls-cert --tls-key --tls-ca --tls-server-name``, the same on every command (env
    DML_TLS_CERT, DML_TLS_KEY, DML_TLS_CA, DML_TLS_SERVER_NAME). Read them with :func:`tls_config`."""
    g = p.add_argument_group("TLS", "PEM files of this process's certificate and key and of the cluster's CA "
                                    "(`dml certs` makes them); without them, plain text on loopback only")
    g.add_argument("--tls-cert", default=os.environ.get("DML_TLS_CERT") or None,
                   help="this process's certificate (env DML_TLS_CERT; default: none, plain text)")
    g.add_argument("--tls-key", default=os.environ.get("DML_TLS_KEY") or None,
                   help="its private key, unencrypted (env DML_TLS_KEY; default: none)")
    g.add_argument("--tls-ca", default=os.environ.get("DML_TLS_CA") or None,
                   help="the cluster's CA certificate: servers are verified against it, and a server "
                        "given it requires client certificates it signed (env DML_TLS_CA; default: none, "
                        "the system's roots to verify servers, no client certificates asked)")
    g.add_argument("--tls-server-name", default=os.environ.get("DML_TLS_SERVER_NAME", tls.CLUSTER_NAME),
                   help="the name to verify in servers' certificates, '' for the host dialed (env DML_TLS_SERVER_NAME)")


def tls_config(p: argparse.ArgumentParser, a: argparse.Namespace, serve: bool = False) -> tls.TlsConfig | None:
    """The TLS config the flags of :func:`add_tls_flags` name (None: plain text). A bad, missing
    or unreadable file is a usage error (one line, exit 2); with ``serve`` (a command that
    listens) a CA alone is one too, as a server needs its own certificate."""
    try:
        cfg = tls.load(a.tls_cert, a.tls_key, a.tls_ca, a.tls_server_name)
    except tls.TlsError as e:
        p.error(str(e))
    if serve and cfg is not None and not cfg.can_serve:
        p.error("serving TLS needs --tls-cert and --tls-key (besides --tls-ca)")
    return cfg


CLUSTER_ID_CHARS = frozenset("0123456789abcdef")


def cluster_id(text: str) -> str:
    """An argparse type: a cluster id as a coordinator makes them (32 hex digits), or "" (none)."""
    v = text.strip().lower()
    if (v and len(v) != 32) or not set(v) <= CLUSTER_ID_CHARS:
        raise argparse.ArgumentTypeError(f"a cluster id is 32 hex digits (the coordinator logs its own), got {text!r}")
    return v


def add_cluster_flag(p: argparse.ArgumentParser) -> None:
    """``--cluster-id`` (env DML_CLUSTER_ID): the cluster a peer belongs to. Without it a peer
    belongs to the cluster of the first coordinator that registers it."""
    p.add_argument("--cluster-id", type=cluster_id, default=os.environ.get("DML_CLUSTER_ID") or "",
                   help="refuse any coordinator of another cluster (its state dir's id, 32 hex digits, "
                        "logged at its start); default: the cluster of the first coordinator joined")


def run_quietly(main: Callable[[], int | None]) -> NoReturn:
    """Runs ``main`` and exits with its code. When stdout is a pipe that closed early (``| head``)
    the process ends quietly with 141, as a tool killed by SIGPIPE does, with no traceback."""
    try:
        try:
            code: int | str | None = main()
        except SystemExit as e:  # argparse's --help and usage errors: flush their output here too
            code = e.code
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that flush has nowhere to fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141
    sys.exit(code)
