"""What a stage cost: wall time, peak host RAM and peak GPU memory, measured per stage.

Host RAM is the process's resident high-water mark (``VmHWM``), reset when a stage starts
(writing ``5`` to ``/proc/self/clear_refs``), so a stage run after another in one process
reports its own peak; where Linux's ``/proc`` is missing, the process's lifetime peak
(``ru_maxrss``) stands in and the record says so. GPU memory is torch's peak of allocated
tensors on every CUDA device it touched (reset at the start); onnxruntime's own CUDA arena
is not in it.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_host_peak() -> bool:
    """Reset the resident high-water mark to the current RSS; False where it cannot be."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def host_peak_bytes() -> int:
    """The resident high-water mark since the last reset (else since the process began)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _cuda():
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_initialized() else None


def gpu_peak_bytes() -> int:
    """torch's peak allocated bytes, summed over the CUDA devices it has touched."""
    cuda = _cuda()
    if cuda is None:
        return 0
    return sum(cuda.max_memory_allocated(i) for i in range(cuda.device_count()))


_per_stage = [False]  # whether the last start_stage could reset the host peak


def start_stage() -> None:
    """Reset the peaks for a stage starting now."""
    cuda = _cuda()
    if cuda is not None:
        for i in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(i)
    _per_stage[0] = _reset_host_peak()


def peak_figures() -> dict[str, float]:
    """The peaks since :func:`start_stage`, in bytes (and a flag where the host peak can
    only be the process's lifetime one)."""
    return {"peak_host_bytes": float(host_peak_bytes()),
            "peak_gpu_bytes": float(gpu_peak_bytes()),
            **({} if _per_stage[0] else {"peak_host_is_process_lifetime": 1.0})}


def describe(figures: dict[str, float]) -> str:
    """``peak host RAM 1.23 GB, peak GPU memory 0.41 GB (torch)`` from stage figures."""
    host = figures.get("peak_host_bytes")
    if host is None:
        return ""
    text = f"peak host RAM {host / 1e9:.2f} GB"
    if figures.get("peak_host_is_process_lifetime"):
        text += " (process lifetime)"
    gpu = figures.get("peak_gpu_bytes", 0.0)
    return text + (f", peak GPU memory {gpu / 1e9:.2f} GB (torch)" if gpu else "")
