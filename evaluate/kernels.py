"""``quantcal bench kernels``: what one projection costs as onnxruntime runs it.

For each shape (default: the Llama-3.2-1B and Llama-3.1-8B projections, and their q/k/v and
gate/up groups both as separate nodes and fused), each format (fp16 MatMul; MatMulNBits of 4
bits with blocks of 16 to 128 and of 8 bits, symmetric and not) and each layout the provider
has (``plain``; on CUDA also onnxruntime's fpA_intB path: ``fpa_intb`` switched on by the
session config ``ep.cuda.fpa_intb_gemm``, ``prepacked`` / ``prepacked-sm90`` weights in its
layout), it builds the graph (:mod:`quantcal.evaluate.kernelgraphs`), binds ``A`` and the
outputs to device buffers once per M (IO binding) and, on CUDA with a session that takes
``enable_cuda_graph``, replays one captured CUDA graph per M, as decoding does. A sample is
``inner`` runs back to back (no sync between them) over their count; the entry is the median
of ``repeats`` samples. A layout onnxruntime refuses for a format is recorded with its reason
(``unsupported``), not fatal.

The result is a :class:`~quantcal.latency.LatencyTable` (device, onnxruntime version, per
entry the median microseconds) with a bandwidth model fitted to its M = 1 entries (for shapes
it did not measure); its per-block overhead is the shipped table's (a kernel bench cannot see
attention or norms). :func:`bench_kernels` measures; the command writes the JSON
(default: :func:`~quantcal.latency.cache_path`) and prints :func:`format_kernels`.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np
import onnxruntime as ort

from quantcal.errors import QuantcalError
from quantcal.evaluate.kernelgraphs import Shape, kernel_model
from quantcal.latency import (
    DENSE_KERNEL, FPA_INTB, LAYOUTS, MATMUL, NBITS_KERNEL, PLAIN, PREPACKED, PREPACKED_SM90,
    KernelEntry, LatencyModel, LatencyTable, cache_path, default_table, kernel_bytes,
    kernel_name, parse_kernel,
)
from quantcal.rundir import atomic_write_json
from quantcal.session import CPU_EP, CUDA_EP, resolve_provider, short_reason

SHIPPED_MODEL = "the shipped table's model"

# hidden, kv width (kv heads x head dim), MLP width
MODEL_SHAPES = {"llama-3.2-1b": (2048, 512, 8192), "llama-3.1-8b": (4096, 1024, 14336)}
DEFAULT_M = (1, 8, 64, 1024)
DEFAULT_FORMATS = ("fp16",) + tuple(
    kernel_name(4, g, s) for g in (16, 32, 64, 128) for s in (False, True)) + tuple(
    kernel_name(8, g, s) for g in (32, 128) for s in (False, True))
_GRAPH_ID = "gpu_graph_id"
_NO_SYNC = "disable_synchronize_execution_providers"
_FPA_INTB_CONFIG = "ep.cuda.fpa_intb_gemm"


def model_shapes_of(name: str) -> list[Shape]:
    """A model's projections: q (= o), k (= v), gate (= up), down; q,k,v and gate,up as
    separate nodes and fused."""
    if name not in MODEL_SHAPES:
        raise QuantcalError(f"unknown model shape {name!r}; use {', '.join(MODEL_SHAPES)}")
    h, kv, inter = MODEL_SHAPES[name]
    return [Shape((h,), h, label="q, o"), Shape((kv,), h, label="k, v"),
            Shape((inter,), h, label="gate, up"), Shape((h,), inter, label="down"),
            Shape((h, kv, kv), h, False, "q,k,v"), Shape((h, kv, kv), h, True, "qkv"),
            Shape((inter, inter), h, False, "gate,up"),
            Shape((inter, inter), h, True, "gate_up")]


def parse_shape(text: str) -> list[Shape]:
    """``NxK`` (one node) or ``N+N[+N]xK`` (a group: separate nodes and fused)."""
    n_text, sep, k_text = text.strip().lower().rpartition("x")
    try:
        parts, k = tuple(int(p) for p in n_text.split("+")), int(k_text)
    except ValueError:
        parts, k = (), 0
    if not sep or not parts or min(parts) < 1 or k < 1:
        raise QuantcalError(f"--kernel-shape {text!r}: write NxK (e.g. 4096x4096) or a group "
                            "N+N+NxK (e.g. 4096+1024+1024x4096)")
    if len(parts) == 1:
        return [Shape(parts, k)]
    return [Shape(parts, k, False), Shape(parts, k, True)]


def _device(provider: str) -> str:
    if provider == "cuda":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        return "CUDA device"
    import platform

    return platform.processor() or platform.machine() or "CPU"


def available_layouts(provider: str) -> tuple[str, ...]:
    """The layouts worth timing on ``provider``: onnxruntime's fpA_intB path is CUDA's."""
    if provider == "cpu":
        return (MATMUL, PLAIN)
    import torch

    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] == 9
    return (MATMUL, PLAIN, FPA_INTB, PREPACKED) + ((PREPACKED_SM90,) if hopper else ())


def fpa_intb_support() -> list[str]:
    """What this onnxruntime says of its fpA_intB path (for the table's notes)."""
    notes = [f"onnxruntime {ort.__version__}: the fpA_intB path is switched on per session "
             f"by the config entry {_FPA_INTB_CONFIG}=1 (or ORT_FPA_INTB_GEMM=1)"]
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

        schema = next(s for s in get_all_operator_schema() if s.name == "MatMulNBits")
        if "weight_prepacked" in schema.attributes:
            notes.append("MatMulNBits has weight_prepacked: "
                         + schema.attributes["weight_prepacked"].description.strip())
    except (ImportError, StopIteration):
        notes.append("MatMulNBits' schema could not be read")
    try:
        from onnxruntime.quantization.cuda_quantizer import CudaQuantizer

        if hasattr(CudaQuantizer, "matmulnbits_prepacked_blockwise_quantize"):
            notes.append("prepacked weights come from onnxruntime.quantization.cuda_quantizer."
                         "CudaQuantizer.matmulnbits_prepacked_blockwise_quantize")
    except ImportError:
        notes.append("onnxruntime.quantization.cuda_quantizer is missing: no prepacked weights")
    return notes


def _session(model: bytes, provider: str, layout: str, cuda_graph: bool
             ) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if provider == "cpu":
        return ort.InferenceSession(model, options, providers=[CPU_EP])
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_session_config_entry(_FPA_INTB_CONFIG, "1" if layout == FPA_INTB else "0")
    return ort.InferenceSession(model, options, providers=[(CUDA_EP, {
        "device_id": "0", "enable_cuda_graph": str(int(cuda_graph))})])


def _time_m(session: ort.InferenceSession, provider: str, shape: Shape, m: int,
            dtype: np.dtype, graph_id: int | None, repeats: int, inner: int) -> float:
    """Median microseconds of one run at M = ``m``, inputs and outputs bound once."""
    device = "cuda" if provider == "cuda" else "cpu"
    a = np.random.default_rng(m).standard_normal((m, shape.k)).astype(dtype)
    binding = session.io_binding()
    binding.bind_ortvalue_input("A", ort.OrtValue.ortvalue_from_numpy(a, device, 0))
    for i, n in enumerate(shape.outputs):
        binding.bind_ortvalue_output(f"Y{i}", ort.OrtValue.ortvalue_from_shape_and_type(
            [m, n], dtype, device, 0))
    options = ort.RunOptions()
    if graph_id is not None:
        options.add_run_config_entry(_GRAPH_ID, str(graph_id))
    if provider == "cuda":
        options.add_run_config_entry(_NO_SYNC, "1")
    for _ in range(5):  # warm-up, and the graph's capture
        session.run_with_iobinding(binding, options)
    binding.synchronize_outputs()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            session.run_with_iobinding(binding, options)
        binding.synchronize_outputs()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples) * 1e6


