"""Model loading and the quantizable layers of a model of a known family.

Each family is one description in :mod:`quantcal.families` (where a decoder-only LM keeps
its blocks, embeddings, final norm and head, and how the exporter builds it). This module
finds every quantizable module by name (``nn.Linear`` and GPT-2's ``Conv1D``, whose
weight is stored transposed) and resolves devices and dtypes explicitly.

:func:`load_model` reads a model folder or hub id without surprises: it never prompts, runs
code from the folder (``auto_map``) only when told to trust it, loads safetensors only (never
unpickles), and refuses weights holding NaN/Inf, each with one QuantcalError line. With
``low_memory`` the decoder blocks stay in the memory-mapped checkpoint until a forward or
:func:`block_weights` needs them (:mod:`quantcal.lazymodel`), so a model larger than memory
loads.
"""

from __future__ import annotations

import json
import os
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from quantcal.config import LayerInfo
from quantcal.datadir import hub_reachable
from quantcal.errors import QuantcalError
from quantcal.families import FAMILIES, SUPPORTED, Family, check_config, family_for
from quantcal.lazymodel import block_weights, held_blocks, to_device_

__all__ = ["FAMILIES", "SUPPORTED", "Family", "block_index", "block_weights", "family_of",
           "held_blocks", "hub_kwargs", "load_model", "quantizable_layers", "to_device_"]


def family_of(model: nn.Module) -> Family:
    """The family of a loaded HF causal LM, or a QuantcalError naming what works."""
    return family_for(getattr(getattr(model, "config", None), "model_type", None))


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


