"""What a simulated run leaves behind: rounds.csv, summary.json and PNG plots.

rounds.csv is the reproducible artefact: one row per node per round, sorted by (round,
node), floats written with a fixed format and no wall-clock value in it, so the same
scenario and seed on the simulated network give a byte-identical file. summary.json holds
the headline figures (including wall time, which is why it is *not* expected to be
byte-identical). Every file is written atomically (temp file, fsync, rename).

Plots use matplotlib's object API on an Agg canvas: no pyplot global state, no display.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2pfl.fsutil import atomic_write

ROUND_COLUMNS = (
    "node", "round", "accuracy", "loss", "bytes_sent", "bytes_received", "epsilon", "alive",
)  # fmt: skip
FLOAT_FORMAT = "%.6f"
PLOT_FILES = ("accuracy.png", "loss.png", "bytes.png")


class RecordLike(Protocol):
    """The fields of p2pfl.sim.cluster.RoundRecord that reports read."""

    node: int
    round: int
    accuracy: float | None
    loss: float | None
    bytes_sent: int
    bytes_received: int
    epsilon: float | None
    alive: bool


@dataclass(frozen=True)
class RoundStat:
    """One round over all nodes: what the plots and experiment curves show."""

    round: int
    alive: int
    accuracy_mean: float | None
    accuracy_min: float | None
    accuracy_max: float | None
    loss_mean: float | None
    loss_min: float | None
    loss_max: float | None
    bytes_sent: int
    bytes_received: int
    epsilon_max: float | None


@dataclass(frozen=True)
class Summary:
    scenario: str
    seed: int
    nodes: int
    rounds: int
    network: str
    final: dict[str, float | None]  # accuracy_mean/min/max, loss_mean over live nodes
    bytes_sent_total: int
    bytes_received_total: int
    wall_s: float
    virtual_s: float | None
    rounds_completed: int
    test: dict[str, float] = field(default_factory=dict)  # final model on the global test set
    result: dict[str, Any] = field(default_factory=dict)  # the signed task result
    epsilon_max: float | None = None
    out_dir: str | None = None
    # the task result's status ("succeeded", "failed"...), or the run's own when it stopped
    # early: "interrupted" (Ctrl-C) or "errored"; the files then hold the rounds until then
    status: str | None = None
    reason: str = ""  # why it failed or stopped, if it did
    warnings: list[str] = field(default_factory=list)  # e.g. settings a network ignored
    bytes_sent_per_round: float | None = None  # all nodes' bytes sent / rounds completed

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- formatting ----------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return FLOAT_FORMAT % value


def sorted_records(records: Iterable[RecordLike]) -> list[RecordLike]:
    """(round, node) order: independent of the order the cluster yielded them in."""
    return sorted(records, key=lambda r: (r.round, r.node))


def rounds_csv_text(records: Iterable[RecordLike]) -> str:
    lines = [",".join(ROUND_COLUMNS)]
    for r in sorted_records(records):
        lines.append(
            ",".join(
                (
                    str(int(r.node)),
                    str(int(r.round)),
                    _fmt(r.accuracy),
                    _fmt(r.loss),
                    str(int(r.bytes_sent)),
                    str(int(r.bytes_received)),
                    _fmt(r.epsilon),
                    "1" if r.alive else "0",
                )
            )
        )
    return "\n".join(lines) + "\n"


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def round_stats(records: Iterable[RecordLike]) -> list[RoundStat]:
    """Per-round aggregates; accuracy/loss/epsilon over live nodes that reported one."""
    by_round: dict[int, list[RecordLike]] = {}
    for r in records:
        by_round.setdefault(int(r.round), []).append(r)
    out: list[RoundStat] = []
    for rnd in sorted(by_round):
        rs = by_round[rnd]
        live = [r for r in rs if r.alive]
        acc = [float(r.accuracy) for r in live if r.accuracy is not None and _ok(r.accuracy)]
        loss = [float(r.loss) for r in live if r.loss is not None and _ok(r.loss)]
        eps = [float(r.epsilon) for r in rs if r.epsilon is not None and _ok(r.epsilon)]
        out.append(
            RoundStat(
                round=rnd,
                alive=len(live),
                accuracy_mean=_mean(acc),
                accuracy_min=min(acc) if acc else None,
                accuracy_max=max(acc) if acc else None,
                loss_mean=_mean(loss),
                loss_min=min(loss) if loss else None,
                loss_max=max(loss) if loss else None,
                bytes_sent=sum(int(r.bytes_sent) for r in rs),
                bytes_received=sum(int(r.bytes_received) for r in rs),
                epsilon_max=max(eps) if eps else None,
            )
        )
    return out


def _ok(v: float | None) -> bool:
    return v is not None and math.isfinite(float(v))


def final_stats(stats: Sequence[RoundStat]) -> dict[str, float | None]:
    """The last round in which some live node reported an accuracy (or loss)."""
    for s in reversed(stats):
        if s.accuracy_mean is not None or s.loss_mean is not None:
            return {
                "accuracy_mean": s.accuracy_mean,
                "accuracy_min": s.accuracy_min,
                "accuracy_max": s.accuracy_max,
                "loss_mean": s.loss_mean,
            }
    return {"accuracy_mean": None, "accuracy_min": None, "accuracy_max": None, "loss_mean": None}


def summarize(
    *,
    scenario: str,
    seed: int,
    nodes: int,
    rounds: int,
    network: str,
    records: Sequence[RecordLike],
    wall_s: float,
    virtual_s: float | None = None,
    test: Mapping[str, float] | None = None,
    result: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    warnings: Sequence[str] = (),
) -> Summary:
    stats = round_stats(records)
    eps = [s.epsilon_max for s in stats if s.epsilon_max is not None]
    completed = max((s.round for s in stats), default=0)
    sent = sum(s.bytes_sent for s in stats)
    return Summary(
        scenario=scenario,
        seed=seed,
        nodes=nodes,
        rounds=rounds,
        network=network,
        final=final_stats(stats),
        bytes_sent_total=sent,
        bytes_received_total=sum(s.bytes_received for s in stats),
        wall_s=round(float(wall_s), 3),
        virtual_s=None if virtual_s is None else round(float(virtual_s), 6),
        rounds_completed=completed,
        test={k: float(v) for k, v in (test or {}).items() if _num(v)},
        result=_jsonable(dict(result or {})),
        epsilon_max=max(eps) if eps else None,
        out_dir=None if out_dir is None else str(out_dir),
        status=None if result is None or result.get("status") is None else str(result["status"]),
        reason=str((result or {}).get("reason") or ""),
        warnings=[str(w) for w in warnings],
        bytes_sent_per_round=round(sent / completed, 1) if completed else None,
    )


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _jsonable(v: Any) -> Any:
    """Keep what JSON can hold; bytes become hex, odd objects their str()."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, str | int | float | bool):
        return v
    if hasattr(v, "item"):  # numpy scalars
        return _jsonable(v.item())
    return str(v)


