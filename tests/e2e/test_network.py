"""Issue 2: nodes find each other, notice a dead peer, keep their identity across restarts,
and stop cleanly."""

from __future__ import annotations

import stat

import pytest

from tests.e2e.cluster import Cluster, NodeProc, wait_until

DROP_TIMEOUT = 30.0  # a SIGKILLed peer's TCP connections close at once; leave room for load


def _check_peers_shape(doc: dict, node: NodeProc) -> None:
    assert set(doc) == {"self", "peers"}, doc
    assert set(doc["self"]) == {"peer_id", "addrs", "datasets"}
    assert doc["self"]["peer_id"] == node.peer_id
    assert doc["self"]["addrs"] and all(
        a.startswith("/ip4/127.0.0.1/tcp/") for a in doc["self"]["addrs"]
    )
    assert isinstance(doc["peers"], list)
    for p in doc["peers"]:
        assert set(p) == {"peer_id", "addrs", "capabilities"}, p
        assert p["peer_id"].startswith("12D3KooW")
        assert p["capabilities"] is None or "cpus" in p["capabilities"]
        assert isinstance(p["addrs"], list)


def test_three_nodes_find_each_other_and_stop_cleanly(cluster: Cluster) -> None:
    """The default-suite smoke test: discovery through one bootstrap node, the peers JSON,
    the identity key's mode, a clean SIGTERM shutdown and the error on a dead node."""
    nodes = cluster.start(3)  # n1 and n2 know only n0; start() waits for full mesh
    ids = {n.peer_id for n in nodes}
    assert len(ids) == 3
    for node in nodes:
        doc = cluster.cli_json("peers", node=node)
        _check_peers_shape(doc, node)
        assert {p["peer_id"] for p in doc["peers"]} == ids - {node.peer_id}
        key = node.data_dir / "identity.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, oct(key.stat().st_mode)

    # A second node on a live data dir is refused before it joins the network (it would
    # do so under the running node's peer id): one-line error, no ready line.
    dup = cluster.spawn("dup", data_dir=nodes[1].data_dir)
    assert dup.proc.wait(timeout=60) != 0
    assert "listening on" not in dup.stdout()
    assert dup.stderr().strip().splitlines()[-1] == (
        f"error: a node is already running in {nodes[1].data_dir} (its control socket answers)"
    ), dup.stderr()
    assert cluster.peer_ids(nodes[1]) == ids - {nodes[1].peer_id}

    # SIGTERM: exit 0, no traceback, control socket removed.
    victim = nodes[2]
    code = victim.stop()
    victim.assert_clean_exit(code)
    assert not victim.socket_path.exists(), "control socket left behind after a clean stop"

    # A dead node and a data dir that never had one: one-line error, non-zero exit.
    for data_dir in (victim.data_dir, cluster.root / "never-a-node"):
        proc = cluster.cli("peers", "--data-dir", str(data_dir))
        assert proc.returncode != 0
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") == 1

    for node in nodes[:2]:
        node.assert_clean_exit(node.stop())


@pytest.mark.slow
def test_killed_peer_is_dropped_and_rejoins_with_same_identity(cluster: Cluster) -> None:
    n0, n1, n2 = cluster.start(3)

    n2.kill()  # SIGKILL: no goodbye
    for node in (n0, n1):
        wait_until(
            lambda node=node: n2.peer_id not in cluster.peer_ids(node),
            DROP_TIMEOUT,
            what=f"{node.name} dropping the killed {n2.name}",
        )
        assert cluster.peer_ids(node) == {n0.peer_id, n1.peer_id} - {node.peer_id}

    # A SIGKILLed node leaves its socket file; the next start must cope with it.
    again = cluster.restart(n2, bootstrap=[n0.bootstrap_addr])
    assert again.peer_id == n2.peer_id, "the peer id changed across a restart"
    cluster.wait_connected([n0, n1, again], timeout=DROP_TIMEOUT)
    doc = cluster.cli_json("peers", node=again)
    assert {p["peer_id"] for p in doc["peers"]} == {n0.peer_id, n1.peer_id}

    for node in (n0, n1, again):
        node.assert_clean_exit(node.stop())
        assert not node.socket_path.exists()
