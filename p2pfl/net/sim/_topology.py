"""Overlay graphs over node indices 0..n-1, as sorted lists of edges (i, j) with i < j.

Pure functions of (n, parameters, rng): the hub passes its seeded rng, so a topology is
reproducible for a seed.
"""

from __future__ import annotations

import random

from p2pfl.errors import LocalProtocolError

Edge = tuple[int, int]
TOPOLOGIES = ("full", "ring", "line", "star", "random-regular", "small-world")


def make_edges(
    kind: str, n: int, rng: random.Random, *, degree: int = 4, rewire: float = 0.1
) -> list[Edge]:
    if kind == "full":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if kind == "line":
        return [(i, i + 1) for i in range(n - 1)]
    if kind == "ring":
        return _norm([(i, (i + 1) % n) for i in range(n)]) if n > 2 else make_edges("line", n, rng)
    if kind == "star":
        return [(0, j) for j in range(1, n)]
    if kind == "random-regular":
        return random_regular(n, degree, rng)
    if kind == "small-world":
        return small_world(n, degree, rewire, rng)
    raise LocalProtocolError(f"topology: unknown kind {kind!r}; expected one of {TOPOLOGIES}")


def _norm(edges: list[Edge]) -> list[Edge]:
    return sorted({(min(a, b), max(a, b)) for a, b in edges if a != b})


def random_regular(n: int, d: int, rng: random.Random) -> list[Edge]:
    """A uniform-ish random d-regular simple graph (Steger-Wormald pairing with restarts).

    Plain configuration-model rejection almost never yields a simple graph for d = 8
    (probability about exp(-(d*d-1)/4)); pairing only "suitable" stubs does, in one pass
    nearly always.
    """
    if d < 0 or d >= n or (n * d) % 2:
        raise LocalProtocolError(
            f"random-regular: need 0 <= degree < n and n*degree even (n={n}, degree={d})"
        )
    for _ in range(100):
        edges = _try_pairing(n, d, rng)
        if edges is not None:
            return sorted(edges)
    raise LocalProtocolError(f"random-regular: no graph found for n={n}, degree={d}")


def _try_pairing(n: int, d: int, rng: random.Random) -> set[Edge] | None:
    stubs = [v for v in range(n) for _ in range(d)]
    edges: set[Edge] = set()
    while stubs:
        for _ in range(50):
            i, j = rng.randrange(len(stubs)), rng.randrange(len(stubs))
            a, b = stubs[i], stubs[j]
            e = (min(a, b), max(a, b))
            if a != b and e not in edges:
                break
        else:
            # Many misses: either nearly stuck or truly stuck; look for any suitable pair.
            pairs = [
                (i, j)
                for i in range(len(stubs))
                for j in range(i + 1, len(stubs))
                if stubs[i] != stubs[j]
                and (min(stubs[i], stubs[j]), max(stubs[i], stubs[j])) not in edges
            ]
            if not pairs:
                return None
            i, j = pairs[rng.randrange(len(pairs))]
            a, b = stubs[i], stubs[j]
            e = (min(a, b), max(a, b))
        edges.add(e)
        # Remove both stubs by swapping with the tail (higher index first).
        for k in sorted((i, j), reverse=True):
            stubs[k] = stubs[-1]
            stubs.pop()
    return edges


def small_world(n: int, k: int, p: float, rng: random.Random) -> list[Edge]:
    """Watts-Strogatz: a ring lattice where each node links k//2 neighbours per side, then
    each lattice edge's far end is rewired with probability p (no loops, no duplicates)."""
    if k < 2 or k >= n or not 0.0 <= p <= 1.0:
        raise LocalProtocolError(
            f"small-world: need 2 <= degree < n and 0 <= rewire <= 1 (n={n}, degree={k}, rewire={p})"
        )
    adj: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):
        for s in range(1, k // 2 + 1):
            j = (i + s) % n
            adj[i].add(j)
            adj[j].add(i)
    for s in range(1, k // 2 + 1):
        for i in range(n):
            j = (i + s) % n
            if j not in adj[i] or rng.random() >= p:
                continue
            if len(adj[i]) >= n - 1:
                continue  # i already links everyone: nowhere to rewire to
            new = rng.randrange(n)
            while new == i or new in adj[i]:
                new = rng.randrange(n)
            adj[i].discard(j)
            adj[j].discard(i)
            adj[i].add(new)
            adj[new].add(i)
    return sorted((i, j) for i in range(n) for j in adj[i] if i < j)