def _measure(fmt: str, layout: str, shape: Shape, ms: Iterable[int], provider: str,
             dtype: np.dtype, repeats: int, inner: int) -> list[KernelEntry]:
    """Entries of one (format, layout, shape) at every M, as CUDA-graph replays where the
    session takes them (else plain runs); QuantcalError when onnxruntime refuses it."""
    model = kernel_model(fmt, layout, shape, dtype)
    error: Exception | None = None
    for graphs in ((True, False) if provider == "cuda" else (False,)):
        try:
            session = _session(model, provider, layout, graphs)
            return [KernelEntry(fmt, layout, list(shape.parts), shape.k, m, shape.fused,
                                _time_m(session, provider, shape, m, dtype,
                                        index + 1 if graphs else None, repeats, inner),
                                repeats * inner, graphs) for index, m in enumerate(ms)]
        except Exception as exc:  # onnxruntime's own types: a refused kernel, or the graph
            error = exc
    raise QuantcalError(short_reason(error, 300))


def fit_model(entries: Iterable[KernelEntry], fallback: LatencyModel) -> LatencyModel:
    """``node_us`` and a bandwidth per kernel family, least squares (non-negative) over the
    M = 1 entries of the exported layouts: ``run + nodes x node_us + bytes / bandwidth``,
    where ``run`` (the launch of a one-graph run) is fitted and dropped: a decode step is
    one run of many nodes. A family without data keeps ``fallback``'s bandwidth."""
    from scipy.optimize import nnls

    rows, times = [], []
    for e in entries:
        if e.m != 1 or e.layout not in (PLAIN, MATMUL):
            continue
        nbytes = sum(kernel_bytes(e.format, n, e.k) for n in e.parts)
        dense = parse_kernel(e.format)[0] == 16
        rows.append([1.0, 1 if e.fused else len(e.parts), 0 if dense else nbytes,
                     nbytes if dense else 0])
        times.append(e.median_us)
    if len(rows) < 4:
        return replace(fallback, source=f"{SHIPPED_MODEL} (fewer than 4 M=1 entries of layouts "
                       "plain and matmul to fit one): " + fallback.source)
    coef, _ = nnls(np.array(rows, dtype=np.float64), np.array(times))
    bandwidth = dict(fallback.bandwidth_gb_s)
    for col, family in ((2, NBITS_KERNEL), (3, DENSE_KERNEL)):
        if coef[col] > 0:
            bandwidth[family] = float(1.0 / (coef[col] * 1e3))  # us per byte -> GB/s
    return LatencyModel(bandwidth, float(coef[1]),
                        f"least squares over the {len(rows)} M=1 entries of layouts plain "
                        f"and matmul: {coef[0]:.2f} us per run (dropped) + nodes x node_us + "
                        "bytes / bandwidth; a family without entries keeps the shipped "
                        "table's bandwidth")


