"""Harnesses for the network conformance suite (tests/net/conformance.py).

The same async tests run against every network kind through one small protocol,
``NetHarness``: start n nodes whose sinks record events, wait for a condition, crash a
node, let time pass. ``net_harness`` is parametrised over ["sim", "libp2p"]; the libp2p
case skips cleanly when ``p2pfl.net.libp2p.Libp2pNetwork`` is not there.

conformance.py is not named test_*.py (it is a suite, not one network's tests), so
``pytest_collect_file`` below collects it explicitly.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest
import trio

from p2pfl.identity import Identity
from p2pfl.net.base import BlobReader, MayServe, NetEvent, Network, allow_all
from p2pfl.net.sim import LinkModel, SimHub

NET_KINDS = ["sim", "libp2p"]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.name == "conformance.py" and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


class NetHarness(Protocol):
    events: list[list[NetEvent]]

    async def start(
        self,
        n: int,
        *,
        topology: str = "full",
        blobs: list[dict[str, bytes]] | None = None,
        may_serve: list[MayServe | None] | None = None,
    ) -> list[Network]:
        """n nodes; node i's sink appends to events[i]; blobs[i] = {cid: bytes} served by i,
        to the peers may_serve[i] allows (default: all).
        topology: "full" (everyone linked) or "star" (everyone linked to node 0)."""
        ...

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Until predicate() is true; raises TimeoutError after `timeout` seconds (virtual
        seconds for the sim)."""
        ...

    async def settle(self, seconds: float) -> None:
        """Let `seconds` pass (to catch duplicates, or let a mesh form)."""
        ...

    async def stop_node(self, i: int) -> None:
        """Crash node i (sim: hub.crash; libp2p: cancel its host)."""
        ...

    async def close(self) -> None: ...


def _reader(blobs: dict[str, bytes]) -> BlobReader:
    def read(cid: str, offset: int, length: int) -> bytes | None:
        blob = blobs.get(cid)
        return None if blob is None else blob[offset : offset + length]

    return read


def _identities(n: int) -> list[Identity]:
    # Fixed seeds: peer ids (and so sim runs) are the same from one test run to the next.
    return [Identity.from_seed(bytes([i + 1]) * 32) for i in range(n)]


class SimHarness:
    """The simulated network; every wait runs the hub in virtual time (no wall clock)."""

    def __init__(self, seed: int = 1) -> None:
        self.hub = SimHub(
            seed=seed, link=LinkModel(latency_ms=10, bandwidth_mbps=100), detect_s=1.0
        )
        self.events: list[list[NetEvent]] = []
        self.nets: list[Network] = []

    async def start(
        self,
        n: int,
        *,
        topology: str = "full",
        blobs: list[dict[str, bytes]] | None = None,
        may_serve: list[MayServe | None] | None = None,
    ) -> list[Network]:
        for i, ident in enumerate(_identities(n)):
            self.events.append([])
            reader = _reader(blobs[i] if blobs else {})
            hook = may_serve[i] if may_serve else None
            self.nets.append(self.hub.add_node(ident.peer_id, self.events[i].append, reader, hook))
        self.hub.apply_topology(topology)
        return list(self.nets)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        self.hub.run(stop=predicate, until=self.hub.now + timeout)
        if not predicate():
            raise TimeoutError(f"condition not met within {timeout} virtual seconds")

    async def settle(self, seconds: float) -> None:
        self.hub.run(until=self.hub.now + seconds)

    async def stop_node(self, i: int) -> None:
        self.hub.crash(self.nets[i].peer_id)

    async def close(self) -> None:
        pass


class Libp2pHarness:
    """Real py-libp2p hosts on 127.0.0.1; the harness owns the nursery they run in."""

    def __init__(self, nursery: trio.Nursery, module: Any) -> None:
        self._nursery = nursery
        self._mod = module
        self.events: list[list[NetEvent]] = []
        self.nets: list[Network] = []
        self._scopes: list[trio.CancelScope] = []

    async def start(
        self,
        n: int,
        *,
        topology: str = "full",
        blobs: list[dict[str, bytes]] | None = None,
        may_serve: list[MayServe | None] | None = None,
    ) -> list[Network]:
        for i, ident in enumerate(_identities(n)):
            self.events.append([])
            hook = (may_serve[i] if may_serve else None) or allow_all
            if i == 0:
                boot: list[str] = []
            elif topology == "star":
                boot = self.nets[0].listen_addrs()[:1]
            else:  # "full": dial every earlier node, so the mesh needs no discovery
                boot = [net.listen_addrs()[0] for net in self.nets]
            config = self._mod.Libp2pConfig(
                listen=["/ip4/127.0.0.1/tcp/0"],
                bootstrap=boot,
                liveness_interval_s=0.5,
                liveness_timeout_s=2.0,
            )
            net = self._mod.Libp2pNetwork(
                ident,
                config,
                sink=self.events[i].append,
                blob_reader=_reader(blobs[i] if blobs else {}),
                may_serve=hook,
            )
            scope = trio.CancelScope()
            self._scopes.append(scope)
            await self._nursery.start(_run_in_scope, net, scope)
            self.nets.append(net)
        return list(self.nets)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        with trio.move_on_after(timeout):
            while not predicate():
                await trio.sleep(0.02)
            return
        raise TimeoutError(f"condition not met within {timeout} s")

    async def settle(self, seconds: float) -> None:
        await trio.sleep(seconds)

    async def stop_node(self, i: int) -> None:
        self._scopes[i].cancel()
        await trio.sleep(0)

    async def close(self) -> None:
        for scope in self._scopes:
            scope.cancel()


async def _run_in_scope(
    net: Any, scope: trio.CancelScope, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    with scope:
        await net.run(task_status=task_status)


def _libp2p_module() -> Any:
    try:
        mod = importlib.import_module("p2pfl.net.libp2p")
    except ImportError as exc:
        pytest.skip(f"p2pfl.net.libp2p not importable: {exc}")
    if not hasattr(mod, "Libp2pNetwork") or not hasattr(mod, "Libp2pConfig"):
        pytest.skip("p2pfl.net.libp2p has no Libp2pNetwork/Libp2pConfig yet")
    return mod


@pytest.fixture(params=NET_KINDS)
async def net_harness(request: pytest.FixtureRequest) -> AsyncIterator[NetHarness]:
    if request.param == "sim":
        sim = SimHarness()
        yield sim
        await sim.close()
        return
    mod = _libp2p_module()
    async with trio.open_nursery() as nursery:
        real = Libp2pHarness(nursery, mod)
        try:
            yield real
        finally:
            await real.close()
            nursery.cancel_scope.cancel()
