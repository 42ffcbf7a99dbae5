"""ClusterBase without a network: a stand-in world records which hooks were called."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

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


def _attacked(byzantine: dict[str, Any]) -> np.ndarray:
    """What byzantine node 0 sends instead of an honest update 2.0 away from the global
    model, through the scenario parser and the cluster's update hook."""
    from p2pfl.sim.runner import cluster_spec_kwargs
    from p2pfl.sim.scenario import parse
    from p2pfl.wire import decode_tensors, encode_tensors

    raw = {
        "name": "byz",
        "nodes": 3,
        "dataset": {"name": "digits"},
        "taskpack": "taskpacks/fedavg-mlp-digits",
        "params": {"rounds": 1},
        "byzantine": {"nodes": [0], **byzantine},
    }
    scenario = parse(raw, check_files=False)
    kwargs = cluster_spec_kwargs(
        scenario, seed=1, network="sim", node_data=[Path("d")] * 3, test_path=Path("t")
    )
    world = World(ClusterSpec(**{**kwargs, "taskpack_dir": Path("pack")}))
    global_ = bytes(encode_tensors({"w": np.zeros(4, np.float32)}))
    machine = SimpleNamespace(global_ref=SimpleNamespace(cid="g"))
    world.nodes = [  # type: ignore[list-item]
        SimpleNamespace(core=SimpleNamespace(tasks={"t": machine}), store={"g": global_})
    ]
    hook = world._update_hook(0)
    assert hook is not None and world._update_hook(1) is None
    honest = bytes(encode_tensors({"w": np.full(4, 2.0, np.float32)}))
    return decode_tensors(hook("t", honest))["w"]


def test_byzantine_scale_and_std_reach_the_attack() -> None:
    """A scenario's `scale` and `std` are the attack's strength: scale 1 and 50 send
    different updates (50x as far from the global model), as do std 0.01 and 5."""
    np.testing.assert_array_equal(_attacked({"attack": "scaled", "scale": 1}), [2.0] * 4)
    np.testing.assert_array_equal(_attacked({"attack": "scaled", "scale": 50}), [100.0] * 4)
    np.testing.assert_array_equal(_attacked({"attack": "sign-flip", "scale": 50}), [-100.0] * 4)
    np.testing.assert_array_equal(_attacked({"attack": "sign-flip"}), [-2.0] * 4)  # default 1
    quiet = _attacked({"attack": "gaussian-noise", "std": 0.01}) - 2.0
    loud = _attacked({"attack": "gaussian-noise", "std": 5.0}) - 2.0
    assert float(np.abs(quiet).max()) < 0.1 < 1.0 < float(np.abs(loud).max())
