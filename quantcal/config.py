"""Strict, versioned configs and the records of the run directory.

Every record is a frozen dataclass deriving from :class:`Strict`: ``from_dict`` rejects
unknown keys and wrong types with a message naming the key, ``to_dict`` gives plain JSON,
and every top-level record carries ``schema_version`` (checked on read). Records hold data
only; reading and writing files is ``quantcal.rundir``'s job.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from quantcal.errors import QuantcalError
from quantcal.formats import DEFAULT_CANDIDATES, BlockQuant, Format, parse_format

SCHEMA_VERSION = 2  # 2: provenance (model_files, files, made_from)

DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert JSON ``value`` to the annotated type ``tp``, or raise naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except QuantcalError as exc:
                errors.append(str(exc))
        raise QuantcalError(errors[0] if errors else f"{where}: unexpected null")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise QuantcalError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)[:1]
        out = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise QuantcalError(f"{where}: expected a table/object, got {type(value).__name__}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Strict):
        return tp.from_dict(value, where=where)
    if isinstance(tp, type) and issubclass(tp, Format):
        try:
            return parse_format(value)
        except QuantcalError as exc:
            raise QuantcalError(f"{where}: {exc}") from None
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise QuantcalError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Strict):
        return value.to_dict()
    if isinstance(value, Format):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Strict:
    """Base of all configs and records: strict ``from_dict``, plain ``to_dict``."""

    versioned: ClassVar[bool] = False

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None):
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise QuantcalError(f"{where}: expected an object, got {type(data).__name__}")
        data = dict(data)
        if cls.versioned:
            version = data.pop("schema_version", None)
            if version != SCHEMA_VERSION:
                raise QuantcalError(
                    f"{where}: schema version {version!r}, but this quantcal reads version "
                    f"{SCHEMA_VERSION}; re-run the stage that wrote it with this quantcal"
                )
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise QuantcalError(
                f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(fields))}"
            )
        missing = [
            n for n, f in fields.items()
            if n not in data and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise QuantcalError(f"{where}: missing key {missing[0]!r}")
        kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION} if self.versioned else {}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out


@dataclass(frozen=True)
class CalibrateConfig(Strict):
    """What ``quantcal calibrate`` was asked to do; stored in ``run.json``."""

    model: str
    revision: str | None = None
    dtype: str = "auto"
    data: str = "c4"
    text_field: str = "text"
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    observer: str = "mse"
    weight_method: str = "aware"
    hessian: bool = False  # block formats by block-by-block sequential GPTQ (calibrate.gptq)
    act_order: bool = False  # GPTQ's columns by descending Hessian diagonal, static groups
    awq: bool = False  # AWQ scales searched and folded into the model first (calibrate.awq)
    sequential: bool = False
    formats: tuple[Format, ...] = DEFAULT_CANDIDATES
    sensitivity: str = "exact"  # exact | fast | none
    sensitivity_samples: int = 32
    trust_remote_code: bool = False  # run code shipped in the model folder (auto_map)

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise QuantcalError(f"--{name.replace('_', '-')} must be at least 1, "
                                    f"got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise QuantcalError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if not _DEVICE.match(self.device):
            raise QuantcalError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.sensitivity not in ("exact", "fast", "none"):
            raise QuantcalError(f"unknown sensitivity {self.sensitivity!r}; use exact or fast")
        if self.sensitivity_samples < 1:
            raise QuantcalError("--sensitivity-samples must be at least 1")
        if self.weight_method not in ("aware", "rtn"):
            raise QuantcalError(f"unknown weight method {self.weight_method!r}; use aware or rtn")
        if not self.formats:
            raise QuantcalError("no candidate formats; name at least one, e.g. int4-g128")
        if self.act_order and not self.hessian:
            raise QuantcalError("--act-order orders GPTQ's columns; it needs --hessian")
        if self.awq and not any(isinstance(f, BlockQuant) for f in self.formats):
            raise QuantcalError("--awq searches scales for a weight-only format; add int4-gN "
                                "or int8 to --formats")


@dataclass(frozen=True)
class LayerInfo(Strict):
    """One quantizable module as found in the model (``kind``: linear, conv1d, embedding)."""

    kind: str
    in_features: int
    out_features: int
    block: int | None = None  # decoder block index; None for embeddings and lm_head


@dataclass(frozen=True)
class DataSource(Strict):
    """The calibration text, exactly: a named corpus (``c4``, ``wikitext2``) or a user's
    path, the split, the local file read (absolute) or the hub's ``load_dataset``
    arguments, the part of a local file the stage reads (documents ``first_doc`` to
    ``first_doc + docs_read``, in the file's order) and the sha256 (16 hex digits) of each
    document whose tokens entered a calibration or held-out window; ``fallback`` says why the
    packaged C4 sample stood in for an unreachable hub."""

    name: str
    split: str = ""
    path: str = ""  # the local file read; "" when read from the hub
    hub: dict[str, Any] = field(default_factory=dict)
    text_field: str = "text"
    first_doc: int = 0
    docs_read: int = 0
    digests: list[str] = field(default_factory=list)
    # why the hub was not used and the C4 sample packaged with quantcal was read ("": it was not)
    fallback: str = ""


@dataclass(frozen=True)
class RunRecord(Strict):
    """``run.json``: the calibration's config, the model's layers, versions and timings."""

    versioned: ClassVar[bool] = True

    config: CalibrateConfig
    layers: dict[str, LayerInfo] = field(default_factory=dict)
    other_param_bytes: int = 0  # fp16 bytes besides the linear layers (embedding table, norms)
    tied_lm_head: bool = False  # the head's weight is the embedding table
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""
    model_files: dict[str, str] = field(default_factory=dict)  # sha256 of config + weights
    files: dict[str, str] = field(default_factory=dict)  # sha256 of stats and qparams written
    data_source: DataSource | None = None  # the calibration text and the documents used


SENSITIVITY_METHODS = ("exact", "fast")


@dataclass(frozen=True)
class SensitivityRecord(Strict):
    """``sensitivity.json``: per layer, the damage of each candidate format.

    ``scores[layer][format]`` is the mean KL (nats/token) of the model's next-token
    distribution from the FP model's when only that layer is quantized (``exact``), or the
    proxy's estimate (``fast``). ``proxy`` holds the fast proxy's scores when both were
    computed, and ``spearman_per_format`` their rank correlation with the exact scores
    across layers, per format (``spearman`` pools all formats, which the format's bits
    alone inflate). ``samples`` held-out windows scored; the plan's KL is measured on
    ``measure_samples`` others.
    """

    versioned: ClassVar[bool] = True

    method: str
    formats: tuple[Format, ...]
    scores: dict[str, dict[str, float]]
    samples: int = 0
    seq_len: int = 0
    proxy: dict[str, dict[str, float]] = field(default_factory=dict)
    spearman: float | None = None  # pooled over formats: inflated by "int4 > int8"
    spearman_per_format: dict[str, float | None] = field(default_factory=dict)  # across layers
    measure_samples: int = 0  # further held-out windows, apart from these, for kl_measured
    timings: dict[str, float] = field(default_factory=dict)
    made_from: dict[str, str] = field(default_factory=dict)  # sha256 of the qparams scored

    def __post_init__(self) -> None:
        if self.method not in SENSITIVITY_METHODS:
            raise QuantcalError(f"unknown sensitivity method {self.method!r}; "
                                f"use {', '.join(SENSITIVITY_METHODS)}")


BUDGET_KINDS = ("target_bits", "max_size", "max_kl", "none")


@dataclass(frozen=True)
class Budget(Strict):
    """The constraint a plan was solved under (``value`` in bits, bytes or nats)."""

    kind: str = "none"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise QuantcalError(f"unknown budget kind {self.kind!r}; use {', '.join(BUDGET_KINDS)}")


@dataclass(frozen=True)
class LayerPlan(Strict):
    """One layer's entry in ``plan.json``; ``reason``: budget, rule or user."""

    format: Format
    bits: float = 0.0
    bytes: int = 0
    score: float | None = None
    reason: str = "user"
    latency_us: float | None = None  # predicted per decode step (a fused node split by share)


@dataclass(frozen=True)
class PlanSpeed(Strict):
    """How ``predicted_tok_s`` was made: one decode step at batch 1 is the planned
    projections (q/k/v and gate/up of a block that share a format as one fused node) plus
    ``blocks`` x the table's block overhead plus its per-token overhead (attention, norms,
    activations, residuals, embedding gather, argmax: everything but the projections)."""

    step_us: float
    layers_us: float
    overhead_us: float
    blocks: int
    fused_groups: int  # groups computed as one node
    groups: int  # groups of layers that could be fused (q/k/v, gate/up per block)
    measured_nodes: int  # nodes whose latency the table measured
    modelled_nodes: int  # nodes its bandwidth model predicted
    table: str  # the table's device, provider and onnxruntime, and where it came from
    min_tok_s: float | None = None  # the latency budget the plan was solved under
    prefer_fusable: float | None = None  # KL (nats/token) given up at most for fused groups


@dataclass(frozen=True)
class Plan(Strict):
    """``plan.json``: a format per layer, the budget, totals; hand-editable."""

    versioned: ClassVar[bool] = True

    model: str
    layers: dict[str, LayerPlan]
    budget: Budget = field(default_factory=Budget)
    totals: dict[str, float] = field(default_factory=dict)
    predicted_size_bytes: int = 0  # the fp16 export (--provider cuda)
    predicted_size_fp32_bytes: int = 0  # the fp32 export (--provider cpu): floats doubled
    kl_predicted: float | None = None  # sum of the layers' scores
    predicted_tok_s: float | None = None  # decode at batch 1, see ``speed``
    kl_measured: float | None = None  # the whole plan applied at once, on held-out windows
    predicted_by: str = "exact"  # the sensitivity summed in kl_predicted: exact (KL) or fast
    score_windows: int = 0  # held-out windows the layers were scored on
    measure_windows: int = 0  # other held-out windows kl_measured was measured on
    made_from: dict[str, str] = field(default_factory=dict)  # sha256 of the qparams planned
    speed: PlanSpeed | None = None  # how predicted_tok_s was made
    # uniform rivals no larger than the mixed plan, measured on the same windows
    # (calibrate/uniform.py): {format or "mixed": {bits_per_weight, size_bytes, kl_measured}}
    uniform: dict[str, dict[str, float]] = field(default_factory=dict)
    choice: str = "mixed"  # "mixed", or "uniform FORMAT" when a rival measured better
