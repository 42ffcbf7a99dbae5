"""What a node advertises, and binding its listen ports exclusively.

A node listening on a wildcard (``/ip4/0.0.0.0/tcp/4110``) must never advertise the
wildcard: a peer dialling 0.0.0.0 reaches itself. It advertises each interface's address
instead (loopback last: useful only to nodes on the same machine), or, when the operator
says what is reachable from outside (`--announce`, a NAT's public address, a DNS name),
exactly that list.

py-libp2p 0.8.1 opens its TCP listeners with SO_REUSEPORT (for hole punching, which
p2pfl does not use): on Linux a second process of the same user then binds the same port
without an error, and the kernel spreads incoming connections over both. `exclusive_tcp_bind`
switches that off, so a port in use fails to bind as it should.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any

import multiaddr

from p2pfl.errors import LocalProtocolError

_WILDCARDS = {"0.0.0.0": "ip4", "::": "ip6"}


def interface_ips() -> dict[str, list[str]]:
    """{"ip4": [...], "ip6": [...]}: this machine's interface addresses, loopback last,
    IPv6 link-local left out (not dialable without a zone)."""
    import psutil

    found: dict[str, list[str]] = {"ip4": [], "ip6": []}
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family == socket.AF_INET:
                kind = "ip4"
            elif entry.family == socket.AF_INET6:
                kind = "ip6"
            else:
                continue
            try:
                ip = ipaddress.ip_address(entry.address.split("%", 1)[0])
            except ValueError:
                continue
            if ip.is_link_local or ip.is_unspecified or str(ip) in found[kind]:
                continue
            found[kind].append(str(ip))
    for kind, ips in found.items():
        found[kind] = sorted(ips, key=lambda a: ipaddress.ip_address(a).is_loopback)
    return found


def strip_p2p(addr: str) -> str:
    """The transport part of a multiaddr (without /p2p/<id>)."""
    return addr.split("/p2p/", 1)[0]


def check_announce(addrs: Sequence[str], peer_id: str) -> list[str]:
    """Announce addresses, without their /p2p/ part; a wildcard or another peer's id is
    refused (it would send peers nowhere, or to someone else)."""
    out = []
    for addr in addrs:
        try:
            ma = multiaddr.Multiaddr(addr)
        except Exception as exc:
            raise LocalProtocolError(f"--announce {addr!r} is not a multiaddr ({exc})") from None
        parts = str(ma).split("/")
        if len(parts) > 2 and parts[2] in _WILDCARDS:
            raise LocalProtocolError(
                f"--announce {addr}: {parts[2]} is not an address a peer can dial"
            )
        if "/p2p/" in addr and not addr.endswith(f"/p2p/{peer_id}"):
            raise LocalProtocolError(f"--announce {addr}: its /p2p/ is not this node's id")
        if strip_p2p(str(ma)) not in out:
            out.append(strip_p2p(str(ma)))
    return out


def expand_wildcards(addrs: Sequence[str], ips: dict[str, list[str]]) -> list[str]:
    """Each wildcard listen address replaced by one address per (non-loopback) interface."""
    out: list[str] = []
    for addr in addrs:
        parts = strip_p2p(addr).split("/")
        kind = _WILDCARDS.get(parts[2]) if len(parts) > 2 else None
        if kind is None or parts[1] != kind:
            candidates = [strip_p2p(addr)]
        else:
            candidates = ["/".join([*parts[:2], ip, *parts[3:]]) for ip in ips[kind]]
        out += [c for c in candidates if c not in out]
    # A wildcard's loopback address is left out when the machine has another one: a peer
    # elsewhere that dials 127.0.0.1 reaches a node of its own machine (on the same port,
    # often itself). Loopback listen addresses given explicitly stay, last.
    explicit = {strip_p2p(a) for a in addrs}
    if any(not _is_loopback(a) for a in out):
        out = [a for a in out if not _is_loopback(a) or a in explicit]
    return sorted(out, key=_is_loopback)


def local_addrs(transport: Sequence[str], advertised: Sequence[str]) -> set[str]:
    """Every address (without /p2p/) that reaches this node: what it listens on, a
    wildcard as each interface's address, loopback included, and what it advertises."""
    ips = interface_ips()
    out = {strip_p2p(a) for a in [*transport, *advertised]}
    for addr in transport:
        parts = strip_p2p(addr).split("/")
        kind = _WILDCARDS.get(parts[2]) if len(parts) > 2 else None
        if kind is not None and parts[1] == kind:
            out |= {"/".join([*parts[:2], ip, *parts[3:]]) for ip in ips[kind]}
    return out


def _is_loopback(addr: str) -> bool:
    parts = addr.split("/")
    try:
        return len(parts) > 2 and ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        return False  # a DNS name


def addrs_factory(announce: Sequence[str]) -> Callable[[list[Any]], list[Any]]:
    """The host's address policy (py-libp2p calls it on every identify and signed record):
    the announce list when given, else the listen addresses with wildcards expanded.
    Interfaces are read once: the factory runs for many RPCs."""
    if announce:
        fixed = [multiaddr.Multiaddr(a) for a in announce]
        return lambda _candidates: list(fixed)
    ips = interface_ips()
    cache: dict[tuple[str, ...], list[Any]] = {}

    def factory(candidates: list[Any]) -> list[Any]:
        key = tuple(str(c) for c in candidates)
        got = cache.get(key)
        if got is None:
            got = [multiaddr.Multiaddr(a) for a in expand_wildcards(key, ips)]
            cache.clear()
            cache[key] = got
        return list(got)

    return factory


def exclusive_tcp_bind() -> None:
    """Make py-libp2p's TCP listeners bind like any server: SO_REUSEADDR (restart while
    old connections sit in TIME_WAIT) but not SO_REUSEPORT. Idempotent."""
    import libp2p.transport.tcp.tcp as tcp_mod

    def reuse_addr_only(sock: Any) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        except OSError:
            pass

    tcp_mod._set_reuse_flags = reuse_addr_only


def bind_problem(addr: str) -> str:
    """Why a TCP listen address cannot be bound, in words (binding it once, plainly)."""
    parts = strip_p2p(addr).split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return "only /ip4/.../tcp/PORT and /ip6/.../tcp/PORT can be listened on"
    family = socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((parts[2], int(parts[4])))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (
                f"port {parts[4]} is already in use (another node? pick a free port,"
                " or tcp/0 for any)"
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"no interface of this machine has the address {parts[2]}"
        if exc.errno == errno.EACCES:
            return f"port {parts[4]} needs privileges (use a port above 1023)"
        return exc.strerror or str(exc)
    return "py-libp2p could not listen there (see the log)"
