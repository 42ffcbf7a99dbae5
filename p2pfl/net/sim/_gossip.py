"""Gossip dissemination plans: per-source BFS trees over the live overlay, cached.

A publish reaches each node along its BFS-tree path from the publisher. The arrival time
of a ``size``-byte message at a node is ``cum_lat + size * cum_inv`` where both sums run
over the tree path (per hop: mean of the two ends' latency, and the slower end's seconds
per byte). Nodes with the same (cum_lat, cum_inv) always arrive together, so a publish is
one heap entry per such group (one per hop depth when all links are alike), not one per
receiver: that is what keeps a 1,000-node broadcast cheap.

The BFS is level-synchronous in numpy (a few array ops per level, no per-node Python), and
deterministic: a node's parent is its lowest-positioned neighbour in the previous level,
and a level lists its nodes in index order.
"""

from __future__ import annotations

import numpy as np

# One arrival group: cumulative latency (s), cumulative seconds per byte, receivers and
# their BFS parents (int32 arrays, same length).
Group = tuple[float, float, np.ndarray, np.ndarray]


class GossipPlanner:
    """BFS trees for one snapshot of the overlay (live nodes, links inside a partition)."""

    def __init__(
        self,
        n: int,
        edges: np.ndarray,
        lat: np.ndarray,
        inv: np.ndarray,
    ) -> None:
        self._n = n
        self._lat = lat
        self._inv = inv
        self._cache: dict[int, list[Group]] = {}
        if len(edges):
            e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
            rows = np.concatenate([e[:, 0], e[:, 1]])
            cols = np.concatenate([e[:, 1], e[:, 0]])
            order = np.lexsort((cols, rows))  # neighbours of a node in index order
            self._indices = cols[order]
            self._indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
        else:
            self._indices = np.zeros(0, dtype=np.int64)
            self._indptr = np.zeros(n + 1, dtype=np.int64)

    def plan(self, src: int) -> list[Group]:
        groups = self._cache.get(src)
        if groups is None:
            groups = self._cache[src] = self._bfs(src)
        return groups

    def _bfs(self, src: int) -> list[Group]:
        n, indptr, indices = self._n, self._indptr, self._indices
        lat, inv = self._lat, self._inv
        visited = np.zeros(n, dtype=bool)
        visited[src] = True
        cum_lat = np.zeros(n)
        cum_inv = np.zeros(n)
        frontier = np.array([src], dtype=np.int64)
        groups: list[Group] = []
        while frontier.size:
            starts = indptr[frontier]
            counts = indptr[frontier + 1] - starts
            total = int(counts.sum())
            if total == 0:
                break
            # Positions of every neighbour of every frontier node, frontier order kept.
            offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(total)
            cand = indices[offsets]
            par = np.repeat(frontier, counts)
            fresh = ~visited[cand]
            cand, par = cand[fresh], par[fresh]
            if not cand.size:
                break
            level, first = np.unique(cand, return_index=True)
            parents = par[first]
            visited[level] = True
            cum_lat[level] = cum_lat[parents] + (lat[parents] + lat[level]) * 0.5
            cum_inv[level] = cum_inv[parents] + np.maximum(inv[parents], inv[level])
            groups.extend(_split(level, parents, cum_lat[level], cum_inv[level]))
            frontier = level
        return groups


def _split(level: np.ndarray, parents: np.ndarray, cl: np.ndarray, ci: np.ndarray) -> list[Group]:
    """Split one BFS level into groups of equal (cum_lat, cum_inv), index order inside."""
    if (cl == cl[0]).all() and (ci == ci[0]).all():
        return [(float(cl[0]), float(ci[0]), level.astype(np.int32), parents.astype(np.int32))]
    order = np.lexsort((level, ci, cl))
    level, parents, cl, ci = level[order], parents[order], cl[order], ci[order]
    cuts = np.flatnonzero((cl[1:] != cl[:-1]) | (ci[1:] != ci[:-1])) + 1
    bounds = [0, *cuts.tolist(), len(level)]
    return [
        (
            float(cl[a]),
            float(ci[a]),
            level[a:b].astype(np.int32),
            parents[a:b].astype(np.int32),
        )
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
