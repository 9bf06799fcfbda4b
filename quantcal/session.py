"""onnxruntime sessions for exported models: CUDA when it really works, CPU otherwise.

Reads one ``model.onnx`` (and its ``model.onnx.data``); writes nothing. A CUDA session is
created with ``session.disable_cpu_ep_fallback=1`` so that onnxruntime cannot quietly run
part (or, when the CUDA libraries fail to load, all) of the graph on CPU while claiming
CUDA. If that strict session cannot be created, the model runs on the CPU provider and one
line on stderr says so; problems with the model file itself raise :class:`QuantcalError`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import onnxruntime as ort

from quantcal.errors import QuantcalError

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
PROVIDERS = ("auto", "cuda", "cpu")

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_STRICT_REFUSAL = "fallback to CPU EP has been explicitly disabled"


def _options(strict_cuda: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if strict_cuda:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        # the failure is reported by us in one line; onnxruntime's own session log of the
        # same error would only repeat it
        options.log_severity_level = 4
    return options


def short_reason(error: BaseException, limit: int = 160) -> str:
    """One line from an onnxruntime exception, without its ``[ONNXRuntimeError]`` prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = _ORT_PREFIX.sub("", text)
    if _STRICT_REFUSAL in text:
        text = "the CUDA provider failed to load or cannot run every node of the graph"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_path(path: Path) -> None:
    if not path.exists():
        raise QuantcalError(f"model file not found: {path}; run `quantcal export` first "
                            "or pass the path of an exported model.onnx")
    if not path.is_file():
        raise QuantcalError(f"model path is not a file: {path}; pass the path of model.onnx")


def _cpu_session(path: Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), _options(strict_cuda=False),
                                    providers=[CPU_EP])
    except Exception as error:  # onnxruntime raises its own pybind exception types
        raise QuantcalError(f"onnxruntime could not load {path}: {short_reason(error)}; "
                            "the file is corrupt or incomplete (is model.onnx.data beside "
                            "it?) - re-run `quantcal export`") from error


def cuda_session(path: Path, device_id: int, cuda_graph: bool = False
                  ) -> tuple[ort.InferenceSession | None, str]:
    """The strict CUDA session, or None and why it could not be made. ``cuda_graph``: let
    the provider capture and replay runs as CUDA graphs (runs then need fixed shapes and
    buffers, or a ``gpu_graph_id`` of -1; see :mod:`quantcal.graphrunner`)."""
    if CUDA_EP not in ort.get_available_providers():
        return None, "this onnxruntime build has no CUDA provider"
    try:
        session = ort.InferenceSession(str(path), _options(strict_cuda=True),
                                       providers=[(CUDA_EP, {
                                           "device_id": str(device_id),
                                           "enable_cuda_graph": str(int(cuda_graph))})])
    except Exception as error:  # any failure here is a reason to run on CPU instead
        return None, short_reason(error)
    if CUDA_EP not in session.get_providers():
        return None, f"onnxruntime used {session.get_providers()} instead"
    return session, ""


def make_session(path: str | os.PathLike, provider: str = "auto", *,
                 device_id: int = 0) -> tuple[ort.InferenceSession, str]:
    """Open an exported model on onnxruntime.

    Args:
        path: the ``model.onnx`` file.
        provider: ``"cuda"`` or ``"auto"`` (try the CUDA provider, fall back to CPU with a
            one-line notice on stderr), or ``"cpu"``.
        device_id: the CUDA device to use.

    Returns:
        The session and the provider it runs on, ``"cuda"`` or ``"cpu"``.
    """
    if provider not in PROVIDERS:
        raise QuantcalError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    path = Path(path)
    _check_path(path)
    if provider == "cpu":
        return _cpu_session(path), "cpu"
    session, reason = cuda_session(path, device_id)
    if session is not None:
        return session, "cuda"
    cpu = _cpu_session(path)  # raises first when the model itself is broken: no notice then
    if provider == "cuda" or CUDA_EP in ort.get_available_providers():
        print(f"quantcal: CUDA provider unavailable ({reason}); running on CPU",
              file=sys.stderr, flush=True)
    return cpu, "cpu"
