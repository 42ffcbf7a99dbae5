"""A flow as the tree people read (plain text, and a rich Tree for a live terminal)::

heart-disease flow 3f2a9c... - Running
├─ Step: standardise [Completed]
│  └─ standardize (Node 12D3Ko…a1b2c3) ✓ - 240 records processed
├─ Step: train [Active - 45%]
│  ├─ fedavg-mlp-tabular (Node 12D3Ko…a1b2c3) - training - Round 10/20, Loss: 0.342
│  └─ Model aggregation - Aggregating round 9
└─ Step: validate [Pending]
"""

from __future__ import annotations

from typing import Any

_STEP_LABEL = {
    "succeeded": "Completed",
    "failed": "Failed",
    "pending": "Pending",
}


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def step_label(step: dict[str, Any]) -> str:
    state = step["state"]
    if state == "running":
        text = f"Active - {step.get('percent', 0)}%"
    else:
        text = _STEP_LABEL.get(state, state)
    if step.get("attempts", 0) > 1:
        text += f", attempt {step['attempts']}"
    return f"Step: {step['name']} [{text}]"


def node_lines(step: dict[str, Any]) -> list[str]:
    """One line per node of the step's task, then the aggregation line while it trains."""
    task = step.get("task") or {}
    name = step.get("taskpack") or "task"
    lines = []
    training = step.get("type") == "training"
    for node in step.get("nodes") or []:
        state = node.get("state") or "-"
        text = f"{name} (Node …{str(node['peer'])[-6:]})"
        if state == "done":
            text += " ✓"
        elif not (training and state == "training"):  # "Round r/R" says it for training
            text += f" - {state}"
        if training:
            text += f" - Round {node.get('round', 0)}/{node.get('rounds') or 1}"
        if node.get("loss") is not None:
            text += f", Loss: {_num(node['loss'])}"
        if node.get("accuracy") is not None:
            text += f", Acc: {_num(node['accuracy'])}"
        if not training and node.get("records") is not None:
            text += f" - {node['records']:,} records processed"
        lines.append(text)
    phase = task.get("phase")
    if step["state"] == "running" and phase in ("aggregating", "training", "evaluating"):
        rnd = task.get("round", 0)
        if phase == "aggregating":
            lines.append(f"Model aggregation - Aggregating round {rnd}")
        elif rnd > 1:
            lines.append(f"Model aggregation - Aggregated round {rnd - 1}")
    if step["state"] == "failed" and step.get("reason"):
        lines.append(f"Reason: {step['reason']}")
    result = step.get("result") or {}
    if step["state"] == "succeeded" and result.get("metrics"):
        shown = {k: v for k, v in result["metrics"].items() if isinstance(v, int | float)}
        if shown:
            lines.append("Result: " + ", ".join(f"{k} {_num(v)}" for k, v in sorted(shown.items())))
    return lines


def flow_tree_text(flow: dict[str, Any]) -> str:
    """The plain-text tree (fits 80 columns: peers are named by their last 6 characters)."""
    status = str(flow.get("status", "?")).capitalize()
    out = [f"{flow.get('name', '?')} flow {flow.get('flow_id', '?')[:12]} - {status}"]
    if flow.get("reason"):
        out[0] += f" ({flow['reason']})"
    steps = flow.get("steps") or []
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        out.append(("└─ " if last else "├─ ") + step_label(step))
        children = node_lines(step)
        for j, line in enumerate(children):
            out.append(
                ("   " if last else "│  ") + ("└─ " if j == len(children) - 1 else "├─ ") + line
            )
    return "\n".join(out)


def flow_tree(flow: dict[str, Any]) -> Any:
    """The same tree as a rich renderable (styled status), for a live terminal."""
    from rich.tree import Tree

    style = {"succeeded": "green", "failed": "red", "running": "yellow"}.get(
        flow.get("status", ""), "cyan"
    )
    head = f"[bold]{flow.get('name', '?')}[/] flow {flow.get('flow_id', '?')[:12]} - [{style}]{str(flow.get('status')).capitalize()}[/]"
    if flow.get("reason"):
        head += f" [red]({flow['reason']})[/]"
    tree = Tree(head)
    for step in flow.get("steps") or []:
        colour = {"succeeded": "green", "failed": "red", "running": "yellow"}.get(
            step["state"], "dim"
        )
        branch = tree.add(f"[{colour}]{step_label(step)}[/]")
        for line in node_lines(step):
            branch.add(line, highlight=False)
    return tree
