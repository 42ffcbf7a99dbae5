"""The two error families: whose fault is it?

`LocalProtocolError` means *we* misused something (a bug or a bad argument on this node).
`RemoteProtocolError` means a *peer* sent something invalid; it never crashes a node: the
message is dropped, the peer's score goes down and a log line says why.
"""

from __future__ import annotations


class P2PFLError(Exception):
    """Base class of every error p2pfl raises on purpose."""


class LocalProtocolError(P2PFLError):
    """This node asked for something impossible (oversize publish, bad argument...)."""


class RemoteProtocolError(P2PFLError):
    """A peer's bytes or message were invalid. The text names what was wrong."""


class ValidationError(P2PFLError):
    """A document (manifest, params, scenario) is invalid.

    `problems` lists every problem as `path: message`, e.g. `spec.requirements.memory: ...`.
    """

    def __init__(self, problems: list[str], what: str = "document") -> None:
        self.problems = list(problems)
        super().__init__(f"invalid {what}:\n  " + "\n  ".join(self.problems))


class NodeNotRunning(P2PFLError):
    """No node answers on the control socket of the given data directory."""


class TaskFailed(P2PFLError):
    """A task ended in failure; the text holds the reason."""


class TaskNotFinished(P2PFLError):
    """The task has not ended yet."""
