"""A message class used as a field of another message (no "v"/"t" of its own)."""

from p2pfl.core.messages import TaskpackAnnounce, TaskpackSync
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import decode, encode


def test_message_nested_in_a_message_round_trips() -> None:
    ref = BlobRef(
        cid="bafkreibjbzwg4yygybbxodq2arjqfw7z2srqr3gfgue4sjiom676jqcuoy",
        size=10,
        chunk_size=10,
        chunk_hashes=(b"\0" * 32,),
    )
    ann = TaskpackAnnounce(
        b"m", ref, "12D3KooWAdtRsu9DCuenhZHJ4MkeLHS3mqLHSyK8Pz4s6qU3sxkq", b"\1" * 64
    )
    sync = TaskpackSync((ann, ann))
    assert decode(encode(sync)) == sync
