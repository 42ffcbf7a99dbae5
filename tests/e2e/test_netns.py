"""Issue 14 item 4: nodes on separate hosts (network namespaces, each its own address),
joined as an operator would (a 0.0.0.0 listener, --announce, `p2pfl id` for the bootstrap
address, a fixed --bulk-port), running a fedavg task across them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Cluster, NodeProc, shard_datasets, split_digits
from tests.e2e.netns import Lan, nat_unavailable, netns_unavailable
from tests.e2e.test_tasks import FEDAVG, run_task, wait_ok

PORT = 4110
BULK_PORT = 4111


@pytest.fixture
def lan() -> Iterator[Lan]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    net = Lan(3)
    try:
        yield net
    finally:
        net.close()


def _only_lan_addrs(addrs: list[str], lan: Lan, i: int) -> None:
    assert not any("/0.0.0.0/" in a for a in addrs), addrs
    assert f"/ip4/{lan.ip(i)}/tcp/{PORT}" in [a.split("/p2p/")[0] for a in addrs], addrs


@pytest.mark.slow
def test_fedavg_across_three_hosts(cluster: Cluster, lan: Lan, digits_split: Path) -> None:
    datasets = shard_datasets(digits_split)
    # Host 0 listens on every interface, with a fixed bulk port (what a firewall opens).
    n0 = cluster.spawn(
        "n0",
        prefix=lan.host_prefix(0),
        listen=[f"/ip4/0.0.0.0/tcp/{PORT}"],
        datasets=datasets(0),
        extra=["--bulk-port", str(BULK_PORT)],
    )
    n0.wait_ready()
    me = cluster.cli_json("id", node=n0)
    assert me["running"] is True and me["peer_id"] == n0.peer_id
    _only_lan_addrs(me["addrs"], lan, 0)
    bootstrap = next(a for a in me["addrs"] if f"/{lan.ip(0)}/" in a)

    others: list[NodeProc] = []
    for i in (1, 2):
        node = cluster.spawn(
            f"n{i}",
            prefix=lan.host_prefix(i),
            listen=[f"/ip4/0.0.0.0/tcp/{PORT}"],
            datasets=datasets(i),
            bootstrap=[bootstrap],
            trust=[n0.peer_id],
            # What this host tells others to dial (here its LAN address, as a NAT's
            # public address would be announced).
            extra=["--announce", f"/ip4/{lan.ip(i)}/tcp/{PORT}"],
        )
        others.append(node)
    cluster.wait_ready(others)
    nodes = [n0, *others]
    cluster.wait_connected(nodes, timeout=120)

    # Each node knows the others by their LAN addresses only (an announce is exact).
    for i, node in enumerate(nodes):
        peers = cluster.cli_json("peers", node=node)["peers"]
        for peer in peers:
            j = next(k for k, n in enumerate(nodes) if n.peer_id == peer["peer_id"])
            _only_lan_addrs(peer["addrs"], lan, j)
            if j > 0:
                assert [a.split("/p2p/")[0] for a in peer["addrs"]] == [
                    f"/ip4/{lan.ip(j)}/tcp/{PORT}"
                ], (i, peer)

    task_id = run_task(cluster, n0, FEDAVG, "rounds=2")
    wait_ok(cluster, n0, task_id)
    result = cluster.cli_json("result", task_id, node=n0)
    assert result["status"] == "succeeded", result
    assert sorted(result["participants"]) == sorted(n.peer_id for n in nodes)
    assert result["rounds"] == 2 and result["model_cid"]


@pytest.fixture
def nat_lan() -> Iterator[Lan]:
    reason = netns_unavailable() or nat_unavailable()
    if reason is not None:
        pytest.skip(reason)
    net = Lan(2)
    try:
        yield net
    finally:
        net.close()


@pytest.mark.slow
def test_fedavg_with_two_nodes_behind_nats_through_a_relay(
    cluster: Cluster, nat_lan: Lan, tmp_path: Path
) -> None:
    """n0 (a relay) and n1 on the LAN; n2 and n3 each behind a NAT of its own. Nothing can
    dial n2 or n3; they dial out, and reach each other only through n0's relay."""
    lan = nat_lan
    datasets = shard_datasets(split_digits(tmp_path / "split4", nodes=4))
    n0 = cluster.spawn(
        "n0",
        prefix=lan.host_prefix(0),
        listen=[f"/ip4/0.0.0.0/tcp/{PORT}"],
        datasets=datasets(0),
        extra=["--relay-service"],
    )
    n0.wait_ready()
    relay = f"/ip4/{lan.ip(0)}/tcp/{PORT}/p2p/{n0.peer_id}"
    n1 = cluster.spawn(
        "n1",
        prefix=lan.host_prefix(1),
        listen=[f"/ip4/0.0.0.0/tcp/{PORT}"],
        datasets=datasets(1),
        bootstrap=[relay],
        trust=[n0.peer_id],
    )
    natted = []
    for i in (2, 3):
        k = lan.add_natted_host()
        natted.append(
            cluster.spawn(
                f"n{i}",
                prefix=lan.host_prefix(k),
                listen=[f"/ip4/0.0.0.0/tcp/{PORT}"],
                datasets=datasets(i),
                bootstrap=[relay],
                trust=[n0.peer_id],
                extra=["--relay-via", relay],
            )
        )
    nodes = [n0, n1, *natted]
    cluster.wait_ready(nodes[1:])
    cluster.wait_connected(nodes, timeout=180)

    # The NATed nodes know each other only by their circuit addresses through n0.
    n2, n3 = natted
    peers = {p["peer_id"]: p for p in cluster.cli_json("peers", node=n2)["peers"]}
    assert f"{relay}/p2p-circuit/p2p/{n3.peer_id}" in peers[n3.peer_id]["addrs"]

    task_id = run_task(cluster, n0, FEDAVG, "rounds=2")
    wait_ok(cluster, n0, task_id)
    result = cluster.cli_json("result", task_id, node=n0)
    assert result["status"] == "succeeded", result
    assert sorted(result["participants"]) == sorted(n.peer_id for n in nodes)
