"""How many positions an exported decoder accepts, read from its ONNX file.

The exporters record it in the graph itself: the rotary ``cos_cache`` initializer of the
Llama-style decoder has one row per position (``min(max_position_embeddings,
MAX_CACHE_POSITIONS)``), and GPT-2's learned position table ``transformer.wpe.weight`` one
row per position. Only the graph is read (``load_external_data=False``), never the weights;
nothing is written. Callers turn a request beyond the limit into one line naming the flag.
"""

from __future__ import annotations

import os
from typing import Callable

import onnx

from quantcal.errors import QuantcalError

POSITION_TABLES = ("cos_cache", "transformer.wpe.weight")  # (positions, ...) initializers


def model_positions(path: str | os.PathLike) -> int | None:
    """Positions the exported model at ``path`` accepts; None when the graph does not say
    (not a quantcal export)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a damaged file: the session that opens it says what is wrong
        return None
    for init in model.graph.initializer:
        if init.name in POSITION_TABLES and init.dims:
            return int(init.dims[0])
    return None


def check_fits(path: str | os.PathLike, needed: int, what: str,
               fix: Callable[[int], str]) -> None:
    """Raise one line when ``needed`` positions exceed the model's limit.

    Args:
        path: the exported model.
        needed: positions the request uses (prompt plus generated tokens).
        what: the request in words, e.g. ``"--prompt-len 1024"``.
        fix: given the limit, how to bring the request within it.
    """
    limit = model_positions(path)
    if limit is not None and needed > limit:
        raise QuantcalError(f"{what} needs {needed} positions, but {path} holds "
                            f"{limit}; {fix(limit)}")
