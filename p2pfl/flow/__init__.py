"""Flows: multi-step workflows of tasks, started once and followed as one tree.

spec.py      flow files (YAML): parsing, checking every problem by path, resolving taskpacks
machine.py   the sans-IO flow machine: a flow's state derived from signed task records
service.py   a node's flows: machines fed from the node's task machines, persisted
store.py     DATA_DIR/flows/<flow_id>.flow, written atomically
"""

from p2pfl.flow.machine import FlowMachine, FlowPhase, StepState
from p2pfl.flow.spec import FlowSpec, StepSpec, load_flow, parse_flow

__all__ = [
    "FlowMachine",
    "FlowPhase",
    "FlowSpec",
    "StepSpec",
    "StepState",
    "load_flow",
    "parse_flow",
]