def block_index(model: nn.Module, name: str) -> int | None:
    """The decoder block module ``name`` lies in; None outside the blocks."""
    prefix = family_of(model).blocks + "."
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def quantizable_layers(model: nn.Module) -> dict[str, LayerInfo]:
    """Every quantizable module by name, in model order: the token embedding (kind
    ``embedding``, its ``(V, H)`` table as ``out_features=V``, ``in_features=H``), then every
    linear layer.

    ``block`` is the decoder block index; None for the embedding and the head.
    """
    family = family_of(model)
    prefix = family.blocks + "."
    emb = model.get_submodule(family.embedding)
    layers = {}
    if family.quantize_embedding:
        layers[family.embedding] = LayerInfo("embedding", emb.embedding_dim, emb.num_embeddings)
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
               device: torch.device | str = "cpu", trust_remote_code: bool = False,
               check_family: bool = True, low_memory: bool = False
               ) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer from a local folder or the hub, in eval mode.

    With ``check_family`` (calibrate, export) the config must describe a model quantcal
    exports exactly (:func:`quantcal.families.check_config`), refused before any weight is
    read; without it (the torch evaluation backend) any ``AutoModelForCausalLM`` loads.

    Never prompts and never unpickles: code shipped with the model (``auto_map``) runs only
    with ``trust_remote_code``, weights load from safetensors only, and a weight or buffer
    holding NaN/Inf is refused by name.

    Args:
        low_memory: leave the decoder blocks in the memory-mapped checkpoint; each is read
            (in ``dtype``, onto ``device``) for its own forward, or while
            :func:`block_weights` / :func:`held_blocks` hold it, and dropped after
            (:mod:`quantcal.lazymodel`). Needs a family quantcal knows and accelerate.

    Returns:
        ``(model, tokenizer)``; the model is on ``device`` in ``dtype``.
    """
    source = _model_source(name)
    hub = hub_kwargs(source)
    check_model_config(_config_dict(source, name, revision, hub), name, trust_remote_code,
                       check_family)
    if Path(source).is_dir():
        _check_folder(Path(source), name, trust_remote_code)
    if low_memory:
        return _load_low_memory(source, name, revision, dtype, torch.device(device),
                                trust_remote_code, hub)
    model, tokenizer = _from_pretrained(source, name, revision, dtype, trust_remote_code, hub)
    if check_family:
        check_config(model.config)  # a folder's own config class (auto_map) decides now
    model = model.to(device).eval()
    check_finite_weights(model, name)
    return model, tokenizer


def _load_low_memory(source: str, name: str, revision: str | None, dtype: torch.dtype,
                     device: torch.device, trust_remote_code: bool, hub: dict
                     ) -> tuple[nn.Module, object]:
    from safetensors import SafetensorError
    from transformers import AutoConfig

    from quantcal.lazymodel import load_lazy

    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise QuantcalError("loading a model block by block needs accelerate: "
                            "pip install accelerate") from None
    try:
        config = AutoConfig.from_pretrained(source, revision=revision,
                                            trust_remote_code=trust_remote_code, **hub)
        check_config(config)
        model = load_lazy(source, config, family_for(config.model_type).blocks,
                          revision=revision, dtype=dtype, device=device,
                          trust_remote_code=trust_remote_code, hub=hub,
                          check=lambda module, prefix: check_finite_weights(module, name,
                                                                            prefix))
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc, hub) from None
    except SafetensorError as exc:
        raise QuantcalError(f"model {name!r} has a damaged weight file ({exc}); re-download or "
                            "re-export it") from None
    return model, _tokenizer(source, name, revision, trust_remote_code, hub)


def _model_source(name: str) -> str:
    """The local folder or hub id to load, or a QuantcalError for a missing folder."""
    path = Path(name).expanduser()
    if _looks_like_path(name) and not path.is_dir():
        raise QuantcalError(f"model folder {name} not found; pass a local Hugging Face model "
                            "folder or a hub id such as HuggingFaceTB/SmolLM2-135M")
    if path.is_dir() and not (path / "config.json").is_file():
        raise QuantcalError(f"{name} has no config.json; is it a Hugging Face model folder?")
    return str(path) if path.is_dir() else name


def hub_kwargs(source: str) -> dict[str, bool]:
    """``{"local_files_only": True}`` for a hub id when the hub cannot be reached: the
    local cache answers at once, where the hub client would retry for up to a minute before
    falling back to it. Empty for a local folder, a reachable hub, or offline mode already
    set (``HF_HUB_OFFLINE``: transformers reads the cache alone then)."""
    from huggingface_hub import is_offline_mode

    if Path(source).is_dir() or is_offline_mode() or hub_reachable():
        return {}
    return {"local_files_only": True}


def config_or_none(source: str):
    """``AutoConfig`` of ``source`` (a folder or a hub id, the cache alone when the hub is
    unreachable), or None when there is none to read (an export folder, an unknown id)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, **hub_kwargs(source))
    except (OSError, ValueError):
        return None


def _config_dict(source: str, name: str, revision: str | None, hub: dict) -> dict:
    """config.json as a plain dict (read, never executed)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(source, revision=revision, **hub)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc, hub) from None
    return config


def _custom_code_error(name: str, where: str) -> QuantcalError:
    return QuantcalError(
        f"model {name!r} needs custom code from the model folder (auto_map in {where}); "
        "quantcal runs it only with --trust-remote-code (pass it only if you trust its source)")


def check_model_config(config: dict, name: str, trust_remote_code: bool = False,
                       check_family: bool = True) -> None:
    """Refuse, before any weight is read, a config that needs code from the model folder
    (unless ``trust_remote_code``), names a model type transformers does not know, or (with
    ``check_family``) one the exporter cannot represent exactly."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config.get("auto_map"):
        if not trust_remote_code:
            raise _custom_code_error(name, "config.json")
        return  # the folder's own config class decides the model type
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise QuantcalError(
            f"model type {model_type!r} of {name!r} is not known to transformers "
            f"{transformers.__version__} and config.json names no custom code (auto_map); "
            f"quantcal supports {', '.join(SUPPORTED)}")
    if check_family:
        family_for(model_type)  # an unsupported type is refused before its config is parsed
        check_config(_config_object(config, name))


