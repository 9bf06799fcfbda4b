"""onnxruntime sessions for exported models: CUDA when it really works, CPU otherwise.

Reads one ``model.onnx`` (and its ``model.onnx.data``); writes nothing. A CUDA session is
created with ``session.disable_cpu_ep_fallback=1`` so that onnxruntime cannot quietly run
part (or, when the CUDA libraries fail to load, all) of the graph on CPU while claiming
CUDA. Whether the provider works at all is probed once per process on a one-node graph
(:func:`cuda_unusable`), with onnxruntime's own log of a failed load silenced: the reason is
given once, in quantcal's words. ``provider="auto"`` then runs on CPU with a one-line notice
(a warning of the ``quantcal`` logger); an explicit ``"cuda"`` that cannot run is a
:class:`QuantcalError`; ``"cpu"`` never asks for CUDA. Problems with the model file itself
raise :class:`QuantcalError`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from pathlib import Path

import onnxruntime as ort
from onnx import TensorProto, helper

from quantcal.errors import QuantcalError

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
PROVIDERS = ("auto", "cuda", "cpu")

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_STRICT_REFUSAL = "fallback to CPU EP has been explicitly disabled"
# where a model given as bytes finds its external data (onnxruntime session config key)
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"
_REFUSED = "the CUDA provider failed to load or cannot run every node of the graph"
_ORT_WARNING = 2  # onnxruntime's default log severity (warnings and worse)
log = logging.getLogger(__name__)
_noticed: set[str] = set()  # reasons already given: one notice per process


def _options(strict_cuda: bool, external_folder: Path | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if external_folder is not None:  # a model given as bytes reads its weights from here
        options.add_session_config_entry(EXTERNAL_FOLDER, str(external_folder))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if strict_cuda:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        # the failure is reported by us in one line; onnxruntime's own session log of the
        # same error would only repeat it
        options.log_severity_level = 4
    elif not log.isEnabledFor(logging.DEBUG):
        # errors only (onnxruntime's own log is -v's): its load-time warnings about our own
        # graphs (the optional logits_from input, which has a default) say nothing to do
        options.log_severity_level = 3
    return options


def short_reason(error: BaseException, limit: int = 160) -> str:
    """One line from an onnxruntime exception, without its ``[ONNXRuntimeError]`` prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = _ORT_PREFIX.sub("", text)
    if _STRICT_REFUSAL in text:
        text = _REFUSED
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


@contextlib.contextmanager
def _quiet_onnxruntime():
    """onnxruntime's default logger silenced while a CUDA session is tried: a provider that
    cannot load is reported by quantcal, once (left as it is under ``-v``)."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_WARNING)


def _strict_cuda(model: str | bytes, device_id: int, cuda_graph: bool = False,
                 external_folder: Path | None = None
                 ) -> tuple[ort.InferenceSession | None, str]:
    """A session of ``model`` (a path or serialized bytes, whose external data then lies in
    ``external_folder``) that runs every node on CUDA, or None and why it could not be
    made."""
    if CUDA_EP not in ort.get_available_providers():
        return None, "this onnxruntime build has no CUDA provider"
    try:
        with _quiet_onnxruntime():
            session = ort.InferenceSession(model, _options(True, external_folder),
                                           providers=[(CUDA_EP, {
                                               "device_id": str(device_id),
                                               "enable_cuda_graph": str(int(cuda_graph))})])
    except Exception as error:  # any failure here is a reason to run on CPU instead
        return None, short_reason(error)
    if CUDA_EP not in session.get_providers():
        return None, f"onnxruntime used {session.get_providers()} instead"
    return session, ""


@functools.lru_cache(maxsize=None)
def cuda_unusable(device_id: int = 0) -> str:
    """Why the CUDA provider cannot run on this machine ("" when it can): a one-node graph on
    a strict CUDA session, tried once per process and device."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "probe", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _, reason = _strict_cuda(model.SerializeToString(), device_id)
    if reason == _REFUSED:  # one node that CUDA runs: the provider itself did not load
        reason = ("the CUDA provider failed to load: check the CUDA and cuDNN libraries "
                  "onnxruntime-gpu needs, or run with -v to see onnxruntime's log")
    return reason


