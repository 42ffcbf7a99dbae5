"""What a node advertises (--announce, wildcards), exclusive listen ports, the bulk port."""

from __future__ import annotations

import socket

import pytest
import trio
from libp2p.peer.id import ID

from p2pfl.errors import LocalProtocolError
from p2pfl.identity import Identity
from p2pfl.net.libp2p._addrs import addrs_factory, check_announce, expand_wildcards, strip_p2p
from tests.net.test_libp2p import WAIT_S, start_node

IPS = {"ip4": ["192.0.2.10", "127.0.0.1"], "ip6": ["2001:db8::1", "::1"]}


def test_wildcards_become_interface_addresses_loopback_last() -> None:
    got = expand_wildcards(
        ["/ip4/127.0.0.1/tcp/9", "/ip4/0.0.0.0/tcp/4110/p2p/12D3KooWx", "/ip6/::/tcp/4111"],
        IPS,
    )
    # A wildcard's loopback addresses are left out (a peer elsewhere dialling 127.0.0.1
    # reaches its own machine); an explicit loopback listener stays, last.
    assert got == [
        "/ip4/192.0.2.10/tcp/4110",
        "/ip6/2001:db8::1/tcp/4111",
        "/ip4/127.0.0.1/tcp/9",
    ]
    only_loopback = {"ip4": ["127.0.0.1"], "ip6": []}
    assert expand_wildcards(["/ip4/0.0.0.0/tcp/1"], only_loopback) == ["/ip4/127.0.0.1/tcp/1"]
    assert not any("0.0.0.0" in a or "/::/" in a for a in got)


def test_announce_is_checked() -> None:
    me = Identity.generate().peer_id
    other = Identity.generate().peer_id
    assert check_announce(
        ["/dns4/fl.example.org/tcp/4110", f"/ip4/203.0.113.7/tcp/1/p2p/{me}"], me
    ) == [
        "/dns4/fl.example.org/tcp/4110",
        "/ip4/203.0.113.7/tcp/1",
    ]
    for bad, why in [
        ("/ip4/0.0.0.0/tcp/4110", "not an address a peer can dial"),
        (f"/ip4/203.0.113.7/tcp/1/p2p/{other}", "not this node's id"),
        ("not a multiaddr", "not a multiaddr"),
    ]:
        with pytest.raises(LocalProtocolError, match=why):
            check_announce([bad], me)


def test_addrs_factory_announce_replaces_candidates() -> None:
    import multiaddr

    factory = addrs_factory(["/ip4/203.0.113.7/tcp/4110"])
    got = factory([multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/4110")])
    assert [str(a) for a in got] == ["/ip4/203.0.113.7/tcp/4110"]


async def test_wildcard_listener_advertises_interfaces_not_0000(nursery: trio.Nursery) -> None:
    a = await start_node(nursery, listen=["/ip4/0.0.0.0/tcp/0"])
    own = a.net.listen_addrs()
    assert own and not any("/0.0.0.0/" in x for x in own)
    # What identify tells a peer: the same addresses.
    b = await start_node(nursery, bootstrap=[own[0]])
    await b.rec.wait_for(lambda ev: a.id in b.rec.connected())
    with trio.fail_after(WAIT_S):
        while not b.net._host.get_peerstore().addrs(ID.from_base58(a.id)):
            await trio.sleep(0.05)
    seen = [str(x) for x in b.net._host.get_peerstore().addrs(ID.from_base58(a.id))]
    assert not any("/0.0.0.0/" in x for x in seen)


async def test_announce_is_what_peers_learn(nursery: trio.Nursery) -> None:
    public = "/ip4/203.0.113.7/tcp/4110"
    a = await start_node(nursery, announce=[public])
    assert a.net.listen_addrs() == [f"{public}/p2p/{a.id}"]
    listen = str(a.net._host.get_transport_addrs()[0])
    b = await start_node(nursery, bootstrap=[f"{listen}/p2p/{a.id}"])
    await b.rec.wait_for(lambda ev: a.id in b.rec.connected())
    # Peer exchange and identify both carry the announced address (and only it).
    assert f"{public}/p2p/{a.id}" in b.net._book.addrs(a.id)

    def learned() -> list[str]:
        return [strip_p2p(str(x)) for x in b.net._host.get_peerstore().addrs(ID.from_base58(a.id))]

    with trio.fail_after(WAIT_S):
        while learned() != [public]:
            await trio.sleep(0.05)


async def _start_error(**config: object) -> LocalProtocolError:
    """The one error a node fails to start with (trio wraps it in exception groups)."""
    try:
        async with trio.open_nursery() as inner:
            await start_node(inner, **config)
    except BaseException as exc:
        leaves: list[BaseException] = [exc]
        while isinstance(leaves[0], BaseExceptionGroup):
            leaves = list(leaves[0].exceptions)
        assert len(leaves) == 1 and isinstance(leaves[0], LocalProtocolError), leaves
        return leaves[0]
    raise AssertionError("the node started")


async def test_listen_port_in_use_fails_with_a_clear_error(nursery: trio.Nursery) -> None:
    a = await start_node(nursery)
    port_addr = a.addr.split("/p2p/")[0]
    error = await _start_error(listen=[port_addr])
    assert f"cannot listen on {port_addr}: port" in str(error)
    assert "is already in use" in str(error)
    # Also against a socket that is not a libp2p node at all.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        error = await _start_error(listen=[f"/ip4/127.0.0.1/tcp/{port}"])
        assert f"port {port} is already in use" in str(error)


async def test_bulk_port_is_the_configured_one_and_checked(nursery: trio.Nursery) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    a = await start_node(nursery, bulk_port=free)
    assert a.net._bulk is not None and a.net._bulk.port == free
    error = await _start_error(bulk_port=free)
    assert f"cannot open the bulk port 127.0.0.1:{free}: Address already in use" in str(error)
    off = await start_node(nursery, bulk_tcp=False)
    assert off.net._bulk is None
