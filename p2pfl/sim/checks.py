"""What a scenario asks of its taskpack, checked before anything runs.

The scenario file alone cannot say whether `params.aggregater` is a typo: the taskpack's
`configs/schema.json` decides which parameters it takes. These checks read the taskpack
(manifest, defaults, schema) and give the same verdict the simulated nodes would give
when the task is offered, but before any folder, data or node exists, and by scenario
path (`params.aggregater: unknown key (did you mean aggregator?)`).

They also say in which form the simulator hands each node its data: the format the
taskpack's input declares (`csv` or `npz`; of alternatives such as `npz|csv`, the first).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pfl.errors import ValidationError

if TYPE_CHECKING:
    from p2pfl.sim.scenario import Scenario

# The table formats the simulator can write a node's data in (p2pfl.fl.datasets.write_table).
NODE_DATA_FORMATS = ("csv", "npz")


@dataclass(frozen=True)
class SimInput:
    """The dataset each simulated node registers: its name and the file format."""

    name: str
    format: str


def sim_input(taskpack: Path, dataset: str) -> SimInput:
    """The taskpack's one declared input (name and format); with no readable manifest, or
    several inputs, the dataset's own name as npz (the manifest check reports why)."""
    from p2pfl.taskpack.manifest import load_manifest

    try:
        inputs = load_manifest(taskpack).spec.inputs
    except ValidationError:
        return SimInput(dataset, "npz")
    if len(inputs) != 1:
        return SimInput(dataset, "npz")
    return SimInput(inputs[0].name, node_data_format(inputs[0].format) or "npz")


def node_data_format(declared: str) -> str | None:
    """The first of the declared formats (`csv`, `npz|csv`...) the simulator can write."""
    for fmt in declared.split("|"):
        if fmt.strip().lower() in NODE_DATA_FORMATS:
            return fmt.strip().lower()
    return None


def taskpack_problems(scenario: Scenario) -> list[str]:
    """Every problem of the scenario's taskpack and its parameters, by scenario path."""
    from p2pfl.taskpack.manifest import load_manifest
    from p2pfl.taskpack.params import effective_federated, load_params

    try:
        manifest = load_manifest(scenario.taskpack)
    except ValidationError as exc:
        return [f"taskpack: {p}" for p in exc.problems]
    problems: list[str] = []
    if len(manifest.spec.inputs) != 1:
        problems.append(
            f"taskpack: declares {len(manifest.spec.inputs)} inputs; a simulation gives each "
            "node one dataset"
        )
    else:
        fmt = manifest.spec.inputs[0].format
        if node_data_format(fmt) is None:
            problems.append(
                f"taskpack: input {manifest.spec.inputs[0].name!r} has format {fmt!r}; the "
                f"simulator hands nodes {' or '.join(NODE_DATA_FORMATS)} tables"
            )
    try:
        params = load_params(scenario.taskpack, offer_overrides(scenario))
        effective_federated(manifest, params)
    except ValidationError as exc:
        known = _known_params(scenario.taskpack)
        problems += [_scenario_path(p, known) for p in exc.problems]
    return problems


def rollout_problems(scenario: Scenario) -> list[str]:
    """A rollout's versions against the manifests: the scenario's taskpack is one of the
    shares' versions, and each other directory is a taskpack of the same name at the
    version it is listed under."""
    from p2pfl.taskpack.manifest import load_manifest

    rollout = scenario.rollout
    if rollout is None:
        return []
    try:
        main = load_manifest(scenario.taskpack).metadata
    except ValidationError:
        return []  # taskpack_problems says why
    versions = [v for v, _ in rollout.shares]
    listed = dict(rollout.taskpacks)
    problems = []
    if main.version not in versions:
        problems.append(
            f"rollout.shares: the scenario's taskpack is {main.name}@{main.version}, which"
            f" is not among the versions ({', '.join(versions)})"
        )
    elif main.version in listed:
        problems.append(
            f"rollout.taskpacks.{main.version}: that version is the scenario's taskpack"
            f" ({scenario.taskpack}); list only the others"
        )
    for version, path in rollout.taskpacks:
        where = f"rollout.taskpacks.{version}"
        if not path.is_dir():
            problems.append(f"{where}: no such directory: {path}")
            continue
        try:
            meta = load_manifest(path).metadata
        except ValidationError as exc:
            problems += [f"{where}: {p}" for p in exc.problems]
            continue
        if meta.name != main.name:
            problems.append(
                f"{where}: {path} is taskpack {meta.name!r}; a rollout runs versions of"
                f" {main.name!r}"
            )
        elif meta.version != version:
            problems.append(f"{where}: {path} is version {meta.version}, not {version}")
    return problems


