"""Verifying an exported decoder against torch.

Two checks, on fixed pseudo-random token windows: the logits of a full prefill against the
torch model (which the caller has fake-quantized exactly as the plan says), and greedy
decoding with the KV cache (prefill, then one token per step, feeding ``present`` back as
``past``) against recomputing the whole sequence at every step.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from quantcal.errors import QuantcalError

WINDOWS, WINDOW_LEN, PROMPT_LEN, NEW_TOKENS = 2, 16, 6, 8
HALF_MARGIN = 3.0  # an fp16 graph's logits error, in units of torch's own fp16 error


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

    def run(self, ids: np.ndarray, cache: dict[str, np.ndarray]
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        b, s = ids.shape
        p = next(iter(cache.values())).shape[2]
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, p + s), np.int64),
                 "position_ids": np.tile(np.arange(p, p + s, dtype=np.int64), (b, 1)),
                 "total_sequence_length": np.array(p + s, np.int32), **cache}
        out = dict(zip(self.outputs, self.sess.run(None, feeds)))
        new = {f"past_key_values.{k[len('present.'):]}": v for k, v in out.items()
               if k.startswith("present.")}
        return out["logits"].astype(np.float32), new


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


@torch.inference_mode()
def check_parity(path: Path, model: nn.Module, *, provider: str, dtype) -> dict[str, float]:
    """Figures for ``export.json``: logits error, tolerance, greedy agreement, pass/fail."""
    try:
        sess = _session(path, provider)
        dec = _Decoder(sess)
        g = torch.Generator().manual_seed(1234)
        windows = torch.randint(0, model.config.vocab_size, (WINDOWS, WINDOW_LEN), generator=g)
        onnx_logits, _ = dec.run(windows.numpy(), dec.empty_cache(WINDOWS))
        match, ties, step_err = _greedy(dec, windows[0, :PROMPT_LEN].numpy())
    except (ort.capi.onnxruntime_pybind11_state.NotImplemented,
            ort.capi.onnxruntime_pybind11_state.Fail) as exc:
        raise QuantcalError(
            f"could not run the exported model to verify it ({str(exc).splitlines()[0][:160]}); "
            "an fp16 (--provider cuda) export needs a GPU to verify: export with "
            "--provider cpu on a CPU-only machine") from None
    ref = model(windows, use_cache=False).logits.float().numpy()
    err = float(np.abs(onnx_logits - ref).max())
    scale = float(np.abs(ref).max())
    half = np.dtype(dtype) == np.float16
    figures = {}
    if half:
        # an fp16 graph cannot be closer to the fp32 reference than fp16 rounding allows:
        # the same torch model run in fp16 measures that, and the graph may be off by a
        # small multiple of it (its kernels round in other places)
        figures["torch_fp16_max_abs"] = half_deviation(model, windows, ref)
        tol = max(2e-2 * scale + 1e-2, HALF_MARGIN * figures["torch_fp16_max_abs"])
    else:
        tol = 1e-3 + 1e-4 * scale
    passed = err <= tol and step_err <= tol and match
    return {"logits_max_abs": err, "logits_ref_max": scale, "tolerance": tol,
            "decode_step_max_abs": step_err, "greedy_match": float(match),
            "greedy_near_ties": float(ties), "greedy_tokens": float(NEW_TOKENS),
            **figures, "passed": float(passed)}


def half_deviation(model: nn.Module, windows: torch.Tensor, ref: np.ndarray) -> float:
    """max |logits - ref| of a float16 copy of ``model`` (on CUDA when there is one)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    half = copy.deepcopy(model).half().to(device)
    try:
        out = half(windows.to(device), use_cache=False).logits.float().cpu().numpy()
    finally:
        del half
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return float(np.abs(out - ref).max())
