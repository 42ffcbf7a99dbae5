"""Wire formats: typed msgpack messages, signed envelopes and tensor blobs.

Every message is a versioned, typed msgpack map validated field by field on receipt; a
peer's bad bytes raise `p2pfl.errors.RemoteProtocolError` and nothing else.
"""

from p2pfl.wire.codec import (
    MAX_CONTAINER_LEN,
    MAX_JSON_DEPTH,
    MAX_JSON_ITEMS,
    MAX_MESSAGE_BYTES,
    WIRE_VERSION,
    Json,
    decode,
    encode,
    message,
    record,
    type_name,
)
from p2pfl.wire.signed import Signed, seal, unseal
from p2pfl.wire.tensors import TENSOR_DTYPES, decode_tensors, encode_tensors

__all__ = [
    "MAX_CONTAINER_LEN",
    "MAX_JSON_DEPTH",
    "MAX_JSON_ITEMS",
    "MAX_MESSAGE_BYTES",
    "TENSOR_DTYPES",
    "WIRE_VERSION",
    "Json",
    "Signed",
    "decode",
    "decode_tensors",
    "encode",
    "encode_tensors",
    "message",
    "record",
    "seal",
    "type_name",
    "unseal",
]
