"""BlobFetch against fake providers: honest, lying, dying, failing; determinism."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from p2pfl.store import BlobFetch, BlobStore, FetchCmd, make_blob_ref

CHUNK = 1024
DATA = os.urandom(CHUNK * 20 + 100)  # 21 chunks
REF = make_blob_ref(DATA, CHUNK)


class FakeNet:
    """Providers that answer FetchCmds; each has a behaviour.

    honest: right bytes; liar: wrong bytes; dead: never answers (the driver times it out
    and reports a failure); flaky: fails every other request; short: truncated bytes.
    """

    def __init__(self, behaviours: dict[str, str], seed: int = 0) -> None:
        self.behaviours = behaviours
        self.asked: list[FetchCmd] = []
        self.rng = random.Random(seed)
        self.count: Counter[str] = Counter()

    def answer(self, fetch: BlobFetch, cmd: FetchCmd) -> list[FetchCmd]:
        self.asked.append(cmd)
        self.count[cmd.peer] += 1
        kind = self.behaviours[cmd.peer]
        good = DATA[cmd.offset : cmd.offset + cmd.length]
        if kind == "honest":
            return fetch.on_done(cmd.peer, cmd.index, good)
        if kind == "liar":
            return fetch.on_done(cmd.peer, cmd.index, os.urandom(len(good)))
        if kind == "short":
            return fetch.on_done(cmd.peer, cmd.index, good[:-1])
        if kind == "flaky" and self.count[cmd.peer] % 2:
            return fetch.on_done(cmd.peer, cmd.index, good)
        return fetch.on_failed(cmd.peer, cmd.index, "timeout" if kind == "dead" else "reset")

    def run(self, fetch: BlobFetch, cmds: list[FetchCmd], shuffle: bool = False) -> None:
        queue = list(cmds)
        steps = 0
        while queue:
            steps += 1
            assert steps < 10_000, "fetch did not converge"
            i = self.rng.randrange(len(queue)) if shuffle else 0
            queue += self.answer(fetch, queue.pop(i))
            self.check_limits(fetch)

    @staticmethod
    def check_limits(fetch: BlobFetch) -> None:
        inflight = fetch.inflight()
        assert len(inflight) <= fetch.max_inflight
        for n in Counter(inflight.values()).values():
            assert n <= fetch.max_inflight_per_peer


def new_fetch(tmp_path: Path | None = None, **kw: int) -> tuple[BlobFetch, BlobStore]:
    store = BlobStore(tmp_path)
    return BlobFetch(REF, store.open_partial(REF), **kw), store


def test_honest_providers_share_the_work() -> None:
    fetch, store = new_fetch()
    for p in ("a", "b", "c"):
        fetch.add_provider(p)
    net = FakeNet({"a": "honest", "b": "honest", "c": "honest"})
    cmds = fetch.start()
    assert len(cmds) == 6  # 3 providers x 2 per peer, under max_inflight=8
    assert Counter(c.peer for c in cmds) == {"a": 2, "b": 2, "c": 2}
    assert [c.index for c in cmds] == list(range(6))
    assert all(c.cid == REF.cid and c.token == (REF.cid, c.index) for c in cmds)
    net.run(fetch, cmds)
    assert fetch.done and fetch.cid == REF.cid and fetch.failed_reason is None
    assert fetch.progress() == (len(DATA), len(DATA))
    assert bytes(store.get(REF.cid)) == DATA
    assert len(net.asked) == REF.n_chunks  # no chunk asked twice
    assert min(net.count.values()) >= 5  # spread


def test_global_inflight_cap() -> None:
    fetch, _ = new_fetch(max_inflight=3, max_inflight_per_peer=2)
    for p in "abcdef":
        fetch.add_provider(p)
    cmds = fetch.start()
    assert len(cmds) == 3 and len({c.peer for c in cmds}) == 3


def test_liar_is_dropped_and_chunks_refetched() -> None:
    fetch, store = new_fetch()
    fetch.add_provider("liar")
    fetch.add_provider("good")
    net = FakeNet({"liar": "liar", "good": "honest"})
    net.run(fetch, fetch.start())
    assert fetch.done and bytes(store.get(REF.cid)) == DATA
    assert net.count["liar"] == 2  # its first two answers were bad: dropped, never asked again
    assert "liar" not in fetch.providers()
    assert fetch.add_provider("liar") == []  # not taken back


def test_short_answers_count_as_lies() -> None:
    fetch, _ = new_fetch()
    fetch.add_provider("short")
    fetch.add_provider("good")
    net = FakeNet({"short": "short", "good": "honest"})
    net.run(fetch, fetch.start())
    assert fetch.done and "short" not in fetch.providers()


def test_only_liars_means_no_providers_then_resume() -> None:
    fetch, store = new_fetch()
    fetch.add_provider("l1")
    fetch.add_provider("l2")
    net = FakeNet({"l1": "liar", "l2": "liar", "good": "honest"})
    net.run(fetch, fetch.start())
    assert not fetch.done and fetch.failed_reason == "no providers"
    # A new provider appears later: the fetch resumes.
    cmds = fetch.add_provider("good")
    assert fetch.failed_reason is None and cmds
    net.run(fetch, cmds)
    assert fetch.done and bytes(store.get(REF.cid)) == DATA


def test_dead_provider_failures_move_elsewhere() -> None:
    fetch, _ = new_fetch()
    fetch.add_provider("dead")
    fetch.add_provider("good")
    net = FakeNet({"dead": "dead", "good": "honest"})
    net.run(fetch, fetch.start())
    assert fetch.done
    # Dropped after MAX_FAILURES_PER_PEER (3) failures; one more request was already out.
    assert net.count["dead"] <= 4
    assert "dead" not in fetch.providers()


def test_flaky_provider_keeps_serving() -> None:
    fetch, _ = new_fetch()
    fetch.add_provider("flaky")
    net = FakeNet({"flaky": "flaky"})
    net.run(fetch, fetch.start())
    # Alone, a provider that fails every other request is dropped after three failures.
    assert fetch.failed_reason == "no providers" or fetch.done


def test_removed_provider_inflight_reassigned() -> None:
    fetch, store = new_fetch()
    fetch.add_provider("a")
    fetch.add_provider("b")
    cmds = fetch.start()
    a_chunks = sorted(c.index for c in cmds if c.peer == "a")
    more = fetch.remove_provider("a")
    assert sorted(c.index for c in more if c.peer == "b") == [] or all(c.peer == "b" for c in more)
    assert "a" not in fetch.inflight().values()
    # b was full (2 in flight), so a's chunks wait; answer b's and they go out to b.
    net = FakeNet({"a": "honest", "b": "honest"})
    b_cmds = [c for c in cmds if c.peer == "b"] + more
    net.run(fetch, b_cmds)
    assert fetch.done and bytes(store.get(REF.cid)) == DATA
    assert all(c.peer == "b" for c in net.asked)
    assert set(a_chunks) <= {c.index for c in net.asked}


def test_late_answer_from_removed_provider_is_used_if_valid() -> None:
    fetch, _ = new_fetch()
    fetch.add_provider("a")
    fetch.add_provider("b")
    cmds = fetch.start()
    first_a = next(c for c in cmds if c.peer == "a")
    fetch.remove_provider("a")
    fetch.on_done("a", first_a.index, DATA[first_a.offset : first_a.offset + first_a.length])
    assert fetch.partial.has_chunk(first_a.index)


def test_all_providers_gone() -> None:
    fetch, _ = new_fetch()
    assert fetch.start() == [] and fetch.failed_reason == "no providers"
    cmds = fetch.add_provider("a")
    assert cmds and fetch.failed_reason is None
    assert fetch.remove_provider("a") == []
    assert fetch.failed_reason == "no providers"


def test_wrong_whole_blob_hash_fails() -> None:
    from dataclasses import replace

    from p2pfl.store import cid_of

    lying_ref = replace(REF, cid=cid_of(b"something else"))
    store = BlobStore(None)
    fetch = BlobFetch(lying_ref, store.open_partial(lying_ref))
    fetch.add_provider("a")
    FakeNet({"a": "honest"}).run(fetch, fetch.start())
    assert not fetch.done and fetch.failed_reason.startswith("hash-mismatch")
    assert not store.has(lying_ref.cid)


def test_resume_only_fetches_missing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    p = store.open_partial(REF)
    for i in range(0, REF.n_chunks, 2):
        p.write_chunk(i, DATA[i * CHUNK : (i + 1) * CHUNK])
    fetch = BlobFetch(REF, BlobStore(tmp_path).open_partial(REF))
    fetch.add_provider("a")
    net = FakeNet({"a": "honest"})
    net.run(fetch, fetch.start())
    assert fetch.done
    assert sorted(c.index for c in net.asked) == list(range(1, REF.n_chunks, 2))


def test_already_complete() -> None:
    store = BlobStore(None)
    p = store.open_partial(REF)
    for i in range(REF.n_chunks):
        p.write_chunk(i, DATA[i * CHUNK : (i + 1) * CHUNK])
    fetch = BlobFetch(REF, p)
    assert fetch.start() == [] and fetch.done


def test_ref_must_match_partial() -> None:
    other = make_blob_ref(b"x" * 5000, CHUNK)
    with pytest.raises(ValueError):
        BlobFetch(other, BlobStore(None).open_partial(REF))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(["honest", "liar", "dead", "flaky", "short"]), min_size=1, max_size=5),
    st.integers(0, 2**32),
)
def test_any_mix_ends_done_iff_an_honest_provider(kinds: list[str], seed: int) -> None:
    fetch, store = new_fetch()
    behaviours = {f"p{i}": k for i, k in enumerate(kinds)}
    cmds = fetch.start()
    for p in behaviours:
        cmds += fetch.add_provider(p)
    FakeNet(behaviours, seed).run(fetch, cmds, shuffle=True)
    if "honest" in kinds:
        assert fetch.done and bytes(store.get(REF.cid)) == DATA
    elif set(kinds) <= {"liar", "dead", "short"}:
        assert fetch.failed_reason == "no providers"
    else:
        assert fetch.done or fetch.failed_reason == "no providers"


def test_deterministic_given_same_calls() -> None:
    def trace() -> list[FetchCmd]:
        fetch, _ = new_fetch()
        for p in ("a", "b", "c", "d"):
            fetch.add_provider(p)
        net = FakeNet({"a": "honest", "b": "liar", "c": "dead", "d": "honest"}, seed=7)
        net.run(fetch, fetch.start(), shuffle=True)
        assert fetch.done
        return net.asked

    assert trace() == trace()
