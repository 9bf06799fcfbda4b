"""The fp16 yardstick of export parity: torch's own fp16 rounding of the same model."""

from __future__ import annotations

import numpy as np
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
