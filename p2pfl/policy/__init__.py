"""Site policy and privacy: who may use which dataset for what, and what may leave a node.

Pure modules the node core calls (no trio, no clock; I/O only in the explicit load/save
functions): `load_policy` / `SitePolicy.decide`, `PrivacyLedger` (lifetime epsilon per
dataset), `AuditLog` (DATA_DIR/audit.jsonl) and `filter_release` (analysis outputs).
See docs/privacy.md.
"""

from p2pfl.policy.audit import AUDIT_FILE, AuditLog
from p2pfl.policy.ledger import LEDGER_FILE, LedgerError, PrivacyLedger
from p2pfl.policy.release import ReleaseRules, filter_release, released_epsilon
from p2pfl.policy.site import (
    POLICY_FILE,
    Decision,
    OfferFacts,
    PolicyError,
    SitePolicy,
    load_policy,
    parse_policy,
)

__all__ = [
    "AUDIT_FILE",
    "LEDGER_FILE",
    "POLICY_FILE",
    "AuditLog",
    "Decision",
    "LedgerError",
    "OfferFacts",
    "PolicyError",
    "PrivacyLedger",
    "ReleaseRules",
    "SitePolicy",
    "filter_release",
    "load_policy",
    "parse_policy",
    "released_epsilon",
]
