"""One fetch of a blob range: reach the peer, then the bulk path, else the stream protocol.

Every stage is bounded (see _framing.deadline): reaching the peer, opening a stream, the
offer or answer header, the transfer in proportion to its size. A stage past its deadline
raises StageTimeout, which fails the fetch at once (the fetcher asks another provider)
instead of holding it until fetch_timeout_s.

Reaching the peer matters because an update is announced over gossip, so its author may
be a peer we have no connection to (yet): discovery is still connecting the mesh when the
first round starts. Without a connection and without a known address, `new_stream` fails
in microseconds ("No known addresses"), and a fetcher that retries three times in a few
milliseconds gives the blob up for good. So a fetch first waits (bounded) for a
connection: it dials the peer's known addresses, or waits for discovery to learn them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as L2PeerInfo, info_from_p2p_addr

from p2pfl.errors import RemoteProtocolError
from p2pfl.net.libp2p import _blob, _bulk, _channel
from p2pfl.net.libp2p._framing import (
    StageTimeout,
    close_quietly,
    deadline,
    reset_quietly,
)

LOG = logging.getLogger("p2pfl.net.libp2p")

# Opening a stream on a live connection (multistream-select) takes milliseconds.
OPEN_TIMEOUT_S = 10.0
# How often a fetch looks again for a peer it has no address of (discovery may learn it).
REACH_POLL_S = 0.25
# Dials of one peer before a fetch gives up on it (within its reach timeout).
DIAL_ATTEMPTS = 2
CLOSE_TIMEOUT_S = 2.0


def lacks_protocol(exc: BaseException) -> bool:
    """Whether a failed new_stream means the peer does not speak the protocol (it said
    "na" in multistream-select), as opposed to a broken connection."""
    seen: BaseException | None = exc
    while seen is not None:
        if "not supported" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Unreachable(Exception):
    """No connection to the peer could be made; str() says why."""


class Reacher:
    """Connects to a peer before a fetch; one dial per peer at a time."""

    def __init__(
        self,
        host: Any,
        known_addrs: Callable[[str], tuple[str, ...]],
        connect: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        """`connect(peer)`, when given, dials the peer's known addresses (relayed ones
        too) and says whether it worked; else the host dials the direct ones."""
        self._host = host
        self._known_addrs = known_addrs
        self._connect = connect
        self._dialing: dict[str, trio.Event] = {}

    def connected(self, pid: ID) -> bool:
        return bool(self._host.get_network().get_connections(pid))

    async def reach(self, peer: str, timeout: float) -> None:
        """Return once connected to `peer`; Unreachable if a dial fails or no address
        turns up within `timeout` (a dial failure is final: the peer is down, most likely)."""
        pid = ID.from_base58(peer)
        if self.connected(pid):
            return
        failures = 0
        with trio.move_on_after(timeout):
            while not self.connected(pid):
                busy = self._dialing.get(peer)
                if busy is not None:  # another fetch is dialling this peer: share its dial
                    await busy.wait()
                    continue
                addrs = self._addrs(pid, peer)
                if not addrs and not (self._connect and self._known_addrs(peer)):
                    await trio.sleep(REACH_POLL_S)
                    continue
                done = self._dialing[peer] = trio.Event()
                try:
                    if self._connect is not None:
                        if not await self._connect(peer):
                            failures += 1
                            if failures >= DIAL_ATTEMPTS:
                                raise Unreachable("no known address answered")
                            # Two peers dialling each other at once (a round's fetches,
                            # a DHT lookup) can fail both dials: once more, shortly.
                            await trio.sleep(REACH_POLL_S)
                        continue
                    # A peer that failed before is in the swarm's 60 s negative cache.
                    self._host.get_network().unblock_peer(pid)
                    await self._host.connect(L2PeerInfo(pid, addrs))
                except Unreachable as exc:
                    raise Unreachable(f"dial failed: {exc}") from None
                except Exception as exc:
                    raise Unreachable(f"dial failed: {exc}") from None
                finally:
                    del self._dialing[peer]
                    done.set()
            return
        raise Unreachable(f"not connected and no address known within {timeout:.1f} s")

    def _addrs(self, pid: ID, peer: str) -> list[Any]:
        out = []
        for a in self._known_addrs(peer):
            if "/p2p-circuit/" in a:
                continue  # dialled through the relay transport (see _relay), not the host
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(a))
            except Exception:
                continue
            if info.peer_id == pid:
                out.extend(info.addrs)
        if not out:
            try:
                out = list(self._host.get_peerstore().addrs(pid))
            except Exception:
                out = []
        return out


# Peers remembered as having no reachable bulk path (a bound on our memory of them).
_MAX_NO_BULK = 4096


class BulkStreams:
    """Bulk session streams (BULK_SESSION_PROTOCOL) idle between two ranges, per peer.

    A stream goes back here only after a whole exchange (offer read, range collected or
    refused cleanly), so the next request starts on a clean stream. At most KEEP_PER_PEER
    per peer and MAX_KEPT_PEERS peers; one idle for FETCHER_IDLE_S or more is closed, not
    reused (the server closes its side after SESSION_IDLE_S)."""

    def __init__(self) -> None:
        self._idle = _bulk.IdlePool[str, Any](_bulk.KEEP_PER_PEER, _bulk.MAX_KEPT_PEERS)
        self.sockets = _bulk.KeptSockets()  # the TCP connections the ranges come on
        self.channels = _channel.Channels()  # preferred: no stream exchange per range

    async def take(self, peer: str) -> Any | None:
        stream, stale = self._idle.take(peer)
        for old in stale:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await close_quietly(old)
        return stream

    def give(self, peer: str, stream: Any) -> bool:
        """Keep `stream` for the next range from `peer`; False: the caller closes it."""
        return self._idle.give(peer, stream)

    def forget(self, peer: str) -> None:
        """The peer is gone: its streams went with the connection; its channels close."""
        self._idle.pop(peer)
        self.channels.forget(peer)

    def close(self) -> None:
        self.sockets.close()
        self.channels.close()

    def idle(self, peer: str) -> int:
        return self._idle.count(peer)


async def fetch_range(
    host: Any,
    peer: str,
    cid: str,
    offset: int,
    length: int,
    bulk: bool,
    extra: dict[str, int],
    no_bulk: set[str] | None = None,
    streams: BulkStreams | None = None,
) -> tuple[bytes, int]:
    """(data, wire bytes) of one range from a connected peer; counts into `extra`.

    A peer whose bulk path is unreachable or missing is added to `no_bulk` and not tried
    over it again: behind a firewall, each try would cost a connect timeout. With
    `streams`, the range comes on a bulk channel (_channel.py) to the peer, kept for the
    next range; a peer without channels gets the request on a kept session stream, and
    one without sessions one BULK_PROTOCOL stream per range, as before.
    Raises FetchRefused, StageTimeout, RemoteProtocolError or another Exception."""
    no_bulk = set() if no_bulk is None else no_bulk
    if bulk and peer not in no_bulk:
        result = None
        if streams is not None and peer not in streams.channels.unsupported:
            result = await _fetch_on_channel(
                host, peer, cid, offset, length, extra, no_bulk, streams.channels
            )
        if result is None and peer not in no_bulk and streams is not None:
            stream = await streams.take(peer)
            if stream is not None:
                _count(extra, "bulk_streams_reused")
                result = await _fetch_via(
                    host, peer, _bulk.BULK_PROTOCOL, cid, offset, length, extra, no_bulk,
                    streams, stream,
                )  # fmt: skip
        if result is None and peer not in no_bulk:
            result = await _fetch_via(
                host, peer, _bulk.BULK_PROTOCOL, cid, offset, length, extra, no_bulk, streams
            )
        if result is not None:
            return result
    result = await _fetch_via(host, peer, _blob.BLOB_PROTOCOL, cid, offset, length, extra)
    assert result is not None
    return result


def _count(extra: dict[str, int], key: str) -> None:
    extra[key] = extra.get(key, 0) + 1


async def _fetch_on_channel(
    host: Any,
    peer: str,
    cid: str,
    offset: int,
    length: int,
    extra: dict[str, int],
    no_bulk: set[str],
    channels: _channel.Channels,
) -> tuple[bytes, int] | None:
    """One range on a kept channel to `peer`, or on a new one. None: negotiate it per
    range instead (the peer has no channels, or the server is busy, or the channel
    failed), or, if `peer` is now in `no_bulk`, use the stream protocol. Raises
    FetchRefused and StageTimeout as the other paths do."""
    channel = await channels.take(peer)
    if channel is not None:
        _count(extra, "bulk_channels_reused")
    for _attempt in range(2):  # a kept channel, then a fresh one if the kept one ended
        if channel is None:
            channel = await _open_channel(host, peer, extra, no_bulk, channels)
            if channel is None:
                return None
        try:
            return await _on_channel(peer, channel, cid, offset, length, extra, channels)
        except _channel.ChannelBroken as exc:
            # Only a kept channel breaks so (a fresh one's first answer never does).
            LOG.debug("kept bulk channel to %s ended (%s); opening a fresh one", peer, exc)
            channel = None
        except (_blob.FetchRefused, StageTimeout):
            raise
        except Exception as exc:
            _channel_failed(peer, exc, extra)
            return None
    return None


async def _open_channel(
    host: Any, peer: str, extra: dict[str, int], no_bulk: set[str], channels: _channel.Channels
) -> _channel.Channel | None:
    """A new channel to `peer`; None (and why remembered) when there is none to have."""
    try:
        with deadline("opening a bulk channel stream", OPEN_TIMEOUT_S):
            stream = await host.new_stream(
                ID.from_base58(peer), [TProtocol(_channel.BULK_CHANNEL_PROTOCOL)]
            )
        channel = await _channel.open_channel(stream)
    except StageTimeout:
        raise
    except _channel.ChannelBusy:
        return None
    except Exception as exc:
        if lacks_protocol(exc):
            channels.lacks(peer)
        elif isinstance(exc, _bulk.BulkUnreachable):
            _no_bulk_path(no_bulk, peer, exc)
        else:
            _channel_failed(peer, exc, extra)
        return None
    _count(extra, "bulk_channels_opened")
    return channel


def _no_bulk_path(no_bulk: set[str], peer: str, exc: Exception) -> None:
    """Remember that `peer`'s bulk port is out of reach (or it has no bulk path)."""
    if len(no_bulk) < _MAX_NO_BULK:
        no_bulk.add(peer)
    LOG.info("no bulk path to %s (%s): blobs from it use the stream protocol", peer, exc)


