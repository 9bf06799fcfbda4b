"""A small ONNX graph builder: nodes, initializers, inputs and outputs, deterministic names.

Node names follow the module path (``model.layers.3.mlp.down_proj`` becomes
``/model/layers.3/mlp/down_proj``, as onnxruntime-genai names them), so a plan keyed by
module name maps onto the graph without guessing. Models are written atomically; weights go
to one external-data file beside the model (``model.onnx.data``) so models over 2 GB work.

A builder given an :class:`ExternalData` writes each large initializer to that file the
moment it is added and keeps only its place (offset, length): a whole model's weights are
never in memory at once. The file is laid out exactly as ``onnx.save_model`` lays it out
(initializers of at least :data:`SIZE_THRESHOLD` bytes, in graph order, back to back), so a
streamed model and one saved whole are the same bytes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcal.rundir import atomic_path
from quantcal.runner import SHARED_CACHE_KEY

OPSET = 21
MS_DOMAIN = "com.microsoft"
SIZE_THRESHOLD = 1024  # onnx.save_model's: tensors whose raw data (sys.getsizeof) reaches it


def node_prefix(module_name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``/model/layers.3/mlp/down_proj``."""
    parts: list[str] = []
    for piece in module_name.split("."):
        if piece.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{piece}"
        else:
            parts.append(piece)
    return "/" + "/".join(parts)


def onnx_dtype(dtype: Any) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class ExternalData:
    """The weights file of a model under construction, written as its initializers come.

    Created beside the model's final path as a hidden partial file; :func:`save_model`
    moves it into place. Use as a context manager: a file never handed to ``save_model``
    (a failed build) is removed on exit.
    """

    def __init__(self, model_path: str | os.PathLike):
        model_path = Path(model_path)
        self.location = model_path.name + ".data"  # as the saved model names it
        self.path = model_path.parent / f".{self.location}.partial"
        self._file = open(self.path, "wb")

    def tensor(self, array: np.ndarray, name: str) -> TensorProto:
        """``array`` as the initializer ``name``: when ``onnx.save_model`` would store it
        outside the model, its bytes are appended to the file now and the tensor only
        points at them (its bytes never sit in a proto: protobuf keeps a cleared field's
        memory until the whole message goes); else the tensor holds them."""
        raw = numpy_helper.tobytes_little_endian(array)
        if array.dtype.kind not in "fiub" or sys.getsizeof(raw) < SIZE_THRESHOLD:
            return numpy_helper.from_array(array, name)  # small, or packed by onnx itself
        tensor = TensorProto()
        tensor.dims.extend(array.shape)
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        offset = self._file.tell()
        self._file.write(raw)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset),
                           ("length", len(raw))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return tensor

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "ExternalData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class GraphBuilder:
    """Accumulates a graph; ``dtype`` is the activation dtype (float16 on GPU, float32 CPU);
    ``data``: the weights file large initializers are written to as they come."""

    def __init__(self, dtype: Any = np.float32, data: ExternalData | None = None):
        self.dtype = np.dtype(dtype)
        self.data = data  # where large initializers go as they come (None: kept in memory)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        # layers emitted as one node: {the node's layer name: member layers} (export.fusion)
        self.fused: dict[str, list[str]] = {}

    @property
    def elem_type(self) -> int:
        return onnx_dtype(self.dtype)

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add a constant tensor; returns its name."""
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name}")
        self._names.add(name)
        array = np.ascontiguousarray(array)
        self.initializers.append(numpy_helper.from_array(array, name) if self.data is None
                                 else self.data.tensor(array, name))
        return name

    def const(self, name: str, values: Sequence | np.ndarray, dtype: Any = np.int64) -> str:
        return self.initializer(name, np.asarray(values, dtype=dtype))

    def node(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | int = 1, *,
             name: str, domain: str = "", **attrs: Any) -> list[str]:
        """Add a node named ``name``; ``outputs`` as names or a count (named after the node)."""
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name,
                                           domain=domain or None, **attrs))
        return list(outputs)

    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def model(self, graph_name: str = "quantcal") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs,
                                  self.initializers)
        model = helper.make_model(graph, producer_name="quantcal", opset_imports=[
            helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = 10
        if any(n.op_type == "GroupQueryAttention" for n in self.nodes):
            # its past and present may be one buffer, written in place (see quantcal.runner)
            helper.set_model_props(model, {SHARED_CACHE_KEY: "1"})
        return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike,
               data: ExternalData | None = None) -> None:
    """Write ``model`` with its weights in ``<path>.data``, both atomically.

    Args:
        data: the weights file a streaming builder wrote ``model``'s initializers to
            (:class:`ExternalData` made for ``path``); it becomes ``<path>.data``, and any
            large initializer still in memory is appended to it.
    """
    path = Path(path)
    data_name = path.name + ".data"
    if data is not None and data.location != data_name:
        raise ValueError(f"{data.path} was made for {data.location}, not {data_name}")
    with atomic_path(path.parent / data_name) as tmp_data:
        tmp_data.unlink(missing_ok=True)
        with atomic_path(path) as tmp_model:
            # onnx writes external data relative to the model file: write under the final
            # data file's name into a scratch folder, then move both
            scratch = tmp_model.parent / f".{path.name}.scratch"
            scratch.mkdir(exist_ok=True)
            try:
                if data is not None:
                    data.close()
                    os.replace(data.path, scratch / data_name)
                onnx.save_model(model, scratch / path.name, save_as_external_data=True,
                                all_tensors_to_one_file=True, location=data_name,
                                size_threshold=SIZE_THRESHOLD)
                os.replace(scratch / path.name, tmp_model)
                if (scratch / data_name).exists():
                    os.replace(scratch / data_name, tmp_data)
                else:
                    tmp_data.write_bytes(b"")
            finally:
                for leftover in scratch.iterdir():
                    leftover.unlink()
                scratch.rmdir()