def summary_json(summary: Summary) -> str:
    return json.dumps(summary.as_dict(), sort_keys=True, separators=(",", ":"))


# --- files ---------------------------------------------------------------------------


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, text.encode("utf-8"))


def write_rounds_csv(path: str | Path, records: Iterable[RecordLike]) -> Path:
    return atomic_write_text(path, rounds_csv_text(records))


def write_summary(path: str | Path, summary: Summary) -> Path:
    return atomic_write_text(path, json.dumps(summary.as_dict(), indent=2, sort_keys=True) + "\n")


def new_figure(width: float = 7.0, height: float = 4.0) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot, safe in any thread/headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    import io

    buf = io.BytesIO()
    # No timestamps/software tags in the PNG: same data, same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return atomic_write(path, buf.getvalue())


def _band_plot(stats: Sequence[RoundStat], what: str, title: str, path: Path) -> Path:
    rows = [s for s in stats if getattr(s, f"{what}_mean") is not None]
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    if rows:
        xs = [s.round for s in rows]
        ax.fill_between(
            xs,
            [getattr(s, f"{what}_min") for s in rows],
            [getattr(s, f"{what}_max") for s in rows],
            alpha=0.25,
            label="min-max over nodes",
        )
        ax.plot(xs, [getattr(s, f"{what}_mean") for s in rows], marker="o", label="mean")
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, f"no {what} reported", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("round")
    ax.set_ylabel(what)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_plots(out_dir: str | Path, stats: Sequence[RoundStat], title: str) -> list[Path]:
    """accuracy.png, loss.png (mean with min-max band) and bytes.png (per round)."""
    out = Path(out_dir)
    paths = [
        _band_plot(stats, "accuracy", f"{title}: accuracy per round", out / "accuracy.png"),
        _band_plot(stats, "loss", f"{title}: loss per round", out / "loss.png"),
    ]
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    xs = [s.round for s in stats]
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [s.bytes_sent / 1e6 for s in stats], width, label="sent")
    ax.bar(
        [x + width / 2 for x in xs],
        [s.bytes_received / 1e6 for s in stats],
        width,
        label="received",
    )
    ax.set_xlabel("round")
    ax.set_ylabel("MB (all nodes)")
    ax.set_title(f"{title}: bytes per round")
    if stats:
        ax.legend(loc="best")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "bytes.png"))
    return paths


def write_report(
    out_dir: str | Path, summary: Summary, records: Sequence[RecordLike], *, plots: bool = True
) -> dict[str, Path]:
    """rounds.csv, summary.json and (unless plots=False) the three PNGs in `out_dir`."""
    out = Path(out_dir)
    files = {
        "rounds": write_rounds_csv(out / "rounds.csv", records),
        "summary": write_summary(out / "summary.json", summary),
    }
    if plots:
        for p in write_plots(out, round_stats(records), summary.scenario):
            files[p.stem] = p
    return files
