"""The `p2pfl` command: a lazy click group, so `p2pfl --help` imports none of the commands.

Each command lives in a module named in `COMMANDS` and is imported only when run (or when
its own --help is asked for). A module that is missing or broken breaks only its own
command, with a one-line message. Errors from any command, click's usage errors included,
are `error: ...` on stderr and a non-zero exit (2 for a bad command line, 130 for Ctrl-C,
1 otherwise), never a traceback (set P2PFL_DEBUG=1 to see one). A list of problems (an
invalid manifest) follows its `error:` line, one problem per indented line.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

# name -> ("module:attribute", one-line help shown by `p2pfl --help` without importing it)
COMMANDS: dict[str, tuple[str, str]] = {
    "node": ("p2pfl.cli.node_cmds:node_cmd", "Run a node (until Ctrl-C)."),
    "peers": ("p2pfl.cli.node_cmds:peers_cmd", "List the peers a node knows."),
    "id": ("p2pfl.cli.id_cmd:id_cmd", "Print a node's peer id and dialable addresses."),
    "publish": ("p2pfl.cli.node_cmds:publish_cmd", "Publish a taskpack (and run it with --run)."),
    "taskpacks": ("p2pfl.cli.node_cmds:taskpacks_cmd", "List the taskpacks a node knows."),
    "tasks": ("p2pfl.cli.node_cmds:tasks_cmd", "List the tasks a node knows."),
    "cancel": ("p2pfl.cli.node_cmds:cancel_cmd", "End a task you published, for everyone."),
    "withdraw": ("p2pfl.cli.node_cmds:withdraw_cmd", "Take this node out of a task."),
    "trace": ("p2pfl.cli.node_cmds:trace_cmd", "Follow a task live until it ends."),
    "wait": (
        "p2pfl.cli.node_cmds:wait_cmd",
        "Wait for a task to end (exit 0 ok, 1 failed, 2 timeout).",
    ),
    "result": ("p2pfl.cli.node_cmds:result_cmd", "Print a task's result; write its model."),
    "run": (
        "p2pfl.cli.policy_cmds:run_cmd",
        "Run a verified taskpack (by name, name@range or cid) as a task.",
    ),
    "policy": ("p2pfl.cli.policy_cmds:policy_group", "The site policy: show, reload, check."),
    "audit": ("p2pfl.cli.policy_cmds:audit_cmd", "Read the node's audit log."),
    "new": ("p2pfl.cli.taskpack_cmds:new_cmd", "Create a new taskpack from a template."),
    "pack": ("p2pfl.cli.taskpack_cmds:pack_cmd", "Validate and pack a taskpack directory."),
    "reports": (
        "p2pfl.cli.runs_cmds:reports_cmd",
        "List a node's inference reports (they stay on the node).",
    ),
    "datasets": (
        "p2pfl.cli.datasets_cmd:datasets_group",
        "Offline datasets: list, split.",
    ),
    "flow": ("p2pfl.cli.flow_cmds:flow_group", "Flows: run, status, resume, result, check."),
    "simulate": ("p2pfl.cli.sim_cmds:simulate_cmd", "Simulate a network of nodes from a scenario."),
    "experiment": ("p2pfl.cli.sim_cmds:experiment_cmd", "Run a grid of simulations and report."),
}


def fail(message: str, code: int = 1) -> None:
    """Print `error: message` (one line) on stderr and exit with `code`."""
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


def _fail_lines(message: str, code: int) -> None:
    """`error: first line`, then any further lines (a list of problems) indented as given."""
    first, *rest = message.strip().splitlines() or [""]
    click.echo(f"error: {first.strip()}", err=True)
    for line in rest:
        click.echo(line, err=True)
    sys.exit(code)


def error_text(exc: BaseException) -> str:
    """What to tell a person about `exc`, on one line."""
    from p2pfl.control.framing import one_line

    text = one_line(exc)
    if isinstance(exc, FileNotFoundError | PermissionError) and exc.filename:
        text = f"{exc.strerror}: {exc.filename}"
    return text


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name not in self.lazy:
            return None
        target, short = self.lazy[cmd_name]
        try:
            module_name, attr = target.split(":")
            cmd = getattr(importlib.import_module(module_name), attr)
            if not isinstance(cmd, click.Command):
                raise TypeError(f"{target} is not a click command")
        except Exception as exc:
            return _unavailable(cmd_name, target, short, exc)
        self.commands[cmd_name] = cmd
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table, so that `p2pfl --help` imports no command module.
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                rows.append((name, self.commands[name].get_short_help_str(60)))
            else:
                rows.append((name, self.lazy[name][1]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """click's main, with its errors (usage, ClickException, Abort) in our one style."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # `p2pfl` alone: the help, as click
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            fail(exc.format_message() + hint, exc.exit_code)
        except click.ClickException as exc:
            _fail_lines(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("interrupted", 130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:
            if os.environ.get("P2PFL_DEBUG"):
                raise
            fail(error_text(exc))


def _unavailable(name: str, target: str, short: str, exc: Exception) -> click.Command:
    """A stand-in that explains why a command could not be loaded."""
    reason = error_text(exc)

    @click.command(
        name,
        help=f"{short}\n\n(unavailable: {reason})",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )
    def stub() -> None:
        fail(f"the '{name}' command is unavailable: cannot load {target}: {reason}")

    return stub


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="p2pfl", prog_name="p2pfl")
def cli() -> None:
    """p2pfl: a peer-to-peer network of edge nodes for federated learning and analysis.

    Start a node with `p2pfl node`, then talk to it from the same machine with the other
    commands (they find it through --data-dir, default $P2PFL_DATA_DIR or ~/.p2pfl).
    """


def main() -> None:
    cli(prog_name="p2pfl")


if __name__ == "__main__":
    main()
