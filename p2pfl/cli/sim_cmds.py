"""`p2pfl simulate` and `p2pfl experiment`: the researcher's commands.

Progress goes to stderr (a rich progress bar: round r/R, nodes alive, accuracy), results
to stdout; `--json` prints exactly one JSON line on stdout. Errors are one line on stderr
(`error: FILE: path: problem; ...`) with a non-zero exit. The scenario (or the whole grid)
is validated, and the output folder checked, before anything runs or is created.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import click

from p2pfl.errors import P2PFLError, ValidationError

NETWORK_CHOICE = click.Choice(["sim", "libp2p"])


def _executor_options(fn: Any) -> Any:
    """--executor and --ray-address, shared by simulate and experiment."""
    fn = click.option(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster to join: auto (the one running here), HOST:PORT, ray://HOST:PORT",
    )(fn)
    return click.option(
        "--executor",
        type=click.Choice(["local", "ray"]),
        help="where taskpack jobs run (default: the scenario's executor, else local)",
    )(fn)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(exc.problems)
    return " ".join(str(exc).split()) or type(exc).__name__


class _RoundTracker:
    """Folds RoundRecords into what the bar shows: current round, alive, accuracy."""

    def __init__(self) -> None:
        self.round = 0
        self.alive = 0
        self.acc: list[float] = []

    def add(self, record: Any) -> None:
        if record.round != self.round:
            self.round, self.alive, self.acc = record.round, 0, []
        if record.alive:
            self.alive += 1
            if record.accuracy is not None:
                self.acc.append(float(record.accuracy))

    def text(self) -> str:
        acc = f"{statistics.fmean(self.acc):.3f}" if self.acc else "-"
        return f"alive {self.alive}  acc {acc}"


def _progress() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )


@click.command("simulate")
@click.argument("scenario_file", type=click.Path(path_type=Path))
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), help="default: runs/<name>-<seed>/"
)
@click.option("--seed", type=click.IntRange(min=0), help="override the scenario's seed")
@click.option("--network", type=NETWORK_CHOICE, default="sim", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON line")
@click.option("--no-plots", is_flag=True, help="skip the PNG plots")
@click.option("--force", is_flag=True, help="replace an earlier run in the output folder")
@_executor_options
def simulate_cmd(
    scenario_file: Path,
    out_dir: Path | None,
    seed: int | None,
    network: str,
    as_json: bool,
    no_plots: bool,
    force: bool,
    executor: str | None,
    ray_address: str | None,
) -> None:
    """Run a simulated scenario and write rounds.csv, summary.json and plots."""
    from p2pfl.sim.runner import (
        choose_executor,
        claim_out_dir,
        default_out_dir,
        run_scenario,
    )
    from p2pfl.sim.scenario import load_scenario

    try:
        scenario = load_scenario(scenario_file, seed=seed)
    except ValidationError as exc:
        raise click.ClickException(f"{scenario_file}: {_one_line(exc)}") from None
    try:  # before any progress output: a missing Ray is the one line printed
        choose_executor(scenario, network, executor, ray_address)
    except (ValidationError, ImportError) as exc:
        raise click.ClickException(_one_line(exc)) from None
    run_seed = scenario.seed
    out = out_dir or default_out_dir(scenario, run_seed)
    try:
        claim_out_dir(out, force)  # before the progress bar: nothing has started yet
    except P2PFLError as exc:
        raise click.ClickException(_one_line(exc)) from None
    tracker = _RoundTracker()
    phases = {"data": "preparing data", "cluster": "starting nodes", "report": "writing report"}
    try:
        with _progress() as bar:
            task = bar.add_task(scenario.name, total=scenario.rounds, info="")

            def on_progress(record: Any, phase: str) -> None:
                if record is None:
                    bar.update(task, info=phases.get(phase, ""))
                    return
                tracker.add(record)
                bar.update(
                    task,
                    completed=max(0, record.round - 1),
                    info=f"round {record.round}  {tracker.text()}",
                )

            summary = run_scenario(
                scenario,
                seed=run_seed,
                network=network,
                out_dir=out,
                progress=on_progress,
                plots=not no_plots,
                force=force,
                executor=executor,
                ray_address=ray_address,
            )
            bar.update(task, completed=summary.rounds_completed, info=tracker.text())
    except KeyboardInterrupt:
        _interrupted(out)
    except (P2PFLError, OSError, ImportError, NotImplementedError) as exc:
        raise click.ClickException(_one_line(exc)) from None
    if as_json:
        click.echo(json.dumps(summary.as_dict(), sort_keys=True, separators=(",", ":")))
    else:
        _print_summary(summary, scenario.nodes, out, no_plots)
    if summary.failed:
        reason = summary.reason or "no reason given"
        raise click.ClickException(f"the task failed: {reason} (report in {out}/)")


def _interrupted(out: Path) -> None:
    """Ctrl-C: say what was kept (a run folder holds whole files only), exit 130."""
    from p2pfl.cli.main import fail

    kept = (out / "summary.json").is_file()
    detail = f"the rounds so far are in {out}/ (status interrupted)" if kept else "nothing kept"
    fail(f"interrupted: {detail}", 130)


def _print_summary(summary: Any, nodes: int, out: Path, no_plots: bool) -> None:
    final = summary.final
    acc = final["accuracy_mean"]
    click.echo(
        f"{summary.scenario} seed {summary.seed}: {nodes} nodes, "
        f"{summary.rounds_completed} rounds on {summary.network}"
    )
    if acc is not None:
        loss = final["loss_mean"]
        click.echo(
            f"  final accuracy {acc:.4f} (min {final['accuracy_min']:.4f}, "
            f"max {final['accuracy_max']:.4f})" + (f", loss {loss:.4f}" if loss is not None else "")
        )
    click.echo(f"  sent {summary.bytes_sent_total / 1e6:.2f} MB, wall {summary.wall_s:.1f} s")
    click.echo(f"  report: {out}/ (rounds.csv, summary.json{'' if no_plots else ', *.png'})")


@click.command("experiment")
@click.argument("scenario_file", type=click.Path(path_type=Path))
@click.option(
    "--vary",
    "vary",
    multiple=True,
    metavar="PATH=V1,V2",
    help="an axis of the grid: a dotted scenario path (or seed) and its values; repeatable",
)
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), help="default: runs/<name>-experiment/"
)
@click.option("--network", type=NETWORK_CHOICE, default="sim", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the results table as one JSON line")
@click.option("--no-plots", is_flag=True, help="skip the PNG plots")
@click.option("--force", is_flag=True, help="replace an earlier experiment in the output folder")
@_executor_options
def experiment_cmd(
    scenario_file: Path,
    vary: tuple[str, ...],
    out_dir: Path | None,
    network: str,
    as_json: bool,
    no_plots: bool,
    force: bool,
    executor: str | None,
    ray_address: str | None,
) -> None:
    """Run a grid of scenario variants over seeds and compare them in one table."""
    from p2pfl.sim.experiment import expand_grid, parse_vary, run_experiment
    from p2pfl.sim.runner import choose_executor, claim_out_dir
    from p2pfl.sim.scenario import load_raw

    try:
        raw = load_raw(scenario_file)
        axes = [parse_vary(v) for v in vary]
        out = out_dir or Path("runs") / f"{raw.get('name', scenario_file.stem)}-experiment"
        # Validate the whole grid before anything runs (run_experiment does it again, cheaply).
        points = expand_grid(
            raw, axes, out, base_dir=scenario_file.resolve().parent, source=scenario_file
        )
        claim_out_dir(out, force)
    except ValidationError as exc:
        raise click.ClickException(f"{scenario_file}: {_one_line(exc)}") from None
    except P2PFLError as exc:
        raise click.ClickException(_one_line(exc)) from None
    try:  # before any progress output: a missing Ray is the one line printed
        for point in points:
            choose_executor(point.scenario, network, executor, ray_address)
    except (ValidationError, ImportError) as exc:
        raise click.ClickException(_one_line(exc)) from None

    tracker = _RoundTracker()
    try:
        with _progress() as bar:
            runs = bar.add_task("runs", total=len(points), info="")
            rounds = bar.add_task("rounds", total=1, info="")
            state = {"index": -1}

            def on_progress(i: int, total: int, point: Any, record: Any, phase: str) -> None:
                if i != state["index"]:
                    state["index"] = i
                    bar.update(runs, completed=i, info=f"{point.label} seed {point.seed}")
                    bar.reset(rounds, total=point.scenario.rounds, info="")
                if record is not None:
                    tracker.add(record)
                    bar.update(rounds, completed=max(0, record.round - 1), info=tracker.text())
                elif phase == "done":
                    bar.update(rounds, completed=point.scenario.rounds)
                    bar.update(runs, completed=i + 1)

            result = run_experiment(
                scenario_file,
                list(vary),
                out,
                network=network,
                progress=on_progress,
                plots=not no_plots,
                force=force,
                executor=executor,
                ray_address=ray_address,
            )
    except KeyboardInterrupt:
        from p2pfl.cli.main import fail

        fail(f"interrupted: finished runs are in {out}/ (no results table)", 130)
    except (P2PFLError, OSError, ImportError, NotImplementedError) as exc:
        raise click.ClickException(_one_line(exc)) from None
    if as_json:
        click.echo(json.dumps(result.as_dict(), sort_keys=True, separators=(",", ":")))
        return
    click.echo((out / "results.md").read_text(), nl=False)
    click.echo(
        f"results: {out}/ (results.csv, results.md{'' if no_plots else ', comparison.png, curves.png'})"
    )
