"""A hostile peer floods a real node; the node's memory stays bounded and it keeps answering.

The attacker is a Libp2pNetwork in the test process, bootstrapped to one `p2pfl node`
process. It sends (a) 3,000 direct messages of 400 KB and (b) 600 gossip messages of
450 KB on the tasks topic, first junk (fails to decode), then valid signed TaskOffers of
the same size. After each flood the node's RSS must be within 200 MB of where it started,
and `p2pfl peers --json` must have answered throughout.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from p2pfl.core.messages import NONCE_BYTES, TASK_ID_HEX, TOPIC_TASKS, TaskOffer
from p2pfl.core.offer import derive_task_id
from p2pfl.identity import Identity
from p2pfl.memtrim import TRIM_EVERY_S
from p2pfl.net.base import NetEvent
from p2pfl.net.libp2p import Libp2pConfig, Libp2pNetwork, _host, _network
from p2pfl.wire import encode, seal
from tests.e2e.cluster import Cluster, p2pfl_argv

pytestmark = pytest.mark.slow

MB = 1024 * 1024
RSS_SLACK = 200 * MB
DIRECT_N, DIRECT_SIZE = 3000, 400_000
GOSSIP_N, GOSSIP_SIZE = 600, 450_000
# How long the node gets at most to drain and settle after a flood before RSS is compared.
SETTLE_S = 60.0
# A `p2pfl peers` call during the flood must answer within this.
PEERS_TIMEOUT_S = 20.0


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def _peers_ok(node: Any) -> list[dict[str, Any]]:
    """`p2pfl peers --json` against the node; its parsed answer (raises if it fails)."""
    argv = p2pfl_argv("peers", "--data-dir", str(node.data_dir), "--json")
    with trio.fail_after(PEERS_TIMEOUT_S):
        proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    peers: list[dict[str, Any]] = json.loads(proc.stdout)["peers"]
    return peers


async def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise TimeoutError(f"{what} not within {timeout} s")


def _junk(size: int) -> bytes:
    # 0xc1 is never valid msgpack: the node's decoder fails on the first byte, cheaply.
    return bytes([0xC1]) + os.urandom(size - 1)


def _big_offer(attacker: Identity, i: int, size: int) -> bytes:
    """A valid signed TaskOffer of about `size` bytes (the bulk is in params)."""
    now = time.time()
    offer = TaskOffer(
        task_id="0" * TASK_ID_HEX,  # replaced below by the id derived from the contents
        cid="bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
        name="flood",
        version="1.0.0",
        type="training",
        publisher=attacker.peer_id,
        params={"pad": "x" * size},
        protocol="fedavg",
        aggregator="fedavg",
        rounds=1,
        min_nodes=1,
        max_nodes=2,
        fanout=1,
        mu=0.0,
        dp=None,
        inputs=("data",),
        created=now,
        volunteer_deadline=now + 3600,
        round_timeout_s=60.0,
        nonce=os.urandom(NONCE_BYTES),
    )
    return encode(seal(attacker, replace(offer, task_id=derive_task_id(offer))))


class Attacker:
    """A raw Libp2pNetwork bootstrapped to the node, run in the test's nursery."""

    def __init__(self, node_addr: str) -> None:
        self.identity = Identity.generate()
        self.events: list[NetEvent] = []
        self.net = Libp2pNetwork(
            self.identity, Libp2pConfig(bootstrap=[node_addr]), sink=self.events.append
        )

    def hears_topic(self, peer: str, topic: str) -> bool:
        """The attacker's pubsub knows `peer` subscribes to `topic` (publishes reach it)."""
        pubsub = self.net._pubsub
        subs = pubsub.peer_topics.get(topic, set()) if pubsub is not None else set()
        return any(str(p) == peer for p in subs)

    def attempted(self) -> int:
        """Messages sent, plus direct ones given up (the victim may drop a flooder)."""
        stats = self.net.stats()
        return stats.messages_sent + stats.extra.get("direct_dropped", 0)

    def gossip_backlog(self) -> int:
        """Bytes of gossip the attacker's pubsub still has queued for its peers."""
        pubsub = self.net._pubsub
        queues = pubsub.peer_queues.values() if pubsub is not None else ()
        return sum(getattr(q._queue, "bytes", 0) for q in queues)

    async def drain(self, before: int, n: int, timeout: float) -> None:
        """Until `n` more messages went out (direct: written; gossip: handed to pubsub,
        with at most a few MB of it still queued) since `before`."""
        await _wait(
            lambda: self.attempted() >= before + n and self.gossip_backlog() < 8 * MB,
            timeout,
            f"{n} messages sent",
        )


