"""The fp16 yardstick of export parity: torch's own fp16 rounding of the same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from quantcal.export.parity import half_deviation


def test_half_deviation_is_small_and_leaves_the_model_alone(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    windows = torch.randint(0, model.config.vocab_size, (2, 16),
                            generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(windows, use_cache=False).logits.float().numpy()
        dev = half_deviation(model, windows, ref)
        again = model(windows, use_cache=False).logits.float().numpy()
    assert 0 < dev < 1e-2 * np.abs(ref).max() + 1e-2  # rounding, not a different model
    assert next(model.parameters()).dtype == torch.float32
    np.testing.assert_array_equal(again, ref)


def test_logits_are_measured_against_float64(tiny_llama_dir, tmp_path):
    """The fp32 graph is compared with the float64 result of the same network, and torch's
    own fp32 distance from it is recorded: where a model amplifies rounding (SmolLM2's
    massive activations: fp32 torch is 0.0027 from float64 at one position, the graph
    0.0034, the two fp32 results 0.0061 apart against a tolerance of 0.0044), comparing
    two fp32 computations fails an export that is as exact as torch."""
    import onnxruntime as ort

    from quantcal.export.builder import save_model
    from quantcal.export.graphs import build_decoder
    from quantcal.export.parity import WINDOW_LEN, WINDOWS, check_parity
    from quantcal.formats import FP16
    from quantcal.models import quantizable_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    formats = {n: FP16() for n in quantizable_layers(model)}
    save_model(build_decoder(model, formats, {}, np.float32).model(), tmp_path / "m.onnx")
    p = check_parity(tmp_path / "m.onnx", model, formats, {}, provider="cpu",
                     dtype=np.float32)
    windows = torch.randint(0, model.config.vocab_size, (WINDOWS, WINDOW_LEN),
                            generator=torch.Generator().manual_seed(1234))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": windows.numpy(),
             "attention_mask": np.ones((WINDOWS, WINDOW_LEN), np.int64),
             "position_ids": np.tile(np.arange(WINDOW_LEN), (WINDOWS, 1)),
             "total_sequence_length": np.array(WINDOW_LEN, np.int32)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((WINDOWS, i.shape[1], 0, i.shape[3]), np.float32)
    got = sess.run(["logits"], feeds)[0].astype(np.float64)
    with torch.inference_mode():
        ref32 = model(windows, use_cache=False).logits.double().numpy()
        ref64 = model.double()(windows, use_cache=False).logits.numpy()
    assert p["logits_max_abs"] == pytest.approx(np.abs(got - ref64).max(), rel=1e-6)
    assert p["logits_vs_fp32_max_abs"] == pytest.approx(np.abs(got - ref32).max(), rel=1e-6)
    assert p["torch_fp32_max_abs"] == pytest.approx(np.abs(ref32 - ref64).max(), rel=1e-6)
    assert 0 < p["torch_fp32_max_abs"] < 1e-5 and p["passed"] == 1.0