def cuda_session(path: Path, device_id: int, cuda_graph: bool = False,
                 model: bytes | None = None) -> tuple[ort.InferenceSession | None, str]:
    """The strict CUDA session, or None and why it could not be made. ``cuda_graph``: let
    the provider capture and replay runs as CUDA graphs (runs then need fixed shapes and
    buffers, or a ``gpu_graph_id`` of -1; see :mod:`quantcal.graphrunner`). ``model``: the
    graph to run instead of the file's (e.g. :func:`quantcal.greedy.greedy_model` of it),
    its weights read from the file's folder."""
    reason = cuda_unusable(device_id)
    if reason:
        return None, reason
    if model is None:
        return _strict_cuda(str(path), device_id, cuda_graph)
    return _strict_cuda(model, device_id, cuda_graph, Path(path).parent)


def cpu_session_of(model: bytes, folder: Path) -> ort.InferenceSession:
    """A CPU session of a serialized graph whose external data lies in ``folder``."""
    return ort.InferenceSession(model, _options(False, folder), providers=[CPU_EP])


def _check_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        raise QuantcalError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")


def _refusal(reason: str) -> QuantcalError:
    """The error for an explicit ``--provider cuda`` that cannot run."""
    return QuantcalError(f"--provider cuda: the CUDA provider cannot run here ({reason}); "
                         "pass --provider cpu, or --provider auto to fall back to CPU")


def _notice_cpu(reason: str) -> None:
    """The one-line notice that ``auto`` runs on CPU, once per reason and process; none for
    an onnxruntime built without CUDA (where CPU is all there is)."""
    if reason in _noticed or CUDA_EP not in ort.get_available_providers():
        return
    _noticed.add(reason)
    log.warning(f"quantcal: CUDA provider unavailable ({reason}); running on CPU")


def resolve_provider(provider: str, device_id: int = 0) -> str:
    """``"cuda"`` or ``"cpu"``, the provider a command should target: ``auto`` is CUDA when
    it works here, else CPU (with :func:`_notice_cpu`).

    Raises:
        QuantcalError: an unknown provider, or ``"cuda"`` where CUDA cannot run.
    """
    _check_provider(provider)
    if provider == "cpu":
        return "cpu"
    reason = cuda_unusable(device_id)
    if not reason:
        return "cuda"
    if provider == "cuda":
        raise _refusal(reason)
    _notice_cpu(reason)
    return "cpu"


def make_session(path: str | os.PathLike, provider: str = "auto", *,
                 device_id: int = 0) -> tuple[ort.InferenceSession, str]:
    """Open an exported model on onnxruntime.

    Args:
        path: the ``model.onnx`` file.
        provider: ``"auto"`` (the CUDA provider when it runs the model, else CPU with a
            one-line notice), ``"cuda"`` (an error when it cannot) or ``"cpu"``.
        device_id: the CUDA device to use.

    Returns:
        The session and the provider it runs on, ``"cuda"`` or ``"cpu"``.
    """
    _check_provider(provider)
    path = Path(path)
    _check_path(path)
    if provider == "cpu":
        return _opened(_cpu_session(path), path, "cpu")
    session, reason = cuda_session(path, device_id)
    if session is not None:
        return _opened(session, path, "cuda")
    if provider == "cuda" and cuda_unusable(device_id):
        raise _refusal(reason)  # the machine, not the model: no need to load it
    cpu = _cpu_session(path)  # raises first when the model itself is broken: no notice then
    if provider == "cuda":
        raise _refusal(reason)
    _notice_cpu(reason)
    return _opened(cpu, path, "cpu")


def _opened(session: ort.InferenceSession, path: Path, provider: str
            ) -> tuple[ort.InferenceSession, str]:
    log.debug(f"quantcal: {path.name} runs on {', '.join(session.get_providers())}")
    return session, provider
