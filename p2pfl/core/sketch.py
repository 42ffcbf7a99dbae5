"""Random linear sketches that let every node check a reduce-scatter round's combined
slices without holding their inputs (linear aggregators: fedavg, fedprox).

Pure functions, no I/O, deterministic: every node evaluates them on the same inputs.

The check. FedAvg is linear: slice j of the model is a_j = sum_i f_i * s_ij, where s_ij is
slice j of participant i's update and f_i its normalised weight (its signed sample count,
capped as the rounds cap it, over the included total). Once every owner has published its
combined slice (SliceDone, naming a_j by content id), a seed R follows from the task, the
round, the close attempt and every combined slice's cid, in slice order (`sketch_seed`).
From R come K pseudo-random vectors per slice (`challenge`). Each participant then
publishes <R_j^m, s_ij> for every slice j and m < K (and the L1 norm of s_ij, for the
tolerance); every node, holding every a_j, checks <R_j^m, a_j> = sum_i f_i <R_j^m, s_ij>.

Why it catches an owner: R is fixed only after every a_j is (its cid is in the seed), so an
owner that publishes a_j + d cannot choose d orthogonal to R. R's coordinates are
independent and uniform on [-sqrt 3, sqrt 3] (variance 1), so <R, d> has standard
deviation |d| and, whatever d's direction, a density of at most 1 / (sqrt 6 |d|) (Ball's
cube-slicing bound: no central hyperplane section of a unit cube exceeds sqrt 2): it
falls within a tolerance t of 0 with probability at most 0.82 t / |d|, against 0.80 t / |d|
for a Gaussian R, so far outside the tolerance unless d is below float32 rounding. Uniform
draws are five times cheaper than normal ones (1.1 ms per 125,000 coordinates here, 32 of
them per round at 8 nodes and 1M parameters), and bound |R_c| by sqrt 3 instead of ~4.5.

The owner's own contribution to its slice is not taken from the owner (it could make up a
value that hides its shift): the owner offers that slice to a witness, the next included
participant after it in rank order, which publishes its sketch instead.

The randomness here is a public challenge, not privacy noise: anyone can recompute it, and
it must be reproducible (numpy's SFC64 seeded by sha256, the fastest of numpy's bit
generators here), not drawn from a CSPRNG.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from p2pfl.fl.aggregate import Weights

K = 4  # challenge vectors per slice
# Floats one participant's sketch carries per slice: K inner products and one L1 norm.
PER_SLICE = K + 1
# The float64 sums behind an inner product (over at most 2**31 coordinates and 256
# updates) are off by far less than this fraction of the sum of |terms|; see `tolerance`.
FLOAT64_SLACK = 2.0**-24
ROUNDING_MARGIN = 4.0  # times the dtype's worst rounding error (eps / 2)


# On the wire each float travels as float32 (little-endian): the sketches are computed in
# float64 and rounded once; the check and the proofs allow that rounding (`ROUNDED`), far
# below the float32 rounding of the aggregate itself. (At 128 nodes, float64 sketches
# would move 0.2 models per node per round; float32 ones 0.1.)
WIRE = np.dtype("<f4")
ROUNDED = 2.0**-22  # > twice float32's relative rounding (2**-24) of a published value


def pack(values: Sequence[float], norms_up: bool = True) -> bytes:
    """Sketches (PER_SLICE floats per slice) as float32 bytes. L1 norms are rounded up,
    so a tolerance built on them still bounds what it must."""
    arr = np.asarray(values, dtype=np.float64)
    out = arr.astype(WIRE)
    if norms_up and arr.size:
        norms = arr[PER_SLICE - 1 :: PER_SLICE]
        low = out[PER_SLICE - 1 :: PER_SLICE].astype(np.float64) < norms
        up = np.nextafter(out[PER_SLICE - 1 :: PER_SLICE], np.float32(np.inf))
        out[PER_SLICE - 1 :: PER_SLICE] = np.where(low, up, out[PER_SLICE - 1 :: PER_SLICE])
    return out.tobytes()


def unpack(data: bytes) -> tuple[float, ...]:
    """The floats of `pack` (float64 again: exact)."""
    return tuple(np.frombuffer(data, dtype=WIRE).astype(np.float64).tolist())


def sketch_seed(task_id: str, rnd: int, attempt: int, combined: Sequence[str]) -> bytes:
    """The round's public challenge seed: fixed by every combined slice's cid."""
    h = hashlib.sha256(b"p2pfl sketch v1\0")
    h.update(f"{task_id}\0{rnd}\0{attempt}\0".encode())
    for cid in combined:
        h.update(cid.encode() + b"\0")
    return h.digest()


# Challenge vectors recently made, up to this many bytes: a node sketches its own slices
# and then the combined ones under the same seed, and simulated nodes share a process
# (the first to ask draws a slice's vectors; the others wait for them rather than draw
# them again).
CACHE_BYTES = 64 * 1024 * 1024
# Each entry: a slice's K vectors as the rows of one (K, length) matrix (one pass over a
# slice computes all K inner products), and rmax, the largest |coordinate| of any row.
_Drawn = tuple[np.ndarray, float]
_cache: OrderedDict[tuple[bytes, int, int], _Drawn] = OrderedDict()
_cached = [0]
_lock = threading.Lock()  # slice work runs in worker threads (driver.py)
_drawing: dict[tuple[bytes, int, int], threading.Event] = {}


def challenge(seed: bytes, index: int, m: int, length: int) -> np.ndarray:
    """The m-th challenge vector of slice `index` (float64, uniform on [-sqrt 3, sqrt 3]:
    mean 0, variance 1; read-only)."""
    if not 0 <= m < K:
        raise ValueError(f"challenge {m} of {K}")
    return _challenges(seed, index, length)[0][m]


def _challenges(seed: bytes, index: int, length: int) -> _Drawn:
    """Slice `index`'s K challenge vectors (rows) and rmax (see aggregate_sketch)."""
    key = (seed, index, length)
    while True:
        with _lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
                return hit
            drawing = _drawing.get(key)
            if drawing is None:
                drawing = _drawing[key] = threading.Event()
                break
        drawing.wait()  # another thread draws it; then it is in the cache (or too big)
        with _lock:
            if key not in _cache:
                return _draw(seed, index, length)
    try:
        out = _draw(seed, index, length)
        if out[0].nbytes <= CACHE_BYTES // 4:
            with _lock:
                _cache[key] = out
                _cached[0] += out[0].nbytes
                while _cached[0] > CACHE_BYTES:
                    _cached[0] -= _cache.popitem(last=False)[1][0].nbytes
        return out
    finally:
        with _lock:
            _drawing.pop(key, None)
        drawing.set()


