"""Node-local data that is not a registered site dataset: derived datasets (data/derived.py)."""

from p2pfl.data.derived import (
    DerivedError,
    DerivedInfo,
    DerivedRegistry,
    check_derived_name,
    check_scope,
)

__all__ = ["DerivedError", "DerivedInfo", "DerivedRegistry", "check_derived_name", "check_scope"]
