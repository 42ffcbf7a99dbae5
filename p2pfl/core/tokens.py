"""Typed keys for timers, jobs and aggregations: what the core asked for, echoed back.

The driver treats them as opaque hashable keys; the core matches on their fields. No
tuples or strings as keys: a typo is a type error, not a timer that never matches.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TimerKind(enum.Enum):
    """Deadlines of one task (all absolute times on the driver's clock)."""

    VOLUNTEER = "volunteer"  # volunteering is over: reveal ranking nonces
    REVEAL = "reveal"  # reveals are in (or late): the best-ranked makes the roster
    ROSTER_TAKEOVER = "roster-takeover"  # the best-ranked stayed silent: next in rank
    PUBLISHER_WATCH = "publisher-watch"  # the publisher fails a task nobody coordinates
    REPUBLISH_ROSTER = "republish-roster"  # our roster once more, for late subscribers
    REPUBLISH_REVEAL = "republish-reveal"  # our reveal once more (a lost one leaves us out)
    ROUND = "round"  # a round's deadline (and each takeover grace after it)
    RECLOSE = "reclose"  # waiting for a re-close after an unfetchable update
    UPDATES = "updates"  # ask again for updates a close includes that never came
    REFETCH = "refetch"  # retry a failed fetch from a live author
    STAGE = "stage"  # reduce-scatter: ask again for stage messages still missing
    SLICES = "slices"  # reduce-scatter: ask again for slice offers still missing
    REDUCE = "reduce"  # the reducer's deadline (and each failover grace after it)
    PARTIAL = "partial"  # our final partial once more, while no result has come
    EXPIRE = "expire"  # an offer that never got a roster is forgotten


@dataclass(frozen=True, slots=True)
class TaskTimer:
    task_id: str
    kind: TimerKind
    round: int = 0
    cid: str = ""  # REFETCH: which blob


class NodeTimerKind(enum.Enum):
    CAPABILITIES = "capabilities"  # publish our capability record again
    REPUBLISH = "republish"  # one of our own records once more (late subscribers)


@dataclass(frozen=True, slots=True)
class NodeTimer:
    kind: NodeTimerKind
    name: str = ""  # REPUBLISH: which record


Timer = TaskTimer | NodeTimer


class JobStep(enum.Enum):
    """Taskpack code the core asks the runtime to run."""

    VALIDATE = "validate"  # dry-run validate_inputs on the local data
    INIT = "init"  # the initial global model
    TRAIN = "train"  # one round of local training (or the one execution of analysis)
    EVALUATE = "evaluate"  # the new global model on local validation data
    FINALIZE = "finalize"  # postprocess: this node's final partial
    REDUCE = "reduce"  # the taskpack's reduce over every partial (the reducer only)


@dataclass(frozen=True, slots=True)
class JobToken:
    task_id: str
    step: JobStep
    round: int = 0


@dataclass(frozen=True, slots=True)
class AggToken:
    """An aggregation of round `round` (attempt: the RoundClose re-close count; final: the
    gossip reducer's merge of every final model)."""

    task_id: str
    round: int
    attempt: int = 0
    final: bool = False
    stage: str = ""  # hierarchical rounds: "group" or "global" (core/hierarchy.py)


@dataclass(frozen=True, slots=True)
class SliceToken:
    """Reduce-scatter work (core/scatter.py) of round `round` under close `attempt`:
    `kind` cut | reduce | assemble, `index` the slice (reduce)."""

    task_id: str
    round: int
    attempt: int
    kind: str
    index: int = 0
