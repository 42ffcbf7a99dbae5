"""How an offer asks its fedavg/fedprox rounds to move updates: the `aggregation` task
parameter, checked when the offer is received (core/offer.py) and read by the rule
every node evaluates (core/scatter.py, core/hierarchy.py).

    aggregation: {kind: auto}                         the default: fedavg/fedprox at n >= 4
                                                      reduce-scatter with every slice
                                                      checked (core/verify.py); otherwise
                                                      all-gather
    aggregation: {kind: allgather}                    every node fetches every update and
                                                      combines them itself
    aggregation: {kind: reduce-scatter}               each node combines one slice for all
                                                      (2(n-1)/n models per node per round;
                                                      checked under fedavg, trusts each
                                                      slice's owner under median, trimmed
                                                      mean and Krum: core/scatter.py)
    aggregation: {kind: hierarchical, group_size: 8}  groups of 8 by rank, leaders combine
    aggregation: {kind: hierarchical, group_by: region}  a group per value of the site label
                                                         `region` (p2pfl node --label region=eu)
"""

from __future__ import annotations

from typing import Any

from p2pfl.core.messages import LABEL_RE

KINDS = ("auto", "allgather", "reduce-scatter", "hierarchical")
MAX_GROUP_SIZE = 4096


def aggregation(offer: Any) -> dict[str, Any]:
    """The offer's `aggregation` parameter; {} when it sets none."""
    params = offer.params if isinstance(offer.params, dict) else {}
    value = params.get("aggregation")
    return value if isinstance(value, dict) else {}


def aggregation_problem(params: Any) -> str | None:
    """Why an offer's `aggregation` parameter is not acceptable, or None."""
    value = params.get("aggregation") if isinstance(params, dict) else None
    if value is None:
        return None
    if not isinstance(value, dict) or not set(value) <= {"kind", "group_size", "group_by"}:
        return "aggregation must be {kind, group_size, group_by}"
    kind = value.get("kind", "auto")
    if kind not in KINDS:
        return f"aggregation kind {kind!r} is not one of {', '.join(KINDS)}"
    size = value.get("group_size")
    if size is not None and (
        kind != "hierarchical" or type(size) is not int or not 2 <= size <= MAX_GROUP_SIZE
    ):
        return f"aggregation group_size must be an integer in [2, {MAX_GROUP_SIZE}], for kind hierarchical"
    by = value.get("group_by")
    if by is not None and (
        kind != "hierarchical" or type(by) is not str or not LABEL_RE.fullmatch(by)
    ):
        return "aggregation group_by must name a site label (letters, digits, '.', '_', '-'), for kind hierarchical"
    return None
