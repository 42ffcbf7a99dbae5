"""A node's flows on disk: `DATA_DIR/flows/<flow_id>.flow`, one file per flow.

The file holds the flow record, whether this node started it, and every signed record the
flow machine counted (offers, rosters, results), as they came: after a restart the machine
is rebuilt by replaying them, each signature checked again (p2pfl/flow/machine.py
`FlowMachine.replay`). The file name is the flow id, 32 hex digits derived from the record,
never a peer's string. Writes are atomic (temp file + rename): a crash leaves the old file or
the new one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from p2pfl.core.flowrec import FlowRecord, check_flow_id, flow_id_of
from p2pfl.errors import RemoteProtocolError
from p2pfl.fsutil import atomic_write
from p2pfl.wire import decode, encode, message

MAX_FLOW_FILE = 64 * 1024 * 1024


@message("flow.saved")
@dataclass(frozen=True, slots=True)
class SavedFlow:
    flow: FlowRecord
    started: bool  # this node started it (it offers the steps)
    records: tuple[bytes, ...]  # each an encoded Signed record, in the order counted


class FlowStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, flow_id: str) -> Path:
        return self.root / f"{check_flow_id(flow_id)}.flow"

    def save(self, saved: SavedFlow) -> None:
        data = encode(saved)
        if len(data) > MAX_FLOW_FILE:  # bounded disk: the records' count is bounded too
            raise ValueError(f"flow file of {len(data)} bytes, over {MAX_FLOW_FILE}")
        atomic_write(self._path(flow_id_of(saved.flow)), data, mode=0o600)

    def remove(self, flow_id: str) -> None:
        self._path(flow_id).unlink(missing_ok=True)

    def load(self, flow_id: str) -> SavedFlow | None:
        path = self._path(flow_id)
        try:
            if path.stat().st_size > MAX_FLOW_FILE:
                return None
            saved = decode(path.read_bytes(), expected=SavedFlow)
        except (OSError, RemoteProtocolError):
            return None
        return saved if flow_id_of(saved.flow) == flow_id else None

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob("*.flow")):
            try:
                out.append(check_flow_id(path.stem))
            except ValueError:
                continue
        return out
