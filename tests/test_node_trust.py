"""A node runs its own taskpacks without `--trust`; others' only when trusted."""

from __future__ import annotations

from pathlib import Path

from p2pfl.config import NodeConfig
from p2pfl.identity import peer_id_from_public_bytes
from p2pfl.node import trust_policy

ME = peer_id_from_public_bytes(b"\x01" * 32)
FRIEND = peer_id_from_public_bytes(b"\x02" * 32)
STRANGER = peer_id_from_public_bytes(b"\x03" * 32)


def test_own_taskpacks_are_trusted_without_trust(tmp_path: Path) -> None:
    policy = trust_policy(NodeConfig(data_dir=tmp_path), ME)
    assert policy.allows(ME) and not policy.allows(STRANGER)


def test_trust_adds_publishers_and_keeps_our_own(tmp_path: Path) -> None:
    policy = trust_policy(NodeConfig(data_dir=tmp_path, trusted=frozenset({FRIEND})), ME)
    assert policy.allows(ME) and policy.allows(FRIEND) and not policy.allows(STRANGER)
