"""Experiments: a grid of scenario variants, each run over several seeds, one table.

    p2pfl experiment scenarios/byzantine.yaml \\
        --vary params.aggregator=fedavg,median,krum --vary seed=1,2,3 --out runs/byz

Each `--vary PATH=V1,V2,...` is an axis; the grid is their cartesian product. PATH is a
dotted path into the scenario document (`params.aggregator`, `network.latency_ms`,
`dataset.partition.alpha`); `seed` is the run seed. Values are read as YAML scalars
(`0.5` is a number, `true` a boolean, `fedavg` a string). Every grid point is validated
before the first run starts, so a typo costs nothing.

Without `--vary seed=...` every configuration runs DEFAULT_SEEDS (5) seeds, starting at
the scenario's own: one seed cannot tell an effect from seed noise.

Layout of DIR: `<config>/seed-<s>/` per run (the usual run report), then `results.csv`,
`results.md` (one row per configuration: mean and std over seeds), `comparison.png`
(final accuracy, bars with std error bars), `curves.png` (mean accuracy per round).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from p2pfl.errors import ValidationError
from p2pfl.sim.report import Summary, atomic_write_text, new_figure, save_figure
from p2pfl.sim.runner import ClusterFactory, Progress, claim_out_dir, run_scenario
from p2pfl.sim.scenario import Scenario, apply_override, load_raw, parse

METRICS = ("accuracy", "loss", "bytes_sent_total", "wall_s")
DEFAULT_SEEDS = 5  # seeds per configuration when no `--vary seed=...` is given
FEW_SEEDS = 3  # below this a row's std says little about seed noise: the table says so
# What an experiment writes at its top level (and `--force` removes first).
RESULT_FILES = (
    "results.csv", "results.md", "results.json", "comparison.png", "curves.png",
)  # fmt: skip


@dataclass(frozen=True)
class Axis:
    path: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class GridPoint:
    config: tuple[tuple[str, Any], ...]  # the non-seed axis values, in axis order
    seed: int
    scenario: Scenario
    out_dir: Path

    @property
    def label(self) -> str:
        return config_label(self.config)


@dataclass(frozen=True)
class ConfigRow:
    """One configuration over its seeds: (mean, std) of each of METRICS."""

    config: tuple[tuple[str, Any], ...]
    n_seeds: int
    stats: dict[str, tuple[float | None, float | None]]
    n_failed: int = 0  # runs whose task ended "failed" (their figures still count)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {path: value for path, value in self.config}
        for name, (mean, std) in self.stats.items():
            out[f"{name}_mean"], out[f"{name}_std"] = mean, std
        out["n_seeds"] = self.n_seeds
        out["n_failed"] = self.n_failed
        return out


@dataclass(frozen=True)
class ExperimentResult:
    rows: list[ConfigRow]
    summaries: list[tuple[GridPoint, Summary]]
    files: dict[str, Path]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.as_dict() for r in self.rows],
            "files": {k: str(v) for k, v in self.files.items()},
        }


# --- the grid ------------------------------------------------------------------------


def _scalar(text: str) -> Any:
    text = text.strip()
    value = yaml.safe_load(text) if text else ""
    if isinstance(value, str):
        try:  # YAML 1.1 reads `1e-5` as a string; a researcher means a number.
            return (
                float(value)
                if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value)
                else value
            )
        except ValueError:
            return value
    return value


def parse_vary(spec: str) -> Axis:
    """`path=v1,v2,...` -> Axis. Raises ValidationError naming the bad spec."""
    path, sep, values = spec.partition("=")
    path = path.strip()
    if not sep or not path:
        raise ValidationError([f"--vary {spec!r}: expected PATH=V1,V2,..."], "experiment")
    items = [_scalar(v) for v in values.split(",")]
    if not values.strip() or any(v in ("", None) for v in items):
        raise ValidationError([f"--vary {path}: empty value in {values!r}"], "experiment")
    if len(set(map(repr, items))) != len(items):
        raise ValidationError([f"--vary {path}: a value is listed twice"], "experiment")
    return Axis(path, tuple(items))


def config_label(config: Sequence[tuple[str, Any]]) -> str:
    return ",".join(f"{p}={v}" for p, v in config) or "base"


def _slug(config: Sequence[tuple[str, Any]]) -> str:
    if not config:
        return "base"
    text = "_".join(f"{p.rsplit('.', 1)[-1]}={v}" for p, v in config)
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)[:120]


def expand_grid(
    raw: dict[str, Any],
    axes: Sequence[Axis],
    out_dir: str | Path,
    *,
    base_dir: Path | None = None,
    source: Path | None = None,
    check_files: bool = True,
) -> list[GridPoint]:
    """Every (configuration, seed), validated; all problems of all points in one error."""
    problems: list[str] = []
    paths = [a.path for a in axes]
    for p in {p for p in paths if paths.count(p) > 1}:
        problems.append(f"--vary {p}: given more than once")
    seed_axes = [a for a in axes if a.path == "seed"]
    # Without a seed axis, DEFAULT_SEEDS seeds from the scenario's own: one seed cannot
    # separate two configurations (one digits seed alone varies by about 0.06 in accuracy).
    first = raw.get("seed", 0) if isinstance(raw.get("seed", 0), int) else 0
    seeds: list[Any] = (
        list(seed_axes[0].values) if seed_axes else [first + i for i in range(DEFAULT_SEEDS)]
    )
    for s in seeds:
        if s is not None and (not isinstance(s, int) or isinstance(s, bool) or s < 0):
            problems.append(f"--vary seed: {s!r} is not an integer >= 0")
    if problems:
        raise ValidationError(problems, "experiment")
    others = [a for a in axes if a.path != "seed"]
    out = Path(out_dir)
    points: list[GridPoint] = []
    for combo in itertools.product(*(a.values for a in others)):
        config = tuple(zip((a.path for a in others), combo, strict=True))
        doc = raw
        try:
            for path, value in config:
                doc = apply_override(doc, path, value)
        except ValidationError as exc:
            problems.extend(exc.problems)
            continue
        for seed in seeds:
            try:
                scenario = parse(
                    doc, base_dir=base_dir, source=source, seed=seed, check_files=check_files
                )
            except ValidationError as exc:
                label = config_label(config)
                problems.extend(f"[{label}] {p}" for p in exc.problems)
                continue
            run_dir = out / _slug(config) / f"seed-{scenario.seed}"
            points.append(GridPoint(config, scenario.seed, scenario, run_dir))
    if problems:
        raise ValidationError(list(dict.fromkeys(problems)), "experiment")
    return points


# --- running and tables ----------------------------------------------------------------

# progress(index, total, point, record_or_None, phase): index is 0-based over all runs.
ExperimentProgress = Callable[[int, int, GridPoint, Any, str], None]


def run_experiment(
    scenario_path: str | Path,
    vary: Sequence[str],
    out_dir: str | Path,
    *,
    network: str = "sim",
    progress: ExperimentProgress | None = None,
    cluster_factory: ClusterFactory | None = None,
    check_files: bool = True,
    plots: bool = True,
    force: bool = False,
    executor: str | None = None,
    ray_address: str | None = None,
) -> ExperimentResult:
    """Run every grid point (see the module docstring). `executor` / `ray_address`
    override each scenario's `executor:` (a Ray started here serves every run)."""
    source = Path(scenario_path)
    raw = load_raw(source)
    axes = [parse_vary(v) for v in vary]
    out = Path(out_dir)
    points = expand_grid(
        raw, axes, out, base_dir=source.resolve().parent, source=source, check_files=check_files
    )
    claim_out_dir(out, force)
    for point in points:
        claim_out_dir(point.out_dir, force)
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    summaries: list[tuple[GridPoint, Summary]] = []
    for i, point in enumerate(points):
        hook: Progress | None = None
        if progress is not None:

            def hook(record: Any, phase: str, _i: int = i, _p: GridPoint = point) -> None:
                progress(_i, len(points), _p, record, phase)

        summary = run_scenario(
            point.scenario,
            seed=point.seed,
            network=network,
            out_dir=point.out_dir,
            progress=hook,
            cluster_factory=cluster_factory,
            plots=plots,
            force=force,
            executor=executor,
            ray_address=ray_address,
        )
        summaries.append((point, summary))
    rows = aggregate_rows(summaries)
    files = write_tables(out, rows, [a.path for a in axes if a.path != "seed"])
    if plots:
        files["comparison"] = plot_comparison(out / "comparison.png", rows)
        files["curves"] = plot_curves(out / "curves.png", summaries)
    return ExperimentResult(rows, summaries, files)


