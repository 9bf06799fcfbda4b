"""The model families quantcal calibrates and exports exactly: one frozen description each.

A :class:`Family` says where a decoder-only LM keeps its parts (blocks, embedding, final
norm, head, and inside a block its attention and MLP projections and norms), how its block
is wired (norms before and/or after each branch, RMSNorm with ``w`` or ``1 + w``), which
activation, rope and attention extras (sliding window, soft-capping, query scale, per-head
q/k norm) it uses, and which graph builds it. Calibrate reads the paths (quantizable layers,
blocks), export builds the ONNX graph from the description alone, evaluate loads by it.

:func:`check_config` refuses, from ``config.json`` alone (before any weight is read), a
config the exporter cannot represent exactly: an unknown model type (MoE and encoder models
among them), experts, rope types it does not compute, a rotary width GroupQueryAttention
cannot rotate, an activation it cannot emit, bidirectional attention. Each refusal is one
QuantcalError line naming the field and the supported families. Reads nothing but the
config it is given.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from quantcal.errors import QuantcalError


class Graph(enum.Enum):
    """Which ONNX graph builder a family uses."""

    ROTARY = "rotary"  # GroupQueryAttention with rotary inside (Llama and its descendants)
    GPT2 = "gpt2"  # learned positions, fused Conv1D QKV, LayerNorm


class Activation(enum.Enum):
    """MLP activations the exporter emits exactly as HF computes them."""

    SILU = "silu"  # x * sigmoid(x)
    GELU_TANH = "gelu_tanh"  # FastGelu: the tanh approximation (gelu_new, gelu_pytorch_tanh)
    GELU = "gelu"  # Gelu: exact erf
    RELU = "relu"


ACTIVATIONS = {
    "silu": Activation.SILU, "swish": Activation.SILU,
    "gelu_pytorch_tanh": Activation.GELU_TANH, "gelu_new": Activation.GELU_TANH,
    "gelu": Activation.GELU, "relu": Activation.RELU,
}


class Sliding(enum.Enum):
    """Where a family's ``sliding_window`` applies."""

    NONE = "none"  # never (Llama)
    ALL = "all"  # every layer when set (Mistral, Phi-3: HF reads config.sliding_window)
    LAYER_TYPES = "layer_types"  # layers whose config.layer_types[i] is sliding_attention


class NormStyle(enum.Enum):
    RMS = "rms"  # x / rms(x) * w
    RMS_PLUS_ONE = "rms_plus_one"  # x / rms(x) * (1 + w)  (Gemma)
    LAYER = "layer"  # LayerNorm with bias (GPT-2)


@dataclass(frozen=True)
class Attention:
    """Attention projections relative to a block; ``qkv`` names a fused projection (then
    ``q``, ``k``, ``v`` are unused). ``q_norm``/``k_norm``: per-head RMSNorm before rotary."""

    path: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None


@dataclass(frozen=True)
class Mlp:
    """MLP projections relative to a block; ``gate_up`` names a fused gate+up projection
    (gate first, as ``chunk(2)`` splits it)."""

    path: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None


@dataclass(frozen=True)
class Norms:
    """Block norms relative to a block. ``attn_in`` and ``mlp_in`` normalize a branch's
    input; ``attn_out``/``mlp_out`` (Gemma's sandwich) its output before the residual add."""

    attn_in: str = "input_layernorm"
    mlp_in: str = "post_attention_layernorm"
    attn_out: str | None = None
    mlp_out: str | None = None
    style: NormStyle = NormStyle.RMS


