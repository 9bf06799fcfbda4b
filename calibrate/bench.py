"""``quantcal bench calibrate``: what the statistic hooks cost.

Times a plain forward pass over the calibration batches against the same passes with the
hooks attached (and with X^T X), and reports calibration throughput in tokens/s. Models can
be real (a hub id or folder) or random-weight models of a real shape built from a config
(weights do not change the cost), e.g. ``--shape llama-3.2-1b``.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from quantcal.calibrate.collect import collect_full
from quantcal.errors import QuantcalError
from quantcal.models import quantizable_layers

# public configs of real models, for random-weight benchmarks (no download needed)
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True, head_dim=64),
}


def random_model(shape: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A random-weight causal LM with the architecture of ``shape`` (see ``SHAPES``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise QuantcalError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best-of-``repeats`` wall time of ``fn`` in seconds, synchronised on CUDA."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def bench_calibrate(model: nn.Module, windows: torch.Tensor, *, batch_size: int,
                    device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Plain forward vs the hooked calibration pass over ``windows`` (S, L).

    Each is timed over the first half of the windows and over all of them; the difference
    is the steady-state cost of the extra batches, free of one-time costs (compilation,
    CUDA-graph capture), and gives ``overhead_steady_pct``. Totals over all windows, one-time
    costs included, give ``overhead_pct``.
    """
    layers = quantizable_layers(model)
    modules = {n: model.get_submodule(n) for n, i in layers.items() if i.kind != "embedding"}
    half = windows[: max(batch_size, (windows.shape[0] // (2 * batch_size)) * batch_size)]

    def plain(w: torch.Tensor) -> Callable[[], object]:
        @torch.inference_mode()
        def run() -> None:
            for batch in w.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)
        return run

    def hooked(w: torch.Tensor, hessian: bool) -> Callable[[], object]:
        return lambda: collect_full(model, w, modules, batch_size=batch_size, device=device,
                                    hessian=hessian, progress=False)

    plain(half)()  # warm-up (kernels, allocator, compilation)
    hooked(half, True)()
    out = {"tokens": float(windows.numel()), "layers": float(len(modules))}
    extra = float(windows.numel() - half.numel())
    def plain_graphed(w: torch.Tensor) -> Callable[[], object]:
        # the calibration driver with no modules hooked: the same CUDA-graph replay, so the
        # difference to "hooks" is the statistics alone
        return lambda: collect_full(model, w, {}, batch_size=batch_size, device=device,
                                    progress=False)

    runs = [("plain", plain), ("hooks", lambda w: hooked(w, False)),
            ("hooks_hessian", lambda w: hooked(w, True))]
    if device.type == "cuda":
        runs.insert(1, ("plain_graph", plain_graphed))
    for key, make in runs:
        t_all = _timed(make(windows), device, repeats)
        t_half = _timed(make(half), device, repeats)
        out[f"{key}_s"] = t_all
        out[f"{key}_tok_s"] = windows.numel() / t_all
        out[f"{key}_steady_tok_s"] = extra / max(t_all - t_half, 1e-9)
    for key in ("hooks", "hooks_hessian"):
        name = key.removeprefix("hooks").strip("_") or "stats"
        out[f"overhead_{name}_pct"] = 100.0 * (out[f"{key}_s"] / out["plain_s"] - 1.0)
        out[f"overhead_{name}_steady_pct"] = \
            100.0 * (out["plain_steady_tok_s"] / out[f"{key}_steady_tok_s"] - 1.0)
        if "plain_graph_s" in out:
            out[f"overhead_{name}_vs_graph_steady_pct"] = \
                100.0 * (out["plain_graph_steady_tok_s"] / out[f"{key}_steady_tok_s"] - 1.0)
    return out


def run_bench_calibrate(*, model: str | None, shape: str | None, samples: int, seq_len: int,
                        batch_size: int, device: str, dtype: str, repeats: int = 3
                        ) -> dict[str, float | str]:
    """Load (or build) the model, make random token windows, and time plain vs hooked."""
    from quantcal.models import load_model, resolve_device, resolve_dtype

    if (model is None) == (shape is None):
        raise QuantcalError("bench calibrate needs exactly one of --model or --shape")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if shape is not None:
        net = random_model(shape, dt, dev)
    else:
        net, _ = load_model(model, dtype=dt, device=dev)
    vocab = net.config.vocab_size
    windows = torch.randint(0, vocab, (samples, seq_len),
                            generator=torch.Generator().manual_seed(0))
    out: dict[str, float | str] = {"model": shape or str(model), "device": str(dev),
                                   "dtype": str(dt).removeprefix("torch."),
                                   "samples": samples, "seq_len": seq_len,
                                   "batch_size": batch_size}
    out.update(bench_calibrate(net, windows, batch_size=batch_size, device=dev, repeats=repeats))
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def format_bench(result: dict[str, float | str]) -> str:
    """A short human-readable table of :func:`run_bench_calibrate`'s figures."""
    r = result
    rows = [("plain forward", "plain", None), ("with stat hooks", "hooks", "stats"),
            ("hooks + X^T X", "hooks_hessian", "hessian")]
    if "plain_graph_s" in r:
        rows.insert(1, ("plain, CUDA graph", "plain_graph", None))
    lines = [
        f"model {r['model']} on {r.get('gpu', r['device'])} ({r['dtype']}), "
        f"{r['samples']} x {r['seq_len']} tokens, batch {r['batch_size']}, "
        f"{int(r['layers'])} hooked layers",
        f"  {'':18} {'total s':>9} {'tok/s':>12} {'overhead':>9}   "
        f"{'steady tok/s':>12} {'overhead':>9}",
    ]
    for label, key, over in rows:
        o = f"{r[f'overhead_{over}_pct']:+8.1f}%" if over else f"{'':>9}"
        so = f"{r[f'overhead_{over}_steady_pct']:+8.1f}%" if over else f"{'':>9}"
        lines.append(f"  {label:18} {r[f'{key}_s']:9.3f} {r[f'{key}_tok_s']:12,.0f} {o}   "
                     f"{r[f'{key}_steady_tok_s']:12,.0f} {so}")
    lines.append("  (steady: the cost of the second half of the batches, after one-time "
                 "compilation and CUDA-graph capture)")
    if "plain_graph_s" in r:
        lines.append(f"  statistics alone, steady, against the graphed plain forward: "
                     f"{r['overhead_stats_vs_graph_steady_pct']:+.1f}% "
                     f"(with X^T X {r['overhead_hessian_vs_graph_steady_pct']:+.1f}%)")
    return "\n".join(lines)
