"""Reduce-scatter over a model's flat parameter vector: pure numpy, no I/O, deterministic.

The model's tensors, in their key order, laid end to end form one flat vector of D
elements. It is cut into `count` slices by one rule every node evaluates: slice j covers
elements [j*D // count, (j+1)*D // count). A slice travels as a tensor blob holding, for
each tensor the range touches, that tensor's flattened segment under the tensor's own
name and dtype (so a float32 model moves float32 bytes; nothing is widened on the wire).

Why bit-identical models follow: every aggregator used here is coordinate-wise, so
combining slice j of every update computes exactly the float64 operations, in the same
order, that combining the whole updates computes for those coordinates (fl/aggregate.py's
determinism rule); the assembled model is the byte-for-byte concatenation of the combined
slices in slice order. Every node assembles the same slice bytes (verified by cid), so
every node holds the same model.

A slice whose tensor names, dtypes or lengths differ from what the reference model and
the slice index say is refused (`slice_problem`): a peer cannot make a node hold or mix
more than its part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from p2pfl.fl.aggregate import Weights, aggregate, scores_from_distances, squared_distances

__all__ = [
    "BadSlice",
    "assemble",
    "assemble_blobs",
    "cut_blob",
    "reduce_blobs",
    "bounds",
    "cut",
    "layout",
    "reduce_slice",
    "slice_layout",
    "slice_problem",
]

# Sketch work (core/verify.py names it by purpose): our slices, an owner's inputs, a
# proof's slice; "check" sketches combined slices.
SKETCH_KINDS = ("sketch", "mine", "inputs", "proof")
Layout = list[tuple[str, np.dtype, int]]  # (tensor name, dtype, elements) in key order


def layout(reference: Weights) -> Layout:
    return [(k, np.asarray(v).dtype, int(np.asarray(v).size)) for k, v in reference.items()]


def bounds(total: int, count: int, index: int) -> tuple[int, int]:
    """Elements [lo, hi) of slice `index` of `count` over a vector of `total` elements."""
    if not 0 <= index < count:
        raise ValueError(f"slice {index} of {count}")
    return index * total // count, (index + 1) * total // count


def slice_layout(model: Layout, count: int, index: int) -> list[tuple[str, np.dtype, int, int]]:
    """What slice `index` holds: (tensor name, dtype, start within the tensor, length)."""
    total = sum(n for _, _, n in model)
    lo, hi = bounds(total, count, index)
    out, pos = [], 0
    for name, dtype, n in model:
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append((name, dtype, a - pos, b - a))
        pos += n
    return out


def cut(weights: Weights, count: int) -> list[Weights]:
    """The `count` slices of a model (views where possible; encode copies them)."""
    model = layout(weights)
    flat = {k: np.asarray(v).reshape(-1) for k, v in weights.items()}
    return [
        {name: flat[name][start : start + n] for name, _, start, n in slice_layout(model, count, j)}
        for j in range(count)
    ]


def slice_problem(piece: Weights, model: Layout, count: int, index: int) -> str | None:
    """Why `piece` is not slice `index` of a model laid out as `model`, or None."""
    want = slice_layout(model, count, index)
    if list(piece) != [name for name, _, _, _ in want]:
        return f"slice {index}: tensors {list(piece)[:4]} differ from {[w[0] for w in want][:4]}"
    for name, dtype, _, n in want:
        value = np.asarray(piece[name])
        if value.dtype != dtype or value.shape != (n,):
            return f"slice {index}: {name!r} is {value.dtype}{list(value.shape)}, expected {dtype}[{n}]"
    return None


def reduce_slice(
    method: str,
    pieces: Sequence[tuple[Weights | None, float]],
    model: Layout,
    count: int,
    index: int,
    options: dict[str, Any] | None = None,
) -> tuple[Weights, tuple[int, str] | None]:
    """Combine slice `index` of every update (in the given order) with `method`.

    Returns the combined slice, and the first input that is not a well-formed slice
    (position, why) -- then nothing is combined: the round must be re-closed without its
    author, so that no update is in one slice of the model and out of another."""
    for pos, (piece, _) in enumerate(pieces):
        problem = (
            "not a tensor blob" if piece is None else slice_problem(piece, model, count, index)
        )
        if problem is not None:
            return {}, (pos, problem)
    kept = [(p, w) for p, w in pieces if p is not None]
    if not kept:
        raise ValueError("no slices to combine")
    if not kept[0][0]:  # an empty slice (fewer elements than slices)
        return {}, None
    return aggregate(method, kept, **dict(options or {})), None


class BadSlice(ValueError):
    """A combined slice does not fit its place in the model (`index` says which)."""

    def __init__(self, index: int, why: str) -> None:
        super().__init__(why)
        self.index = index


def slice_distances(
    pieces: Sequence[Weights | None], model: Layout, count: int, index: int
) -> tuple[np.ndarray, tuple[int, str] | None]:
    """Krum over slices: the n x n squared distances between the updates' slice `index`
    (float64). Summed over the slices in slice order they are the distances between the
    whole updates, up to float rounding, identically on every node. Returns the first
    malformed input (position, why) instead, as `reduce_slice` does."""
    rows = []
    for pos, piece in enumerate(pieces):
        problem = (
            "not a tensor blob" if piece is None else slice_problem(piece, model, count, index)
        )
        if problem is not None:
            return np.empty(0), (pos, problem)
        assert piece is not None
        parts = [np.asarray(v, dtype=np.float64).ravel() for v in piece.values()]
        rows.append(np.concatenate(parts) if parts else np.empty(0))
    return squared_distances(np.stack(rows, axis=0)), None


def krum_choice(partials: Sequence[np.ndarray], n: int, f: int) -> int:
    """The position Krum picks from per-slice distance matrices (summed in slice order;
    ties to the earlier update). BadSlice names a matrix of the wrong shape or values."""
    total = np.zeros((n, n), dtype=np.float64)
    for j, dist in enumerate(partials):
        if dist.shape != (n, n) or dist.dtype != np.float64:
            raise BadSlice(
                j,
                f"slice {j}: distances are {dist.dtype}{list(dist.shape)}, expected float64[{n}, {n}]",
            )
        if not np.all(dist >= 0) or not np.array_equal(dist, dist.T):
            raise BadSlice(j, f"slice {j}: distances are not a symmetric non-negative matrix")
        total += dist
    f = min(f, max(0, (n - 3) // 2))
    return int(np.argsort(scores_from_distances(total, f), kind="stable")[0])


def assemble(pieces: Sequence[Weights], reference: Weights) -> Weights:
    """The model whose slices are `pieces` (slice order), shaped like `reference`.
    BadSlice names the first slice that does not fit."""
    model = layout(reference)
    count = len(pieces)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in reference}
    for j, piece in enumerate(pieces):
        problem = slice_problem(piece, model, count, j)
        if problem is not None:
            raise BadSlice(j, problem)
        for name, value in piece.items():
            parts[name].append(np.asarray(value))
    out: Weights = {}
    for name, ref in reference.items():
        ref = np.asarray(ref)
        flat = np.concatenate(parts[name]) if parts[name] else np.empty(0, ref.dtype)
        out[name] = flat.astype(ref.dtype, copy=False).reshape(ref.shape)
    return out


# --- the same steps on blobs (what the driver runs off the event path) -----------------


def own_model(reference: bytes | memoryview) -> Weights:
    """The node's own global model, which slices are cut along: validated when it was
    made; only its layout is read here, so its values are not scanned again."""
    from p2pfl.wire import decode_tensors

    return decode_tensors(reference, allow_nonfinite=True)


def cut_blob(update: bytes | memoryview, count: int) -> list[bytes]:
    """Encoded slices of an encoded model."""
    from p2pfl.wire import decode_tensors, encode_tensors

    return [bytes(encode_tensors(piece)) for piece in cut(decode_tensors(update), count)]


def reduce_blobs(
    method: str,
    blobs: Sequence[tuple[bytes | memoryview, float]],
    reference: bytes | memoryview,
    count: int,
    index: int,
    options: dict[str, Any] | None = None,
) -> tuple[bytes, tuple[int, str] | None]:
    """`reduce_slice` on encoded slices; a blob that does not decode is a bad input."""
    from p2pfl.errors import RemoteProtocolError
    from p2pfl.wire import decode_tensors, encode_tensors

    model = layout(own_model(reference))
    pieces: list[tuple[Weights | None, float]] = []
    for data, weight in blobs:
        try:
            pieces.append((decode_tensors(data), weight))
        except RemoteProtocolError:
            pieces.append((None, weight))
    combined, bad = reduce_slice(method, pieces, model, count, index, options)
    return (b"", bad) if bad is not None else (bytes(encode_tensors(combined)), None)


def assemble_blobs(blobs: Sequence[bytes | memoryview], reference: bytes | memoryview) -> bytes:
    """The encoded model made of encoded combined slices (ValueError names a bad one)."""
    from p2pfl.errors import RemoteProtocolError
    from p2pfl.wire import decode_tensors, encode_tensors

    pieces = []
    for j, data in enumerate(blobs):
        try:
            pieces.append(decode_tensors(data))
        except RemoteProtocolError as exc:
            raise BadSlice(j, f"slice {j}: {exc}") from None
    return bytes(encode_tensors(assemble(pieces, own_model(reference))))


def slice_work(
    kind: str,
    blobs: Sequence[bytes | memoryview],
    reference: bytes | memoryview,
    count: int,
    index: int = 0,
    method: str = "fedavg",
    weights: Sequence[float] = (),
    options: dict[str, Any] | None = None,
) -> tuple[list[bytes], int, str, int, tuple[float, ...]]:
    """One SliceWork step (core/commands.py) on blobs: (output blobs, bad, reason, chosen,
    values), the same for the driver and the test harness. bad >= 0: reduce and
    distances, the position of a malformed input; assemble and krum, the index of a
    combined slice (or distance matrix) that does not fit; sketch and check, the position
    of a blob that is not the slice it should be. chosen: krum, the position of the update
    chosen. values: sketch and check, the floats of core/sketch.py."""
    from p2pfl.errors import RemoteProtocolError
    from p2pfl.wire import decode_tensors, encode_tensors

    if kind in SKETCH_KINDS or kind == "check":
        return sketch_work(kind, blobs, reference, count, options or {})
    if kind == "cut":
        return cut_blob(blobs[0], count), -1, "", -1, ()
    if kind == "reduce":
        data, bad = reduce_blobs(
            method, list(zip(blobs, weights, strict=True)), reference, count, index, options
        )
        return ([], bad[0], bad[1], -1, ()) if bad is not None else ([data], -1, "", -1, ())
    if kind == "assemble":
        try:
            return [assemble_blobs(blobs, reference)], -1, "", -1, ()
        except BadSlice as exc:
            return [], exc.index, str(exc), -1, ()
    if kind == "distances":
        model = layout(own_model(reference))
        decoded: list[Weights | None] = []
        for blob in blobs:
            try:
                decoded.append(decode_tensors(blob))
            except RemoteProtocolError:
                decoded.append(None)
        dist, bad = slice_distances(decoded, model, count, index)
        if bad is not None:
            return [], bad[0], bad[1], -1, ()
        return [bytes(encode_tensors({"d": dist}))], -1, "", -1, ()
    if kind == "krum":
        partials = []
        for j, blob in enumerate(blobs):
            try:
                partials.append(np.asarray(decode_tensors(blob).get("d", np.empty(0))))
            except RemoteProtocolError as exc:
                return [], j, f"slice {j}: {exc}", -1, ()
        try:
            chosen = krum_choice(partials, len(weights), int((options or {}).get("f", 0)))
        except BadSlice as exc:
            return [], exc.index, str(exc), -1, ()
        return [], -1, "", chosen, ()
    raise ValueError(f"unknown slice work {kind!r}")


def sketch_work(
    kind: str,
    blobs: Sequence[bytes | memoryview],
    reference: bytes | memoryview,
    count: int,
    options: dict[str, Any],
) -> tuple[list[bytes], int, str, int, tuple[float, ...]]:
    """Sketches (core/sketch.py) of slice blobs under options {seed: hex, indices: the
    slice index of each blob}. sketch: per blob, sketch() then rmax (K + 2 floats), what a
    participant publishes of its slices and what an owner, witness or proof checker
    recomputes; check: per blob (combined slices), aggregate_sketch() (2K + 1 floats).
    A blob that is not a well-formed slice of its index is `bad` (its position)."""
    from p2pfl.core import sketch as sk
    from p2pfl.errors import RemoteProtocolError
    from p2pfl.wire import decode_tensors

    seed = bytes.fromhex(str(options["seed"]))
    indices = [int(i) for i in options["indices"]]
    model = layout(own_model(reference))
    values: list[float] = []
    for pos, (blob, index) in enumerate(zip(blobs, indices, strict=True)):
        try:
            piece = decode_tensors(blob)
        except RemoteProtocolError as exc:
            return [], pos, f"slice {index}: {exc}", -1, ()
        problem = slice_problem(piece, model, count, index)
        if problem is not None:
            return [], pos, problem, -1, ()
        if kind == "check":
            values.extend(sk.aggregate_sketch(seed, index, piece))
        else:
            values.extend(sk.sketch(seed, index, piece))
    return [], -1, "", -1, tuple(values)
