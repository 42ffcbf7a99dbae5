"""`p2pfl id`: peer id and dialable addresses, with and without a running node."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from fakenode import running_server

from p2pfl.cli.main import cli
from p2pfl.identity import Identity
from p2pfl.net.advertised import load_addrs, save_addrs


def _id(data_dir: Path, *extra: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["id", "--data-dir", str(data_dir), *extra])
    return result.exit_code, result.stdout, result.stderr


def test_id_without_a_node_creates_the_identity_once(tmp_path: Path) -> None:
    d = tmp_path / "n0"
    code, out, err = _id(d, "--json")
    assert code == 0 and "new identity created" not in out
    first = json.loads(out)
    assert first["created"] is True and first["running"] is False and first["addrs"] == []
    assert first["peer_id"] == Identity.load_or_create(d).peer_id
    code, out, _ = _id(d)
    assert code == 0
    assert f"peer id: {first['peer_id']}" in out and "none known yet" in out
    assert json.loads(_id(d, "--json")[1])["created"] is False


def test_id_prints_the_addresses_of_the_last_run(tmp_path: Path) -> None:
    me = Identity.load_or_create(tmp_path).peer_id
    addrs = [f"/ip4/192.0.2.5/tcp/4110/p2p/{me}", f"/ip4/127.0.0.1/tcp/4110/p2p/{me}"]
    save_addrs(tmp_path, me, addrs)
    got = json.loads(_id(tmp_path, "--json")[1])
    assert got == {"peer_id": me, "addrs": addrs, "running": False, "created": False}
    code, out, _ = _id(tmp_path)
    assert code == 0 and "not running now" in out and addrs[0] in out


def test_saved_addresses_of_another_key_or_garbage_are_ignored(tmp_path: Path) -> None:
    me = Identity.load_or_create(tmp_path).peer_id
    other = Identity.generate().peer_id
    save_addrs(tmp_path, other, [f"/ip4/192.0.2.5/tcp/1/p2p/{other}"])
    assert load_addrs(tmp_path, me) == []
    (tmp_path / "addrs.json").write_text('{"peer_id": 3, "addrs": "x"}')
    assert load_addrs(tmp_path, me) == []
    (tmp_path / "addrs.json").write_bytes(b"\xff not json")
    assert json.loads(_id(tmp_path, "--json")[1])["addrs"] == []


def test_id_asks_a_running_node(tmp_path: Path) -> None:
    Identity.load_or_create(tmp_path)
    with running_server(tmp_path):
        got = json.loads(_id(tmp_path, "--json")[1])
    assert got["running"] is True and got["addrs"] == ["/ip4/127.0.0.1/tcp/4001"]
