"""ClusterBase without a network: a stand-in world records which hooks were called."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pfl.net.base import NetStats
from p2pfl.sim.cluster import ClusterSpec, RoundRecord
from p2pfl.sim.cluster_base import ClusterBase


class World(ClusterBase):
    def __init__(self, spec: ClusterSpec) -> None:
        super().__init__(spec)
        self.calls: list[tuple[Any, ...]] = []
        self.counters = {i: NetStats() for i in range(spec.nodes)}
        self._remove_tmp()  # nothing is unpacked here

    def _schedule(self, fn: Callable[[], None]) -> None:
        fn()

    def _stats(self, index: int) -> NetStats:
        return self.counters[index]

    def _crash_node(self, index: int) -> None:
        self.calls.append(("crash", index))

    def _restart_node(self, index: int) -> None:
        self.calls.append(("restart", index))

    def _partition(self, groups: list[list[int]]) -> None:
        self.calls.append(("partition", groups))

    def _heal(self) -> None:
        self.calls.append(("heal",))


def _spec(**kw: Any) -> ClusterSpec:
    base: dict[str, Any] = dict(
        seed=3, nodes=3, taskpack_dir=Path("pack"), node_data=[Path("d")] * 3, input_name="x"
    )
    base.update(kw)
    return ClusterSpec(**base)


def test_offer_overrides_flatten_params_and_dp() -> None:
    world = World(_spec(params={"rounds": 4, "opt": {"lr": 0.1}, "name": "m"}, dp={"noise": 1}))
    assert world._offer_overrides() == {
        "rounds": "4",
        "opt.lr": "0.1",
        "name": "m",
        "max_nodes": "3",  # a scenario of N nodes means N participants
        "min_nodes": "2",
        "differential_privacy.enabled": "true",
        "differential_privacy.noise": "1",
    }
    assert World(_spec(params={"max_nodes": 2}))._offer_overrides()["max_nodes"] == "2"


def test_faults_play_once_each_at_their_round() -> None:
    world = World(
        _spec(
            faults=[
                {"round": 1, "crash": [1]},
                {"round": 2, "partition": [[0], [1, 2]]},
                {"round": 3, "heal": True, "restart": [1, 2]},  # 2 never crashed
            ]
        )
    )
    world._apply_faults()  # before round 1
    assert world.calls == [("crash", 1)]
    world._apply_faults()
    assert world.calls == [("crash", 1)]  # once only
    world._closed_round = 1  # round 1 closed, but not every node has finished it yet
    world._apply_faults()
    assert world.calls == [("crash", 1)]
    world._round_done = 1  # every live participant evaluated round 1: round 2's faults play
    world._apply_faults()
    assert world.calls[-1] == ("partition", [[0], [1, 2]])
    world._closed_round = 3  # fallback: round 3 closed somewhere (a partitioned node lags)
    world._apply_faults()
    assert world.calls[-2:] == [("heal",), ("restart", 1)]
    assert world._crashed == set()


def test_records_count_bytes_since_the_last_and_fill_missing_rows() -> None:
    world = World(_spec())
    world.counters[0] = NetStats(bytes_sent=100, bytes_received=40)
    world._collect(0, 1, {"model_cid": "c1", "accuracy": 0.5, "epsilon": 2})
    world.counters[0] = NetStats(bytes_sent=250, bytes_received=100)
    world._collect(0, 2, {"model_cid": "c2", "loss": 1})
    world._record(1, 1, {"model_cid": "c1"}, NetStats(bytes_sent=7, bytes_received=9))
    assert world.records == [
        RoundRecord(0, 1, 0.5, None, 100, 40, 2.0, True),
        RoundRecord(0, 2, None, 1.0, 150, 60, None, True),
        RoundRecord(1, 1, None, None, 7, 9, None, True),
    ]
    missing = list(world._missing_records())
    assert [(r.node, r.round, r.alive) for r in missing] == [
        (2, 1, False),
        (1, 2, False),
        (2, 2, False),
    ]
    assert len(world.records) == 6 and world.warnings == []