def _config_object(config: dict, name: str):
    """The transformers config class's view of ``config`` (rope parameters standardized)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(config["model_type"], **fields)
    except (TypeError, ValueError, KeyError) as exc:
        raise QuantcalError(f"config.json of {name!r} is not valid for its model type "
                            f"({str(exc).splitlines()[0][:160]})") from None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = ("convert it once, in an environment you trust, with "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True)")


def _check_folder(folder: Path, name: str, trust_remote_code: bool) -> None:
    """A local folder must hold ``*.safetensors`` weights (pickle files can run code when
    loaded) and, unless trusted, a tokenizer that needs no code from the folder."""
    tok_cfg = folder / "tokenizer_config.json"
    if not trust_remote_code and tok_cfg.is_file():
        try:
            needs_code = bool(json.loads(tok_cfg.read_text()).get("auto_map"))
        except (ValueError, AttributeError):
            needs_code = False  # transformers words a broken tokenizer config itself
        if needs_code:
            raise _custom_code_error(name, "tokenizer_config.json")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise QuantcalError(
            f"model folder {name} holds only pickle weights ({', '.join(pickles[:3])}); "
            f"quantcal loads safetensors only, since unpickling can run code: {CONVERT_HINT}")
    raise QuantcalError(f"model folder {name} has no weights (no *.safetensors file); "
                        "save the model into it with save_pretrained(dir)")


def _tokenizer(source: str, name: str, revision: str | None, trust_remote_code: bool,
               hub: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, revision=revision,
                                             trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc, hub) from None


def _from_pretrained(source: str, name: str, revision: str | None, dtype: torch.dtype,
                     trust_remote_code: bool, hub: dict) -> tuple[nn.Module, object]:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    # trust_remote_code is always explicit: left None, transformers may ask on stdin
    tokenizer = _tokenizer(source, name, revision, trust_remote_code, hub)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=True, **hub)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc, hub) from None
    except SafetensorError as exc:
        raise QuantcalError(f"model {name!r} has a damaged weight file ({exc}); re-download or "
                            "re-export it") from None
    return model, tokenizer


def _load_error(name: str, exc: Exception, hub: dict) -> QuantcalError:
    """One line for a failed hub/folder load: custom code, missing safetensors, a hub id
    neither cached nor reachable (``hub``: the cache was read alone), or else."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "custom code" in text:
        return _custom_code_error(name, "config.json or tokenizer_config.json")
    if "safetensors" in text and ("no file named" in text or "does not appear" in text):
        return QuantcalError(f"model {name!r} has no safetensors weights; quantcal loads "
                             f"safetensors only, since unpickling can run code: {CONVERT_HINT}")
    if hub.get("local_files_only"):
        return QuantcalError(f"model {name!r} is not in the local Hugging Face cache and the "
                             "hub cannot be reached; connect to the network, or pass a local "
                             "model folder")
    return QuantcalError(
        f"could not load model {name!r} ({first}); check the id or folder, and for hub ids "
        "your network or HF_HUB_OFFLINE")


def check_finite_weights(model: nn.Module, name: str, prefix: str = "") -> None:
    """Refuse a model with a NaN/Inf in any floating parameter or buffer, naming the first
    few (``prefix`` + their name in ``model``, a module of the model). One
    ``isfinite().all()`` per tensor, read back with a single synchronisation; tensors left
    in the checkpoint (meta) are checked when read."""
    tensors = [(prefix + n, t) for n, t in chain(model.named_parameters(),
                                                 model.named_buffers())
               if t.is_floating_point() and not t.is_meta]
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()  # (P,)
    bad = [(n, t) for (n, t), ok in zip(tensors, finite.tolist()) if not ok]
    if not bad:
        return
    listed = ", ".join(f"{n} ({'NaN' if bool(t.isnan().any()) else 'Inf'})" for n, t in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    dtype = bad[0][1].dtype
    half = (f"; or its values overflow {str(dtype).removeprefix('torch.')}: try --dtype float32"
            if dtype in (torch.float16, torch.bfloat16) else "")
    raise QuantcalError(f"model {name!r} has non-finite weights in {listed}{more}: the "
                        f"checkpoint is damaged; re-download or re-export it{half}")
