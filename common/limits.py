"""Length limits on the strings requests carry, and what a dialable peer address is.

Every string a request carries (ids, digests, names, addresses) is at most :data:`MAX_ID_BYTES`,
free text (a failure's detail) at most :data:`MAX_DETAIL_BYTES`, and bytes fields that are not
payloads at most :data:`MAX_KEY_BYTES`; servicers refuse a longer one with INVALID_ARGUMENT
(:func:`message_error`). A peer's advertised address must be one others can dial
(:func:`dialable_address`).
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from dml.common import rpc

MAX_ID_BYTES = 256  # ids, digests, names, addresses
MAX_DETAIL_BYTES = 4096  # free text: a failure's detail
MAX_KEY_BYTES = 256  # bytes fields that are keys or tokens, not payloads
MAX_WORKERS = 64  # a peer's training workers (dml-peer --workers / --gpus; PeerCapability.workers)
PAYLOAD_FIELDS = frozenset({"data", "labels", "task_code"})  # bytes fields bounded by the message size limit instead
# (task_code: a job's task bundle, bounded by the coordinator's --max-task-code-bytes too)
TEXT_FIELDS: Mapping[str, int] = {"detail": MAX_DETAIL_BYTES}
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _too_long(name: str, n: int, limit: int) -> str:
    return f"{name} is {n} bytes; at most {limit} are allowed"


def message_error(msg: Message, prefix: str = "") -> str:
    """Why ``msg`` carries a string or key longer than its limit ("" if none does); nested
    messages (a job's spec, a peer's capability) are checked too."""
    for fd, value in msg.ListFields():
        name = f"{prefix}{fd.name}"
        repeated = fd.is_repeated
        values = list(value) if repeated else [value]
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                continue  # no request carries a map of strings
            for v in values:
                err = message_error(v, f"{name}.")
                if err:
                    return err
        elif fd.type == FieldDescriptor.TYPE_STRING:
            limit = TEXT_FIELDS.get(fd.name, MAX_ID_BYTES)
            for v in values:
                n = len(v.encode("utf-8", "surrogatepass"))
                if n > limit:
                    return _too_long(name, n, limit)
        elif fd.type == FieldDescriptor.TYPE_BYTES and fd.name not in PAYLOAD_FIELDS:
            for v in values:
                if len(v) > MAX_KEY_BYTES:
                    return _too_long(name, len(v), MAX_KEY_BYTES)
    return ""


def string_error(name: str, value: str, limit: int = MAX_ID_BYTES) -> str:
    """Why ``value`` (a metadata value, say) is too long ("" if it is not)."""
    n = len(value.encode("utf-8", "surrogatepass"))
    return _too_long(name, n, limit) if n > limit else ""


def dialable_address(address: str) -> tuple[str, int]:
    """Checks that ``address`` is one other machines can dial: ``HOST:PORT`` within
    :data:`MAX_ID_BYTES`, the host an IP address (not a wildcard such as 0.0.0.0 or ::, nor a
    multicast one) or a DNS name, the port 1..65535. Returns (host, port); ValueError says
    what is wrong."""
    if len(address.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise ValueError(f"address is longer than {MAX_ID_BYTES} bytes")
    host, port = rpc.parse_address(address)
    bare = host[1:-1] if host.startswith("[") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        if host.startswith("[") or not _is_dns_name(host):
            raise ValueError(f"address host {host!r} is neither an IP address nor a DNS name") from None
        return host, port
    if ip.is_unspecified:
        raise ValueError(f"address host {host} is a wildcard, which nobody can dial; advertise this machine's address")
    if ip.is_multicast:
        raise ValueError(f"address host {host} is a multicast address")
    return host, port


def _is_dns_name(host: str) -> bool:
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_DNS_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()
