"""An export folder as an onnxruntime-genai model: ``og.Model(folder)`` loads what this writes.

Written into the export's staging folder beside the staged ``NAME.onnx`` (and so promoted
with it in one commit, :mod:`quantcal.txn`):

- ``NAME.genai.onnx``: the verified graph with one change. quantcal's decoder takes
  ``total_sequence_length`` (int32 scalar, P + S) as an input that its runner feeds from
  host memory, so that no node needs the CPU. onnxruntime-genai's decoder state does not
  feed that input: ``model.decoder.inputs.total_sequence_length`` in genai_config.json only
  renames it, and genai fills it for sliding-input (windowed) models alone. This graph
  computes it instead from ``attention_mask``'s width (Shape, Gather, Cast, as genai's own
  builder does), small nodes onnxruntime keeps on the CPU. Every other node and initializer
  is the verified graph's; the weights are not copied: it reads ``NAME.onnx.data``.
- ``genai_config.json``: model type, special token ids, context length, the decoder's
  sizes and its input and output names, session and provider options (the CUDA provider for
  CUDA exports), search defaults from the model's generation config.
- the tokenizer files and chat template found in the source model folder, copied as they are
  (genai's tokenizer reads ``tokenizer.json`` and ``tokenizer_config.json``).

:func:`write_genai_files` returns ``{file: sha256}`` for the export record
(``ExportRecord.genai``). A folder holds one genai model: a second export written into the
same folder (``-o DIR/OTHER.onnx``) points genai_config.json at its own graph.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcal.export.positions import model_positions
from quantcal.families import FAMILIES, family_for
from quantcal.provenance import model_folder, sha256_file

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
TOTAL = "total_sequence_length"
POSITIONS = "position_ids"
# the tokenizer and chat template files a model folder may hold, copied when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")
# genai's model.type per quantcal family. GPT-2 is "decoder" (genai's generic decoder-only
# model): genai's "gpt2" type is its older GPT-2 export with one combined past_%d cache
# tensor per layer, which it refuses quantcal's separate key and value caches for.
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3_text",
               "gpt2": "decoder"}
if {f.name for f in FAMILIES} - set(GENAI_TYPES):  # pragma: no cover - a new family
    raise ImportError("no onnxruntime-genai model type for family "
                      f"{sorted({f.name for f in FAMILIES} - set(GENAI_TYPES))}")
# genai's CUDA provider options: CUDA graphs on, as a user after speed sets them. genai's
# capture failed (CUDA error 906) while the genai graph kept an unread position_ids input,
# which genai then updates every step; the graph drops it (see write_genai_graph).
CUDA_OPTIONS = {"enable_cuda_graph": "1"}
# genai search key <- generation_config attribute, with genai's value when the model says none
_SEARCH = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
           "repetition_penalty": 1.0, "num_beams": 1, "num_return_sequences": 1,
           "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0}


def genai_graph_name(model_name: str) -> str:
    """``NAME.genai.onnx`` for the export ``NAME.onnx``."""
    return model_name.removesuffix(".onnx") + ".genai.onnx"


def write_genai_graph(model_path: Path, out: Path) -> None:
    """Write ``model_path``'s graph with ``total_sequence_length`` computed from the mask.

    Reads the graph only (``load_external_data=False``): the initializers keep pointing at
    ``model_path``'s external data file, which must stay beside ``out``.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    if TOTAL not in {i.name for i in graph.input}:  # pragma: no cover - every decoder has it
        raise ValueError(f"{model_path} has no {TOTAL} input")
    # position_ids goes too where nothing reads it (rotary inside GroupQueryAttention), as
    # in genai's own builder: genai then keeps no position state of its own to update
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.input if i.name != TOTAL
            and (i.name != POSITIONS or POSITIONS in used)]
    del graph.input[:]
    graph.input.extend(kept)
    prefix = "/model/attn_mask/total_sequence_length"
    graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), f"{prefix}/axis"))
    nodes = [  # attention_mask (B, P+S) -> P+S, an int32 scalar
        helper.make_node("Shape", ["attention_mask"], [f"{prefix}/Shape/output_0"],
                         name=f"{prefix}/Shape"),
        helper.make_node("Gather", [f"{prefix}/Shape/output_0", f"{prefix}/axis"],
                         [f"{prefix}/Gather/output_0"], name=f"{prefix}/Gather", axis=0),
        helper.make_node("Cast", [f"{prefix}/Gather/output_0"], [TOTAL],
                         name=f"{prefix}/Cast", to=TensorProto.INT32)]
    for node in reversed(nodes):  # before every consumer: the graph stays sorted
        graph.node.insert(0, node)
    onnx.save_model(model, str(out))
    onnx.checker.check_model(str(out), full_check=False)  # a path: it finds the .data file


def _first(attr: str, *sources: Any) -> Any:
    """The first value of ``attr`` that is not None among ``sources``."""
    for source in sources:
        value = getattr(source, attr, None) if source is not None else None
        if value is not None:
            return value
    return None


