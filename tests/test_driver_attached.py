"""Blobs sent along with a direct message (p2pfl/attached.py, Driver): taken only for the
fetch that very message starts, once their hash is the blob's content id; anything else
is dropped and the blob fetched as before. A driver over a fake core, network and loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from p2pfl import attached
from p2pfl.attached import Attached
from p2pfl.core.commands import BlobReady, Command, FetchBlob, Send
from p2pfl.core.round_messages import SliceAsk
from p2pfl.driver import Driver
from p2pfl.limits import MAX_DIRECT_BYTES
from p2pfl.net.base import Message
from p2pfl.store.blobref import make_blob_ref
from p2pfl.store.blobs import BlobStore
from p2pfl.wire import decode, encode

ME = "1" * 46
PEER = "2" * 46
INNER = encode(SliceAsk("0" * 32, 1, PEER, 0))


class FakeCore:
    me = ME
    book = type("Book", (), {"entries": {}})()  # no taskpack archives being swarmed

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.answer: list[Command] = []

    def handle(self, event: Any, now: float) -> list[Command]:
        self.seen.append(event)
        out, self.answer = self.answer, []
        return out


class FakeNetwork:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.plain: list[bytes | None] = []
        self.fetched: list[str] = []

    def send(self, peer: str, data: bytes, plain: bytes | None = None) -> None:
        self.sent.append((peer, data))
        self.plain.append(plain)

    def fetch(self, peer: str, cid: str, offset: int, length: int, token: object) -> None:
        self.fetched.append(cid)


class FakeIO:
    def __init__(self) -> None:
        self.soon: list[Any] = []

    def now(self) -> float:
        return 0.0

    def call_soon(self, callback: Any) -> None:
        self.soon.append(callback)


def make(tmp_path: Path) -> tuple[Driver, FakeCore, FakeNetwork, FakeIO]:
    core, net, io = FakeCore(), FakeNetwork(), FakeIO()
    driver = Driver(
        core,  # type: ignore[arg-type]
        net,  # type: ignore[arg-type]
        BlobStore(None),
        io,  # type: ignore[arg-type]
        taskpack_root=tmp_path / "taskpacks",
        datasets={},
    )
    return driver, core, net, io


def arrive(driver: Driver, data: bytes, cid: str, inner: bytes = INNER) -> None:
    driver.on_event(Message(None, PEER, encode(Attached(inner, cid, data))))


def test_a_blob_attached_to_the_message_that_fetches_it_is_stored_not_fetched(
    tmp_path: Path,
) -> None:
    driver, core, net, io = make(tmp_path)
    blob = os.urandom(100_000)
    ref = make_blob_ref(blob)
    core.answer = [FetchBlob(ref, (PEER,))]
    arrive(driver, blob, ref.cid)
    # The core got the message itself, not the envelope.
    assert [(e.sender, e.data) for e in core.seen] == [(PEER, INNER)]
    assert driver.store.has(ref.cid) and bytes(driver.store.get(ref.cid)) == blob
    assert net.fetched == []
    io.soon.pop()()  # BlobReady on the next turn, as for a blob already held
    assert core.seen[-1] == BlobReady(ref.cid)


@pytest.mark.parametrize("lie", ["other bytes", "cut short"])
def test_an_attached_blob_that_is_not_the_one_fetched_is_refused_and_fetched(
    tmp_path: Path, lie: str
) -> None:
    driver, core, net, _ = make(tmp_path)
    blob = os.urandom(100_000)
    ref = make_blob_ref(blob)
    core.answer = [FetchBlob(ref, (PEER,))]
    wrong = os.urandom(100_000) if lie == "other bytes" else blob[:-1]
    arrive(driver, wrong, ref.cid)
    assert not driver.store.has(ref.cid)
    assert net.fetched == [ref.cid]  # as if nothing had been attached


def test_a_blob_nobody_fetches_is_dropped(tmp_path: Path) -> None:
    driver, core, net, _ = make(tmp_path)
    blob = os.urandom(1000)
    ref = make_blob_ref(blob)
    arrive(driver, blob, ref.cid)  # the core asks for nothing
    assert not driver.store.has(ref.cid)
    # Nor is it kept for a later fetch of that blob.
    core.answer = [FetchBlob(ref, (PEER,))]
    driver.on_event(Message(None, PEER, INNER))
    assert not driver.store.has(ref.cid) and net.fetched == [ref.cid]
    # Another blob's fetch started by the message does not take it either.
    other = make_blob_ref(os.urandom(1000))
    core.answer = [FetchBlob(other, (PEER,))]
    arrive(driver, blob, ref.cid)
    assert not driver.store.has(other.cid) and not driver.store.has(ref.cid)


def test_a_malformed_envelope_is_dropped_before_the_core(tmp_path: Path) -> None:
    driver, core, _, _ = make(tmp_path)
    driver.on_event(Message(None, PEER, attached.PREFIX + b"\xc1 not msgpack"))
    big = Attached.__new__(Attached)  # over MAX_DIRECT_BYTES: __post_init__ refuses it
    object.__setattr__(big, "msg", INNER)
    object.__setattr__(big, "cid", make_blob_ref(b"x").cid)
    object.__setattr__(big, "data", bytes(MAX_DIRECT_BYTES))
    driver.on_event(Message(None, PEER, encode(big)))
    assert core.seen == []


def test_a_send_carries_its_blob_when_both_fit_one_direct_message(tmp_path: Path) -> None:
    driver, _, net, _ = make(tmp_path)
    small = driver.put_blob(os.urandom(200_000))
    msg = SliceAsk("0" * 32, 1, PEER, 0)
    driver.execute([Send(PEER, msg, small), Send("3" * 46, msg, small)])
    (_, first), (_, second) = net.sent
    env = decode(first, Attached)
    assert env.msg == encode(msg) and env.cid == small.cid
    assert env.data == bytes(driver.store.get(small.cid))
    assert second is first  # enveloped once for every peer of the same message
    # Where bulk must not go (a yamux stream), the network sends the message alone.
    assert net.plain == [encode(msg), encode(msg)]
    driver.execute([Send(PEER, msg)])
    assert net.sent[-1] == (PEER, encode(msg)) and net.plain[-1] is None
    # Too big to go along, or not held: the message alone.
    big = driver.put_blob(os.urandom(MAX_DIRECT_BYTES))
    missing = make_blob_ref(os.urandom(10))
    net.sent.clear()
    driver.execute([Send(PEER, msg, big), Send(PEER, msg, missing), Send(PEER, msg)])
    assert [data for _, data in net.sent] == [encode(msg)] * 3
