"""Configuration of one node, as given on the command line (`p2pfl node ...`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
CONTROL_SOCKET = "control.sock"
# The addresses the node advertised when it last started (read by `p2pfl id`).
ADDRS_FILE = "addrs.json"


@dataclass
class NodeConfig:
    data_dir: Path
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    bootstrap: list[str] = field(default_factory=list)
    announce: list[str] = field(default_factory=list)  # advertised instead of listen addrs
    bulk_port: int | None = 0  # the bulk path's TCP port; 0 any free one, None: off
    relay_via: list[str] = field(default_factory=list)  # relays to be reachable through
    relay_service: bool = False  # relay for others (circuit relay v2)
    datasets: dict[str, Path] = field(default_factory=dict)  # NAME -> PATH (csv / npz)
    trusted: frozenset[str] = frozenset()  # publisher peer ids whose taskpacks we run
    trust_any: bool = False  # development only: run anyone's taskpacks (loud warning)
    # Development only: datasets the site policy does not name may be used by ANY requester
    # (the safe default: only by this node's own operator). Loud warning.
    allow_any_requester: bool = False
    unsafe_no_sandbox: bool = False  # run taskpack code without bubblewrap (loud warning)
    min_records: int = 10  # k: never release an aggregate over fewer records
    # Site labels (region=eu): hierarchical tasks may group participants by one of them.
    labels: dict[str, str] = field(default_factory=dict)
    log_level: str = "info"

    @property
    def control_socket(self) -> Path:
        return self.data_dir / CONTROL_SOCKET