_SQRT3 = float(np.sqrt(3.0))


def _draw(seed: bytes, index: int, length: int) -> _Drawn:
    rows = np.empty((K, length))
    for m in range(K):  # each row from its own seed, sha256(seed|index|m)
        digest = hashlib.sha256(seed + f"|{index}|{m}".encode()).digest()
        gen = np.random.Generator(np.random.SFC64(int.from_bytes(digest, "big")))
        gen.random(out=rows[m])  # [0, 1), then in place to [-sqrt 3, sqrt 3)
    rows *= 2 * _SQRT3
    rows -= _SQRT3
    rows.flags.writeable = False
    # Uniform on [-sqrt 3, sqrt 3): every |coordinate| is below sqrt 3, the bound rmax
    # stands for; the largest drawn one is tighter and costs a pass.
    rmax = float(max(rows.max(), -rows.min())) if length else 0.0
    return rows, rmax


def _flat(piece: Weights) -> tuple[np.ndarray, np.ndarray | float]:
    """A slice's floating-point coordinates as one float64 vector, and each one's
    rounding unit (eps / 2 of its dtype; one number when every tensor has the same dtype,
    as is usual: no second vector, and no copy to join the tensors when there is one).

    Integer and bool tensors (e.g. BatchNorm's step counter) are left out: fedavg rounds
    them, which is not linear, and their rounding slack (0.5 per coordinate) would hide a
    float shift of that size in the same inner product. They are not checked (see
    docs/architecture.md)."""
    values: list[np.ndarray] = []
    units: list[tuple[int, float]] = []  # (coordinates, eps / 2) of each float tensor
    for value in piece.values():
        arr = np.asarray(value).reshape(-1)
        if not np.issubdtype(arr.dtype, np.floating):
            continue
        values.append(arr.astype(np.float64))
        units.append((arr.size, float(np.finfo(arr.dtype).eps) / 2))
    if not values:
        return np.empty(0), np.empty(0)
    flat = values[0] if len(values) == 1 else np.concatenate(values)
    if len({unit for _, unit in units}) == 1:
        return flat, units[0][1]
    return flat, np.concatenate([np.full(n, unit) for n, unit in units])


