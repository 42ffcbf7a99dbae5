"""Content ids, the content-addressed blob store, and the sans-IO chunk fetcher."""

from p2pfl.store.blobref import BlobRef, check_chunk, make_blob_ref, validate_ref
from p2pfl.store.blobs import BlobStore, PartialBlob
from p2pfl.store.cid import cid_from_sha256, cid_of, digest_of_cid, is_cid
from p2pfl.store.fetcher import BlobFetch, FetchCmd
from p2pfl.store.journal import Journal

__all__ = [
    "BlobFetch",
    "BlobRef",
    "BlobStore",
    "FetchCmd",
    "Journal",
    "PartialBlob",
    "check_chunk",
    "cid_from_sha256",
    "cid_of",
    "digest_of_cid",
    "is_cid",
    "make_blob_ref",
    "validate_ref",
]
