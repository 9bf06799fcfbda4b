"""Greedy decoding that stays on the device: the decode graph picks its own next token.

Per greedy step a runner otherwise uploads the new token, its position and the mask, runs the
model, runs an argmax and copies the ids back: five host round trips around one CUDA-graph
replay, during which the GPU waits. :func:`greedy_model` adds to a copy of the exported graph
(its weights read in place from the export's external-data file) the few small nodes that
turn one step's outputs into the next step's inputs:

- ``greedy.next_ids`` (B, S) int64: the argmax of ``logits`` over the vocabulary;
- ``greedy.next_positions`` (B, S) int64: ``position_ids + 1``;
- ``greedy.next_mask`` (B, C) int64: ``greedy.columns <= greedy.next_positions``, with
  ``greedy.columns`` (1, C) = 0..C-1 bound by the runner: the attention mask of an unpadded
  row one token longer (its default, a (1, 1) zero, serves runs that do not read it).

:class:`~quantcal.graphrunner.GraphRunner` binds two sets of these buffers crosswise (a step
reads set 0 and writes set 1, the next step the reverse), each binding captured as its own
CUDA graph: a greedy step is then one graph replay and one copy of B token ids to the host,
nothing uploaded. Only for rows without padding (every mask entry up to the position is 1),
as generation and the benchmarks run; a padded batch takes the general path. The exported
file is not changed: evaluation and onnxruntime-genai see the model as exported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NEXT_IDS = "greedy.next_ids"
NEXT_POSITIONS = "greedy.next_positions"
NEXT_MASK = "greedy.next_mask"
COLUMNS = "greedy.columns"
OUTPUTS = (NEXT_IDS, NEXT_POSITIONS, NEXT_MASK)


def greedy_model(path: str | Path) -> bytes:
    """The exported decoder at ``path`` with the greedy-step nodes and outputs added,
    serialized without its weights (:func:`quantcal.session.cuda_session` loads it with its
    weights read from the export's folder)."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    names = {o.name for o in graph.output} | {i.name for i in graph.input}
    if not {"logits", "position_ids", "attention_mask"} <= names:
        raise ValueError(f"{path} is not a quantcal decoder (logits, position_ids, "
                         "attention_mask)")
    one = numpy_helper.from_array(np.array(1, dtype=np.int64), "greedy.one")
    columns = numpy_helper.from_array(np.zeros((1, 1), dtype=np.int64), COLUMNS)
    graph.initializer.extend([one, columns])
    graph.input.append(helper.make_tensor_value_info(COLUMNS, TensorProto.INT64,
                                                     [1, "greedy_columns"]))
    graph.node.extend([
        helper.make_node("ArgMax", ["logits"], [NEXT_IDS], name="/greedy/ArgMax", axis=-1,
                         keepdims=0),
        helper.make_node("Add", ["position_ids", "greedy.one"], [NEXT_POSITIONS],
                         name="/greedy/Add"),
        helper.make_node("LessOrEqual", [COLUMNS, NEXT_POSITIONS], ["greedy.mask_bool"],
                         name="/greedy/LessOrEqual"),
        helper.make_node("Cast", ["greedy.mask_bool"], [NEXT_MASK], name="/greedy/Cast",
                         to=TensorProto.INT64),
    ])
    for name, dims in ((NEXT_IDS, ["batch", "seq"]), (NEXT_POSITIONS, ["batch", "seq"]),
                       (NEXT_MASK, ["batch", "greedy_mask"])):
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, dims))
    return model.SerializeToString()


def has_greedy_outputs(output_names) -> bool:
    return set(OUTPUTS) <= set(output_names)
