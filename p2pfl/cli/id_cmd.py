"""`p2pfl id`: a node's peer id and the addresses other nodes can dial.

Works whether or not the node runs: the peer id comes from DATA_DIR/identity.key (made
here on first use, as `p2pfl node` would, so an operator can hand out the id before the
first start); the addresses from the running node, else those it advertised when it last
started (DATA_DIR/addrs.json).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from p2pfl.cli.node_cmds import data_dir_option, emit_json, json_option


@click.command("id")
@data_dir_option
@json_option
def id_cmd(data_dir: Path, as_json: bool) -> None:
    """Print this node's peer id and dialable addresses (also without a running node).

    Give another site one address (or all) for its --bootstrap, and the peer id for its
    --trust.
    """
    from p2pfl.client import Client
    from p2pfl.errors import NodeNotRunning
    from p2pfl.identity import KEY_FILE, Identity
    from p2pfl.net.advertised import load_addrs

    data_dir = data_dir.expanduser()
    created = not (data_dir / KEY_FILE).exists()
    if created:
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)
    identity = Identity.load_or_create(data_dir)
    running = True
    try:
        addrs = [str(a) for a in Client(data_dir).info().get("addrs") or []]
    except NodeNotRunning:
        running = False
        addrs = load_addrs(data_dir, identity.peer_id)
    if as_json:
        emit_json(
            {"peer_id": identity.peer_id, "addrs": addrs, "running": running, "created": created}
        )
        return
    if created:
        click.echo(f"new identity created in {data_dir}", err=True)
    click.echo(f"peer id: {identity.peer_id}")
    if not addrs:
        click.echo("addresses: none known yet (start the node: p2pfl node --listen ...)")
        return
    state = "" if running else " (when the node last ran; it is not running now)"
    click.echo(f"addresses{state}:")
    for addr in addrs:
        click.echo(f"  {addr}")
