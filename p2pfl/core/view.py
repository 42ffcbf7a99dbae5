"""How followers see a task: each participant's state, the task summary, the result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pfl.core.messages import TaskResult


@dataclass
class NodeState:
    """What the task's followers see of one participant."""

    state: str = "volunteered"
    round: int = 0
    loss: float | None = None
    accuracy: float | None = None
    epsilon: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "round": self.round,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "epsilon": self.epsilon,
        }

    def absorb(self, metrics: Any) -> None:
        """Take loss / accuracy / epsilon from a peer's metrics (only numbers)."""
        if not isinstance(metrics, dict):
            return
        for name in ("loss", "accuracy", "epsilon"):
            value = metrics.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                setattr(self, name, float(value))


def withdrew_summary(withdrawn: dict[str, str]) -> str:
    """Why participants left, e.g. `2 withdrew: train failed: ValueError (2 nodes)`."""
    counts: dict[str, int] = {}
    for why in withdrawn.values():
        counts[why] = counts.get(why, 0) + 1
    parts = [f"{why} ({n} node{'s' if n != 1 else ''})" for why, n in sorted(counts.items())]
    return f"{len(withdrawn)} withdrew: " + "; ".join(parts)


def result_fields(result: TaskResult) -> dict[str, Any]:
    """The fields of a signed result every view shows (tasks and flow steps alike)."""
    return {
        "task_id": result.task_id,
        "status": result.status,
        "reason": result.reason,
        "participants": list(result.participants),
        "rounds": result.rounds,
        "metrics": result.metrics,
        "model_cid": result.model.cid if result.model else None,
        "reducer": result.reducer,
    }


def result_dict(result: TaskResult, signer: str, offer: Any) -> dict[str, Any]:
    return {
        **result_fields(result),
        "signer": signer,
        "signature_ok": True,  # unsealed with a valid signature, or it would not be here
        "name": offer.name,
        "version": offer.version,
        "cid": offer.cid,
        "created": result.created,
    }


def jsonable(value: Any) -> Any:
    """Reduce output as msgpack-native values (numpy scalars and arrays become Python)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)
