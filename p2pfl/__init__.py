"""p2pfl: a peer-to-peer network of edge nodes for federated learning and analysis."""

from p2pfl.client import (
    Client as Client,
    ControlError as ControlError,
    NotFound as NotFound,
)
from p2pfl.errors import (
    LocalProtocolError as LocalProtocolError,
    NodeNotRunning as NodeNotRunning,
    P2PFLError as P2PFLError,
    RemoteProtocolError as RemoteProtocolError,
    TaskFailed as TaskFailed,
    TaskNotFinished as TaskNotFinished,
    ValidationError as ValidationError,
)
from p2pfl.identity import Identity as Identity
from p2pfl.model import load_model as load_model
from p2pfl.taskpack.sdk import (
    Context as Context,
    DPConfig as DPConfig,
    Partial as Partial,
    Table as Table,
    Task as Task,
    Update as Update,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Context",
    "ControlError",
    "DPConfig",
    "Identity",
    "LocalProtocolError",
    "NodeNotRunning",
    "NotFound",
    "P2PFLError",
    "Partial",
    "RemoteProtocolError",
    "Table",
    "Task",
    "TaskFailed",
    "TaskNotFinished",
    "Update",
    "ValidationError",
    "load_model",
]
