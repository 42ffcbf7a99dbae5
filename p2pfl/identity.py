"""Node identity: one Ed25519 key per node, its libp2p peer id, and record signatures.

The same key is the libp2p host key (so the peer id on the wire is the id that signs
records) and the key that signs application records (capabilities, manifests, rosters,
results) so they can be checked later, off the wire.

Peer ids are computed here without importing libp2p (its import costs about 1 s): an
Ed25519 peer id is base58btc(multihash-identity(protobuf PublicKey{type=Ed25519, data})),
which is why they all start with ``12D3KooW``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from bases import base58btc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from p2pfl.errors import LocalProtocolError
from p2pfl.fsutil import atomic_write

KEY_FILE = "identity.key"
# protobuf PublicKey{Type: Ed25519 (1), Data: <32 bytes>} and its identity-multihash prefix.
_PROTO_PREFIX = b"\x08\x01\x12\x20"
_MULTIHASH_PREFIX = b"\x00\x24"
# Domain separation: a signature made for one kind of record can never pass as another.
_DOMAIN = b"p2pfl/v1/"


def _signing_input(kind: str, payload: bytes) -> bytes:
    return _DOMAIN + kind.encode() + b"\x00" + payload


def peer_id_from_public_bytes(public: bytes) -> str:
    """The libp2p peer id (base58btc string) of a raw 32-byte Ed25519 public key."""
    if len(public) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return base58btc.encode(_MULTIHASH_PREFIX + _PROTO_PREFIX + public)


def public_bytes_from_peer_id(peer_id: str) -> bytes | None:
    """The raw Ed25519 public key inside an Ed25519 peer id, or None if it is not one."""
    if len(peer_id) > _MAX_PEER_ID:  # a peer's string: never a cache key of any size
        return None
    return _public_bytes(peer_id)


_MAX_PEER_ID = 64
_VERIFY_CACHE_MAX_PAYLOAD = 16 * 1024


@functools.lru_cache(maxsize=65536)
def _public_bytes(peer_id: str) -> bytes | None:
    try:
        raw = base58btc.decode(peer_id)
    except Exception:
        return None
    prefix = _MULTIHASH_PREFIX + _PROTO_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        return None
    return bytes(raw[len(prefix) :])


def verify(peer_id: str, kind: str, payload: bytes, signature: bytes) -> bool:
    """True when `signature` is `peer_id`'s signature of `payload` as a record of `kind`.

    Memoised for small records: verification is a pure function, and in a simulation a
    thousand nodes check the same gossiped record. Large payloads are checked each time,
    so a flood of big signed messages cannot pin them in memory as cache keys."""
    if len(payload) > _VERIFY_CACHE_MAX_PAYLOAD or len(kind) > 64:
        return _verify(peer_id, kind, payload, signature)
    return _verify_cached(peer_id, kind, payload, signature)


@functools.lru_cache(maxsize=65536)
def _verify_cached(peer_id: str, kind: str, payload: bytes, signature: bytes) -> bool:
    return _verify(peer_id, kind, payload, signature)


def _verify(peer_id: str, kind: str, payload: bytes, signature: bytes) -> bool:
    public = public_bytes_from_peer_id(peer_id)
    if public is None or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, _signing_input(kind, payload))
    except InvalidSignature:
        return False
    return True


class Identity:
    """A node's Ed25519 key pair and peer id."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_bytes = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.peer_id = peer_id_from_public_bytes(self.public_bytes)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from a 32-byte seed (simulations, tests)."""
        if len(seed) != 32:
            raise LocalProtocolError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> Identity:
        """Load `DATA_DIR/identity.key`, creating it (mode 0600) on first start."""
        path = Path(data_dir) / KEY_FILE
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise LocalProtocolError(
                    f"{path}: key file is readable by others (mode {mode:o}); chmod 600 it"
                )
            seed = path.read_bytes()
            if len(seed) != 32:
                raise LocalProtocolError(f"{path}: not a 32-byte Ed25519 key")
            return cls.from_seed(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = cls.generate()
        atomic_write(path, identity.seed(), mode=0o600)  # a secret: owner only
        return identity

    def seed(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def sign(self, kind: str, payload: bytes) -> bytes:
        """Sign `payload` as a record of `kind` (domain-separated)."""
        return self._key.sign(_signing_input(kind, payload))

    def libp2p_keypair(self):  # -> libp2p.crypto.keys.KeyPair (imported lazily: slow import)
        from libp2p.crypto.ed25519 import Ed25519PrivateKey as L2Priv
        from libp2p.crypto.keys import KeyPair

        priv = L2Priv.new(self.seed())
        return KeyPair(priv, priv.get_public_key())
