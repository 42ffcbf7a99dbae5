"""Separate hosts on one machine: Linux network namespaces joined by a bridge.

`Lan(n)` makes n "hosts" (namespaces with their own loopback and one interface, eth0,
198.51.100.<i+1>/24, a documentation range) plugged by veth pairs into a bridge that
lives in a namespace of its own, so nothing of the machine's own networking changes.
`host_prefix(i)` is the command prefix that runs a program on host i. Everything is
deleted by `close()` (deleting a namespace deletes its interfaces).

Needs root and iproute2 (`ip netns`); `netns_unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

SUBNET = "198.51.100"


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _run_in(ns: str, *argv: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {ns}: {proc.stderr.strip()}")


def nat_unavailable() -> str | None:
    """Why a NAT namespace cannot be made here (a skip reason), or None."""
    return (
        None if shutil.which("iptables") else "iptables is not installed (apt-get install iptables)"
    )


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2 is not installed (apt-get install iproute2)"
    probe = f"p2pfl-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as exc:
        return f"ip netns add fails here: {exc}"
    try:
        _ip("netns", "del", probe)
    except RuntimeError:
        pass
    return None


class Lan:
    def __init__(self, hosts: int) -> None:
        self.tag = secrets.token_hex(2)
        self.bridge_ns = f"p2pfl-{self.tag}-lan"
        self.hosts = [f"p2pfl-{self.tag}-h{i}" for i in range(hosts)]
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        self._made.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts):
            _ip("netns", "add", ns)
            self._made.append(ns)
            # Interface names are at most 15 characters, and global until moved.
            inner, outer = f"pf{self.tag}h{i}", f"pf{self.tag}l{i}"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "netns", self.bridge_ns)
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.bridge_ns, "link", "set", outer, "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", outer, "up")

    def add_natted_host(self) -> int:
        """One more host, behind a NAT of its own: a router on the LAN (its next LAN
        address) masquerades the host's private subnet (100.64.K.0/24, carrier-grade NAT
        space); nothing on the LAN can open a connection to the host. Returns its index
        (host_prefix(index) runs a program there; its LAN-side address is the router's)."""
        k = len(self.hosts)
        router, host = f"p2pfl-{self.tag}-r{k}", f"p2pfl-{self.tag}-h{k}"
        _ip("netns", "add", router)
        self._made.append(router)
        _ip("netns", "add", host)
        self._made.append(host)
        self.hosts.append(host)
        wan_in, wan_out = f"pf{self.tag}w{k}", f"pf{self.tag}l{k}"
        _ip("link", "add", wan_in, "type", "veth", "peer", "name", wan_out)
        _ip("link", "set", wan_in, "netns", router)
        _ip("link", "set", wan_out, "netns", self.bridge_ns)
        _ip("-n", router, "link", "set", wan_in, "name", "eth0")
        _ip("-n", router, "addr", "add", f"{self.ip(k)}/24", "dev", "eth0")
        _ip("-n", router, "link", "set", "eth0", "up")
        _ip("-n", router, "link", "set", "lo", "up")
        _ip("-n", self.bridge_ns, "link", "set", wan_out, "master", "br0")
        _ip("-n", self.bridge_ns, "link", "set", wan_out, "up")
        lan_in, lan_out = f"pf{self.tag}p{k}", f"pf{self.tag}q{k}"
        _ip("link", "add", lan_in, "type", "veth", "peer", "name", lan_out)
        _ip("link", "set", lan_in, "netns", host)
        _ip("link", "set", lan_out, "netns", router)
        _ip("-n", host, "link", "set", lan_in, "name", "eth0")
        _ip("-n", host, "addr", "add", f"100.64.{k}.2/24", "dev", "eth0")
        _ip("-n", host, "link", "set", "eth0", "up")
        _ip("-n", host, "link", "set", "lo", "up")
        _ip("-n", host, "route", "add", "default", "via", f"100.64.{k}.1")
        _ip("-n", router, "addr", "add", f"100.64.{k}.1/24", "dev", lan_out)
        _ip("-n", router, "link", "set", lan_out, "up")
        _run_in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _run_in(
            router,
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            f"100.64.{k}.0/24",
            "-o",
            "eth0",
            "-j",
            "MASQUERADE",
        )
        return k

    @staticmethod
    def ip(i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def host_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[i]]

    def close(self) -> None:
        for ns in reversed(self._made):
            try:
                _ip("netns", "del", ns)
            except RuntimeError:
                pass
        self._made.clear()
