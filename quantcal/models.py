"""Model loading and the model-family table.

A family is a row of data saying where a decoder-only LM keeps its blocks, embeddings,
final norm and head; no subclass per family and no chain of class-name checks. This module
also finds every quantizable module by name (``nn.Linear`` and GPT-2's ``Conv1D``, whose
weight is stored transposed) and resolves devices and dtypes explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantcal.config import LayerInfo
from quantcal.errors import QuantcalError


@dataclass(frozen=True)
class Family:
    """Where the parts of one model family live (dotted module paths). ``embedding`` is the
    token embedding (GPT-2's learned positions, ``wpe``, are not quantizable)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    embedding: str
    final_norm: str
    lm_head: str = "lm_head"


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2"), "model.layers", "model.embed_tokens",
           "model.norm"),
    Family("gpt2", ("gpt2",), "transformer.h", "transformer.wte", "transformer.ln_f"),
)
SUPPORTED = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(model: nn.Module) -> Family:
    """The family row of a loaded HF causal LM, or a QuantcalError naming what works."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise QuantcalError(
        f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
    )


def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def is_quantizable(module: nn.Module) -> bool:
    conv = conv1d_type()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``(N out, K in)``; Conv1D stores ``(K, N)``."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()


def blocks_of(model: nn.Module, family: Family) -> nn.ModuleList:
    return model.get_submodule(family.blocks)


def quantizable_layers(model: nn.Module) -> dict[str, LayerInfo]:
    """Every quantizable module by name, in model order: the token embedding (kind
    ``embedding``, its ``(V, H)`` table as ``out_features=V``, ``in_features=H``), then every
    linear layer.

    ``block`` is the decoder block index; None for the embedding and the head.
    """
    family = family_of(model)
    prefix = family.blocks + "."
    emb = model.get_submodule(family.embedding)
    layers = {family.embedding: LayerInfo("embedding", emb.embedding_dim, emb.num_embeddings)}
    for name, module in model.named_modules():
        if not is_quantizable(module):
            continue
        n, k = weight_matrix(module).shape
        block = int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None
        kind = "linear" if isinstance(module, nn.Linear) else "conv1d"
        layers[name] = LayerInfo(kind, in_features=k, out_features=n, block=block)
    return layers


def max_positions(model: nn.Module) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def resolve_device(spec: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable cuda is an error."""
    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise QuantcalError(f"--device {spec}: no CUDA GPU is available here; use --device cpu")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float16 on CUDA, float32 on CPU."""
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``owner/name`` or ``name``; anything else is meant as a local path."""
    return (Path(name).expanduser().exists() or name.startswith((".", "~", os.sep))
            or name.count("/") > 1 or name.endswith("/"))


def load_model(name: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer from a local folder or the hub, in eval mode.

    Returns:
        ``(model, tokenizer)``; the model is on ``device`` in ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if _looks_like_path(name) and not path.is_dir():
        raise QuantcalError(f"model folder {name} not found; pass a local Hugging Face model "
                            "folder or a hub id such as HuggingFaceTB/SmolLM2-135M")
    source = str(path) if path.is_dir() else name
    if path.is_dir() and not (path / "config.json").is_file():
        raise QuantcalError(f"{name} has no config.json; is it a Hugging Face model folder?")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantcalError(
            f"could not load model {name!r} ({first}); check the id or folder, and for hub ids "
            "your network or HF_HUB_OFFLINE"
        ) from None
    family_of(model)
    return model.to(device).eval(), tokenizer
