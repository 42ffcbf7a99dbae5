"""Flows on disk: saved after each change, rebuilt by replaying their signed records."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from p2pfl.flow.machine import FlowMachine, FlowPhase
from p2pfl.flow.store import FlowStore, SavedFlow
from p2pfl.wire import Signed, decode, encode
from tests.flow.flowharness import FlowHarness


def test_a_saved_flow_replays_to_the_same_state(tmp_path: Path) -> None:
    h = FlowHarness(3, store_root=tmp_path)
    flow_id = h.start(h.record())
    h.run()
    for index in range(3):
        store = FlowStore(tmp_path / str(index))
        assert store.ids() == [flow_id]
        saved = store.load(flow_id)
        assert saved is not None and saved.started == (index == 0)
        machine = FlowMachine.replay(
            saved.flow, h.nodes[index].peer, list(saved.records), saved.started
        )
        assert machine.phase is FlowPhase.SUCCEEDED
        assert [v.task_id for v in machine.steps()] == [
            v.task_id for v in h.flow(flow_id, index).steps()
        ]
        # The file is written atomically: no temporary file is left behind.
        assert [p.name for p in (tmp_path / str(index)).iterdir()] == [f"{flow_id}.flow"]


def test_a_tampered_record_does_not_count_on_replay(tmp_path: Path) -> None:
    h = FlowHarness(2, store_root=tmp_path)
    flow_id = h.start(h.record())
    h.run()
    store = FlowStore(tmp_path / "1")
    saved = store.load(flow_id)
    assert saved is not None
    records = list(saved.records)
    last = decode(records[-1], expected=Signed)  # the last step's result
    records[-1] = encode(replace(last, sig=bytes(64)))
    machine = FlowMachine.replay(saved.flow, h.nodes[1].peer, records, False)
    assert machine.phase is FlowPhase.RUNNING  # the forged result is refused: step 3 still runs
    assert [v.state.value for v in machine.steps()] == ["succeeded", "succeeded", "running"]


def test_damaged_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    h = FlowHarness(2, store_root=tmp_path)
    flow_id = h.start(h.record())
    h.run()
    root = tmp_path / "0"
    store = FlowStore(root)
    (root / "../../etc.flow").resolve().parent.mkdir(parents=True, exist_ok=True)
    (root / "not-a-flow-id.flow").write_bytes(b"junk")
    assert store.ids() == [flow_id]
    other = "0" * 32
    (root / f"{other}.flow").write_bytes(b"\x81\xa1vjunk")
    assert store.load(other) is None
    # A file whose record hashes to another flow id is not that flow.
    saved = store.load(flow_id)
    assert saved is not None
    (root / f"{other}.flow").write_bytes(encode(saved))
    assert store.load(other) is None
    store.save(SavedFlow(saved.flow, True, ()))
    assert store.load(flow_id).records == ()


def test_followed_flows_are_bounded(tmp_path: Path, monkeypatch) -> None:
    """A node follows at most MAX_FLOWS flows: the oldest finished one it only followed
    makes room (file and all); its own flows and unfinished ones stay."""
    import p2pfl.flow.service as service_mod

    monkeypatch.setattr(service_mod, "MAX_FLOWS", 2)
    h = FlowHarness(2, store_root=tmp_path)
    ids = []
    for k in range(3):
        record = replace(h.record(), nonce=bytes([k + 1]) * 16, created=h.now)
        ids.append(h.start(record))
        h.run()
    follower = h.services[1]
    assert len(follower.flows) == 2 and ids[0] not in follower.flows
    assert set(FlowStore(tmp_path / "1").ids()) == set(ids[1:])
    assert set(h.services[0].flows) == set(ids)  # the starter keeps its own