def _dots(rows: np.ndarray, flat: np.ndarray) -> list[float]:
    """<row, flat> for every row, in float64, in one pass over `flat` and without BLAS:
    OpenBLAS splits a long product over threads that spin while they wait, and next to an
    event loop on a busy core each call then stalled for a scheduler slice (1.3 s of 2 per
    round over 8 hosts in one process)."""
    return [float(x) for x in np.einsum("mi,i->m", rows, flat)]


def sketch(seed: bytes, index: int, piece: Weights) -> tuple[float, ...]:
    """What a participant publishes for its slice `index`: K inner products with the
    challenge vectors, then the slice's L1 norm (all float64); then rmax (see
    aggregate_sketch), which is not published (everyone derives it): K + 2 floats."""
    flat, _ = _flat(piece)
    rows, rmax = _challenges(seed, index, flat.size)
    return (*_dots(rows, flat), float(np.abs(flat).sum()), rmax)


def aggregate_sketch(seed: bytes, index: int, piece: Weights) -> tuple[float, ...]:
    """The combined slice's K inner products; for each m the bound on how far the honest
    cast to the tensors' dtypes may move it; then rmax, the largest |R_j^m[c]| (it bounds
    sum_c |R_c x_c| by rmax * |x|_1): 2K + 1 floats.

    The cast moves coordinate c by at most eps/2 of its dtype times |a_c|, so
    <R^m, a> by at most sum_c |R^m_c| eps_c/2 |a_c| <= rmax sum_c eps_c/2 |a_c|; the
    bound is ROUNDING_MARGIN times that, the same for every m: one pass over the slice
    instead of K more over K vectors of |R| (it is at most sqrt 3 / E|R_c| = 2 times the
    per-vector sum, still at the scale of float32 rounding)."""
    flat, units = _flat(piece)
    rows, rmax = _challenges(seed, index, flat.size)
    # With one dtype its unit (a power of two, as is ROUNDING_MARGIN) scales the sum
    # once instead of every coordinate: the same bits.
    if isinstance(units, float):
        rounding = ROUNDING_MARGIN * units * float(np.abs(flat).sum())
    else:
        rounding = float(np.einsum("i,i->", ROUNDING_MARGIN * units, np.abs(flat)))
    return (*_dots(rows, flat), *[rmax * rounding] * K, rmax)


def rmax_of(checked: Sequence[float]) -> float:
    """rmax from an aggregate_sketch."""
    return float(checked[2 * K])


def tolerance(rounding: float, rmax: float, weighted_norm: float) -> float:
    """How far <R, a_j> may honestly be from sum_i f_i <R, s_ij>.

    `rounding`: the cast of the float64 mean to the model's dtypes (aggregate_sketch: a
    float32 coordinate is rounded by at most 2**-24 of itself; 4x that is allowed).
    The float64 sums (fedavg's accumulation over <= 256 updates, numpy's dot products over
    the slice) are exact to far better than FLOAT64_SLACK of sum_c |R_c| sum_i f_i
    |s_ic|, bounded by rmax * sum_i f_i |s_ij|_1 (`weighted_norm`). The absolute floor
    keeps an all-zero slice checkable. A relative 1e-5 of |R||a| (the first idea) would let
    an owner hide a shift of about sqrt(slice length) * 1e-5 of the slice per coordinate;
    this bound is as tight as float32 rounding allows."""
    return rounding + FLOAT64_SLACK * rmax * weighted_norm + 1e-30