def unknown_param_problems(taskpack: Path, params: dict[Any, Any]) -> list[str]:
    """`params` keys that the taskpack's schema does not take (when its schema says
    `additionalProperties: false`), for a scenario whose other parts are broken."""
    import json

    from p2pfl.taskpack.params import FEDERATED_KEYS, SCHEMA_FILE

    try:
        schema = json.loads((taskpack / SCHEMA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(schema, dict) or schema.get("additionalProperties", True) is not False:
        return []
    from p2pfl.sim.scenario import PARAM_KEYS

    declared = {*schema.get("properties", {}), *FEDERATED_KEYS, *PARAM_KEYS}
    known = sorted(declared)
    return [
        _scenario_path(f"{key}: unknown field", known)
        for key in params
        if isinstance(key, str) and key not in declared
    ]


def flow_param_problems(scenario: Scenario) -> list[str]:
    """A flow scenario's `params`: a plain key goes to every training step, `STEP.KEY` to
    that step; each is checked against the taskpack it reaches."""
    from p2pfl.flow.spec import load_flow, resolve_flow

    assert scenario.flow is not None
    try:
        steps = resolve_flow(load_flow(scenario.flow))
    except ValidationError as exc:
        return [f"flow: {p}" for p in exc.problems]
    params = scenario.params.as_dict()
    problems: list[str] = []
    by_name = {s.step.name: s for s in steps}
    for key in params:
        step_name, _, sub = key.partition(".")
        if sub and step_name not in by_name:
            problems.append(f"params.{key}: the flow has no step {step_name!r}")
    for item in steps:
        plain = {k: v for k, v in params.items() if "." not in k}
        prefix = item.step.name + "."
        own = {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}
        mine = {**plain, **own} if item.type == "training" else own
        problems += [
            p.replace("params.", f"params ({item.step.name}).", 1)
            for p in unknown_param_problems(item.directory, mine)
        ]
    return problems


def offer_overrides(scenario: Scenario) -> dict[str, str]:
    """The parameter overrides the simulated publisher offers the task with (the same as
    p2pfl.sim.cluster_base's): the scenario's params, node bounds and DP settings."""
    from p2pfl.sim.cluster_base import _flatten, _param_text

    params: dict[str, Any] = scenario.params.as_dict()
    params.setdefault("max_nodes", scenario.nodes)
    params.setdefault("min_nodes", min(2, scenario.nodes))
    overrides = {k: _param_text(v) for k, v in _flatten(params).items()}
    if scenario.dp is not None:
        overrides["differential_privacy.enabled"] = "true"
        for key, value in scenario.dp.as_dict().items():
            overrides[f"differential_privacy.{key}"] = _param_text(value)
    return overrides


def _known_params(taskpack: Path) -> list[str]:
    """The parameter names the taskpack declares (for "did you mean ...")."""
    import json

    from p2pfl.taskpack.params import FEDERATED_KEYS, SCHEMA_FILE

    try:
        schema = json.loads((taskpack / SCHEMA_FILE).read_text(encoding="utf-8"))
        declared = list(schema.get("properties", {}))
    except (OSError, ValueError, AttributeError):
        declared = []
    return sorted({*declared, *FEDERATED_KEYS})


def _scenario_path(problem: str, known: list[str]) -> str:
    """A params problem (`aggregater: unknown field`) as a scenario problem
    (`params.aggregater: unknown key (did you mean aggregator?)`)."""
    path, sep, message = problem.partition(": ")
    if not sep:
        return f"params: {problem}"
    if path.startswith("configs/"):  # the taskpack's own defaults or schema are broken
        return f"taskpack: {problem}"
    if path.startswith("differential_privacy."):  # set from the scenario's dp: section
        return f"dp.{path.split('.', 1)[1]}: {message}"
    if message == "unknown field":
        message = "unknown key"
        close = difflib.get_close_matches(path.split(".")[0], known, n=1)
        if close:
            message += f" (did you mean {close[0]}?)"
        else:
            message += " (the taskpack's configs/schema.json does not declare it)"
    return f"params.{path}: {message}"