async def _flood(
    node: Any, attacker: Attacker, send: Callable[[int], None], n: int, timeout: float
) -> dict[str, Any]:
    """Send n messages with `send(i)` while polling `p2pfl peers`; RSS before/peak/after."""
    base = _rss(node.pid)
    peak = base
    answers = 0
    done = trio.Event()

    async def poll() -> None:
        nonlocal peak, answers
        while not done.is_set():
            # It must answer; whether it still lists the flooder is its own business (a
            # node may well drop a peer that floods it).
            await _peers_ok(node)
            answers += 1
            peak = max(peak, _rss(node.pid))
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        before = attacker.attempted()
        # Batches, so the attacker's own send queue stays small too.
        for start in range(0, n, 100):
            for i in range(start, min(n, start + 100)):
                send(i)
            await attacker.drain(before, min(n, start + 100), timeout)
            peak = max(peak, _rss(node.pid))
        # Let the node work through what it accepted and run its periodic heap trim
        # (p2pfl.memtrim), then measure once RSS is steady.
        start = trio.current_time()
        deadline = start + SETTLE_S
        after = _rss(node.pid)
        while trio.current_time() < deadline:
            await trio.sleep(1.0)
            now = _rss(node.pid)
            peak = max(peak, now)
            steady = abs(now - after) < 2 * MB
            after = now
            if steady and trio.current_time() - start > TRIM_EVERY_S + 1:
                break
        done.set()
    after = _rss(node.pid)
    return {"base_mb": base / MB, "peak_mb": peak / MB, "after_mb": after / MB, "answers": answers}


async def _run_case(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # The attacker ignores our own etiquette: its queues for the victim are unbounded (the
    # victim is another process, with the real bounds).
    monkeypatch.setattr(_host, "OUTBOUND_GOSSIP_PEER_BYTES", 1 << 40)
    monkeypatch.setattr(_network, "OUTBOUND_DIRECT_PEER_BYTES", 1 << 40)
    cluster = Cluster(tmp_path)
    node = None
    try:
        node = cluster.start_node("victim")
        attacker = Attacker(node.bootstrap_addr)
        async with trio.open_nursery() as nursery:
            await nursery.start(attacker.net.run)
            attacker.net.subscribe(TOPIC_TASKS)
            await _wait(lambda: bool(attacker.net.connected_peers()), 30, "attacker connected")
            victim_id = attacker.net.connected_peers()[0].peer_id
            await _wait(lambda: attacker.hears_topic(victim_id, TOPIC_TASKS), 30, "subscription")
            if case == "direct":
                data = _junk(DIRECT_SIZE)
                result = await _flood(
                    node, attacker, lambda i: attacker.net.send(victim_id, data), DIRECT_N, 300
                )
            elif case == "gossip-junk":
                data = _junk(GOSSIP_SIZE)
                result = await _flood(
                    node, attacker, lambda i: attacker.net.publish(TOPIC_TASKS, data), GOSSIP_N, 300
                )
            else:
                # Every offer distinct (another task id): nothing is deduplicated for free.
                result = await _flood(
                    node,
                    attacker,
                    lambda i: attacker.net.publish(
                        TOPIC_TASKS, _big_offer(attacker.identity, i, GOSSIP_SIZE - 2000)
                    ),
                    GOSSIP_N,
                    300,
                )
            nursery.cancel_scope.cancel()
        assert node.alive(), node.stderr_tail()
        result["drop_reports"] = node.stderr().count("dropping messages from")
        print(f"flood {case}: {result}")
        return result
    except BaseException:
        if node is not None:
            print(f"victim's stderr:\n{node.stderr_tail()}")
        raise
    finally:
        cluster.close()


@pytest.mark.parametrize("case", ["direct", "gossip-junk"])
async def test_flood_junk_keeps_rss_bounded(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = await _run_case(tmp_path, case, monkeypatch)
    assert result["answers"] >= 1
    assert (result["after_mb"] - result["base_mb"]) * MB < RSS_SLACK, result


async def test_flood_valid_large_offers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = await _run_case(tmp_path, "offers", monkeypatch)
    assert result["answers"] >= 1
    assert (result["after_mb"] - result["base_mb"]) * MB < RSS_SLACK, result
