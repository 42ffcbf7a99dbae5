"""A stand-in for p2pfl.sim.cluster.SimCluster: plausible, seeded RoundRecords, no network."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FakeRecord:
    node: int
    round: int
    accuracy: float | None
    loss: float | None
    bytes_sent: int
    bytes_received: int
    epsilon: float | None
    alive: bool


class FakeCluster:
    """Accuracy climbs towards a ceiling that depends on the aggregator; crashes honoured."""

    instances: list[FakeCluster] = []

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.virtual_s = 0.0
        self.result: dict[str, Any] = {}
        self.final_test_metrics: dict[str, float] = {}
        FakeCluster.instances.append(self)

    def run(self) -> Iterator[FakeRecord]:
        spec = self.spec
        rng = np.random.default_rng(spec["seed"])
        n, rounds = spec["nodes"], spec["params"]["rounds"]
        params = spec["params"]
        key = params["protocol"] if params["protocol"] != "fedavg" else params["aggregator"]
        ceiling = {"fedavg": 0.9, "gossip": 0.8, "median": 0.85}.get(key, 0.7)
        down: set[int] = set()
        eps = spec["dp"]["epsilon"] if spec.get("dp") else None
        for r in range(1, rounds + 1):
            for f in spec["faults"]:
                if f["round"] == r and "crash" in f:
                    down.update(f["crash"])
                if f["round"] == r and "restart" in f:
                    down.difference_update(f["restart"])
            # Yield in reverse node order: the report must sort.
            for node in reversed(range(n)):
                alive = node not in down
                acc = ceiling * (1 - 0.7**r) + float(rng.normal(0, 0.01)) if alive else None
                yield FakeRecord(
                    node=node,
                    round=r,
                    accuracy=acc,
                    loss=None if acc is None else 1.0 - acc + 1 / 3,
                    bytes_sent=1000 * r + node if alive else 0,
                    bytes_received=900 * r if alive else 0,
                    epsilon=None if eps is None else eps * r / rounds,
                    alive=alive,
                )
            self.virtual_s += 1.5
        self.result = {"status": "ok", "metrics": {"accuracy": ceiling}, "model_cid": b"\x01\x02"}
        self.final_test_metrics = {"accuracy": ceiling, "loss": 0.4}


class ExplodingCluster(FakeCluster):
    def run(self) -> Iterator[FakeRecord]:
        it = super().run()
        for _ in range(self.spec["nodes"] + 1):
            yield next(it)
        raise RuntimeError("boom")