def weights_of(counts: Sequence[float]) -> list[float]:
    """The normalised weights fedavg uses (fl/aggregate.py fedavg): n_i / total, or equal
    weights when every count is 0."""
    total = sum(counts)
    return [c / total for c in counts] if total > 0 else [1.0 / len(counts)] * len(counts)


def slice_fails(
    combined: Sequence[float], contributions: Sequence[tuple[float, Sequence[float]]]
) -> str | None:
    """Why slice j's check fails, or None. `combined`: aggregate_sketch of a_j;
    `contributions`: (f_i, sketch of s_ij) of every included update, in close order."""
    claims = np.asarray([[s[:PER_SLICE] for _, s in contributions]], dtype=np.float64)
    factors = np.asarray([f for f, _ in contributions], dtype=np.float64)
    return slices_fail(np.asarray([combined], dtype=np.float64), claims.swapaxes(0, 1), factors)[0]


def slices_fail(checked: np.ndarray, claims: np.ndarray, factors: np.ndarray) -> list[str | None]:
    """Why each slice's check fails (None: it passes). `checked`: (slices, 2K + 1), the
    aggregate_sketch of each combined slice; `claims`: (participants, slices, PER_SLICE),
    the sketches the check uses; `factors`: each participant's normalised weight.

    Each m: |<R, a_j> - sum_i f_i <R, s_ij>| <= tolerance(), plus ROUNDED times
    sum_i f_i |<R, s_ij>| for the float32 rounding of the published sketches."""
    expected = np.einsum("i,ijm->jm", factors, claims)  # (slices, PER_SLICE)
    magnitude = np.einsum("i,ijm->jm", factors, np.abs(claims))
    out: list[str | None] = []
    for j in range(checked.shape[0]):
        rmax, norm = checked[j, 2 * K], expected[j, K]
        why = None
        for m in range(K):
            got = checked[j, m]
            tol = tolerance(checked[j, K + m], rmax, norm) + ROUNDED * magnitude[j, m]
            diff = abs(got - expected[j, m])
            if not np.isfinite(diff) or not diff <= tol:
                why = (
                    f"<R{m}, slice> is {got:.9g}, the updates' sketches say "
                    f"{expected[j, m]:.9g} (tolerance {tol:.3g})"
                )
                break
        out.append(why)
    return out


def sketch_lies(claimed: Sequence[float], actual: Sequence[float]) -> str | None:
    """Why a participant's published sketch of a slice is not that slice's (`actual`, the
    sketch() recomputed from the slice it signed an offer for, rmax last), or None. A lie big enough to make a
    slice check fail alone is bigger than this tolerance (the check allows the same
    FLOAT64_SLACK term), so an honest owner can always prove it."""
    base = FLOAT64_SLACK * actual[PER_SLICE] * actual[K] + 1e-30
    for m in range(K):
        # Half the check's allowance for the float32 rounding: a lie the check cannot
        # absorb (over ROUNDED |claimed|) is over this too.
        slack = base + ROUNDED / 2 * max(abs(claimed[m]), abs(actual[m]))
        if not abs(claimed[m] - actual[m]) <= slack:
            return f"<R{m}, slice> claimed {claimed[m]:.9g}, the slice gives {actual[m]:.9g}"
    norm, true = claimed[K], actual[K]
    if not true * (1 - 2.0**-30) <= norm <= true * (1 + ROUNDED) + 1e-30:
        return f"L1 norm claimed {norm:.9g}, the slice gives {true:.9g}"
    return None
