"""Result models on disk: what `p2pfl result TASK --model-out FILE` writes, read back.

A result model is a tensor blob (p2pfl.wire.tensors: named arrays, a small header, raw
little-endian data), the very bytes the network agreed on; its cid is the result's
`model_cid`. Loading checks the layout and refuses NaN/Inf, as a node does.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def load_model(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The named arrays of a result model file, in their stored order (writable copies).

    A torch model takes them with
    ``model.load_state_dict({k: torch.from_numpy(v) for k, v in load_model(path).items()})``.
    Raises OSError if the file cannot be read, ValidationError if it is not a model.
    """
    import numpy as np

    from p2pfl.errors import RemoteProtocolError, ValidationError
    from p2pfl.wire.tensors import decode_tensors

    with open(path, "rb") as fh:
        data = fh.read()
    try:
        tensors = decode_tensors(data)
    except RemoteProtocolError as exc:
        raise ValidationError([f"{os.fspath(path)}: {exc}"], "model file") from None
    return {name: np.array(arr) for name, arr in tensors.items()}
