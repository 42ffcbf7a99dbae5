"""The runner over the real SimCluster: a short quickstart, twice, byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.sim.runner import run_scenario
from p2pfl.sim.scenario import apply_override, load_raw, parse

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("p2pfl.sim.cluster")


@pytest.mark.slow  # two real runs, about 5 s
def test_quickstart_short_is_deterministic(tmp_path: Path) -> None:
    raw = load_raw(REPO / "scenarios/quickstart.yaml")
    raw = apply_override(apply_override(raw, "params.rounds", 2), "nodes", 3)
    scenario = parse(raw, base_dir=REPO / "scenarios")
    a = run_scenario(scenario, out_dir=tmp_path / "a", plots=False)
    b = run_scenario(scenario, out_dir=tmp_path / "b", plots=False)
    assert (tmp_path / "a/rounds.csv").read_bytes() == (tmp_path / "b/rounds.csv").read_bytes()
    assert a.rounds_completed == 2 and not a.failed, a.reason
    assert a.final == b.final and a.final["accuracy_mean"] is not None
    assert a.bytes_sent_total > 0 and a.virtual_s == b.virtual_s
