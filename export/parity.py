"""Verifying an exported decoder against torch.

The torch reference is the model with the plan's fake-quant stand-ins swapped in
(:mod:`quantcal.fakequant`), made one decoder block at a time
(:mod:`quantcal.export.reference`): no copy of the model is made, and a model loaded with
``low_memory`` reads one block at a time. For an fp32 graph it is evaluated in float64 when
a float64 copy of the model would fit :data:`EXACT_BYTES` (the rule of the days when that
copy was made, kept so that the same models get the same check): a model with massive
activations (SmolLM2 has outputs of 2,000 to 25,000 at a few positions) amplifies fp32
rounding there by 10^3 or more, so that two fp32 computations of the same network, summed
in different orders, differ by up to the tolerance; the float64 result is what both should
be close to, and the tolerance rules are unchanged. The fp32 reference's own distance from
float64 is recorded (``torch_fp32_max_abs``) beside the graph's distance from each.

Checks, on fixed pseudo-random tokens: the logits of a full prefill; greedy decoding with
the KV cache (prefill, then one token per step, feeding ``present`` back as ``past``)
against recomputing the whole sequence at every step; a short window after a past
far beyond the original rope length and the sliding window, and a right-padded batch
(:mod:`quantcal.export.parity_batch`); and every planned layer alone, or through the fused
node that serves it (:mod:`quantcal.export.layer_parity`), whose figures name the layer
that disagrees most.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from quantcal.errors import QuantcalError
from quantcal.export.layer_parity import layer_errors, layer_figures, worst_layer
from quantcal.export.parity_batch import far_position_figures, padded_batch_figures
from quantcal.export.reference import fake_quant_reference, tensor_count
from quantcal.formats import Format

WINDOWS, WINDOW_LEN, PROMPT_LEN, NEW_TOKENS = 2, 16, 6, 8
HALF_MARGIN = 3.0  # an fp16 graph's logits error, in units of torch's own fp16 error
EXACT_BYTES = 8 << 30  # largest float64 model (as a copy) checked against float64
CHECKS = ("long_passed", "padded_passed")  # extra checks that must pass when they ran
# a layer's max abs error, relative to its largest output, beyond rounding: a bug (one
# flipped int8 code in a group shows as ~5e-3)
LAYER_DISAGREES = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2}


def _session(path: Path, provider: str) -> ort.InferenceSession:
    from quantcal.session import make_session

    return make_session(path, provider)[0]


class _Decoder:
    """Feeds the graph's inputs: ids, mask, positions and the past cache."""

    def __init__(self, sess: ort.InferenceSession):
        self.sess = sess
        self.past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in sess.get_outputs()]
        first = self.past[0]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.dtype = np.float16 if "float16" in first.type else np.float32

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {i.name: np.zeros(shape, self.dtype) for i in self.past}

    def run(self, ids: np.ndarray, cache: dict[str, np.ndarray],
            mask: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits ``(B, S, V)`` float32 and the new cache; ``mask`` ``(B, S)`` for the new
        tokens (default all ones; right padding only), the past always attended."""
        b, s = ids.shape
        p = next(iter(cache.values())).shape[2]
        new = np.ones((b, s), np.int64) if mask is None else mask
        feeds = {"input_ids": ids,
                 "attention_mask": np.concatenate([np.ones((b, p), np.int64), new], axis=1),
                 "position_ids": np.tile(np.arange(p, p + s, dtype=np.int64), (b, 1)),
                 "total_sequence_length": np.array(p + s, np.int32), **cache}
        out = dict(zip(self.outputs, self.sess.run(None, feeds)))
        present = {f"past_key_values.{k[len('present.'):]}": v for k, v in out.items()
                   if k.startswith("present.")}
        return out["logits"].astype(np.float32), present


def _greedy(dec: _Decoder, prompt: np.ndarray) -> tuple[bool, int, float]:
    """Greedy decoding with the cache against recomputing the whole sequence at each step.

    Both paths condition on the same tokens (the cached path's), so every step is compared
    on its own. A step agrees when the two argmaxes are equal, or when they are a near-tie
    in the recomputed logits: closer than twice that step's logit difference, which is
    rounding (fp16 on random weights), not a cache error. Returns (agree, near ties,
    max |logit difference|).
    """
    logits, cache = dec.run(prompt[None], dec.empty_cache(1))
    seq, worst, ties, agree = list(prompt), 0.0, 0, True
    for _ in range(NEW_TOKENS):
        full, _ = dec.run(np.array([seq], np.int64), dec.empty_cache(1))
        step, ref = logits[0, -1], full[0, -1]
        diff = float(np.abs(ref - step).max())
        worst = max(worst, diff)
        token, ref_token = int(step.argmax()), int(ref.argmax())
        if token != ref_token:
            tie = ref[ref_token] - ref[token] <= 2 * diff
            ties += int(tie)
            agree = agree and bool(tie)
        seq.append(token)
        logits, cache = dec.run(np.array([[token]], np.int64), cache)
    return agree, ties, worst


def _tolerance(half: bool, fp16_err: float | None) -> Callable[[np.ndarray], float]:
    """The export's rule: fp32 ``1e-3 + 1e-4 * max|ref|``; fp16 ``2e-2 * max|ref| + 1e-2``
    or :data:`HALF_MARGIN` times torch's own fp16 error, whichever is larger."""
    def tol(ref: np.ndarray) -> float:
        scale = float(np.abs(ref).max())
        if half:
            return max(2e-2 * scale + 1e-2, HALF_MARGIN * (fp16_err or 0.0))
        return 1e-3 + 1e-4 * scale
    return tol


def _run_checked(fn, *args, **kwargs):
    """``fn(...)``, an onnxruntime failure turned into one line that says what to do."""
    try:
        return fn(*args, **kwargs)
    except (ort.capi.onnxruntime_pybind11_state.NotImplemented,
            ort.capi.onnxruntime_pybind11_state.Fail) as exc:
        raise QuantcalError(
            f"could not run the exported model to verify it ({str(exc).splitlines()[0][:160]}); "
            "an fp16 (--provider cuda) export needs a GPU to verify: export with "
            "--provider cpu on a CPU-only machine") from None


def _prefill_figures(dec: _Decoder, model: nn.Module, reference: Callable,
                     windows: torch.Tensor, half: bool
                     ) -> tuple[dict[str, float], Callable, bool]:
    """Logits of a full prefill against torch (float64 when the model is small enough),
    greedy decoding with the cache against recomputation; returns the figures, the
    tolerance rule and whether the reference is float64. ``reference(dtype=...)``: the
    fake-quant model's context (:func:`fake_quant_reference` of ``model``)."""
    onnx_logits, _ = dec.run(windows.numpy(), dec.empty_cache(WINDOWS))
    match, ties, step_err = _greedy(dec, windows[0, :PROMPT_LEN].numpy())
    with reference():
        ref32 = model(windows, use_cache=False).logits.double().numpy()
        exact = not half and 8 * tensor_count(model) <= EXACT_BYTES
    ref, figures = ref32, {}
    if exact:
        with reference(dtype=torch.float64):
            ref = model(windows, use_cache=False).logits.numpy()
        figures["torch_fp32_max_abs"] = float(np.abs(ref32 - ref).max())
        figures["logits_vs_fp32_max_abs"] = float(np.abs(onnx_logits - ref32).max())
    if half:
        # an fp16 graph cannot be closer to the fp32 reference than fp16 rounding allows:
        # the same torch model run in fp16 measures that, and the graph may be off by a
        # small multiple of it (its kernels round in other places)
        figures["torch_fp16_max_abs"] = half_deviation(model, windows, ref,
                                                       reference=reference)
    rule = _tolerance(half, figures.get("torch_fp16_max_abs"))
    err = float(np.abs(onnx_logits - ref).max())
    return {"logits_max_abs": err, "logits_ref_max": float(np.abs(ref).max()),
            "tolerance": rule(ref), "decode_step_max_abs": step_err,
            "greedy_match": float(match), "greedy_near_ties": float(ties),
            "greedy_tokens": float(NEW_TOKENS), **figures}, rule, exact


@torch.inference_mode()
def check_parity(path: Path, model: nn.Module, formats: Mapping[str, Format],
                 qparams: Mapping[str, torch.Tensor], *, provider: str, dtype,
                 fused: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """Figures for ``export.json``: logits errors and tolerances of every check, greedy
    agreement, per-layer errors and the worst layer, pass/fail.

    Args:
        model: the float32 torch model, unquantized (the plan's stand-ins are swapped in
            here, a block at a time, and out again before returning); loaded whole, or
            with ``low_memory``.
        formats, qparams: the plan's formats and the run's qparams.
        fused: ``{fused name: member layers}`` the graph emits as one node each (its
            builder's ``fused``); each member is checked through that node.
    """
    sess = _run_checked(_session, path, provider)
    dec = _Decoder(sess)
    half = np.dtype(dtype) == np.float16
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    windows = torch.randint(0, vocab, (WINDOWS, WINDOW_LEN), generator=g)
    reference = partial(fake_quant_reference, model, formats, qparams)
    figures, rule, exact = _run_checked(_prefill_figures, dec, model, reference, windows,
                                        half)
    with reference(dtype=torch.float64 if exact else None):
        figures.update(_run_checked(far_position_figures, dec, model, windows, rule,
                                    dtype=torch.float64 if exact else None))
        figures.update(_run_checked(padded_batch_figures, dec, model, rule))
    errors = _run_checked(layer_errors, model, formats, qparams, windows[:1],
                          dtype=np.dtype(dtype), provider=provider, fused=fused)
    figures.update(layer_figures(errors))
    figures["layer_rel_tolerance"] = LAYER_DISAGREES[np.dtype(dtype)]
    passed = (figures["logits_max_abs"] <= figures["tolerance"]
              and figures["decode_step_max_abs"] <= figures["tolerance"]
              and figures["greedy_match"] == 1.0
              and all(figures.get(k, 1.0) == 1.0 for k in CHECKS))
    return {**figures, "passed": float(passed)}


def _g(v: float | None) -> str:
    return "non-finite" if v is None else f"{v:.3g}"


def failure_detail(figures: Mapping[str, float | None], formats: Mapping[str, str]) -> str:
    """What a failed export's message adds to the logits figures: the extra checks that
    failed, and the planned layer that disagrees with torch (or that none does).

    Args:
        figures: the ``parity`` of ``export.json``.
        formats: format name per planned layer.
    """
    parts = []
    if figures.get("long_passed") == 0.0:
        parts.append(f"after a past of {figures.get('long_past_length'):.0f} positions "
                     f"the logits are {_g(figures.get('long_logits_max_abs'))} off "
                     f"(tolerance {_g(figures.get('long_tolerance'))})")
    if figures.get("padded_passed") == 0.0:
        parts.append(f"a right-padded batch is {_g(figures.get('padded_logits_max_abs'))} off "
                     f"its rows run alone (tolerance {_g(figures.get('padded_tolerance'))})")
    worst = worst_layer(figures)
    if worst is not None:
        name, err = worst
        rel = figures.get("worst_layer_rel")
        label = f"{name} ({formats.get(name, 'fp16')})"
        if rel is None or rel > figures.get("layer_rel_tolerance", 1e-4):
            parts.append(f"layer {label} disagrees: {_g(err)} vs torch "
                         f"({_g(rel)} of its largest output)")
        else:
            own = figures.get("torch_fp32_max_abs")
            parts.append(
                f"every planned layer agrees with torch on its own (worst {label}, "
                f"{_g(rel)} of its largest output), so the difference comes from outside "
                "them (attention, norms, positions)"
                + ("" if own is None else f" or from the model amplifying rounding (torch's "
                                          f"own fp32 logits are {_g(own)} from float64)"))
    return "".join(f"; {p}" for p in parts)


def half_deviation(model: nn.Module, windows: torch.Tensor, ref: np.ndarray, *,
                   reference: Callable | None = None) -> float:
    """max |logits - ref| of ``model`` in float16 (on CUDA when there is one), converted a
    block at a time as ``.half()`` would convert a copy of it.

    Args:
        reference: ``reference(dtype=..., device=...)``, the context that makes ``model``
            the plan's fake-quant model (:func:`fake_quant_reference`); None: ``model``
            as it is (stand-ins already swapped in, or none).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = reference or partial(fake_quant_reference, model, {}, {})
    try:
        with reference(dtype=torch.float16, device=device):
            out = model(windows.to(device), use_cache=False).logits.float().cpu().numpy()
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return float(np.abs(out - ref).max())