def _channel_failed(peer: str, exc: Exception, extra: dict[str, int]) -> None:
    if isinstance(exc, RemoteProtocolError):
        LOG.warning("bulk channel to %s failed (%s); negotiating per range", peer, exc)
    else:
        LOG.info("bulk channel to %s failed (%r); negotiating per range", peer, exc)
    _count(extra, "bulk_fallbacks")


async def _on_channel(
    peer: str,
    channel: _channel.Channel,
    cid: str,
    offset: int,
    length: int,
    extra: dict[str, int],
    channels: _channel.Channels,
) -> tuple[bytes, int]:
    """One range on `channel`, which is kept after a clean exchange (an error answer
    included) and closed after anything else."""
    kept = False
    try:
        try:
            result = await channel.fetch(cid, offset, length)
        except _blob.FetchRefused:
            kept = channels.give(peer, channel)
            raise
        kept = channels.give(peer, channel)
    finally:
        if not kept:
            await channel.aclose()
    _count(extra, "bulk_fetches")
    return result


async def _fetch_via(
    host: Any,
    peer: str,
    protocol: str,
    cid: str,
    offset: int,
    length: int,
    extra: dict[str, int],
    no_bulk: set[str] | None = None,
    streams: BulkStreams | None = None,
    kept: Any = None,
) -> tuple[bytes, int] | None:
    """One range over `protocol` (on the `kept` session stream, if given). For the bulk
    path, None means "fall back" (or, for a kept stream, "try a fresh one")."""
    stream = kept
    try:
        if stream is None:
            wanted = [protocol]
            if protocol == _bulk.BULK_PROTOCOL and streams is not None:
                wanted = [_bulk.BULK_SESSION_PROTOCOL, protocol]  # the first both speak
            with deadline(f"opening a {protocol} stream", OPEN_TIMEOUT_S):
                stream = await host.new_stream(ID.from_base58(peer), [TProtocol(p) for p in wanted])
        if protocol == _bulk.BULK_PROTOCOL:
            sockets = streams.sockets if streams is not None else None
            result = await _bulk.fetch_bulk(stream, cid, offset, length, sockets)
            _count(extra, "bulk_fetches")
        else:
            result = await _blob.request_range(stream, cid, offset, length)
        session = str(stream.get_protocol()) == _bulk.BULK_SESSION_PROTOCOL
        if not (session and streams is not None and streams.give(peer, stream)):
            with trio.move_on_after(CLOSE_TIMEOUT_S):  # the data is in: never wait long
                await close_quietly(stream)
        return result
    except _blob.FetchRefused:
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await close_quietly(stream)
        raise
    except BaseException as exc:
        await reset_quietly(stream)
        if kept is not None and isinstance(exc, Exception) and not isinstance(exc, StageTimeout):
            # A kept stream that broke (its connection was replaced, say): the caller
            # opens a fresh one rather than blaming the peer's bulk path.
            LOG.debug("kept bulk stream to %s failed (%r); opening a fresh one", peer, exc)
            return None
        # A timeout means an overloaded server or link: the stream path would load it
        # more, so the fetch fails and the fetcher asks another provider. A broken bulk
        # path (an old peer, a firewalled port, a withdrawn offer) falls back.
        if (
            protocol != _bulk.BULK_PROTOCOL
            or not isinstance(exc, Exception)
            or isinstance(exc, StageTimeout)
        ):
            raise
        if no_bulk is not None and (isinstance(exc, _bulk.BulkUnreachable) or lacks_protocol(exc)):
            _no_bulk_path(no_bulk, peer, exc)
        elif isinstance(exc, RemoteProtocolError):
            LOG.warning("bulk fetch from %s failed (%s); using the stream protocol", peer, exc)
        else:
            LOG.info("bulk fetch from %s failed (%r); using the stream protocol", peer, exc)
        _count(extra, "bulk_fallbacks")
        return None
