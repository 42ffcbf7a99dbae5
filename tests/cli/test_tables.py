"""Every list the CLI prints is readable at 80 columns: names and statuses whole, ids and
cids shortened, reasons and addresses wrapped; --wide prints every value in full."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fakenode import FakeNodeAPI, running_server

from p2pfl.cli.main import cli
from p2pfl.cli.render import short_cid, short_task
from p2pfl.client import short_id
from p2pfl.identity import peer_id_from_public_bytes
from p2pfl.store.cid import cid_of

ME = peer_id_from_public_bytes(b"\x01" * 32)
OTHER = peer_id_from_public_bytes(b"\x02" * 32)
CID_A, CID_B = cid_of(b"pack a"), cid_of(b"pack b")
LONG_NAME = "hospital-readmission-logreg"
REASON = (
    f"untrusted-publisher: {OTHER} is not in this node's trust list "
    "(start the node with --trust PEER_ID to run its taskpacks)"
)
TASK_ID = "0123456789abcdef0123456789abcdef"


class RealisticAPI(FakeNodeAPI):
    """Full-length peer ids and cids, a long name and a long reason."""

    def info(self) -> dict[str, Any]:
        return {**super().info(), "peer_id": ME, "addrs": [f"/ip4/127.0.0.1/tcp/4001/p2p/{ME}"]}

    def peers(self) -> list[dict[str, Any]]:
        return [
            {
                "peer_id": OTHER,
                "addrs": [f"/ip4/192.168.100.200/tcp/40010/p2p/{OTHER}", "/ip4/10.0.0.5/tcp/4001"],
                "capabilities": {"datasets": [{"name": "digits", "rows": 599}], "cpus": 2},
            }
        ]

    def taskpacks(self) -> list[dict[str, Any]]:
        return [
            {"name": LONG_NAME, "version": "0.3.0-rc.1", "cid": CID_A, "publisher": ME,
             "status": "verified", "reason": ""},
            {"name": "federated-stats", "version": "1.0.0", "cid": CID_B, "publisher": OTHER,
             "status": "rejected", "reason": REASON},
        ]  # fmt: skip

    def tasks(self) -> list[dict[str, Any]]:
        return [
            {"task_id": TASK_ID, "name": LONG_NAME, "version": "0.3.0-rc.1", "type": "training",
             "status": "succeeded", "round": 5, "rounds": 5, "participants": [ME, OTHER],
             "created": 1700000000.0},
        ]  # fmt: skip


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("node")
    with running_server(d, RealisticAPI()):
        yield d


def run80(*args: str) -> Result:
    r = CliRunner().invoke(cli, list(args), env={"COLUMNS": "80"}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def lines_fit(text: str, width: int = 80) -> bool:
    return all(len(line.rstrip()) <= width for line in text.splitlines())


def test_taskpacks_at_80_columns(node_dir: Path) -> None:
    out = run80("taskpacks", "--data-dir", str(node_dir)).stdout
    assert lines_fit(out), out
    for whole in (LONG_NAME, "federated-stats", "0.3.0-rc.1", "verified", "rejected"):
        assert whole in out, (whole, out)
    assert short_cid(CID_A) in out and CID_A not in out
    assert short_id(OTHER) in out
    # The reason is a sentence: it is shown whole (wrapped) under the table, by pack name.
    flat = " ".join(out.split())
    assert f"federated-stats@1.0.0: {' '.join(REASON.split())}" in flat


def test_taskpacks_wide_shows_everything(node_dir: Path) -> None:
    out = run80("taskpacks", "--data-dir", str(node_dir), "--wide").stdout
    row = next(line for line in out.splitlines() if "federated-stats" in line)
    assert CID_B in row and OTHER in row and REASON in row  # all on one line


def test_peers_at_80_columns(node_dir: Path) -> None:
    out = run80("peers", "--data-dir", str(node_dir)).stdout
    assert lines_fit(out), out
    assert short_id(ME) in out and short_id(OTHER) in out
    # Addresses whole, on their own lines (never folded into 5-character pieces), without
    # the /p2p/ tail the id column already shows.
    assert "/ip4/192.168.100.200/tcp/40010" in out and "/ip4/10.0.0.5/tcp/4001" in out
    assert f"/p2p/{OTHER}" not in out
    assert "digits (599 rows)" in out
    wide = run80("peers", "--data-dir", str(node_dir), "--wide").stdout
    assert f"/ip4/192.168.100.200/tcp/40010/p2p/{OTHER}" in wide and ME in wide


def test_tasks_at_80_columns(node_dir: Path) -> None:
    out = run80("tasks", "--data-dir", str(node_dir)).stdout
    assert lines_fit(out), out
    assert short_task(TASK_ID) in out and TASK_ID not in out
    assert f"{LONG_NAME}@0.3.0-rc.1" in out and "succeeded" in out and "5/5" in out
    wide = run80("tasks", "--data-dir", str(node_dir), "--wide").stdout
    assert TASK_ID in wide and "training" in wide


def test_markup_from_a_peer_is_shown_as_text() -> None:
    from rich.console import Console

    from p2pfl.cli.render import taskpacks_table

    pack = {"name": "[red]x[/red]", "version": "1", "cid": CID_A, "publisher": OTHER,
            "status": "rejected", "reason": "[bold]bad[/bold]"}  # fmt: skip
    con = Console(width=80, record=True)
    con.print(taskpacks_table([pack]))
    text = con.export_text()
    assert "[red]x[/red]" in text and "[bold]bad[/bold]" in text


def test_a_node_without_peers_says_so_instead_of_an_empty_table() -> None:
    from rich.console import Console

    from p2pfl.cli.render import peers_table

    con = Console(width=80, record=True)
    con.print(peers_table({"peer_id": ME, "addrs": ["/ip4/127.0.0.1/tcp/4101"]}, []))
    text = con.export_text()
    assert short_id(ME) in text and "no peers yet" in text and "peer id" not in text