def _metric(summary: Summary, name: str) -> float | None:
    if name in ("accuracy", "loss"):
        return summary.final.get(f"{name}_mean")
    return float(getattr(summary, name))


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate_rows(summaries: Sequence[tuple[GridPoint, Summary]]) -> list[ConfigRow]:
    """One row per configuration (first-seen order): mean and sample std over its seeds."""
    groups: dict[tuple[tuple[str, Any], ...], list[Summary]] = {}
    for point, summary in summaries:
        groups.setdefault(point.config, []).append(summary)
    rows = []
    for config, group in groups.items():
        stats = {}
        for name in METRICS:
            xs = [
                v for v in (_metric(s, name) for s in group) if v is not None and math.isfinite(v)
            ]
            stats[name] = _mean_std(xs)
        rows.append(ConfigRow(config, len(group), stats, sum(1 for s in group if s.failed)))
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def results_csv_text(rows: Sequence[ConfigRow], config_paths: Sequence[str]) -> str:
    header = [
        *config_paths,
        *(f"{m}_{k}" for m in METRICS for k in ("mean", "std")),
        "n_seeds",
        "n_failed",
    ]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        d = row.as_dict()
        w.writerow([_cell(d.get(h)) for h in header])
    return buf.getvalue()


def results_md_text(rows: Sequence[ConfigRow], config_paths: Sequence[str]) -> str:
    def pm(stat: tuple[float | None, float | None], fmt: str) -> str:
        mean, std = stat
        return "n/a" if mean is None else f"{mean:{fmt}} ± {std or 0.0:{fmt}}"

    header = [
        *(config_paths or ["configuration"]),
        "accuracy",
        "loss",
        "MB sent",
        "wall s",
        "seeds",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        mb = tuple(None if v is None else v / 1e6 for v in row.stats["bytes_sent_total"])
        cells = [str(v) for _, v in row.config] or ["base"]
        cells += [
            pm(row.stats["accuracy"], ".4f"),
            pm(row.stats["loss"], ".4f"),
            pm(mb, ".2f"),  # type: ignore[arg-type]
            pm(row.stats["wall_s"], ".1f"),
            str(row.n_seeds) + (f" ({row.n_failed} failed)" if row.n_failed else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    counts = sorted({row.n_seeds - row.n_failed for row in rows})
    lines += ["", f"Mean ± sample std over each configuration's seeds ({_seed_counts(counts)})."]
    if counts and counts[0] < FEW_SEEDS:
        lines.append(
            f"Warning: a configuration has fewer than {FEW_SEEDS} seeds; its std does not "
            "measure seed noise, and a difference smaller than that noise (about 0.06 in "
            "accuracy for one digits seed) is not an effect."
        )
    return "\n".join(lines) + "\n"


def _seed_counts(counts: list[int]) -> str:
    if len(counts) == 1:
        return f"{counts[0]} seed{'s' if counts[0] != 1 else ''} each"
    return f"{', '.join(str(c) for c in counts)} seeds (see the seeds column)"


def write_tables(
    out_dir: Path, rows: Sequence[ConfigRow], config_paths: Sequence[str]
) -> dict[str, Path]:
    return {
        "results_csv": atomic_write_text(
            out_dir / "results.csv", results_csv_text(rows, config_paths)
        ),
        "results_md": atomic_write_text(
            out_dir / "results.md", results_md_text(rows, config_paths)
        ),
        "results_json": atomic_write_text(
            out_dir / "results.json", json.dumps([r.as_dict() for r in rows], indent=2) + "\n"
        ),
    }


def short_labels(configs: Sequence[tuple[tuple[str, Any], ...]]) -> list[str]:
    """Plot labels: only the axes that vary, by their last path component."""
    varying = {
        p for p in {p for c in configs for p, _ in c} if len({dict(c).get(p) for c in configs}) > 1
    }
    return [
        ", ".join(f"{p.rsplit('.', 1)[-1]}={v}" for p, v in c if p in varying) or "base"
        for c in configs
    ]


def plot_comparison(path: Path, rows: Sequence[ConfigRow]) -> Path:
    fig = new_figure(max(5.0, 1.2 * len(rows) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    labels = short_labels([r.config for r in rows])
    means = [r.stats["accuracy"][0] or 0.0 for r in rows]
    stds = [r.stats["accuracy"][1] or 0.0 for r in rows]
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4)
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
    ax.set_ylabel("final accuracy (mean over nodes)")
    ax.set_title("final accuracy (error bars: std over seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _round_accuracy(rounds_csv: Path) -> dict[int, float]:
    """Mean accuracy of live nodes per round, read back from a run's rounds.csv."""
    acc: dict[int, list[float]] = {}
    if not rounds_csv.is_file():
        return {}
    with rounds_csv.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["alive"] == "1" and row["accuracy"]:
                acc.setdefault(int(row["round"]), []).append(float(row["accuracy"]))
    return {r: statistics.fmean(v) for r, v in acc.items()}


def plot_curves(path: Path, summaries: Sequence[tuple[GridPoint, Summary]]) -> Path:
    per_config: dict[str, dict[int, list[float]]] = {}
    labels = dict(
        zip(
            (p.config for p, _ in summaries),
            short_labels([p.config for p, _ in summaries]),
            strict=True,
        )
    )
    for point, _summary in summaries:
        curve = per_config.setdefault(labels[point.config], {})
        for rnd, acc in _round_accuracy(point.out_dir / "rounds.csv").items():
            curve.setdefault(rnd, []).append(acc)
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in per_config.items():
        xs = sorted(curve)
        ax.plot(xs, [statistics.fmean(curve[x]) for x in xs], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (mean over nodes and seeds)")
    ax.set_title("accuracy per round")
    ax.grid(True, alpha=0.3)
    if per_config:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)