def _ids(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def special_tokens(config: Any, generation: Any, tokenizer: Any) -> dict[str, Any]:
    """bos, eos and pad ids for genai: the generation config's, else config.json's, else
    the tokenizer's. The tokenizer's own end token joins the eos list when the configs name
    others (a chat model ends its turn with it), so genai stops where ``quantcal generate``
    does; pad falls back to the first eos id."""
    eos_value = _first("eos_token_id", generation, config, tokenizer)
    eos = [] if eos_value is None else _ids(eos_value)
    own = getattr(tokenizer, "eos_token_id", None)
    if own is not None and int(own) not in eos:
        eos.append(int(own))
    out: dict[str, Any] = {}
    bos = _first("bos_token_id", generation, config, tokenizer)
    if bos is not None:
        out["bos_token_id"] = _ids(bos)[0]
    if eos:
        out["eos_token_id"] = eos
    pad = _first("pad_token_id", generation, config, tokenizer)
    if pad is not None or eos:
        out["pad_token_id"] = _ids(pad)[0] if pad is not None else eos[0]
    return out


def search_defaults(generation: Any, max_length: int) -> dict[str, Any]:
    """genai's ``search`` section: the model's generation config where it says, genai's
    defaults elsewhere; ``max_length`` is the context length (genai allocates the KV cache
    for it, shared by past and present: GroupQueryAttention writes in place)."""
    search = {}
    for key, default in _SEARCH.items():
        value = _first(key, generation)
        search[key] = default if value is None else type(default)(value)
    early = _first("early_stopping", generation)
    search.update(early_stopping=early is True, min_length=0, max_length=max_length,
                  past_present_share_buffer=True)
    return dict(sorted(search.items()))


def _cache_sizes(graph: onnx.GraphProto) -> tuple[int, int, int]:
    """(layers, kv_heads, head_size) from the graph's cache inputs."""
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    dims = past[0].type.tensor_type.shape.dim  # (B, kv_heads, P, head_size)
    return len(past) // 2, dims[1].dim_value, dims[3].dim_value


def genai_config(model_path: Path, graph_name: str, config: Any, generation: Any,
                 tokenizer: Any, provider: str) -> dict[str, Any]:
    """genai_config.json for the staged export ``model_path`` of a model with HF
    ``config``; the decoder's sizes and the context length come from the graph itself."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    layers, kv_heads, head_size = _cache_sizes(graph)
    inputs = {i.name for i in graph.input}
    context = model_positions(model_path) or int(config.max_position_embeddings)
    options: list[dict] = [{"cuda": dict(CUDA_OPTIONS)}] if provider == "cuda" else []
    pasts = {"past_key_names": "past_key_values.%d.key",
             "past_value_names": "past_key_values.%d.value"}
    decoder = {
        "filename": graph_name,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": options},
        "head_size": head_size, "hidden_size": int(config.hidden_size),
        "num_attention_heads": int(config.num_attention_heads),
        "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   **({POSITIONS: POSITIONS} if POSITIONS in inputs else {}), **pasts},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"}}
    model = {"type": GENAI_TYPES[family_for(config.model_type).name], "context_length": context,
             "vocab_size": int(config.vocab_size), "decoder": decoder,
             **special_tokens(config, generation, tokenizer)}
    return {"model": dict(sorted(model.items())), "search": search_defaults(generation, context)}


def copy_tokenizer(source: Path | None, dest: Path) -> list[str]:
    """Copy the tokenizer and chat template files of ``source`` into ``dest``; their names."""
    names = [n for n in TOKENIZER_FILES if source is not None and (source / n).is_file()]
    for name in names:
        shutil.copyfile(source / name, dest / name)
    if not {"tokenizer.json", "tokenizer.model"} & set(names):
        log.warning("quantcal: no tokenizer.json in %s; onnxruntime-genai's tokenizer will "
                    "not load until one is copied beside the export", source)
    return names


def write_genai_files(stage: Path, model_name: str, model: Any, tokenizer: Any,
                      source: str, revision: str | None, provider: str) -> dict[str, str]:
    """Write the genai graph, genai_config.json and the tokenizer files of ``source`` into
    ``stage`` beside the staged ``model_name``.

    Args:
        stage: the export's staging folder, holding ``model_name`` and its ``.data``.
        model_name: the export's file name (``model.onnx`` or ``NAME.onnx``).
        model: the loaded HF model (its ``config`` and ``generation_config`` are read).
        tokenizer: the loaded HF tokenizer (its end token joins the eos ids).
        source: the model's folder or hub id, and ``revision``: where the tokenizer files
            are copied from (the hub cache only; nothing downloads).
        provider: ``cuda`` or ``cpu``, the export's target.

    Returns:
        ``{file: sha256}`` of every file written, for the export record.
    """
    stage = Path(stage)
    graph_name = genai_graph_name(model_name)
    write_genai_graph(stage / model_name, stage / graph_name)
    config = genai_config(stage / graph_name, graph_name, model.config,
                          getattr(model, "generation_config", None), tokenizer, provider)
    (stage / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    names = [graph_name, GENAI_CONFIG, *copy_tokenizer(model_folder(source, revision), stage)]
    return {name: sha256_file(stage / name) for name in names}