@dataclass(frozen=True)
class Family:
    """One model family (dotted module paths from the causal LM). ``embedding`` is the
    token embedding (GPT-2's learned positions, ``wpe``, are not quantizable)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    embedding: str
    final_norm: str
    lm_head: str = "lm_head"
    graph: Graph = Graph.ROTARY
    attention: Attention = Attention()
    mlp: Mlp = Mlp()
    norms: Norms = Norms()
    act_field: str = "hidden_act"  # the config field naming the MLP activation
    gated_mlp: bool = True  # act(gate) * up; else act(fc)
    sliding: Sliding = Sliding.NONE
    scaled_embedding: bool = False  # rows times the module's embed_scale (sqrt(hidden))
    softcaps: bool = False  # attn_logit_softcapping and final_logit_softcapping
    query_pre_attn_scalar: bool = False  # attention scale query_pre_attn_scalar ** -0.5
    rope_per_layer_type: bool = False  # one rope per layer type (Gemma 3: local vs global)
    quantize_embedding: bool = True  # whether plans may quantize the token embedding

    def block(self, i: int) -> str:
        return f"{self.blocks}.{i}"

    def attn(self, i: int, part: str) -> str:
        return f"{self.block(i)}.{self.attention.path}.{part}"

    def mlp_part(self, i: int, part: str) -> str:
        return f"{self.block(i)}.{self.mlp.path}.{part}"

    def norm(self, i: int, part: str) -> str:
        return f"{self.block(i)}.{part}"


_GEMMA_NORMS = Norms(mlp_in="pre_feedforward_layernorm", attn_out="post_attention_layernorm",
                     mlp_out="post_feedforward_layernorm", style=NormStyle.RMS_PLUS_ONE)
_GEMMA = dict(blocks="model.layers", embedding="model.embed_tokens", final_norm="model.norm",
              norms=_GEMMA_NORMS, act_field="hidden_activation", sliding=Sliding.LAYER_TYPES,
              scaled_embedding=True, softcaps=True, query_pre_attn_scalar=True)
_LLAMA = dict(blocks="model.layers", embedding="model.embed_tokens", final_norm="model.norm")

FAMILIES = (
    Family("llama", ("llama",), **_LLAMA),
    Family("mistral", ("mistral",), sliding=Sliding.ALL, **_LLAMA),
    Family("qwen2", ("qwen2",), sliding=Sliding.LAYER_TYPES, **_LLAMA),
    Family("qwen3", ("qwen3",), sliding=Sliding.LAYER_TYPES,
           attention=Attention(q_norm="q_norm", k_norm="k_norm"), **_LLAMA),
    Family("phi3", ("phi3",), sliding=Sliding.ALL, attention=Attention(qkv="qkv_proj"),
           mlp=Mlp(gate_up="gate_up_proj"), **_LLAMA),
    Family("gemma2", ("gemma2",), **_GEMMA),
    Family("gemma3", ("gemma3_text",), rope_per_layer_type=True,
           attention=Attention(q_norm="q_norm", k_norm="k_norm"), **_GEMMA),
    Family("gpt2", ("gpt2",), "transformer.h", "transformer.wte", "transformer.ln_f",
           graph=Graph.GPT2, act_field="activation_function", gated_mlp=False,
           norms=Norms("ln_1", "ln_2", style=NormStyle.LAYER),
           attention=Attention(path="attn", qkv="c_attn", o="c_proj"),
           mlp=Mlp(path="mlp", up="c_fc", down="c_proj")),
)
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED = tuple(BY_MODEL_TYPE)
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")  # static, or switched exactly
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _supported() -> str:
    return "supported families: " + ", ".join(f"{f.name} ({'/'.join(f.model_types)})"
                                              for f in FAMILIES)


def family_for(model_type: str | None) -> Family:
    """The family of ``model_type``, or a QuantcalError naming the supported ones."""
    family = BY_MODEL_TYPE.get(model_type)  # type: ignore[arg-type]
    if family is None:
        raise QuantcalError(f"model_type {model_type!r} is not supported; {_supported()}")
    return family


def activation_of(family: Family, config: Any) -> Activation:
    """The family's MLP activation, read from its config field."""
    name = getattr(config, family.act_field, None)
    act = ACTIVATIONS.get(name)  # type: ignore[arg-type]
    if act is None:
        raise QuantcalError(
            f"{family.act_field}={name!r} in the {family.name} config: the exporter emits "
            f"only {', '.join(ACTIVATIONS)} exactly; {_supported()}")
    return act


def rope_parameters(config: Any) -> list[dict]:
    """Every rope parameter dict of ``config`` (one per layer type for Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in params or "rope_theta" in params:
        return [params]
    return [p for p in params.values() if isinstance(p, dict)]


def check_config(config: Any) -> Family:
    """Refuse a config the exporter cannot represent exactly (one line naming the field);
    returns its family. ``config`` is a transformers config object (weights not needed)."""
    family = family_for(getattr(config, "model_type", None))
    if getattr(config, "is_encoder_decoder", False):
        raise QuantcalError(f"is_encoder_decoder=True: quantcal exports decoder-only "
                            f"models; {_supported()}")
    for field in MOE_FIELDS:
        if getattr(config, field, None):
            raise QuantcalError(f"{field}={getattr(config, field)}: mixture-of-experts models "
                                f"are not supported; {_supported()}")
    if getattr(config, "use_bidirectional_attention", False):
        raise QuantcalError("use_bidirectional_attention=True: the exporter emits causal "
                            f"attention only; {_supported()}")
    activation_of(family, config)
    if family.graph is Graph.ROTARY:
        _check_rope(config)
    for field, exported in (("scale_attn_by_inverse_layer_idx", False),
                            ("scale_attn_weights", True)):
        if family.graph is Graph.GPT2 and getattr(config, field, exported) != exported:
            raise QuantcalError(f"{field}={getattr(config, field)}: the GPT-2 exporter "
                                f"scales attention by 1/sqrt(head_dim) only; {_supported()}")
    return family


def _check_rope(config: Any) -> None:
    for params in rope_parameters(config):
        rope_type = params.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise QuantcalError(
                f"rope_scaling type {rope_type!r}: the exporter computes only "
                f"{', '.join(ROPE_TYPES)} exactly (a 'dynamic' rope changes with the "
                f"sequence length); {_supported()}")
        partial = params.get("partial_rotary_factor",
                             getattr(config, "partial_rotary_factor", None)) or 1.0
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        half = int(head_dim * partial) // 2
        if half % 8:  # onnxruntime's GroupQueryAttention rotates 16k dims (Phi-4-mini: 96)
            raise QuantcalError(
                f"partial_rotary_factor={partial}: {2 * half} rotary dims of {head_dim}; "
                f"GroupQueryAttention rotates a multiple of 16 dims only; {_supported()}")
