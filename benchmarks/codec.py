"""Tensor codec throughput: encode+decode of a ~100 MB float32 state dict, vs. a memcpy.

Prints one JSON line: {"gb_s": ..., "memcpy_gb_s": ..., "ratio": ..., ...}. GB/s counts the
state dict's bytes once per encode+decode round trip; both figures are the best of a few
repetitions measured in the same run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from p2pfl.wire import Json, decode, decode_tensors, encode, encode_tensors, message


@message("bench.offer")
@dataclass(frozen=True, slots=True)
class Offer:
    task_id: str
    params: Json
    peers: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)
    round: int = 0


def small_message_us(n: int = 20000) -> tuple[float, float]:
    """Microseconds per encode and per decode+validate of a typical small message."""
    msg = Offer(
        "task-1234", {"lr": 0.01, "epochs": 2}, ("12D3KooWabc", "12D3KooWdef"), {"a": 0.5}, 3
    )
    data = encode(msg)
    t_enc = best(lambda: [encode(msg) for _ in range(n)], 3) / n
    t_dec = best(lambda: [decode(data) for _ in range(n)], 3) / n
    return t_enc * 1e6, t_dec * 1e6


REPS = 5


def state_dict(total_bytes: int = 100 * 1000 * 1000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # A few big layers and some small ones, like a real model.
    sizes = [0.4, 0.3, 0.2, 0.09]
    out = {
        f"layer{i}.weight": rng.standard_normal(int(total_bytes * f) // 4, np.float32)
        for i, f in enumerate(sizes)
    }
    rest = total_bytes - sum(a.nbytes for a in out.values())
    for i in range(10):
        out[f"layer{i}.bias"] = rng.standard_normal(rest // 40, np.float32)
    return out


def best(fn, reps: int = REPS) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    tensors = state_dict()
    nbytes = sum(a.nbytes for a in tensors.values())

    def round_trip() -> None:
        out = decode_tensors(encode_tensors(tensors))
        assert len(out) == len(tensors)

    flat = np.concatenate([a.ravel() for a in tensors.values()])
    dst = np.empty_like(flat)

    def memcpy() -> None:
        # Fresh destination each time, like encode's fresh buffer (page faults included).
        np.copyto(np.empty_like(flat), flat)

    def memcpy_warm() -> None:
        np.copyto(dst, flat)

    round_trip()  # warm up
    t_codec = best(round_trip)
    t_copy = best(memcpy)
    t_warm = best(memcpy_warm)
    t_enc = best(lambda: encode_tensors(tensors))
    blob = encode_tensors(tensors)
    t_dec = best(lambda: decode_tensors(blob))
    enc_us, dec_us = small_message_us()
    gb = nbytes / 1e9
    print(
        json.dumps(
            {
                "gb_s": round(gb / t_codec, 2),
                "memcpy_gb_s": round(gb / t_copy, 2),
                "ratio": round(t_copy / t_codec, 3),
                "memcpy_warm_gb_s": round(gb / t_warm, 2),
                "encode_gb_s": round(gb / t_enc, 2),
                "decode_gb_s": round(gb / t_dec, 2),
                "mbytes": round(nbytes / 1e6, 1),
                "tensors": len(tensors),
                "small_msg_encode_us": round(enc_us, 2),
                "small_msg_decode_us": round(dec_us, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
