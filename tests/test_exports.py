"""The curated public surface of `import p2pfl`, and that importing it stays light."""

import subprocess
import sys

import p2pfl

PUBLIC = {
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
}


def test_public_names_are_exactly_the_curated_ones() -> None:
    assert set(p2pfl.__all__) == PUBLIC
    assert all(hasattr(p2pfl, name) for name in PUBLIC)
    defined = {n for n in vars(p2pfl) if not n.startswith("_")}
    # Submodules appear as attributes once imported; anything else must be in __all__.
    assert {n for n in defined - PUBLIC if not isinstance(getattr(p2pfl, n), type(sys))} == set()


def test_import_does_not_load_heavy_dependencies() -> None:
    """A program or the CLI that only talks to a node must not pay for torch or libp2p."""
    code = "import sys, p2pfl; print(sorted(m for m in ('torch', 'trio', 'libp2p', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_client_errors_are_importable_from_the_package() -> None:
    """What `Client` raises can be caught by a program that imports only `p2pfl`."""
    from p2pfl.client import ControlError, NotFound

    assert p2pfl.NotFound is NotFound and p2pfl.ControlError is ControlError
    assert issubclass(p2pfl.NotFound, p2pfl.ControlError)
    assert issubclass(p2pfl.NotFound, KeyError)  # `except KeyError` keeps working
    assert issubclass(p2pfl.ControlError, p2pfl.P2PFLError)