def _measure_shapes(fmt, layout, shapes, ms, provider, dtype, repeats, inner, unsupported,
                    bar) -> list[KernelEntry]:
    """Entries of one format and layout over ``shapes``, smallest first: when onnxruntime
    refuses the smallest, the others are not tried (its refusals are of a format, not a
    size); a later refusal is recorded for that shape alone."""
    entries = []
    ordered = sorted(shapes, key=lambda s: sum(s.parts) * s.k)
    for i, shape in enumerate(ordered):
        bar.set_postfix_str(f"{fmt} {layout} {shape.describe()}")
        try:
            entries += _measure(fmt, layout, shape, ms, provider, dtype, repeats, inner)
        except QuantcalError as exc:
            if i == 0:
                unsupported[f"{fmt} {layout}"] = f"{exc} (on {shape.describe()}; no other " \
                                                 "shape tried)"
                bar.update(len(ordered))
                break
            unsupported[f"{fmt} {layout} {shape.describe()}"] = str(exc)
        finally:
            gc.collect()
        bar.update(1)
    return entries


def bench_kernels(shapes: list[Shape], formats: Iterable[str] = DEFAULT_FORMATS,
                  ms: Iterable[int] = DEFAULT_M, layouts: Iterable[str] | None = None, *,
                  provider: str = "auto", repeats: int = 20, inner: int = 10,
                  progress: bool = False) -> LatencyTable:
    """Time every (format, layout, shape) at every M; see the module docstring."""
    from tqdm.auto import tqdm

    formats, ms = [kernel_name(*parse_kernel(f)) for f in formats], list(ms)
    for layout in layouts or ():
        if layout not in LAYOUTS:
            raise QuantcalError(f"unknown layout {layout!r}; use {', '.join(LAYOUTS)}")
    if min(ms, default=0) < 1 or repeats < 1 or inner < 1:
        raise QuantcalError("M, --repeats and inner runs must be at least 1")
    provider = resolve_provider(provider)
    have = available_layouts(provider)
    wanted = list(have if layouts is None else layouts)
    dtype = np.dtype(np.float16 if provider == "cuda" else np.float32)
    entries, unsupported = [], {}
    jobs = [(layout, fmt) for layout in wanted if layout in have for fmt in formats
            if (parse_kernel(fmt)[0] == 16) == (layout == MATMUL)]
    unsupported |= {f"* {layout}": f"not timed on the {provider} provider"
                    for layout in wanted if layout not in have}
    with tqdm(total=len(jobs) * len(shapes), desc="kernels", disable=not progress) as bar:
        for layout, fmt in jobs:
            entries += _measure_shapes(fmt, layout, shapes, ms, provider, dtype, repeats,
                                       inner, unsupported, bar)
    shipped = default_table()
    return LatencyTable(
        device=_device(provider), provider=provider, onnxruntime=ort.__version__,
        activation_dtype=dtype.name, entries=entries,
        model=fit_model(entries, shipped.model), block_overhead_us=shipped.block_overhead_us,
        token_overhead_us=shipped.token_overhead_us,
        overhead_source="copied from the table shipped with quantcal (a kernel bench does not "
                        "time attention, norms or activations): " + shipped.overhead_source,
        source=f"quantcal bench kernels: median of {repeats} samples of {inner} runs back to "
               "back, inputs and outputs bound on the device"
               + (", CUDA graph replay where the session took it" if provider == "cuda" else ""),
        unsupported=unsupported, notes=fpa_intb_support() if provider == "cuda" else [],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def format_kernels(table: LatencyTable) -> str:
    """The table as text: one row per (format, layout, shape), microseconds per M."""
    ms = sorted({e.m for e in table.entries})
    rows: dict[tuple, dict[int, float]] = {}
    for e in table.entries:
        key = (e.format, e.layout, "+".join(map(str, e.parts)), e.k, e.fused)
        rows.setdefault(key, {})[e.m] = e.median_us
    lines = [f"{table.describe()}, {table.activation_dtype} activations; median us per run",
             f"{'format':14} {'layout':14} {'N':>18} {'K':>6} {'fused':>5} "
             + " ".join(f"{'M=' + str(m):>9}" for m in ms)]
    for (fmt, layout, parts, k, fused), by_m in rows.items():
        cells = " ".join(f"{by_m[m]:9.1f}" if m in by_m else f"{'-':>9}" for m in ms)
        lines.append(f"{fmt:14} {layout:14} {parts:>18} {k:6} {'yes' if fused else '':>5} "
                     f"{cells}")
    lines += [f"not measured: {what}: {why}" for what, why in table.unsupported.items()]
    if table.model is not None:
        bw = ", ".join(f"{k} {v:.0f} GB/s" for k, v in table.model.bandwidth_gb_s.items())
        shipped = " (" + SHIPPED_MODEL + ")" if table.model.source.startswith(
            SHIPPED_MODEL) else ""
        lines.append(f"model for other shapes at M=1{shipped}: {table.model.node_us:.2f} us per "
                     f"node + bytes at {bw}")
    return "\n".join(lines + table.notes)



def _comma(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def run_bench_kernels(*, kernel_shapes: Iterable[str] = (), model_shapes: str | None = None,
                      kernel_formats: str | None = None, layouts: str | None = None,
                      m_values: str = "1,8,64,1024", repeats: int = 20,
                      output: str | os.PathLike | None = None, provider: str = "auto",
                      progress: bool = False) -> tuple[LatencyTable, Path]:
    """``quantcal bench kernels``: parse the options, measure, write the table (``output``,
    default the user cache) and return it with its path."""
    shapes = [s for text in kernel_shapes for s in parse_shape(text)]
    if not shapes:
        names = _comma(model_shapes) or list(MODEL_SHAPES)
        shapes = [s for name in names for s in model_shapes_of(name)]
    try:
        ms = [int(m) for m in _comma(m_values) or []]
    except ValueError:
        raise QuantcalError(f"--m {m_values!r}: write whole numbers, e.g. 1,8,64,1024") from None
    if not ms or min(ms) < 1:
        raise QuantcalError(f"--m {m_values!r}: give at least one M of 1 or more")
    table = bench_kernels(shapes, _comma(kernel_formats) or DEFAULT_FORMATS, ms,
                          _comma(layouts), provider=provider, repeats=repeats,
                          progress=progress)
    path = Path(output) if output else cache_path(table.device, table.onnxruntime)
    atomic_write_json(path, table)
    return table, path
